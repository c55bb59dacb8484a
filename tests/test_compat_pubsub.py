"""Canaries for ``modelnet_p2p/p2p/_compat/pubsub.py``: stock py-libp2p 0.8.1 pubsub still behaves so.

The ``test_stock_*`` tests assert the upstream behaviour each shim corrects; when one fails,
upstream has changed: check whether the shim is still needed, and drop it (and its canary) if
not. The other tests check that the shim corrects it. A few behaviours can only be reached
through a whole running mesh; their canaries read the upstream source instead, and say so.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.validators import signature_validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

from modelnet_p2p.errors import ConfigError
from modelnet_p2p.p2p._compat.pubsub import (
    PUBSUB_PROTOCOLS,
    READ_CHUNK,
    BufferedReads,
    GuardedPubsub,
    LeanGossipSub,
    announce_subscription,
    build_pubsub,
    build_router,
    registered_pubsub_protocols,
    stop_pubsub,
    trim_delivery_log,
)
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.pubsub import Gossip, GossipSettings

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
TOPIC = "/modelnet-test/compat/1"


def stock_router(**kwargs: Any) -> GossipSub:
    return GossipSub(list(PUBSUB_PROTOCOLS), 6, 4, 12, **kwargs)


def lean_router() -> LeanGossipSub:
    return build_router(
        degree=6, degree_low=4, degree_high=12, heartbeat_interval=1, max_messages_per_topic_per_second=100
    )


def guarded(host: Any, router: GossipSub) -> GuardedPubsub:
    pubsub, _ = build_pubsub(
        host, router, stream_setup_timeout=5, on_write=lambda n: None, on_dropped=lambda: None
    )
    return pubsub


class FakeStream:
    """A stream that serves ``data`` and records the size of every read."""

    def __init__(self, data: bytes = b"", error: BaseException | None = None) -> None:
        self.data = data
        self.error = error
        self.reads: list[int | None] = []
        self.was_reset = False
        self.muxed_conn = type("Conn", (), {"peer_id": ID(Identity.generate().peer_id.to_bytes())})()

    async def read(self, n: int | None = None) -> bytes:
        self.reads.append(n)
        if self.error is not None:
            raise self.error
        n = len(self.data) if n is None else n
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def reset(self) -> None:
        self.was_reset = True


# -- reads ----------------------------------------------------------------------------------


async def test_stock_reader_reads_the_length_one_byte_at_a_time() -> None:
    stream = FakeStream(encode_uvarint(300) + b"x" * 300)
    assert await read_varint_prefixed_bytes_limited(stream, 1000) == b"x" * 300  # type: ignore[arg-type]
    assert stream.reads[:2] == [1, 1]  # two varint bytes, one read (and one WINDOW_UPDATE) each


async def test_buffered_reads_serve_small_reads_from_one_large_one() -> None:
    stream = FakeStream(encode_uvarint(300) + b"x" * 300)
    buffered = BufferedReads(stream)  # type: ignore[arg-type]
    assert await read_varint_prefixed_bytes_limited(buffered, 1000) == b"x" * 300  # type: ignore[arg-type]
    assert stream.reads == [READ_CHUNK]
    assert buffered.muxed_conn is stream.muxed_conn  # everything else is the stream's


# -- malformed input and failing handlers -------------------------------------------------


def garbage_message(topic: str = TOPIC) -> rpc_pb2.Message:
    """A message on ``topic`` whose ``key`` is garbage and whose ``from`` is no peer id."""
    return rpc_pb2.Message(
        data=b"x",
        topicIDs=[topic],
        from_id=b"not-a-peer-id",
        seqno=b"\x00" * 8,
        signature=b"s" * 64,
        key=b"\x01\x02junk",
    )


def test_stock_signature_check_raises_on_a_malformed_message() -> None:
    """In ``push_msg`` (a service task) this stops the whole pubsub service."""
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises, it must not
        signature_validator(garbage_message())


async def test_stock_push_msg_raises_and_guarded_drops() -> None:
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    stock.set_topic_validator(TOPIC, lambda f, m: True, is_async_validator=False)
    with pytest.raises(Exception):  # noqa: B017
        await stock.push_msg(host.get_id(), garbage_message())
    stop_stock(stock)
    dropped: list[int] = []
    host2 = build_host(Identity.generate())
    pubsub, _ = build_pubsub(
        host2,
        lean_router(),
        stream_setup_timeout=5,
        on_write=lambda n: None,
        on_dropped=lambda: dropped.append(1),
    )
    await pubsub.push_msg(host2.get_id(), garbage_message())
    assert dropped == [1]
    pubsub.seen_messages.stop()


def stop_stock(pubsub: Pubsub) -> None:
    pubsub.seen_messages.stop()


async def test_stock_stream_handler_lets_unexpected_errors_escape() -> None:
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    async with background_trio_service(stock):
        stream = FakeStream(error=RuntimeError("surprise"))
        with pytest.raises(RuntimeError):
            await stock.stream_handler(stream)  # type: ignore[arg-type]
        assert not stream.was_reset
    stop_stock(stock)
    host2 = build_host(Identity.generate())
    pubsub = guarded(host2, lean_router())
    async with background_trio_service(pubsub):
        stream = FakeStream(error=RuntimeError("surprise"))
        await pubsub.stream_handler(stream)  # type: ignore[arg-type]
        assert stream.was_reset
    pubsub.seen_messages.stop()


async def test_stock_stream_handler_leaves_a_stream_open_once_stopped() -> None:
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    async with background_trio_service(stock):
        pass
    stream = FakeStream(encode_uvarint(2) + b"\x00\x00")
    await stock.stream_handler(stream)  # type: ignore[arg-type]
    assert not stream.was_reset
    stop_stock(stock)
    host2 = build_host(Identity.generate())
    pubsub = guarded(host2, lean_router())
    async with background_trio_service(pubsub):
        pass
    stream = FakeStream(encode_uvarint(2) + b"\x00\x00")
    await pubsub.stream_handler(stream)  # type: ignore[arg-type]
    assert stream.was_reset
    pubsub.seen_messages.stop()


# -- registration ---------------------------------------------------------------------------


class SlowFailingHost:
    """Stands in for the host in ``_handle_new_peer``: new_stream takes a while, then fails."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0

    async def new_stream(self, peer_id: ID, protocols: Any) -> Any:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await trio.sleep(0.01)
        self.in_flight -= 1
        raise SwarmException("no")


@pytest.mark.parametrize("kind", ["stock", "guarded"])
async def test_registration_checks_before_an_await_and_registers_after(kind: str) -> None:
    host = build_host(Identity.generate())
    pubsub = Pubsub(host, stock_router()) if kind == "stock" else guarded(host, lean_router())
    fake = SlowFailingHost()
    pubsub.host = fake  # type: ignore[assignment]
    peer = Identity.generate().peer_id

    async def register() -> None:
        with pytest.raises(SwarmException):
            await pubsub._handle_new_peer(peer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(register)
        nursery.start_soon(register)
    # Stock: both pass the "already registered?" check, so both open a stream.
    assert fake.most_in_flight == (2 if kind == "stock" else 1)
    pubsub.seen_messages.stop()


async def test_stock_pubsub_ignores_connections_made_before_it_started() -> None:
    a, b = build_host(Identity.generate()), build_host(Identity.generate())
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK):
        await a.connect(_info(b))
        stock = [Pubsub(h, stock_router(heartbeat_interval=1)) for h in (a, b)]
        async with background_trio_service(stock[0]), background_trio_service(stock[1]):
            await stock[0].subscribe(TOPIC)
            await stock[1].subscribe(TOPIC)
            await trio.sleep(0.3)
            assert not stock[0].peers and not stock[1].peers  # nobody opened a stream
        for s in stock:
            s.seen_messages.stop()


def _info(host: Any) -> Any:
    from libp2p.peer.peerinfo import PeerInfo

    return PeerInfo(host.get_id(), host.get_addrs())


async def test_gossip_attaches_connections_made_before_it_started() -> None:
    a, b = build_host(Identity.generate()), build_host(Identity.generate())
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK):
        await a.connect(_info(b))
        gossips = [Gossip(h) for h in (a, b)]
        for g in gossips:
            g.join(TOPIC, lambda m: True)
        async with trio.open_nursery() as nursery:
            for g in gossips:
                await nursery.start(g.run)
            with trio.fail_after(10):
                while not all(g.neighbours(TOPIC) for g in gossips):
                    await trio.sleep(0.02)
            assert gossips[0].peers() == {str(b.get_id())}
            nursery.cancel_scope.cancel()


async def test_stock_pubsub_opens_a_stream_to_every_peer_while_subscribed_to_nothing() -> None:
    """Shim: GuardedPubsub(lazy=True)."""
    a, b = build_host(Identity.generate()), build_host(Identity.generate())
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK):
        stock = [Pubsub(h, stock_router(heartbeat_interval=1)) for h in (a, b)]
        async with background_trio_service(stock[0]), background_trio_service(stock[1]):
            await stock[0].wait_until_ready()
            await stock[1].wait_until_ready()
            await a.connect(_info(b))
            with trio.fail_after(10):  # both ways, though neither has anything to say
                while not (stock[0].peers and stock[1].peers):
                    await trio.sleep(0.02)
        for s in stock:
            s.seen_messages.stop()


async def test_lazy_gossip_opens_its_stream_once_it_subscribes() -> None:
    a, b = build_host(Identity.generate()), build_host(Identity.generate())
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK):
        ga, gb = Gossip(a), Gossip(b)
        assert ga.settings.lazy_streams
        async with trio.open_nursery() as nursery:
            await nursery.start(ga.run)
            await nursery.start(gb.run)
            await a.connect(_info(b))
            with trio.fail_after(10):  # each side saw the new connection and opened nothing
                while not (ga.deferred_streams() and gb.deferred_streams()):
                    await trio.sleep(0.02)
            assert ga.peers() == gb.peers() == frozenset()
            gb.join(TOPIC, lambda m: True)  # b's first topic: b opens its stream to a, and says so
            with trio.fail_after(10):
                while not ga.neighbours(TOPIC):
                    await trio.sleep(0.02)
            assert gb.peers() == {str(a.get_id())} and ga.peers() == frozenset()
            ga.join(TOPIC, lambda m: True)  # and a opens its own: a mesh forms, messages flow
            with trio.fail_after(10):
                while not (gb.neighbours(TOPIC) and ga.mesh_size(TOPIC) and gb.mesh_size(TOPIC)):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()


async def test_a_subscribed_dialer_waits_for_the_listener_to_speak_first() -> None:
    """A subscribed peer opens no stream to a peer it dialed until that peer opens one."""
    a, b, c = (build_host(Identity.generate()) for _ in range(3))
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK), running_host(c, LOOPBACK):
        ga, gb, gc = Gossip(a), Gossip(b), Gossip(c)
        ga.join(TOPIC, lambda m: True)
        gc.join(TOPIC, lambda m: True)
        async with trio.open_nursery() as nursery:
            for g in (ga, gb, gc):
                await nursery.start(g.run)
            await a.connect(_info(b))  # b subscribes to nothing: nobody speaks
            with trio.fail_after(10):
                while not (ga.awaited_streams() and gb.deferred_streams()):
                    await trio.sleep(0.02)
            assert ga.peers() == gb.peers() == frozenset()
            await a.connect(_info(c))  # c subscribes: c speaks first, and a answers
            with trio.fail_after(10):
                while not (ga.mesh_size(TOPIC) and gc.mesh_size(TOPIC)):
                    await trio.sleep(0.02)
            assert ga.peers() == {str(c.get_id())} and gc.peers() == {str(a.get_id())}
            gb.join(TOPIC, lambda m: True)  # b's first topic: b speaks to a, and a answers
            with trio.fail_after(10):
                while not (ga.neighbours(TOPIC) == 2 and gb.neighbours(TOPIC) == 1):
                    await trio.sleep(0.02)
            assert ga.peers() == {str(b.get_id()), str(c.get_id())}
            nursery.cancel_scope.cancel()


async def test_lazy_gossip_publishes_where_it_does_not_subscribe() -> None:
    """A peer subscribed to nothing opens streams to a topic's subscribers before it publishes."""
    a, b = build_host(Identity.generate()), build_host(Identity.generate())
    async with running_host(a, LOOPBACK), running_host(b, LOOPBACK):
        ga, gb = Gossip(a), Gossip(b)
        seen: list[bytes] = []

        def validator(message: Any) -> bool:
            seen.append(bytes(message.data))
            return True

        gb.join(TOPIC, validator)
        async with trio.open_nursery() as nursery:
            await nursery.start(ga.run)
            await nursery.start(gb.run)
            await a.connect(_info(b))
            with trio.fail_after(10):
                while not ga.neighbours(TOPIC):
                    await trio.sleep(0.02)
            assert ga.peers() == frozenset()
            with trio.fail_after(10):
                await ga.publish(TOPIC, b"from a")
                while b"from a" not in seen:
                    await trio.sleep(0.02)
            assert ga.peers() == {str(b.get_id())}
            nursery.cancel_scope.cancel()


# -- what a stopped pubsub leaves behind ------------------------------------------------------


async def test_stock_pubsub_leaves_notifee_handlers_and_a_thread_behind() -> None:
    host = build_host(Identity.generate())
    network = host.get_network()
    notifees, threads = len(network.notifees), threading.active_count()
    router = stock_router()
    stock = Pubsub(host, router)
    async with background_trio_service(stock), background_trio_service(router):
        pass
    assert len(network.notifees) == notifees + 1
    assert registered_pubsub_protocols(host) == list(PUBSUB_PROTOCOLS)
    assert threading.active_count() == threads + 1
    stop_stock(stock)

    host2 = build_host(Identity.generate())
    network2 = host2.get_network()
    notifees2, threads2 = len(network2.notifees), threading.active_count()
    router2 = lean_router()
    pubsub, registered = build_pubsub(
        host2, router2, stream_setup_timeout=5, on_write=lambda n: None, on_dropped=lambda: None
    )
    assert len(registered) == 1
    async with background_trio_service(pubsub), background_trio_service(router2):
        pass
    await stop_pubsub(host2, pubsub, router2, registered)
    assert len(network2.notifees) == notifees2 and registered_pubsub_protocols(host2) == []
    assert threading.active_count() == threads2


async def test_a_second_gossip_on_one_host_is_refused() -> None:
    host = build_host(Identity.generate())
    first = Gossip(host)
    first.join(TOPIC, lambda m: True)
    async with running_host(host, LOOPBACK), trio.open_nursery() as nursery:
        await nursery.start(first.run)
        with pytest.raises(ConfigError, match="one AvailabilityService per host"):
            Gossip(host).check_host_free()
        nursery.cancel_scope.cancel()
    assert registered_pubsub_protocols(host) == []


# -- router defaults and upstream quirks ------------------------------------------------------


def test_stock_gossipsub_defaults() -> None:
    router = stock_router()
    assert router.heartbeat_interval == 120
    assert router.adaptive_gossip_enabled
    assert router.max_messages_per_topic_per_second == 10.0
    # Adaptive gossip turns a 1 s heartbeat into 30 s when it judges the network unhealthy.
    fast = stock_router(heartbeat_interval=1)
    fast._adapt_heartbeat_parameters(0.1)
    assert fast.heartbeat_interval == 30
    ours = lean_router()
    assert ours.heartbeat_interval == 1 and not ours.adaptive_gossip_enabled
    assert ours.max_messages_per_topic_per_second == 100


@pytest.mark.parametrize("kind", ["stock", "lean"])
async def test_idontwant_for_small_messages(kind: str) -> None:
    router = stock_router() if kind == "stock" else lean_router()
    peer = Identity.generate().peer_id
    router.pubsub = object()  # type: ignore[assignment]
    router.mesh = {TOPIC: {peer}}
    router.peer_protocol = {peer: PROTOCOL_ID_V12}
    sent: list[Any] = []

    async def record(msg_ids: Any, to: Any) -> None:
        sent.append((msg_ids, to))

    router.emit_idontwant = record  # type: ignore[method-assign]
    await router._emit_idontwant_for_message(b"a small message id", [TOPIC])
    assert len(sent) == (1 if kind == "stock" else 0)


def test_stock_seqnos_start_at_unix_seconds() -> None:
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    assert abs(stock.counter - time.time()) < 5
    stop_stock(stock)
    pubsub, _ = build_pubsub(
        build_host(Identity.generate()),
        lean_router(),
        stream_setup_timeout=5,
        on_write=lambda n: None,
        on_dropped=lambda: None,
        wall_clock=lambda: 1000.0,
    )
    assert pubsub.counter == 1_000_000_000
    pubsub.seen_messages.stop()


async def test_stock_pubsub_forgets_subscriptions_when_an_old_stream_dies() -> None:
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    peer = Identity.generate().peer_id
    stock.peer_topics = {TOPIC: {peer}}
    stock._handle_dead_peer(peer)
    assert TOPIC not in stock.peer_topics
    # The announcement is rebuilt through a private method; it must still exist and work.
    packet, subopt = stock._build_announce_rpc(TOPIC, True)
    assert subopt.topicid == TOPIC and subopt.subscribe and list(packet.subscriptions) == [subopt]
    await announce_subscription(stock, TOPIC)  # no peers: nothing to do
    stop_stock(stock)


def test_stock_delivery_log_is_trimmed_only_by_adaptive_gossip() -> None:
    """Source canary: the log is appended in ``publish`` and trimmed only on the adaptive path."""
    users = [
        name
        for name, fn in inspect.getmembers(GossipSub, inspect.isfunction)
        if "recent_message_deliveries" in inspect.getsource(fn)
    ]
    assert sorted(users) == ["__init__", "_calculate_message_delivery_health", "publish"]
    heartbeat = inspect.getsource(GossipSub.heartbeat)
    guard = heartbeat.index("if self.adaptive_gossip_enabled:")
    assert heartbeat.index("self._update_network_health()") > guard
    router = lean_router()
    router.recent_message_deliveries[TOPIC] = [time.time() - 120, time.time()]
    trim_delivery_log(router, time.time())
    assert len(router.recent_message_deliveries[TOPIC]) == 1


def test_stock_rpcs_carry_the_signed_peer_record() -> None:
    """Source canary: every forwarded message gets the host's signed peer record."""
    assert "senderRecord" in inspect.getsource(GossipSub.publish)
    assert "senderRecord" in inspect.getsource(GossipSub.emit_control_message)


async def test_guarded_writes_leave_the_record_out_of_plain_rpcs() -> None:
    host = build_host(Identity.generate())
    written: list[int] = []
    pubsub, _ = build_pubsub(
        host, lean_router(), stream_setup_timeout=5, on_write=written.append, on_dropped=lambda: None
    )

    class Sink:
        def __init__(self) -> None:
            self.data = b""

        async def write(self, data: bytes) -> None:
            self.data += data

    rpc = rpc_pb2.RPC(publish=[rpc_pb2.Message(data=b"x" * 10, topicIDs=[TOPIC])], senderRecord=b"r" * 200)
    sink = Sink()
    assert await pubsub.write_msg(sink, rpc)  # type: ignore[arg-type]
    assert b"r" * 200 not in sink.data and written == [len(sink.data)]
    subscribe = rpc_pb2.RPC.SubOpts(subscribe=True, topicid=TOPIC)
    hello = rpc_pb2.RPC(subscriptions=[subscribe], senderRecord=b"r" * 200)
    sink = Sink()
    assert await pubsub.write_msg(sink, hello)  # type: ignore[arg-type]
    assert b"r" * 200 in sink.data  # subscription changes keep it
    pubsub.seen_messages.stop()


async def test_stock_pubsub_stops_when_any_of_its_tasks_fails() -> None:
    """Why :class:`~modelnet_p2p.p2p.pubsub.Gossip` restarts a pubsub that died."""
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())

    async def boom() -> None:
        raise RuntimeError("one task failed")

    with pytest.raises(BaseException) as caught:  # the service re-raises it, perhaps wrapped
        with trio.fail_after(5):
            async with background_trio_service(stock):
                stock.manager.run_task(boom)
                await trio.sleep_forever()
    assert "one task failed" in repr(caught.value)
    stop_stock(stock)


# -- messages on several topics ---------------------------------------------------------------


async def test_stock_runs_one_validator_per_topic_with_the_same_message() -> None:
    """Why :class:`Gossip` remembers its last verdict: py-libp2p calls each topic's validator."""
    host = build_host(Identity.generate())
    stock = Pubsub(host, stock_router())
    calls: list[Any] = []
    for topic in ("/t/a", "/t/b"):
        stock.set_topic_validator(topic, lambda f, m: calls.append(m) or True, is_async_validator=False)
    msg = rpc_pb2.Message(
        data=b"x", topicIDs=["/t/a", "/t/b"], from_id=host.get_id().to_bytes(), seqno=b"\0" * 8
    )
    await stock.validate_msg(host.get_id(), msg)
    assert len(calls) == 2 and calls[0] is msg and calls[1] is msg
    stop_stock(stock)


async def test_gossip_judges_a_message_on_several_topics_once() -> None:
    host = build_host(Identity.generate())
    async with running_host(host, LOOPBACK):
        settings = GossipSettings(signed=False, message_id=lambda data: data)
        gossip = Gossip(host, settings)
        calls: list[bytes] = []
        for topic in ("/t/a", "/t/b"):
            gossip.join(topic, lambda m: calls.append(m.data) is None)
        async with trio.open_nursery() as nursery:
            await nursery.start(gossip.run)
            await gossip.publish(["/t/a", "/t/b"], b"one")
            assert calls == [b"one"]
            # Topics come and go while running.
            gossip.leave("/t/b")
            assert gossip.topics() == {"/t/a"}
            gossip.join("/t/c", lambda m: True)
            with trio.fail_after(5):
                while (
                    "/t/c" not in gossip.libp2p_pubsub.topic_ids or "/t/b" in gossip.libp2p_pubsub.topic_ids
                ):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", ["stock", "lean"])
def test_own_messages_flood_to_every_subscribed_neighbour(kind: str) -> None:
    """py-libp2p sends a peer's own message to its mesh (D peers) only; ours floods it."""
    router = stock_router() if kind == "stock" else lean_router()
    me, in_mesh, *others = [Identity.generate().peer_id for _ in range(5)]

    fake = type("FakePubsub", (), {"my_id": me, "peer_topics": {TOPIC: {in_mesh, *others}}})
    router.pubsub = fake()
    router.mesh = {TOPIC: {in_mesh}}
    router.peer_protocol = {p: PROTOCOL_ID_V12 for p in (in_mesh, *others)}
    own = set(router._get_peers_to_send([TOPIC], msg_forwarder=me, origin=me))
    relayed = set(router._get_peers_to_send([TOPIC], msg_forwarder=others[0], origin=others[1]))
    assert relayed == {in_mesh}  # a relayed message goes to the mesh only, both ways
    assert own == ({in_mesh} if kind == "stock" else {in_mesh, *others})


def test_stock_replays_only_the_message_cache_and_lean_keeps_the_latest_own_message() -> None:
    """py-libp2p replays its message cache (a few heartbeats) to a new subscriber, keyed by
    from + seqno whatever the message-id function; older messages are gone, so
    :class:`LeanGossipSub` keeps this peer's latest own message per topic for greetings."""
    router = lean_router()
    me = Identity.generate().peer_id
    msg = rpc_pb2.Message(data=b"r", topicIDs=[TOPIC], from_id=me.to_bytes(), seqno=b"\x00\x01")
    router.mcache.put(msg)
    assert router.mcache.get(me.to_bytes() + b"\x00\x01") is msg
    for _ in range(len(router.mcache.history)):
        router.mcache.shift()
    assert router.mcache.window(TOPIC) == [] and router.mcache.get(me.to_bytes() + b"\x00\x01") is None
    assert router.own_message(TOPIC) is None
    router.own_last[TOPIC] = msg
    assert router.own_message(TOPIC) is msg

"""Joining and announcing: a fresh peer's first lookup, a late provider, acknowledged announces.

Real peers on 127.0.0.1 in this process. The bounds are generous: these tests check
behaviour (complete results, acknowledgements, requests not wasted), the benchmark
(``benchmarks/bench_discovery.py``) measures time.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from modelnet_p2p import Capability, Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.ids import parse_id
from modelnet_p2p.p2p.kad import KadKind, KadPeer, KadRequest, peer_id_bytes
from modelnet_p2p.proto.card import task_key, value_key
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID
from modelnet_p2p.services.discovery.index import announced_keys
from modelnet_p2p.services.discovery.lookup import RPC_TIMEOUT, RttEstimator

#: The peers here run discovery only: with availability gossip on as well, 14 peers in one
#: process keep one core busy at start, and these tests are about discovery.
PEER_OPTS: dict[str, Any] = {"gossip": False}


async def answer(request: Any) -> str:
    return "ok"


@asynccontextmanager
async def mesh(n: int, serve: dict[int, Capability], seed: int = 7) -> AsyncIterator[list[Peer]]:
    """``n`` peers, each bootstrapping from one random earlier peer; ``serve[i]`` served at once."""
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(n):
            boot = [rng.choice(peers).addrs[0]] if peers else []
            peer = await stack.enter_async_context(Peer(bootstrap=boot, **PEER_OPTS))
            if i in serve:
                peer.serve(serve[i], answer)
            peers.append(peer)
        yield peers


def chat(name: str) -> Capability:
    return Capability(name=name, tasks=("chat",))


async def settled(peers: list[Peer]) -> None:
    for p in peers:
        await p.discovery.bootstrapped.wait()


@pytest.mark.timeout(180)
async def test_a_fresh_peers_first_lookup_right_after_the_mesh_starts_finds_every_provider() -> None:
    """14 peers start one after the other, 3 serving at once; nobody waits for anything.
    A fresh peer that knows one address looks up once, right away, and gets all 3."""
    with trio.fail_after(150):
        async with mesh(14, {1: chat("m-a"), 6: chat("m-b"), 12: chat("m-c")}) as peers:
            want = {peers[1].peer_id, peers[6].peer_id, peers[12].peer_id}
            async with Peer(listen=[], bootstrap=[peers[9].addrs[0]], **PEER_OPTS) as fresh:
                cards = await fresh.discover("chat", timeout=30)
                assert {c.peer_id for c in cards} == want
                assert len(cards) == 3


@pytest.mark.timeout(180)
async def test_a_provider_started_after_the_mesh_settled_is_found_within_seconds() -> None:
    with trio.fail_after(150):
        async with mesh(12, {}) as peers:
            await settled(peers)
            async with Peer(bootstrap=[peers[3].addrs[0]], **PEER_OPTS) as late:
                late.serve(chat("late-model"), answer)
                t0 = trio.current_time()
                seeker = peers[10]
                with trio.fail_after(20):  # generous: a few seconds on a quiet machine
                    while not await seeker.discover(model="late-model", timeout=10):
                        await trio.sleep(0.05)
                found_after = trio.current_time() - t0
                assert found_after < 20
                # The announce loop's announce was acknowledged by enough servers.
                with trio.fail_after(30):
                    while late.discovery.last_announce is None:
                        await trio.sleep(0.05)
                result = late.discovery.last_announce
                assert result.confirmed, (result.acks, result.needed)


@pytest.mark.timeout(120)
async def test_announce_reports_how_many_servers_acknowledged_each_record() -> None:
    with trio.fail_after(100):
        async with mesh(8, {}) as peers:
            await settled(peers)
            provider = peers[5]
            provider.serve(Capability(name="acked", tasks=("chat",), tags=("en",)), answer)
            result = await provider.discovery.announce()
            assert result is not None
            labels = {label for label, _key in announced_keys(result.card.capabilities)}
            assert {"task:chat", "model:acked", "tag:en"} <= labels
            assert set(result.acks) == {"card", *labels}
            # Seven other servers exist; the replication is 5: each record needs 5.
            assert result.replication == 5
            assert all(need == 5 for need in result.needed.values()), result.needed
            assert result.confirmed
            assert result.value_stored == result.acks["card"] >= 5
            assert result.provider_acks == sum(v for k, v in result.acks.items() if k != "card")
            # each acknowledgement's time since the announce began, in order
            for label, count in result.acks.items():
                times = result.ack_times.get(label, [])
                assert len(times) == count and times == sorted(times) and all(t >= 0 for t in times)
            assert provider.discovery.last_announce is result
            # An acknowledgement means the server holds the record.
            key = task_key("chat")
            holders = [
                p
                for p in peers
                if p is not provider
                and any(r.peer_id == provider.peer_id for r in p.discovery.kad.local_providers(key))
            ]
            assert len(holders) >= result.acks["task:chat"]


@pytest.mark.timeout(150)
async def test_an_announce_places_each_record_at_its_reach_not_at_every_server() -> None:
    """A record goes to ``2 * replication`` peers known at once and as many that its lookup
    finds, not to every server near it (up to r8 of the spec: the 20 closest known, up to 20
    answerers and the 20 closest found, so every one of 13 others here). It is still found."""
    with trio.fail_after(120):
        async with mesh(14, {}) as peers:
            await settled(peers)
            provider = peers[4]
            provider.discovery.replication = 2  # reach 4
            provider.serve(chat("reach"), answer)
            result = await provider.discovery.announce()
            assert result is not None and result.confirmed, (result.acks, result.needed)
            assert all(need == 2 for need in result.needed.values()), result.needed
            # At most the 4 known at once plus the 4 closest found; no server twice.
            assert all(2 <= acks <= 8 for acks in result.acks.values()), result.acks
            key = task_key("chat")
            holders = [
                p
                for p in peers
                if p is not provider
                and any(r.peer_id == provider.peer_id for r in p.discovery.kad.local_providers(key))
            ]
            assert 2 <= len(holders) <= 8, len(holders)
            seeker = peers[11]
            with trio.fail_after(30):
                while not await seeker.discover(model="reach", timeout=10):
                    await trio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_a_record_goes_to_the_closest_its_lookup_finds_not_to_the_closest_known() -> None:
    """A provider whose routing table knows only peers far from a key (as a peer of a big
    mesh knows only some of the peers near any key) places the key's record at the reach
    closest that its lookup finds, as they answer, and not at the far peers it knew (up to
    r9 of the spec those got it at once, and the closest only once the lookup had ended)."""
    with trio.fail_after(150):
        async with mesh(16, {}) as peers:
            await settled(peers)
            provider = peers[4]
            provider.discovery.replication = 2  # reach 4
            cap = chat("far-table")
            ((label, key),) = [(lb, k) for lb, k in announced_keys([cap]) if lb.startswith("model:")]
            others = [p for p in peers if p is not provider]
            target = int.from_bytes(hashlib.sha256(key).digest())

            def rank_key(p: Peer) -> int:
                return int.from_bytes(hashlib.sha256(peer_id_bytes(p.peer_id)).digest()) ^ target

            ranked = sorted(others, key=rank_key)
            near, far = ranked[:4], ranked[8:]
            table = provider.discovery.kad
            for p in ranked[:8]:  # the table keeps only the far ones (test-only surgery)
                table._running.routing_table.remove_peer(parse_id(p.peer_id))
            assert set(table.closest_known(key, 4)) <= {p.peer_id for p in far}
            provider.serve(cap, answer)
            result = await provider.discovery.announce()
            assert result is not None and result.acks[label] >= 2, (result.acks, result.needed)
            holders = {
                p.peer_id
                for p in others
                if any(r.peer_id == provider.peer_id for r in p.discovery.kad.local_providers(key))
            }
            assert {p.peer_id for p in near} <= holders, "the 4 closest all hold the record"
            assert not holders & {p.peer_id for p in far}, "no far peer of the table got it"


async def test_a_lone_peers_announce_needs_and_gets_no_acknowledgement() -> None:
    async with Peer(**PEER_OPTS) as alone:
        alone.serve("solo", answer)
        result = await alone.discovery.announce()
        assert result is not None
        assert result.value_stored == 0 and result.provider_acks == 0 and result.rounds == 1
        assert not result.confirmed  # nobody was found to acknowledge


@pytest.mark.timeout(120)
async def test_joining_costs_one_lookup_and_nothing_for_the_others() -> None:
    """A join is one lookup of the peer's own id (not one per bucket), and the peers
    already in the mesh send no DHT request because someone joined. (When it leaves, those
    connected to it check it: ``tests/test_kad_failures.py``.)"""
    with trio.fail_after(100):
        async with mesh(12, {}) as peers:
            await settled(peers)
            await trio.sleep(0.5)
            before = [p.discovery.requests_sent for p in peers]
            async with Peer(bootstrap=[peers[4].addrs[0]], **PEER_OPTS) as joiner:
                await joiner.discovery.bootstrapped.wait()
                assert joiner.discovery.kad.routing_table_size() >= 6
                # One lookup asks each of the 12 peers at most twice (a retry after a reset).
                assert joiner.discovery.requests_sent <= 2 * len(peers)
                await trio.sleep(1.0)
                assert [p.discovery.requests_sent for p in peers] == before


@pytest.mark.timeout(120)
async def test_a_lookup_goes_on_past_a_peer_that_never_answers() -> None:
    """A connected DHT peer that accepts requests and never answers costs the lookup one
    slot for its patience only: the other peers are asked meanwhile and the cards arrive
    before that peer's request times out. Being among the k closest, it is waited for
    (Kademlia's rule), then fails by timing out, and stays in the routing table (slow is
    not dead)."""
    with trio.fail_after(100):
        async with mesh(7, {2: chat("m-x"), 5: chat("m-y")}) as peers:
            await settled(peers)
            for p in (peers[2], peers[5]):
                assert (await p.discovery.announce()) is not None
            hole = build_host(Identity.generate())
            held: list[INetStream] = []

            async def swallow(stream: INetStream) -> None:
                held.append(stream)
                await trio.sleep_forever()

            hole.set_stream_handler(TProtocol(DHT_PROTOCOL_ID), swallow)
            async with running_host(hole, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                hole_addr = str(hole.get_addrs()[0])
                if "/p2p/" not in hole_addr:
                    hole_addr += f"/p2p/{hole.get_id()}"
                async with Peer(listen=[], bootstrap=[hole_addr, peers[0].addrs[0]], **PEER_OPTS) as seeker:
                    await seeker.discovery.bootstrapped.wait()
                    t0 = trio.current_time()
                    arrived: dict[str, float] = {}
                    async for card in seeker.discover_iter("chat", timeout=30):
                        arrived[card.peer_id] = trio.current_time() - t0
                    took = trio.current_time() - t0
                    assert set(arrived) == {peers[2].peer_id, peers[5].peer_id}
                    assert held, "the silent peer was asked"
                    assert seeker.discovery.lookups.slow_requests >= 1
                    assert max(arrived.values()) < RPC_TIMEOUT  # not held up by the silent peer
                    assert took >= RPC_TIMEOUT * 0.9  # the lookup waited for it, as one of the k closest
                    assert seeker.discovery.kad.in_routing_table(str(hole.get_id()))


def test_patience_follows_the_round_trip_times() -> None:
    rtt = RttEstimator(initial=1.0, floor=0.3, ceiling=5.0)
    assert rtt.patience() == 1.0
    for _ in range(20):
        rtt.sample(0.005)
    assert rtt.patience() == 0.3  # fast answers: the floor
    for _ in range(40):
        rtt.sample(2.0)  # a busy machine: every answer comes late
    assert 2.0 <= rtt.patience() <= 5.0
    for _ in range(5):
        rtt.sample(60.0)
    assert rtt.patience() == 5.0  # never past the request timeout


async def test_requests_that_dial_first_are_timed_apart_and_tarpits_teach_nothing() -> None:
    """A DHT request to a peer with no connection is timed by the dial estimate, not by the
    one of open connections; a dial to a tarpit (it takes the TCP connection and never
    answers the handshake) times out without feeding either estimate."""
    async with Peer(**PEER_OPTS) as server, Peer(**PEER_OPTS) as asker:
        lookups = asker.discovery.lookups
        find = KadRequest(KadKind.FIND_NODE, peer_id_bytes(asker.peer_id))
        held: list[trio.SocketStream] = []

        async def hold(stream: trio.SocketStream) -> None:
            held.append(stream)
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            tarpit = Identity.generate().peer_id.to_base58()
            asker.discovery.kad.remember_addrs(KadPeer(tarpit, (f"/ip4/127.0.0.1/tcp/{port}",)), 60)
            assert lookups.estimator(tarpit) is lookups.dial_rtt
            outcome = await lookups.attempt(tarpit, find, timeout=0.5)
            assert outcome.answer is None and held
            assert lookups.dial_rtt.samples == 0 and lookups.rtt.samples == 0
            nursery.cancel_scope.cancel()
        asker.discovery.kad.remember_addrs(KadPeer(server.peer_id, tuple(server.addrs)), 60)
        assert lookups.estimator(server.peer_id) is lookups.dial_rtt  # not connected yet
        assert (await lookups.attempt(server.peer_id, find)).answer is not None
        assert (lookups.dial_rtt.samples, lookups.rtt.samples) == (1, 0)
        assert lookups.estimator(server.peer_id) is lookups.rtt  # connected now
        assert (await lookups.attempt(server.peer_id, find)).answer is not None
        assert (lookups.dial_rtt.samples, lookups.rtt.samples) == (1, 1)


@pytest.mark.timeout(120)
async def test_a_change_places_only_the_new_records_and_the_card() -> None:
    """Serving one more capability re-announces the card and the provider records of the
    new capability only; the records already held stay where they are until the next
    full announce."""
    with trio.fail_after(100):
        async with mesh(6, {}) as peers:
            await settled(peers)
            provider, seeker = peers[4], peers[1]
            provider.serve(chat("first-model"), answer)
            full = await provider.discovery.announce()
            assert full is not None and "model:first-model" in full.acks
            provider.serve(Capability(name="second-model", tasks=("summarization",)), answer)
            with trio.fail_after(30):
                while (last := provider.discovery.last_announce) is full or last is None:
                    await trio.sleep(0.05)
            assert set(last.acks) == {
                "card", "task:summarization", "model:second-model", "model-version:second-model@1.0",
            }, last.acks  # fmt: skip
            assert last.confirmed, (last.acks, last.needed)
            for query in ({"model": "second-model"}, {"model": "first-model"}, {"task": "chat"}):
                cards = await seeker.discover(timeout=10, **query)
                assert [c.peer_id for c in cards] == [provider.peer_id], query
                assert {c.name for c in cards[0].capabilities} == {"first-model", "second-model"}
            # An explicit announce is a full one: every record again.
            again = await provider.discovery.announce()
            assert again is not None and {"model:first-model", "index", "task:chat"} <= set(again.acks)


@pytest.mark.timeout(180)
async def test_an_announce_places_the_task_and_model_records_first() -> None:
    """The records a discoverer looks up (task and model keys) are looked up and delivered
    before the other records and the card, which wait for their first placement to end."""
    with trio.fail_after(100):
        async with mesh(8, {}) as peers:
            await settled(peers)
            provider = peers[5]
            cap = Capability(name="ordered", version="2.0", tasks=("chat",), tags=("en",))
            provider.serve(cap, answer)
            labels = {key: label for label, key in announced_keys([cap])}
            labels[value_key(provider.peer_id).encode()] = "card"
            started: list[str] = []  # each key's label, the first time it is looked up or sent
            lookups = provider.discovery.lookups
            closest, timed, plain = lookups.closest, lookups.timed_request, lookups.request

            def seen(key: bytes) -> None:
                label = labels.get(key)
                if label is not None and label not in started:
                    started.append(label)

            async def closest_(key: bytes, *args: Any, **kw: Any) -> Any:
                seen(key)
                return await closest(key, *args, **kw)

            async def timed_(pid: str, req: Any, *args: Any) -> Any:
                seen(req.key)
                return await timed(pid, req, *args)

            async def request_(pid: str, req: Any, *args: Any) -> Any:
                seen(req.key)
                return await plain(pid, req, *args)

            lookups.closest, lookups.timed_request, lookups.request = closest_, timed_, request_  # type: ignore[method-assign]
            result = await provider.discovery.announce()
            assert result is not None and result.confirmed, result and (result.acks, result.needed)
            first = {"task:chat", "model:ordered"}
            assert set(started) == set(labels.values()), started
            assert set(started[: len(first)]) == first, started

"""Workarounds for py-libp2p 0.8.1's pubsub (``libp2p.pubsub``: ``Pubsub`` and ``GossipSub``).

Each item corrects one upstream behaviour; the canaries in ``tests/test_compat_pubsub.py`` fail
once upstream changes it.

- :class:`BufferedReads`: the pubsub reader reads each RPC's varint length one byte at a time,
  and yamux answers every read with a WINDOW_UPDATE frame: three or four encrypted frames per
  record received.
- :class:`GuardedPubsub`:

  * ``push_msg`` runs as a service task, and a malformed message (a garbage ``key`` with an
    unextractable ``from``) raises from ``signature_validator``: the whole pubsub service stops;
  * its stream handler catches only stream and parse errors; anything else escapes the handler
    (and a stream handler that raises stops the host);
  * a stream accepted while the service stops is left open, and so is every pubsub stream once
    the service has stopped: neighbours keep writing into streams nobody reads;
  * pubsub only opens streams on connections made after it started, so two peers that start
    pubsub at different times after connecting end up with a one-way link;
  * ``_handle_new_peer`` checks "already registered?" before an ``await`` and registers after
    it: two concurrent registrations (its notifee and ours) open two streams and leak a task;
  * every RPC carries the host's signed peer record (about 200 bytes and one signature check
    at the receiver), although only the first RPC of a stream needs it.
  * (``lazy``) it opens a pubsub stream to every peer that connects, and the peer one back,
    although a peer subscribed to nothing has nothing to say on it: about 6 of the 14 ms of
    CPU that a new connection costs here (both ends), and most connections are DHT lookups.
    Here a peer with no subscription opens none, and opens one to every connected peer when
    it subscribes to its first topic (so that a neighbour that subscribes later, and opens
    its own stream then, still finds both ways open). Peers learn each other's subscriptions
    as before: a subscribed peer opens its stream to every peer that connects to it at once.
    A peer that publishes where it does not subscribe opens streams to the topic's subscribers
    first.
  * (``lazy``) a subscribed peer also opened its stream to every peer it dialed, though most
    of those are DHT servers subscribed to nothing: a provider's announce dials tens of them,
    and each one cost both ends a stream, its negotiation and a hello (about 6 ms of the
    28 ms of CPU that such a connection costs here, both ends). Here the listener speaks
    first: on a connection this peer dialed, it opens its stream only once the peer has
    opened one (which a subscribed peer does at once), or when it subscribes to its first
    topic. A neighbour subscribed to nothing then hears nothing, and needs nothing: when it
    subscribes it opens its stream to every connected peer, and is answered.

- :class:`LeanGossipSub`: an IDONTWANT goes to every mesh peer for every message received,
  whatever its size; for records of about 200 bytes that costs as much as the duplicates it
  saves (go-libp2p sends it only above 1 KiB). And py-libp2p has no flood publishing: a peer's
  own message goes to its D mesh peers only, even when more neighbours subscribe to the topic.
  It also remembers this peer's latest own message per topic (:meth:`LeanGossipSub.own_message`),
  so that a new subscriber can be sent that one message instead of a new one going to everyone:
  py-libp2p replays only what is still in its message cache (a few heartbeats), and not even
  that when a subscription arrives before its stream to the peer is registered.
- :func:`build_router`: GossipSub's heartbeat defaults to 120 s; adaptive gossip, on by default,
  sets a 1 s heartbeat to 30-60 s when it judges the network unhealthy; spam protection drops
  anything over 10 messages per second per forwarder and topic, counting relays.
- :func:`build_pubsub`: message ids are (origin, seqno) and seqnos start at ``int(time.time())``,
  so a peer restarted within a minute or two reuses ids still in its neighbours' seen-caches and
  its messages are dropped as duplicates.
- :func:`announce_subscription`: pubsub forgets a neighbour's subscriptions when it notices that
  an *old* stream to it died, even if the neighbour has reconnected and announced itself on a new
  stream meanwhile; that neighbour then never gets our messages. Re-announcing heals it, and
  py-libp2p has no public way to build the announcement.
- :func:`trim_delivery_log`: GossipSub logs the time of every message delivered per topic, and
  only its adaptive-gossip code trims that log.
- :func:`registered_pubsub_protocols`: two pubsubs on one host fight over the stream handlers
  (each sees some of the streams), and py-libp2p does not refuse the second.
- :func:`stop_pubsub`: a stopped pubsub keeps its network notifee, its stream handlers and the
  sweeper thread of its seen-message cache. Its handlers are retired (new streams reset), not
  removed: a removal during a neighbour's protocol negotiation stops the host
  (:func:`~modelnet_p2p.p2p._compat.host.retire_stream_handler`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import trio
from libp2p.abc import IHost, INetStream, INotifee
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.rcmgr import Direction

from ..stream import reset_quietly
from .host import is_retired, retire_stream_handler

__all__ = [
    "IDONTWANT_THRESHOLD",
    "PUBSUB_PROTOCOLS",
    "READ_CHUNK",
    "BufferedReads",
    "GuardedPubsub",
    "LeanGossipSub",
    "announce_subscription",
    "build_pubsub",
    "build_router",
    "pending_rpcs",
    "registered_pubsub_protocols",
    "stop_pubsub",
    "trim_delivery_log",
]

log = logging.getLogger(__name__)

#: The GossipSub versions offered, newest first (1.2 is negotiated with py-libp2p and go-libp2p).
PUBSUB_PROTOCOLS: tuple[TProtocol, ...] = (PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID)
#: Bytes asked of a pubsub stream per read (it returns what has arrived).
READ_CHUNK = 64 * 1024
#: Smallest message, in bytes, for which IDONTWANT is sent (go-libp2p's default).
IDONTWANT_THRESHOLD = 1024
#: Seconds allowed, when stopping, to reset the pubsub streams.
STOP_TIMEOUT = 1.0
#: Seconds of delivery log kept by :func:`trim_delivery_log` (what adaptive gossip keeps).
DELIVERY_LOG_WINDOW = 60.0


class BufferedReads:
    """A stream whose small reads are served from a buffer filled by large ones.

    Everything but ``read`` is the wrapped stream's.
    """

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        if not self._buf:
            self._buf += await self._stream.read(READ_CHUNK)
        if n is None or n >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
            return out
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, made safe to expose to remote input, and measurable.

    ``on_write(n)`` is called with the size of every RPC written (varint prefix included);
    ``on_dropped()`` for every message whose processing raised.
    """

    def __init__(
        self,
        host: IHost,
        router: GossipSub,
        stream_setup_timeout: float,
        on_write: Callable[[int], None],
        on_dropped: Callable[[], None],
        *,
        strict_signing: bool = True,
        message_id: Callable[[bytes], bytes] | None = None,
        lazy: bool = False,
    ) -> None:
        if message_id is None:
            super().__init__(host, router, strict_signing=strict_signing)
        else:
            content_id = message_id
            super().__init__(
                host,
                router,
                strict_signing=strict_signing,
                msg_id_constructor=lambda msg: content_id(bytes(msg.data)),
            )
        self.stream_setup_timeout = stream_setup_timeout
        self.on_write = on_write
        self.on_dropped = on_dropped
        self.inbound: set[INetStream] = set()
        self._ensuring: set[ID] = set()
        self._registering: dict[ID, trio.Lock] = {}
        #: Open no stream while subscribed to nothing (see the module's notes).
        self.lazy = lazy
        #: Streams not opened because this peer was subscribed to nothing.
        self.deferred = 0
        self._wanted: set[ID] = set()  # streams to open even so (a publish, a first topic)
        #: Streams not opened (yet) on connections this peer dialed: the listener speaks first.
        self.awaited = 0
        self._heard: dict[ID, int] = {}  # open inbound pubsub streams, per peer

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:
            self.on_dropped()
            log.debug("dropped a gossip message forwarded by %s: %s", msg_forwarder, type(exc).__name__)

    async def stream_handler(self, stream: INetStream) -> None:
        if not self.manager.is_running:
            await reset_quietly(stream, STOP_TIMEOUT)
            return
        self.inbound.add(stream)
        peer_id = stream.muxed_conn.peer_id
        self._heard[peer_id] = self._heard.get(peer_id, 0) + 1
        try:
            if peer_id not in self.peers and self.manager.is_running:
                self.manager.run_task(self.ensure_stream, peer_id)
            await super().stream_handler(cast(INetStream, BufferedReads(stream)))
        except Exception as exc:
            log.debug("pubsub stream failed: %s", type(exc).__name__)
        finally:
            self.inbound.discard(stream)
            left = self._heard.pop(peer_id, 1) - 1
            if left:
                self._heard[peer_id] = left
            await reset_quietly(stream, STOP_TIMEOUT)

    async def reset_all_streams(self) -> None:
        """Reset every pubsub stream, both ways: neighbours then stop sending to us."""
        for stream in [*self.peers.values(), *self.inbound]:
            await reset_quietly(stream, STOP_TIMEOUT)

    async def subscribe(self, topic_id: str) -> Any:
        first = self.lazy and not self.topic_ids
        subscription = await super().subscribe(topic_id)
        if first and self.manager.is_running:  # the streams not opened while subscribed to nothing
            for peer_id in list(self.host.get_network().get_connections_map()):
                if peer_id not in self.peers:
                    self.manager.run_task(self.ensure_stream, peer_id, True)
        return subscription

    async def publish(self, topic_id: str | list[str], data: bytes) -> None:
        if self.lazy and not self.topic_ids:
            # Subscribed to nothing, so no stream is open: open them to the topic's known
            # subscribers first (a peer may publish where it does not subscribe).
            topics = [topic_id] if isinstance(topic_id, str) else list(topic_id)
            missing = {p for t in topics for p in self.peer_topics.get(t, ()) if p not in self.peers}
            self._wanted |= missing
            try:
                async with trio.open_nursery() as nursery:
                    for peer_id in missing:
                        nursery.start_soon(self.ensure_stream, peer_id)
            finally:
                self._wanted -= missing
        await super().publish(topic_id, data)

    def _dialed_only(self, peer_id: ID) -> bool:
        """Every connection to ``peer_id`` is one this peer dialed (and it has opened no stream)."""
        if peer_id in self._heard:
            return False
        conns = self.host.get_network().get_connections(peer_id)
        return bool(conns) and all(getattr(c, "direction", None) is Direction.OUTBOUND for c in conns)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        if self.lazy and peer_id not in self._wanted:
            if not self.topic_ids:
                self.deferred += 1  # opened by subscribe() if this peer ever subscribes
                return
            if self._dialed_only(peer_id):
                self.awaited += 1  # opened when the peer opens its own
                return
        lock = self._registering.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                await super()._handle_new_peer(peer_id)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._registering.pop(peer_id, None)

    async def ensure_stream(self, peer_id: ID, speak: bool = False) -> None:
        """Open our pubsub stream to ``peer_id`` unless there is one (or an attempt is running).

        ``speak``: even on a connection this peer dialed to a peer that has opened no stream
        (a first subscription, which every connected peer must hear of).
        """
        if peer_id in self._ensuring:
            return
        self._ensuring.add(peer_id)
        wanted = speak and peer_id not in self._wanted
        if wanted:
            self._wanted.add(peer_id)
        try:
            if peer_id not in self.peers:
                await self.ensure_peer_stream(peer_id, timeout=self.stream_setup_timeout)
        except Exception as exc:
            log.debug("could not open a pubsub stream to %s: %s", peer_id, type(exc).__name__)
        finally:
            self._ensuring.discard(peer_id)
            if wanted:
                self._wanted.discard(peer_id)

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        if rpc_msg.HasField("senderRecord") and not rpc_msg.subscriptions:
            # An address book update, not part of GossipSub: the stream's first RPC and
            # subscription changes still carry it.
            lean = rpc_pb2.RPC()
            lean.CopyFrom(rpc_msg)
            lean.ClearField("senderRecord")
            rpc_msg = lean
        ok = await super().write_msg(stream, rpc_msg)
        if ok:
            size = rpc_msg.ByteSize()
            self.on_write(size + _varint_len(size))
        return ok


def _varint_len(n: int) -> int:
    length = 1
    while n >= 0x80:
        n >>= 7
        length += 1
    return length


class LeanGossipSub(GossipSub):
    """GossipSub that sends IDONTWANT only for messages of :data:`IDONTWANT_THRESHOLD` bytes or
    more, and flood-publishes this peer's own messages (GossipSub v1.1; py-libp2p sends them to
    its mesh of D peers only, so a topic's other subscribers wait for relays or gossip)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: This peer's latest own message per topic (one entry per joined topic at most).
        self.own_last: dict[str, rpc_pb2.Message] = {}

    async def publish(self, msg_forwarder: ID, pubsub_msg: rpc_pb2.Message) -> None:
        pubsub = self.pubsub
        if pubsub is not None and msg_forwarder == pubsub.my_id:
            for topic in pubsub_msg.topicIDs:
                self.own_last[topic] = pubsub_msg
        await super().publish(msg_forwarder, pubsub_msg)

    def own_message(self, topic: str) -> rpc_pb2.Message | None:
        """This peer's latest own message on ``topic`` (``None``: nothing published there yet).

        Sent again to a new subscriber even while still in the message cache: py-libp2p's own
        replay of the cache to new subscribers is skipped when the subscription arrives before
        its stream to that peer is registered. A receiver that has it drops the copy by id.
        """
        return self.own_last.get(topic)

    def _get_peers_to_send(
        self, topic_ids: Iterable[str], msg_forwarder: ID, origin: ID, msg_id: bytes | None = None
    ) -> Iterable[ID]:
        topics = list(topic_ids)
        peers = set(super()._get_peers_to_send(topics, msg_forwarder, origin, msg_id))
        pubsub = self.pubsub
        if pubsub is not None and origin == pubsub.my_id:
            for topic in topics:
                peers.update(p for p in pubsub.peer_topics.get(topic, ()) if p in self.peer_protocol)
            peers.discard(origin)
        yield from peers

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        msg = self.mcache.get(msg_id)
        if msg is None or msg.ByteSize() < IDONTWANT_THRESHOLD:
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)


def build_router(
    *,
    degree: int,
    degree_low: int,
    degree_high: int,
    heartbeat_interval: int,
    max_messages_per_topic_per_second: float,
) -> LeanGossipSub:
    """A GossipSub router with the given heartbeat and rate limit, adaptive gossip off."""
    return LeanGossipSub(
        list(PUBSUB_PROTOCOLS),
        degree=degree,
        degree_low=degree_low,
        degree_high=degree_high,
        heartbeat_interval=heartbeat_interval,
        heartbeat_initial_delay=0.1,
        adaptive_gossip_enabled=False,
        max_messages_per_topic_per_second=max_messages_per_topic_per_second,
    )


def build_pubsub(
    host: IHost,
    router: GossipSub,
    *,
    stream_setup_timeout: float,
    on_write: Callable[[int], None],
    on_dropped: Callable[[], None],
    wall_clock: Callable[[], float] = time.time,
    strict_signing: bool = True,
    message_id: Callable[[bytes], bytes] | None = None,
    lazy: bool = False,
) -> tuple[GuardedPubsub, list[INotifee]]:
    """A :class:`GuardedPubsub` on ``host``, and the notifees it registered (for :func:`stop_pubsub`).

    Its seqnos start at the wall clock in microseconds, unique across restarts.
    """
    network = host.get_network()
    before = list(getattr(network, "notifees", []))
    pubsub = GuardedPubsub(
        host,
        router,
        stream_setup_timeout,
        on_write,
        on_dropped,
        strict_signing=strict_signing,
        message_id=message_id,
        lazy=lazy,
    )
    notifees = [n for n in getattr(network, "notifees", []) if n not in before]
    pubsub.counter = int(wall_clock() * 1_000_000)
    return pubsub, notifees


async def announce_subscription(pubsub: Pubsub, topic: str) -> None:
    """Announce our subscription to ``topic`` to every neighbour again."""
    if not pubsub.peers:
        return
    packet, subopt = pubsub._build_announce_rpc(topic, True)
    await pubsub.message_all_peers(packet.SerializeToString(), announce=subopt)


def trim_delivery_log(router: GossipSub, now: float) -> None:
    """Forget deliveries older than :data:`DELIVERY_LOG_WINDOW` (``now``: wall-clock seconds)."""
    cutoff = now - DELIVERY_LOG_WINDOW
    for times in router.recent_message_deliveries.values():
        times[:] = [t for t in times if t > cutoff]


def pending_rpcs(pubsub: Pubsub) -> int:
    """RPCs queued for neighbours and not yet taken by a sending task."""
    return sum(len(q) for q in list(pubsub.peer_queues.values()))


def registered_pubsub_protocols(host: IHost) -> list[TProtocol]:
    """The pubsub protocols that have a stream handler on ``host`` (another pubsub runs there)."""
    registered = set(host.get_mux().get_protocols())
    return [p for p in PUBSUB_PROTOCOLS if p in registered and not is_retired(host, p)]


async def stop_pubsub(
    host: IHost, pubsub: GuardedPubsub, router: GossipSub, notifees: Sequence[INotifee]
) -> None:
    """Undo what a stopped pubsub leaves behind: notifees, stream handlers, streams, a thread.

    Notifees and handlers go first, so that neighbours that react to the resets cannot open
    new streams into the stopped pubsub.
    """
    network = host.get_network()
    remove = getattr(network, "remove_notifee", None)
    if remove is not None:
        for notifee in notifees:
            remove(notifee)
    for proto in router.get_protocols():
        try:
            retire_stream_handler(host, proto)  # removing it could crash the host (a race)
        except Exception:
            pass
    with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
        await pubsub.reset_all_streams()
    try:
        pubsub.seen_messages.stop()
    except Exception:
        pass

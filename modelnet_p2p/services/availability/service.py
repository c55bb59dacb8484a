"""Availability gossip: who is up, what it serves, how busy it is (``specs/availability.md``).

Every peer running an :class:`AvailabilityService` joins the GossipSub topic
:data:`~modelnet_p2p.proto.availability.TOPIC`, publishes its own signed
availability record, and keeps a soft-state table of everyone else's:

* a record is published when the service starts, at once on a significant
  change (state, capabilities, load crossing a threshold, a new neighbour),
  and every ``publish_interval`` seconds otherwise, but never more than once
  per ``min_publish_gap`` (py-libp2p drops bursts silently);
* a topic validator checks every record before it is delivered or forwarded
  (size, strict encoding, origin, record signature, sequence number) and
  enters the accepted ones into the table;
* an entry expires when its TTL (about three publish periods) passes without
  a newer record, so a peer that goes silent disappears;
* :meth:`AvailabilityService.leave` publishes ``leaving`` before shutdown, and
  :meth:`AvailabilityService.drain` announces ``draining`` and waits for the
  requests in flight to finish.

All tasks run in the nursery the service is started in (the peer's), so they
stop with the peer. py-libp2p pitfalls handled here: its GossipSub defaults
(120 s heartbeat, adaptive gossip that raises it to 30 s, a 10 msg/s limit that
counts the relaying peer), a raising validator or a malformed message killing
the whole pubsub service, connections made before pubsub started being
ignored, and state that grows without bound.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import trio
from libp2p.abc import IHost, INetStream, INotifee
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from ...errors import ConfigError, ProtocolError
from ...p2p.identity import Identity
from ...proto.availability import (
    MAX_MESSAGE_SIZE,
    MAX_TTL_MS,
    MIN_TTL_MS,
    TOPIC,
    AvailabilityRecord,
    SignedRecord,
    State,
    capabilities_of,
    open_envelope,
    seal,
)
from ...proto.framing import encode_varint

if TYPE_CHECKING:
    # trio-typing's stubs (installed with py-libp2p) shadow trio's own annotations.
    from trio_typing import TaskStatus

__all__ = [
    "AvailabilityChange",
    "AvailabilityConfig",
    "AvailabilityEntry",
    "AvailabilityService",
    "AvailabilityStats",
    "CapabilityView",
    "InferenceLoad",
    "LoadProvider",
    "LoadSnapshot",
    "MeshViewRow",
    "State",
    "mesh_view",
    "start_availability",
]

log = logging.getLogger(__name__)

#: Seconds between maintenance rounds: re-announce the subscription (see
#: ``AvailabilityService._refresh_subscription``) and trim py-libp2p's per-topic
#: delivery log, which only its adaptive-gossip code (disabled here) trims.
MAINTENANCE_INTERVAL = 30.0
#: Seconds after start of the first subscription re-announcement.
FIRST_SUBSCRIPTION_REFRESH = 2.0
#: Seconds a ``leaving`` entry stays visible before removal (capped by its TTL),
#: so that the CLI and late readers of the table can see that the peer left.
LEAVING_LINGER = 2.0
#: Bytes asked of a pubsub stream per read (it returns what has arrived).
READ_CHUNK = 64 * 1024
#: Seconds allowed, when stopping, to reset the pubsub streams.
STOP_TIMEOUT = 1.0
#: Smallest message, in bytes, for which IDONTWANT is sent (go-libp2p's default).
IDONTWANT_THRESHOLD = 1024
#: Seconds waited between attempts to restart a failed pubsub service.
RESTART_BACKOFF = (1.0, 30.0)


# -- public data types -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """The load figures a record carries (see :meth:`AvailabilityService.report`)."""

    in_flight: int = 0
    queue: int = 0
    max_concurrency: int = 0
    latency_ms: float = 0.0
    tokens_per_s: float = 0.0


#: A callable the service polls for the current load (cheap and non-blocking).
LoadProvider = Callable[[], LoadSnapshot]


@dataclass(frozen=True)
class AvailabilityConfig:
    """Tuning of the availability service. Defaults suit meshes of up to a few hundred peers.

    Attributes:
        publish_interval: seconds between records when nothing changes.
        ttl: seconds a record stays valid without a newer one (announced in the
            record); ``None``: three publish intervals.
        min_publish_gap: fewest seconds between two records of this peer.
            py-libp2p drops bursts silently, so below 1 s is refused.
        load_poll_interval: seconds between polls of the load provider and the
            neighbour count, to publish early on a significant change.
        sweep_interval: seconds between sweeps that evict expired entries.
        initial_state: the state published at start.
        heartbeat_interval: GossipSub heartbeat, whole seconds (py-libp2p's default is 120).
        degree, degree_low, degree_high: GossipSub mesh degree D, D_lo, D_hi.
        max_messages_per_topic_per_second: py-libp2p's per-forwarder rate limit.
            It counts every record a neighbour relays, from all publishers, so it
            must exceed (number of peers / publish_interval).
        max_peers: most entries the table holds (a bound against floods of identities).
        seq_memory: seconds the highest sequence number of a departed peer is
            remembered, so that its old records cannot be replayed after eviction.
        leave_flush_timeout: seconds :meth:`AvailabilityService.leave` waits for
            the ``leaving`` record to be handed to the network.
        stream_setup_timeout: seconds spent opening pubsub streams to peers
            that were connected before the service started.
        topic: the gossip topic (tests may isolate meshes with another one).
    """

    publish_interval: float = 2.0
    ttl: float | None = None
    min_publish_gap: float = 1.0
    load_poll_interval: float = 0.25
    sweep_interval: float = 0.5
    initial_state: State = State.READY
    heartbeat_interval: int = 1
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    max_messages_per_topic_per_second: float = 100.0
    max_peers: int = 10_000
    seq_memory: float = 600.0
    leave_flush_timeout: float = 1.0
    stream_setup_timeout: float = 15.0
    topic: str = TOPIC

    def __post_init__(self) -> None:
        if self.min_publish_gap < 1.0:
            raise ConfigError("min_publish_gap must be at least 1 s (py-libp2p drops bursts)")
        if self.publish_interval < self.min_publish_gap:
            raise ConfigError("publish_interval must be at least min_publish_gap")
        ttl = self.effective_ttl
        if not MIN_TTL_MS / 1000 <= ttl <= MAX_TTL_MS / 1000:
            raise ConfigError(f"ttl must be between {MIN_TTL_MS / 1000:g} and {MAX_TTL_MS / 1000:g} s")
        if ttl < self.publish_interval:
            raise ConfigError("ttl must be at least one publish_interval (three are recommended)")
        if self.heartbeat_interval < 1:
            raise ConfigError("heartbeat_interval must be at least 1 s")
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ConfigError("GossipSub degrees must satisfy 0 < degree_low <= degree <= degree_high")
        if self.load_poll_interval <= 0 or self.sweep_interval <= 0:
            raise ConfigError("poll and sweep intervals must be positive")
        if self.max_peers < 1:
            raise ConfigError("max_peers must be at least 1")
        object.__setattr__(self, "initial_state", State(self.initial_state))

    @property
    def effective_ttl(self) -> float:
        """The TTL in seconds: :attr:`ttl`, or three publish intervals."""
        return self.ttl if self.ttl is not None else 3 * self.publish_interval


@dataclass(frozen=True, slots=True)
class AvailabilityEntry:
    """One row of the availability table.

    Times are :func:`time.monotonic` seconds. ``local`` marks this peer's own record.
    """

    record: AvailabilityRecord
    first_seen: float
    last_seen: float
    expires_at: float
    size: int
    local: bool = False

    @property
    def peer_id(self) -> str:
        return self.record.peer_id

    @property
    def state(self) -> State:
        return self.record.state

    @property
    def seq(self) -> int:
        return self.record.seq

    @property
    def capabilities(self) -> tuple[tuple[str, str], ...]:
        return self.record.capabilities

    @property
    def age(self) -> float:
        """Seconds since the last record from this peer arrived."""
        return max(0.0, time.monotonic() - self.last_seen)

    @property
    def at_capacity(self) -> bool:
        r = self.record
        return r.max_concurrency > 0 and r.in_flight + r.queue >= r.max_concurrency

    @property
    def utilization(self) -> float | None:
        """``(in_flight + queue) / max_concurrency``, or ``None`` if the peer states no limit."""
        r = self.record
        return (r.in_flight + r.queue) / r.max_concurrency if r.max_concurrency else None

    @property
    def accepting(self) -> bool:
        """Ready and not at capacity: worth sending a new request to."""
        return self.record.state is State.READY and not self.at_capacity

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary, for the CLI."""
        r = self.record
        return {
            "peer_id": r.peer_id,
            "seq": r.seq,
            "state": str(r.state),
            "capabilities": [{"name": n, "version": v} for n, v in r.capabilities],
            "in_flight": r.in_flight,
            "queue": r.queue,
            "max_concurrency": r.max_concurrency,
            "latency_ms": r.latency_ms,
            "tokens_per_s": r.tokens_per_s,
            "age_s": round(self.age, 3),
            "ttl_s": r.ttl_ms / 1000,
            "local": self.local,
        }


@dataclass(frozen=True, slots=True)
class AvailabilityChange:
    """A change of the table, as delivered to :meth:`AvailabilityService.subscribe` channels.

    ``kind`` is ``"added"`` (first record of a peer), ``"updated"`` (a newer
    record) or ``"removed"`` (with ``reason`` ``"expired"`` or ``"left"``).
    For ``"removed"``, ``entry`` is the last entry the table held.
    """

    kind: Literal["added", "updated", "removed"]
    peer_id: str
    entry: AvailabilityEntry
    previous: AvailabilityEntry | None = None
    reason: str = ""

    @property
    def state_changed(self) -> bool:
        return self.previous is None or self.previous.state != self.entry.state or self.kind == "removed"


@dataclass
class AvailabilityStats:
    """Counters, for tests, benchmarks and debugging."""

    published: int = 0
    #: Sum of the sizes of the records published, in bytes.
    published_bytes: int = 0
    publish_errors: int = 0
    validated: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    evicted: int = 0
    dropped_notifications: int = 0
    pubsub_restarts: int = 0
    #: Bytes of pubsub RPCs (records, control, gossip) this peer wrote, before
    #: stream-muxer and Noise framing.
    bytes_sent: int = 0
    rpcs_sent: int = 0


# -- hardened pubsub -----------------------------------------------------------------


class _BufferedReads:
    """A stream whose small reads are served from a buffer filled by large ones.

    py-libp2p's pubsub reads each RPC's varint length one byte at a time, and
    its yamux answers every read with a WINDOW_UPDATE frame: three or four
    frames, each encrypted and written, per record received. Reading whatever
    has arrived in one go makes that one. Everything but ``read`` is the
    wrapped stream's.
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


class _GuardedPubsub(Pubsub):
    """py-libp2p's Pubsub, made safe to expose to remote input and measurable.

    * ``push_msg`` runs as a service task, and in 0.8.1 one malformed message
      (a garbage ``key`` field with an unextractable ``from``) raises from the
      signature check, which stops the whole pubsub service. Here it is dropped.
    * A stream handler that raises would stop the host; here it resets the stream.
    * A peer that opens a pubsub stream to us gets one back even if its
      connection predates our pubsub (py-libp2p only opens streams on new
      connections, so two peers that start pubsub at different times after
      connecting would otherwise end up with a one-way link).
    * Bytes written are counted for :class:`AvailabilityStats`.
    """

    def __init__(
        self, host: IHost, router: GossipSub, stream_setup_timeout: float, stats: AvailabilityStats
    ) -> None:
        super().__init__(host, router)
        self.stream_setup_timeout = stream_setup_timeout
        self.stats = stats
        self.inbound: set[INetStream] = set()
        self._ensuring: set[ID] = set()
        self._registering: dict[ID, trio.Lock] = {}

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        try:
            await super().push_msg(msg_forwarder, msg)
        except Exception as exc:
            log.debug("dropped a gossip message forwarded by %s: %s", msg_forwarder, type(exc).__name__)

    async def stream_handler(self, stream: INetStream) -> None:
        if not self.manager.is_running:
            # Accepted in the moment between stopping and unregistering: py-libp2p
            # would return at once and leave the stream open, and the neighbour
            # would keep writing into it.
            try:
                await stream.reset()
            except Exception:
                pass
            return
        self.inbound.add(stream)
        try:
            peer_id = stream.muxed_conn.peer_id
            if peer_id not in self.peers and self.manager.is_running:
                self.manager.run_task(self.ensure_stream, peer_id)
            await super().stream_handler(cast(INetStream, _BufferedReads(stream)))
        except Exception as exc:
            log.debug("pubsub stream failed: %s", type(exc).__name__)
        finally:
            self.inbound.discard(stream)
            # py-libp2p's reader returns without closing the stream when pubsub
            # stops; the neighbour would then keep writing into an unread stream
            # and never notice that we are gone.
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                try:
                    await stream.reset()
                except Exception:
                    pass

    async def reset_all_streams(self) -> None:
        """Reset every pubsub stream, both ways: neighbours then stop sending to us.

        py-libp2p leaves them open when the service stops; an inbound stream's
        reader would then wait for the next message before noticing.
        """
        for stream in [*self.peers.values(), *self.inbound]:
            try:
                await stream.reset()
            except Exception:
                pass

    async def _handle_new_peer(self, peer_id: ID) -> None:
        # py-libp2p checks "already registered?" before an await and registers
        # after it, so two concurrent registrations (its notifee and ours) open
        # two streams and leak a sending task. One at a time per peer.
        lock = self._registering.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                await super()._handle_new_peer(peer_id)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._registering.pop(peer_id, None)

    async def ensure_stream(self, peer_id: ID) -> None:
        """Open our pubsub stream to ``peer_id`` unless there is one (or an attempt is running)."""
        if peer_id in self._ensuring:
            return
        self._ensuring.add(peer_id)
        try:
            if peer_id not in self.peers:
                await self.ensure_peer_stream(peer_id, timeout=self.stream_setup_timeout)
        except Exception as exc:
            log.debug("could not open a pubsub stream to %s: %s", peer_id, type(exc).__name__)
        finally:
            self._ensuring.discard(peer_id)

    async def write_msg(self, stream: INetStream, rpc_msg: rpc_pb2.RPC) -> bool:
        if rpc_msg.HasField("senderRecord") and not rpc_msg.subscriptions:
            # py-libp2p attaches its signed peer record (about 200 bytes, one
            # signature check at the receiver) to every RPC. It is an address
            # book update, not part of GossipSub; the stream's first RPC and
            # subscription changes still carry it.
            lean = rpc_pb2.RPC()
            lean.CopyFrom(rpc_msg)
            lean.ClearField("senderRecord")
            rpc_msg = lean
        ok = await super().write_msg(stream, rpc_msg)
        if ok:
            size = rpc_msg.ByteSize()
            self.stats.bytes_sent += size + len(encode_varint(size))
            self.stats.rpcs_sent += 1
        return ok


class _LeanGossipSub(GossipSub):
    """GossipSub that sends IDONTWANT only for large messages, as the v1.2 spec intends.

    py-libp2p 0.8.1 sends an IDONTWANT to every mesh peer for every message it
    receives; for records of ~200 bytes that costs about as much as the
    duplicates it saves. go-libp2p only does it above 1 KiB.
    """

    async def _emit_idontwant_for_message(self, msg_id: bytes, topic_ids: Iterable[str]) -> None:
        msg = self.mcache.get(msg_id)
        if msg is None or msg.ByteSize() < IDONTWANT_THRESHOLD:
            return
        await super()._emit_idontwant_for_message(msg_id, topic_ids)


# -- the service --------------------------------------------------------------------


def _load_level(load: LoadSnapshot) -> int:
    """Coarse load level; a change of level is a significant change worth publishing at once."""
    busy = load.in_flight + load.queue
    if busy <= 0:
        return 0
    if load.max_concurrency <= 0:
        return 1
    u = busy / load.max_concurrency
    return 1 if u < 0.5 else 2 if u < 1.0 else 3


def _clamp_uint(value: float, limit: int = 2**32 - 1) -> int:
    if not math.isfinite(value) or value <= 0:
        return 0
    return min(round(value), limit)


class AvailabilityService:
    """Publishes this peer's availability and keeps the table of everyone's.

    Start it in the peer's nursery with :func:`start_availability` (or
    ``await nursery.start(service.run)``); it stops when that nursery is
    cancelled. Call :meth:`leave` before a graceful shutdown.

    Args:
        host: the running libp2p host. The service runs its own py-libp2p
            ``Pubsub`` on it: one per host.
        identity: the identity the host runs with; it signs the records.
        config: tuning; defaults to :class:`AvailabilityConfig`.
        load_provider: polled for the current load; ``None``: use the figures
            given to :meth:`report`.
        capabilities: served capabilities, as ``(name, version)`` pairs or
            objects with ``.name`` and ``.version``.
    """

    def __init__(
        self,
        host: IHost,
        identity: Identity,
        config: AvailabilityConfig | None = None,
        *,
        load_provider: LoadProvider | None = None,
        capabilities: Iterable[Any] = (),
    ) -> None:
        self.config = config or AvailabilityConfig()
        self._host = host
        self._identity = identity
        self.peer_id = str(identity.peer_id)
        if host.get_id() != identity.peer_id:
            raise ConfigError("the host does not run with this identity")
        self._load_provider = load_provider
        self._reported = LoadSnapshot()
        self._state: State = self.config.initial_state
        self._wake = trio.Event()
        self._force = True
        self._caps: tuple[tuple[str, str], ...] = ()
        self.set_capabilities(capabilities)
        self._seq = 0
        self._entries: dict[str, AvailabilityEntry] = {}
        self._seq_high: dict[str, tuple[int, float]] = {}
        self._version = 0
        self._changed = trio.Event()
        self._watchers: list[trio.MemorySendChannel[AvailabilityChange]] = []
        self._silent = False
        self._ready_once = False
        self._publish_lock = trio.Lock()
        self._pubsub: _GuardedPubsub | None = None
        self._router: GossipSub | None = None
        self._running = False
        self.stats = AvailabilityStats()

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once subscribed and publishing.

        If py-libp2p's pubsub service fails later, the failure is logged and
        pubsub is restarted (with backoff) instead of taking the peer down.
        """
        if self._running:
            raise RuntimeError("the availability service is already running")
        self._running = True
        self._ready_once = False
        backoff = RESTART_BACKOFF[0]
        try:
            while True:
                try:
                    await self._run_once(task_status)
                    return
                except Exception as exc:
                    if not self._ready_once:
                        raise
                    self.stats.pubsub_restarts += 1
                    log.warning(
                        "availability gossip failed (%s); restarting it in %.0f s",
                        _describe(exc),
                        backoff,
                    )
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF[1])
        finally:
            self._running = False

    async def _run_once(self, task_status: TaskStatus[None]) -> None:
        cfg = self.config
        router = _LeanGossipSub(
            [PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=cfg.degree,
            degree_low=cfg.degree_low,
            degree_high=cfg.degree_high,
            heartbeat_interval=cfg.heartbeat_interval,
            heartbeat_initial_delay=0.1,
            adaptive_gossip_enabled=False,
            max_messages_per_topic_per_second=cfg.max_messages_per_topic_per_second,
        )
        self.check_host_free()
        network = self._host.get_network()
        before: list[INotifee] = list(getattr(network, "notifees", []))
        pubsub = _GuardedPubsub(self._host, router, cfg.stream_setup_timeout, self.stats)
        notifees = [n for n in getattr(network, "notifees", []) if n not in before]
        # Message ids are (origin, seqno) and py-libp2p starts seqno at
        # int(time.time()): a peer restarted within a minute or two could reuse
        # ids still in its neighbours' seen-caches, and its records would be
        # dropped as duplicates. Microseconds keep them unique across restarts.
        pubsub.counter = time.time_ns() // 1000
        try:
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                pubsub.set_topic_validator(cfg.topic, self._validator, is_async_validator=False)
                subscription = await pubsub.subscribe(cfg.topic)
                self._pubsub, self._router = pubsub, router
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._drain_subscription, subscription)
                    nursery.start_soon(self._attach_existing_connections, nursery)
                    nursery.start_soon(self._sweeper)
                    nursery.start_soon(self._maintenance)
                    self._force = True
                    nursery.start_soon(self._publisher)
                    self._ready_once = True
                    task_status.started()
        finally:
            self._pubsub = self._router = None
            # Unregister first, so that neighbours that react to the resets below
            # cannot open new streams into a stopped pubsub.
            for notifee in notifees:
                remove = getattr(network, "remove_notifee", None)
                if remove is not None:
                    remove(notifee)
            for proto in router.get_protocols():
                try:
                    self._host.remove_stream_handler(proto)
                except Exception:
                    pass
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT):
                await pubsub.reset_all_streams()
            # py-libp2p's seen-message cache runs a sweeper thread that nothing stops.
            try:
                pubsub.seen_messages.stop()
            except Exception:
                pass

    def check_host_free(self) -> None:
        """Raise :class:`ConfigError` if a pubsub service already runs on the host.

        Two Pubsubs on one host would fight over the stream handlers, each
        seeing some of the streams.
        """
        mux = self._host.get_mux()
        registered = set(mux.get_protocols())
        for proto in (PROTOCOL_ID_V12, PROTOCOL_ID_V11, PROTOCOL_ID):
            if proto in registered:
                raise ConfigError(
                    f"another pubsub service already handles {proto} on this host; run one "
                    "AvailabilityService per host (a Peer starts its own unless gossip=False)"
                )

    @property
    def running(self) -> bool:
        """Whether the service is subscribed and publishing."""
        return self._pubsub is not None

    @property
    def pubsub(self) -> Pubsub | None:
        """The py-libp2p Pubsub (while running); other topics may share it."""
        return self._pubsub

    @property
    def router(self) -> GossipSub | None:
        """The GossipSub router (while running)."""
        return self._router

    @property
    def bytes_sent(self) -> int:
        """Pubsub bytes written since the service was created (all topics, control included)."""
        return self.stats.bytes_sent

    async def _attach_existing_connections(self, nursery: trio.Nursery) -> None:
        # Pubsub only notices connections made after it started.
        ps = self._pubsub
        if ps is None:
            return
        for peer_id in list(self._host.get_network().get_connections_map()):
            nursery.start_soon(ps.ensure_stream, peer_id)

    async def _drain_subscription(self, subscription: Any) -> None:
        # Records are entered into the table by the validator (which sees each
        # one exactly once, before forwarding); the subscription only has to be
        # emptied so that its 32-slot buffer never overflows.
        async for _ in subscription:
            pass

    async def _maintenance(self) -> None:
        await trio.sleep(FIRST_SUBSCRIPTION_REFRESH)
        while True:
            await self._refresh_subscription()
            router = self._router
            if router is not None:
                cutoff = time.time() - 60.0
                for times in router.recent_message_deliveries.values():
                    times[:] = [t for t in times if t > cutoff]
            await trio.sleep(MAINTENANCE_INTERVAL)

    async def _refresh_subscription(self) -> None:
        """Announce our subscription to every neighbour again.

        py-libp2p forgets a neighbour's subscriptions when it notices that an
        *old* stream to it died, even if the neighbour has reconnected and
        announced itself on a new stream in the meantime (a quick reconnect, or
        this service restarting): that neighbour then never sends us records.
        Repeating the announcement (a few dozen bytes per neighbour) heals it.
        """
        ps = self._pubsub
        if ps is None or not ps.peers:
            return
        try:
            packet, subopt = ps._build_announce_rpc(self.config.topic, True)
            await ps.message_all_peers(packet.SerializeToString(), announce=subopt)
        except Exception as exc:
            log.debug("re-announcing the subscription failed: %s", _describe(exc))

    # -- local state -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def capabilities(self) -> tuple[tuple[str, str], ...]:
        return self._caps

    def set_state(self, state: State | str) -> None:
        """Set this peer's state; published at once (within the rate limit).

        Setting any state after :meth:`leave` resumes publishing.
        """
        new = State(state)
        if new is not State.LEAVING:
            self._silent = False
        if new != self._state:
            self._state = new
            self._poke()

    def set_capabilities(self, capabilities: Iterable[Any]) -> None:
        """Set the served capabilities: ``(name, version)`` pairs or objects with ``.name``/``.version``.

        Raises :class:`ConfigError` if a name repeats or the record would exceed
        :data:`~modelnet_p2p.proto.availability.MAX_MESSAGE_SIZE`.
        """
        try:
            caps = capabilities_of(capabilities)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # Check the largest record these capabilities can make.
        probe = AvailabilityRecord(
            self.peer_id,
            2**64 - 1,
            State.DRAINING,
            caps,
            2**32 - 1,
            2**32 - 1,
            2**32 - 1,
            2**32 - 1,
            1e12,
            MAX_TTL_MS,
        )
        try:
            seal(probe, self._identity)
        except ProtocolError as exc:
            raise ConfigError(f"capabilities do not fit in an availability record: {exc.message}") from None
        if caps != self._caps:
            self._caps = caps
            self._poke()

    def report(
        self,
        in_flight: int,
        queue: int = 0,
        max_concurrency: int = 0,
        latency_ms: float = 0.0,
        tokens_per_s: float = 0.0,
    ) -> None:
        """Report the current load (used when no ``load_provider`` is set)."""
        self._reported = LoadSnapshot(in_flight, queue, max_concurrency, latency_ms, tokens_per_s)
        if self._load_provider is None:
            self._wake.set()

    @property
    def load_provider(self) -> LoadProvider | None:
        """The callable polled for the current load (``None``: :meth:`report` figures)."""
        return self._load_provider

    @load_provider.setter
    def load_provider(self, provider: LoadProvider | None) -> None:
        self._load_provider = provider
        self._wake.set()

    def _poke(self) -> None:
        self._force = True
        self._wake.set()

    def current_load(self) -> LoadSnapshot:
        """The load figures the next record will carry."""
        if self._load_provider is None:
            return self._reported
        try:
            load = self._load_provider()
        except Exception as exc:
            log.debug("load provider failed: %s", _describe(exc))
            return self._reported
        self._reported = load
        return load

    # -- publishing -------------------------------------------------------------------

    async def _publisher(self) -> None:
        cfg = self.config
        last_publish = -math.inf
        next_periodic = -math.inf
        last_key: tuple[Any, ...] | None = None
        last_neighbours = 0
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            if self._silent:
                await self._wake.wait()
                self._force = True
                continue
            load = self.current_load()
            key = (_load_level(load), load.max_concurrency)
            ps = self._pubsub
            neighbours = len(ps.peer_topics.get(cfg.topic, ())) if ps is not None else 0
            if neighbours > last_neighbours:
                # A new neighbour: publish so it learns about us without waiting a period.
                self._force = True
            last_neighbours = neighbours
            due = self._force or key != last_key or now >= next_periodic
            if due:
                earliest = last_publish + cfg.min_publish_gap
                if now < earliest:
                    with trio.move_on_at(earliest):
                        await trio.sleep_forever()
                    continue
                self._force = False
                last_key = key
                await self._publish(load)
                last_publish = trio.current_time()
                next_periodic = last_publish + cfg.publish_interval
                continue
            with trio.move_on_at(min(next_periodic, now + cfg.load_poll_interval)):
                await self._wake.wait()

    async def _publish(self, load: LoadSnapshot | None = None) -> bool:
        async with self._publish_lock:
            ps = self._pubsub
            if ps is None:
                return False
            load = load if load is not None else self.current_load()
            self._seq = max(self._seq + 1, time.time_ns() // 1000)
            try:
                record = AvailabilityRecord(
                    peer_id=self.peer_id,
                    seq=self._seq,
                    state=self._state,
                    capabilities=self._caps,
                    in_flight=_clamp_uint(load.in_flight),
                    queue=_clamp_uint(load.queue),
                    max_concurrency=_clamp_uint(load.max_concurrency),
                    latency_ms=_clamp_uint(load.latency_ms),
                    tokens_per_s=min(max(float(load.tokens_per_s), 0.0), 1e12)
                    if math.isfinite(load.tokens_per_s)
                    else 0.0,
                    ttl_ms=int(self.config.effective_ttl * 1000),
                )
                data = seal(record, self._identity)
            except (ProtocolError, ValueError, TypeError) as exc:
                self.stats.publish_errors += 1
                log.warning("cannot build an availability record: %s", _describe(exc))
                return False
            try:
                await ps.publish(self.config.topic, data)
            except Exception as exc:
                self.stats.publish_errors += 1
                log.debug("publishing the availability record failed: %s", _describe(exc))
                return False
            self.stats.published += 1
            self.stats.published_bytes += len(data)
            return True

    async def publish_now(self) -> bool:
        """Publish a record at once, bypassing the rate limit (for tools; use sparingly)."""
        return await self._publish()

    async def leave(self) -> None:
        """Publish ``leaving`` and stop publishing; call before a graceful shutdown.

        Waits (at most ``leave_flush_timeout``) until the record has been handed
        to every neighbour's connection. The service keeps relaying others'
        records until it is cancelled.
        """
        self._state = State.LEAVING
        self._silent = True
        self._wake.set()
        if await self._publish():
            await self._flush(self.config.leave_flush_timeout)

    async def drain(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Announce ``draining`` and wait until no request is in flight.

        Refusing new requests is up to the inference server (see
        ``InferenceServer.draining``). Returns ``True`` once the in-flight count
        reaches zero, ``False`` if ``timeout`` seconds pass first. The state
        stays ``draining``; follow with :meth:`leave`, or set ``ready`` to resume.
        """
        self.set_state(State.DRAINING)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                if self.current_load().in_flight <= 0:
                    return True
                await trio.sleep(poll)
        return False

    async def _flush(self, timeout: float) -> None:
        ps = self._pubsub
        if ps is None:
            return
        with trio.move_on_after(timeout):
            while any(len(q) for q in list(ps.peer_queues.values())):
                await trio.sleep(0.01)
            # The sending tasks have popped the record; let them finish writing it.
            await trio.sleep(0.05)

    # -- receiving -----------------------------------------------------------------------

    def _validator(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        # A raising synchronous validator stops py-libp2p's whole pubsub service.
        try:
            return self._validate(msg)
        except Exception as exc:
            self.stats.rejected["internal"] += 1
            log.debug("availability validator failed: %s", _describe(exc))
            return False

    def _reject(self, reason: str, origin: bytes, detail: str = "") -> bool:
        self.stats.rejected[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            try:
                who = ID(origin).to_base58()
            except Exception:
                who = origin.hex()[:16]
            log.debug("rejected availability record from %s: %s %s", who, reason, detail)
        return False

    def _validate(self, msg: rpc_pb2.Message) -> bool:
        self.stats.validated += 1
        data: bytes = msg.data
        origin: bytes = msg.from_id
        # 1. size, before any parsing.
        if len(data) > MAX_MESSAGE_SIZE:
            return self._reject("oversized", origin, f"{len(data)} bytes")
        # 2. strict decoding of envelope and record.
        try:
            signed = open_envelope(data, verify=False)
        except ProtocolError as exc:
            return self._reject("malformed", origin, exc.message)
        # 3. the record names the peer that published the gossip message
        #    (whose signature py-libp2p has already checked).
        if signed.peer_id_bytes != origin:
            return self._reject("origin_mismatch", origin)
        # 4. the record's own signature, by the key behind its peer id.
        if not signed.verify():
            return self._reject("bad_signature", origin)
        # 5. newer than anything accepted from that peer.
        record = signed.record
        high = self._seq_high.get(record.peer_id)
        if high is not None and record.seq <= high[0]:
            return self._reject("stale", origin, f"seq {record.seq} <= {high[0]}")
        if record.peer_id not in self._entries and len(self._entries) >= self.config.max_peers:
            return self._reject("table_full", origin)
        self._apply(signed)
        self.stats.accepted += 1
        return True

    def _apply(self, signed: SignedRecord) -> None:
        record = signed.record
        now = time.monotonic()
        ttl = min(max(record.ttl_ms, MIN_TTL_MS), MAX_TTL_MS) / 1000
        if record.state is State.LEAVING:
            ttl = min(ttl, LEAVING_LINGER)
        prev = self._entries.get(record.peer_id)
        entry = AvailabilityEntry(
            record=record,
            first_seen=prev.first_seen if prev is not None else now,
            last_seen=now,
            expires_at=now + ttl,
            size=signed.size,
            local=record.peer_id == self.peer_id,
        )
        self._entries[record.peer_id] = entry
        self._seq_high[record.peer_id] = (record.seq, now)
        self._notify(AvailabilityChange("added" if prev is None else "updated", record.peer_id, entry, prev))

    async def _sweeper(self) -> None:
        while True:
            await trio.sleep(self.config.sweep_interval)
            self.sweep()

    def sweep(self) -> int:
        """Evict expired entries now (the service also does it periodically); returns how many."""
        now = time.monotonic()
        expired = [e for e in self._entries.values() if e.expires_at <= now]
        for entry in expired:
            del self._entries[entry.peer_id]
            self.stats.evicted += 1
            reason = "left" if entry.state is State.LEAVING else "expired"
            log.debug("availability of %s removed (%s)", entry.peer_id, reason)
            self._notify(AvailabilityChange("removed", entry.peer_id, entry, entry, reason))
        forget = now - self.config.seq_memory
        for pid in [p for p, (_, t) in self._seq_high.items() if t < forget and p not in self._entries]:
            del self._seq_high[pid]
        return len(expired)

    # -- reading the table ---------------------------------------------------------------

    def table(self) -> dict[str, AvailabilityEntry]:
        """Live entries by peer id (base58), this peer's own included (``local=True``)."""
        now = time.monotonic()
        return {pid: e for pid, e in self._entries.items() if e.expires_at > now}

    def get(self, peer_id: str) -> AvailabilityEntry | None:
        entry = self._entries.get(peer_id)
        return entry if entry is not None and entry.expires_at > time.monotonic() else None

    def providers(self, capability: str, version: str | None = None) -> list[AvailabilityEntry]:
        """Entries that serve ``capability`` and are accepting, least loaded first."""
        out = [
            e
            for e in self.table().values()
            if e.accepting and not e.local and e.record.serves(capability, version)
        ]
        out.sort(key=lambda e: (e.utilization or 0.0, e.record.latency_ms))
        return out

    @property
    def version(self) -> int:
        """Increases with every change of the table."""
        return self._version

    async def wait_changed(self, after: int) -> int:
        """Wait until :attr:`version` differs from ``after``; returns the new version."""
        while self._version == after:
            await self._changed.wait()
        return self._version

    async def wait_for(
        self,
        peer_id: str,
        predicate: Callable[[AvailabilityEntry | None], bool] | None = None,
        timeout: float = 10.0,
    ) -> AvailabilityEntry | None:
        """Wait until ``predicate(table entry of peer_id or None)`` holds; return that entry.

        The default predicate waits for any entry. Raises :class:`trio.TooSlowError`
        after ``timeout`` seconds.
        """
        pred = predicate or (lambda e: e is not None)
        with trio.fail_after(timeout):
            while True:
                version = self._version
                entry = self.get(peer_id)
                if pred(entry):
                    return entry
                # Expiry is only noticed by the sweep, which bumps the version.
                await self.wait_changed(version)

    def subscribe(self, max_buffer: int = 256) -> trio.MemoryReceiveChannel[AvailabilityChange]:
        """A channel of :class:`AvailabilityChange` events; close it when done.

        A subscriber that falls ``max_buffer`` events behind loses events (counted
        in ``stats.dropped_notifications``) and should re-read :meth:`table`.
        """
        send, recv = trio.open_memory_channel[AvailabilityChange](max_buffer)
        self._watchers.append(send)
        return recv

    def _notify(self, change: AvailabilityChange) -> None:
        self._version += 1
        self._changed.set()
        self._changed = trio.Event()
        for send in list(self._watchers):
            try:
                send.send_nowait(change)
            except trio.WouldBlock:
                self.stats.dropped_notifications += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.remove(send)

    def mesh_view(self, cards: Mapping[str, Any] | None = None) -> list[MeshViewRow]:
        """:func:`mesh_view` of this service's table."""
        return mesh_view(self.table(), cards)


async def start_availability(
    host: IHost,
    identity: Identity,
    nursery: trio.Nursery,
    config: AvailabilityConfig | None = None,
    load_provider: LoadProvider | None = None,
    capabilities: Iterable[Any] = (),
) -> AvailabilityService:
    """Create an :class:`AvailabilityService`, start it in ``nursery`` and return it once publishing."""
    service = AvailabilityService(
        host, identity, config, load_provider=load_provider, capabilities=capabilities
    )
    service.check_host_free()  # here, so that the error is not wrapped by the nursery
    await nursery.start(service.run)
    return service


class InferenceLoad:
    """A load provider fed by an :class:`~modelnet_p2p.services.inference.server.InferenceServer`.

    ::

        load = InferenceLoad(peer.inference, peer.limits.max_concurrency)
        peer.inference.on_request_done = load.on_request_done
        service = await start_availability(..., load_provider=load.snapshot)

    Latency and throughput are exponentially weighted averages over finished
    requests (chunks per second stands in for tokens per second).
    """

    def __init__(self, server: Any, max_concurrency: int, alpha: float = 0.2) -> None:
        self._server = server
        self._max = max_concurrency
        self._alpha = alpha
        self.latency_ms = 0.0
        self.tokens_per_s = 0.0
        self.queue = 0

    def on_request_done(
        self, capability: str, remote: str, seconds: float, chunks: int, error: str | None
    ) -> None:
        if error is not None or seconds <= 0:
            return
        a = self._alpha
        ms = seconds * 1000
        self.latency_ms = ms if self.latency_ms == 0 else (1 - a) * self.latency_ms + a * ms
        rate = chunks / seconds
        self.tokens_per_s = rate if self.tokens_per_s == 0 else (1 - a) * self.tokens_per_s + a * rate

    def snapshot(self) -> LoadSnapshot:
        return LoadSnapshot(
            in_flight=int(getattr(self._server, "in_flight", 0)),
            queue=self.queue,
            max_concurrency=self._max,
            latency_ms=self.latency_ms,
            tokens_per_s=self.tokens_per_s,
        )


# -- mesh view -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapabilityView:
    """One capability of a peer, as seen through availability and discovery together."""

    name: str
    version: str
    #: Listed in the peer's live availability record.
    available: bool
    #: The discovery card for it, if one is known.
    card: Any = None


@dataclass(frozen=True, slots=True)
class MeshViewRow:
    """A peer as the CLI shows it: availability entry (if live) joined with its cards."""

    peer_id: str
    availability: AvailabilityEntry | None
    capabilities: tuple[CapabilityView, ...]

    @property
    def state(self) -> str:
        return str(self.availability.state) if self.availability is not None else "unknown"

    def to_dict(self) -> dict[str, Any]:
        a = self.availability
        return {
            "peer_id": self.peer_id,
            "state": self.state,
            "availability": a.to_dict() if a is not None else None,
            "capabilities": [
                {"name": c.name, "version": c.version, "available": c.available, "card": c.card is not None}
                for c in self.capabilities
            ],
        }


def _card_name_version(card: Any) -> tuple[str, str] | None:
    if isinstance(card, Mapping):
        name, version = card.get("name"), card.get("version", "")
    else:
        name, version = getattr(card, "name", None), getattr(card, "version", "")
    if not isinstance(name, str) or not name:
        return None
    return name, "" if version is None else str(version)


def mesh_view(
    table: Mapping[str, AvailabilityEntry],
    cards: Mapping[str, Any] | None = None,
) -> list[MeshViewRow]:
    """Join the availability table with discovered capability cards, by peer id.

    ``cards`` maps a peer id to its cards: a sequence of objects with
    ``.name``/``.version`` attributes or of dicts with those keys (or a single
    such card). Peers known from only one side appear too, with
    ``availability=None`` or with no cards. Rows are sorted by peer id.
    """
    cards = cards or {}
    rows: list[MeshViewRow] = []
    for pid in sorted(set(table) | set(cards)):
        entry = table.get(pid)
        raw = cards.get(pid, ())
        if isinstance(raw, Mapping) or hasattr(raw, "name") or not isinstance(raw, Iterable):
            raw = (raw,)
        by_name: dict[str, tuple[str, Any]] = {}
        for card in raw:
            nv = _card_name_version(card)
            if nv is not None:
                by_name[nv[0]] = (nv[1], card)
        announced = dict(entry.capabilities) if entry is not None else {}
        views: list[CapabilityView] = []
        for name in sorted(set(announced) | set(by_name), key=lambda n: n.encode()):
            version = announced.get(name, by_name.get(name, ("", None))[0])
            card = by_name.get(name, ("", None))[1]
            views.append(CapabilityView(name, version, name in announced, card))
        rows.append(MeshViewRow(pid, entry, tuple(views)))
    return rows


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions[:3])
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__

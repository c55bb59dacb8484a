"""Availability gossip: who is up, what it serves, how busy it is (``specs/availability.md``).

A peer running an :class:`AvailabilityService` publishes its signed availability record
only if it serves something, on one GossipSub topic per served capability
(:func:`~modelnet_p2p.proto.availability.topic_for`), and keeps a soft-state table of the
records of the capabilities it serves or *follows* (:meth:`AvailabilityService.follow`,
which routing calls for every capability it looks up; a followed topic is left after
``follow_idle`` seconds without use). The service composes three parts, each usable on
its own:

* :class:`~modelnet_p2p.p2p.pubsub.Gossip`: GossipSub on the host (the only part that
  touches py-libp2p, through :mod:`modelnet_p2p.p2p`), with unsigned, content-addressed
  messages: the record's own signature is the only one checked, once per record;
* :class:`~.publisher.Publisher`: when to publish and what (at start, at once on a
  significant change or a new subscriber, every ``publish_interval`` otherwise, never more
  than once per ``min_publish_gap``);
* :class:`~.table.AvailabilityTable`: the topic validator (size, strict encoding, origin,
  record signature, sequence number) and the table it fills, whose entries expire when
  their TTL passes without a newer record.

:meth:`AvailabilityService.leave` publishes ``leaving`` before shutdown, and
:meth:`AvailabilityService.drain` announces ``draining`` and waits for the requests in
flight to finish. All tasks run in the nursery the service is started in (the peer's),
so they stop with the peer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ...errors import ConfigError, ProtocolError, UnavailableError
from ...p2p.host import Host
from ...p2p.identity import Identity
from ...p2p.pubsub import Gossip, GossipMessage, GossipStats, describe_error
from ...proto.availability import (
    MAX_COUNT,
    MAX_LATENCY_MS,
    MAX_SEQ,
    MAX_TOKENS_PER_S,
    MAX_TTL_MS,
    AvailabilityRecord,
    State,
    capabilities_of,
    seal,
    topic_for,
)
from .config import AvailabilityConfig
from .load import InferenceLoad, LoadProvider, LoadSnapshot
from .publisher import Publisher
from .table import AvailabilityChange, AvailabilityEntry, AvailabilityTable, TableStats
from .view import CapabilityView, MeshViewRow, mesh_view

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


@dataclass
class AvailabilityStats:
    """Counters, for tests, benchmarks and debugging: publishing here, receiving and gossip below."""

    published: int = 0
    #: Sum of the sizes of the records published, in bytes.
    published_bytes: int = 0
    publish_errors: int = 0
    table: TableStats = field(default_factory=TableStats)
    gossip: GossipStats = field(default_factory=GossipStats)

    @property
    def validated(self) -> int:
        return self.table.validated

    @property
    def accepted(self) -> int:
        return self.table.accepted

    @property
    def rejected(self) -> Any:
        """Rejected records by reason (a :class:`collections.Counter`)."""
        return self.table.rejected

    @property
    def evicted(self) -> int:
        return self.table.evicted

    @property
    def dropped_notifications(self) -> int:
        return self.table.dropped_notifications

    @property
    def pubsub_restarts(self) -> int:
        return self.gossip.restarts

    @property
    def bytes_sent(self) -> int:
        """Bytes of pubsub RPCs (records, control, gossip) this peer wrote, before muxer and Noise."""
        return self.gossip.bytes_sent

    @property
    def rpcs_sent(self) -> int:
        return self.gossip.rpcs_sent


class AvailabilityService:
    """Publishes this peer's availability and keeps the table of everyone's.

    Start it in the peer's nursery with :func:`start_availability` (or
    ``await nursery.start(service.run)``); it stops when that nursery is
    cancelled. Call :meth:`leave` before a graceful shutdown.

    Args:
        host: the running libp2p host. The service runs its own pubsub on it: one per host.
        identity: the identity the host runs with; it signs the records.
        config: tuning; defaults to :class:`AvailabilityConfig`.
        load_provider: polled for the current load; ``None``: use the figures
            given to :meth:`report`.
        capabilities: served capabilities, as ``(name, version)`` pairs or
            objects with ``.name`` and ``.version``.
        wall_clock: wall-clock seconds, for record and message sequence numbers.
    """

    def __init__(
        self,
        host: Host,
        identity: Identity,
        config: AvailabilityConfig | None = None,
        *,
        load_provider: LoadProvider | None = None,
        capabilities: Iterable[Any] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or AvailabilityConfig()
        self._identity = identity
        self.peer_id = str(identity.peer_id)
        self.gossip = Gossip(host, self.config.gossip_settings, wall_clock=wall_clock)
        if self.gossip.local_peer_id != self.peer_id:
            raise ConfigError("the host does not run with this identity")
        self._table = AvailabilityTable(self.peer_id, self.config)
        self.stats = AvailabilityStats(table=self._table.stats, gossip=self.gossip.stats)
        #: Topics of the served capabilities; of withdrawn ones still owed a record.
        self._served: frozenset[str] = frozenset()
        self._retiring: set[str] = set()
        #: Followed topics and when they were last used (trio time).
        self._followed: dict[str, float] = {}
        self._legacy_logged: set[str] = set()
        self._publisher = Publisher(
            self.peer_id,
            self.config,
            self._send,
            neighbours=self._subscribers,
            greet=self._greet,
            load_provider=load_provider,
            wall_clock=wall_clock,
        )
        self.set_capabilities(capabilities)
        self.gossip.on_ready(self._publisher.poke)
        self._running = False

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once subscribed and publishing.

        If py-libp2p's pubsub service fails later, the failure is logged and
        pubsub is restarted (with backoff) instead of taking the peer down.
        """
        if self._running:
            raise RuntimeError("the availability service is already running")
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.gossip.run)
                nursery.start_soon(self._table.run_sweeper)
                nursery.start_soon(self._publisher.run)
                nursery.start_soon(self._tend_topics)
                task_status.started()
        finally:
            self._running = False

    def check_host_free(self) -> None:
        """Raise :class:`ConfigError` if a pubsub service already runs on the host."""
        self.gossip.check_host_free()

    @property
    def running(self) -> bool:
        """Whether the service is subscribed and publishing."""
        return self.gossip.running

    @property
    def bytes_sent(self) -> int:
        """Pubsub bytes written since the service was created (all topics, control included)."""
        return self.stats.bytes_sent

    # -- local state --------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._publisher.state

    @property
    def capabilities(self) -> tuple[tuple[str, str], ...]:
        return self._publisher.capabilities

    def set_state(self, state: State | str) -> None:
        """Set this peer's state; published at once (within the rate limit).

        Setting any state after :meth:`leave` resumes publishing.
        """
        self._publisher.set_state(state)

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
            MAX_SEQ,
            State.DRAINING,
            caps,
            MAX_COUNT,
            MAX_COUNT,
            MAX_COUNT,
            MAX_LATENCY_MS,
            MAX_TOKENS_PER_S,
            MAX_TTL_MS,
        )
        try:
            seal(probe, self._identity)
        except ProtocolError as exc:
            raise ConfigError(f"capabilities do not fit in an availability record: {exc.message}") from None
        served = frozenset(self.topic(name) for name, _ in caps)
        if len(served) > self.config.max_topics:
            raise ConfigError(f"at most {self.config.max_topics} capabilities can be served")
        self._retiring |= self._served - served
        self._served = served
        for t in served:
            self.gossip.join(t, self._validate)
        self._trim_followed()
        self._publisher.set_capabilities(caps)

    # -- interest -------------------------------------------------------------------------

    def topic(self, capability: str) -> str:
        """The gossip topic of ``capability``'s records."""
        try:
            return topic_for(capability, self.config.topic_prefix)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def follow(self, capability: str) -> None:
        """Receive the records of ``capability``'s providers from now on (idempotent).

        Routing calls it for every capability it looks up; each call counts as a use, and
        a followed capability is left after ``follow_idle`` seconds without one.
        """
        self._use(self.topic(capability))
        self._trim_followed()

    def unfollow(self, capability: str) -> None:
        """Stop receiving ``capability``'s records, unless this peer serves it."""
        t = self.topic(capability)
        if self._followed.pop(t, None) is not None and t not in self._served:
            self.gossip.leave(t)

    def follow_neighbours(self) -> int:
        """Follow every capability a neighbour serves or follows (for views of the mesh).

        Their topics are known from the neighbours' subscriptions. Returns how many topics
        are joined afterwards (at most ``max_topics``).
        """
        prefix = self.config.topic_prefix
        for t in sorted(self.gossip.announced_topics()):
            if t.startswith(prefix) and len(t) > len(prefix):
                self._use(t)
        self._trim_followed()
        return len(self.gossip.topics())

    def following(self) -> frozenset[str]:
        """The joined topics: those of served and of followed capabilities."""
        return self.gossip.topics()

    def mesh_size(self) -> int:
        """The smallest GossipSub mesh among the joined topics (0 if none is joined)."""
        return min((self.gossip.mesh_size(t) for t in self.gossip.topics()), default=0)

    def needs_neighbours(self, capability: str) -> bool:
        """Whether fewer than ``degree_low`` neighbours share ``capability``'s topic.

        Then the caller should connect to some of its providers (from discovery), so that
        their records can reach this peer.
        """
        return len(self.gossip.subscribers(self.topic(capability))) < self.config.degree_low

    def _use(self, t: str) -> None:
        # Join topic t (if not yet) and mark it used now: most recently used last.
        self._followed.pop(t, None)
        self._followed[t] = trio.current_time()
        self.gossip.join(t, self._validate)

    def _trim_followed(self) -> None:
        while self._followed and len(self._served | set(self._followed)) > self.config.max_topics:
            oldest = next(iter(self._followed))
            del self._followed[oldest]
            if oldest not in self._served:
                self.gossip.leave(oldest)

    def _subscribers(self) -> frozenset[str]:
        return frozenset().union(*(self.gossip.subscribers(t) for t in self._served))

    def _greet(self, peer_id: str) -> bool:
        topics = [t for t in sorted(self._served) if peer_id in self.gossip.subscribers(t)]
        return self.gossip.greet(peer_id, topics)

    async def _tend_topics(self) -> None:
        # Leave followed topics idle for follow_idle; log neighbours that only speak version 1.
        cfg = self.config
        while True:
            await trio.sleep(min(cfg.follow_idle, 30.0))
            idle_since = trio.current_time() - cfg.follow_idle
            for t in [t for t, used in self._followed.items() if used <= idle_since]:
                del self._followed[t]
                if t not in self._served:
                    self.gossip.leave(t)
            if cfg.legacy_topic is not None:
                for pid in self.gossip.subscribers(cfg.legacy_topic) - self._legacy_logged:
                    if len(self._legacy_logged) >= cfg.max_peers:
                        break
                    self._legacy_logged.add(pid)
                    log.warning(
                        "peer %s speaks %s only, which this version no longer uses: it does not see "
                        "this peer's availability and this peer does not see its; upgrade it",
                        pid,
                        cfg.legacy_topic,
                    )

    def report(
        self,
        in_flight: int,
        queue: int = 0,
        max_concurrency: int = 0,
        latency_ms: float = 0.0,
        tokens_per_s: float = 0.0,
    ) -> None:
        """Report the current load (used when no ``load_provider`` is set)."""
        self._publisher.report(LoadSnapshot(in_flight, queue, max_concurrency, latency_ms, tokens_per_s))

    @property
    def load_provider(self) -> LoadProvider | None:
        """The callable polled for the current load (``None``: :meth:`report` figures)."""
        return self._publisher.load_provider

    @load_provider.setter
    def load_provider(self, provider: LoadProvider | None) -> None:
        self._publisher.load_provider = provider

    def current_load(self) -> LoadSnapshot:
        """The load figures the next record will carry."""
        return self._publisher.current_load()

    # -- publishing ---------------------------------------------------------------------

    async def _send(self, record: AvailabilityRecord) -> bool:
        if not self.gossip.running:
            return False
        try:
            data = seal(record, self._identity)
        except (ProtocolError, ValueError, TypeError) as exc:
            self.stats.publish_errors += 1
            log.warning("cannot build an availability record: %s", describe_error(exc))
            return False
        retiring = self._retiring - self._served
        topics = sorted(self._served | retiring)
        if not topics:
            return False
        try:
            await self.gossip.publish(topics, data)
        except UnavailableError as exc:
            self.stats.publish_errors += 1
            log.debug("publishing the availability record failed: %s", exc)
            return False
        # Followers of withdrawn capabilities have had their record; leave those topics.
        self._retiring -= retiring
        for t in retiring:
            if t not in self._followed:
                self.gossip.leave(t)
        self.stats.published += 1
        self.stats.published_bytes += len(data)
        return True

    async def publish_now(self) -> bool:
        """Publish a record at once, bypassing the rate limit (for tools; use sparingly)."""
        return await self._publisher.publish_now()

    async def leave(self) -> None:
        """Publish ``leaving`` and stop publishing; call before a graceful shutdown.

        Waits (at most ``leave_flush_timeout``) until the record has been handed
        to every neighbour's connection. The service keeps relaying others'
        records until it is cancelled.
        """
        if await self._publisher.leave():
            await self.gossip.flush(self.config.leave_flush_timeout)

    async def drain(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Announce ``draining`` and wait until no request is in flight.

        Refusing new requests is up to the inference server (see
        ``InferenceServer.draining``). Returns ``True`` once the in-flight count
        reaches zero, ``False`` if ``timeout`` seconds pass first. The state
        stays ``draining``; follow with :meth:`leave`, or set ``ready`` to resume.
        """
        return await self._publisher.drain(timeout, poll)

    # -- receiving ----------------------------------------------------------------------

    def _validate(self, msg: GossipMessage) -> bool:
        return self._table.offer(msg.data, msg.origin)

    def sweep(self) -> int:
        """Evict expired entries now (the service also does it periodically); returns how many."""
        return self._table.sweep()

    def table(self) -> dict[str, AvailabilityEntry]:
        """Live entries by peer id (base58), this peer's own included (``local=True``)."""
        return self._table.table()

    def get(self, peer_id: str) -> AvailabilityEntry | None:
        return self._table.get(peer_id)

    def providers(self, capability: str, version: str | None = None) -> list[AvailabilityEntry]:
        """Entries that serve ``capability`` and are accepting, least loaded first."""
        return self._table.providers(capability, version)

    @property
    def version(self) -> int:
        """Increases with every change of the table."""
        return self._table.version

    async def wait_changed(self, after: int) -> int:
        """Wait until :attr:`version` differs from ``after``; returns the new version."""
        return await self._table.wait_changed(after)

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
        return await self._table.wait_for(peer_id, predicate, timeout)

    def subscribe(self, max_buffer: int = 256) -> trio.MemoryReceiveChannel[AvailabilityChange]:
        """A channel of :class:`AvailabilityChange` events; close it when done."""
        return self._table.subscribe(max_buffer)

    def mesh_view(self, cards: Mapping[str, Any] | None = None) -> list[MeshViewRow]:
        """:func:`mesh_view` of this service's table."""
        return mesh_view(self.table(), cards)


async def start_availability(
    host: Host,
    identity: Identity,
    nursery: trio.Nursery,
    config: AvailabilityConfig | None = None,
    load_provider: LoadProvider | None = None,
    capabilities: Iterable[Any] = (),
    *,
    wall_clock: Callable[[], float] = time.time,
) -> AvailabilityService:
    """Create an :class:`AvailabilityService`, start it in ``nursery`` and return it once publishing."""
    service = AvailabilityService(
        host, identity, config, load_provider=load_provider, capabilities=capabilities, wall_clock=wall_clock
    )
    service.check_host_free()  # here, so that the error is not wrapped by the nursery
    await nursery.start(service.run)
    return service

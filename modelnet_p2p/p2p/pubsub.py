"""GossipSub for the services: join a topic with a validator, publish bytes, count what it costs.

:class:`Gossip` runs py-libp2p's ``Pubsub`` with a ``GossipSub`` router on a host, with every
workaround of :mod:`modelnet_p2p.p2p._compat.pubsub` applied, and shows the services only small
types of its own (:class:`GossipMessage`, :class:`GossipSettings`, :class:`GossipStats`):

* :meth:`Gossip.join` subscribes to a topic with its validator, before or while running, and
  :meth:`Gossip.leave` unsubscribes. The validator sees every new message of the topic exactly
  once, before it is delivered or forwarded, and a rejected message goes no further; for soft
  state that the validator records, it *is* the delivery.
* With ``GossipSettings(signed=False)`` messages are published unsigned and a message's id is a
  function of its data (``message_id``): for payloads that carry their own signature, so that a
  receiver verifies one signature per message instead of two.
* :meth:`Gossip.run` runs until cancelled. If py-libp2p's pubsub service dies after it was
  ready, the failure is logged and pubsub is restarted with backoff (topics re-joined,
  connections re-attached) instead of taking the peer down.
* Connections made before pubsub started get pubsub streams too; subscriptions are re-announced
  periodically (py-libp2p forgets them when an old stream dies).

GossipSub drops messages silently under load (a per-peer send queue of 32, a rate limit per
forwarder): use it for low-rate soft state only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.tools.anyio_service import background_trio_service

from ..errors import ConfigError, UnavailableError
from ._compat.pubsub import (
    GuardedPubsub,
    LeanGossipSub,
    announce_subscription,
    build_pubsub,
    build_router,
    pending_rpcs,
    registered_pubsub_protocols,
    stop_pubsub,
    trim_delivery_log,
)
from .host import Host

if TYPE_CHECKING:
    # trio-typing's stubs (installed with py-libp2p) shadow trio's own annotations.
    from trio_typing import TaskStatus

__all__ = [
    "Gossip",
    "GossipMessage",
    "GossipSettings",
    "GossipStats",
    "Validator",
    "describe_error",
]

log = logging.getLogger(__name__)

#: Seconds between maintenance rounds: re-announce subscriptions, trim GossipSub's delivery log.
MAINTENANCE_INTERVAL = 30.0
#: Seconds after start of the first subscription re-announcement.
FIRST_SUBSCRIPTION_REFRESH = 2.0
#: Seconds waited before the first and the last (doubling) attempt to restart a failed pubsub.
RESTART_BACKOFF = (1.0, 30.0)


@dataclass(frozen=True, slots=True)
class GossipMessage:
    """A message as a validator sees it.

    ``origin`` is the binary peer id of the publisher (whose gossip-layer signature py-libp2p
    has checked); ``forwarder`` the base58 id of the neighbour it came from.
    """

    data: bytes
    origin: bytes
    forwarder: str


#: Decides whether a message is accepted (delivered and forwarded). Must not block; should not
#: raise (a raising validator rejects the message).
Validator = Callable[[GossipMessage], bool]


@dataclass(frozen=True)
class GossipSettings:
    """GossipSub tuning (see :class:`~modelnet_p2p.services.availability.AvailabilityConfig`).

    Attributes:
        heartbeat_interval: whole seconds (py-libp2p's default is 120).
        degree, degree_low, degree_high: the mesh degree D, D_lo and D_hi.
        max_messages_per_topic_per_second: py-libp2p's rate limit per forwarder and topic; it
            counts relayed messages too.
        stream_setup_timeout: seconds spent opening a pubsub stream to a connected peer.
        signed: sign every message and require signatures (py-libp2p's ``strict_signing``).
            ``False`` publishes unsigned messages and ignores signatures; then ``message_id``
            must be set.
        message_id: the message id of a message's data; ``None``: py-libp2p's (origin, seqno).
        lazy_streams: open no pubsub stream while subscribed to nothing (and one to every
            connected peer at the first subscription), instead of one per connection.
    """

    heartbeat_interval: int = 1
    degree: int = 6
    degree_low: int = 4
    degree_high: int = 12
    max_messages_per_topic_per_second: float = 100.0
    stream_setup_timeout: float = 15.0
    signed: bool = True
    message_id: Callable[[bytes], bytes] | None = None
    lazy_streams: bool = True

    def __post_init__(self) -> None:
        if not self.signed and self.message_id is None:
            raise ConfigError("unsigned gossip needs a content-based message_id")
        if self.heartbeat_interval < 1:
            raise ConfigError("heartbeat_interval must be at least 1 s")
        if not 0 < self.degree_low <= self.degree <= self.degree_high:
            raise ConfigError("GossipSub degrees must satisfy 0 < degree_low <= degree <= degree_high")


@dataclass
class GossipStats:
    """Counters of one :class:`Gossip`."""

    #: Bytes of pubsub RPCs written (messages, control, gossip), before muxer and Noise framing.
    bytes_sent: int = 0
    rpcs_sent: int = 0
    #: Times the pubsub service died and was restarted.
    restarts: int = 0
    #: Messages dropped because processing them raised (malformed input).
    dropped: int = 0
    #: Own messages sent again to a neighbour that newly subscribed (:meth:`Gossip.greet`).
    greetings: int = 0


def describe_error(exc: BaseException) -> str:
    """A one-line description of ``exc`` (the first three leaves of a group), for logs."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(e) for e in exc.exceptions[:3])
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class Gossip:
    """GossipSub on one host. At most one per host (see :meth:`check_host_free`).

    Args:
        host: the running libp2p host.
        settings: GossipSub tuning.
        wall_clock: wall-clock seconds; message seqnos start at it (in microseconds), so that
            message ids stay unique across restarts.
    """

    def __init__(
        self,
        host: Host,
        settings: GossipSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings or GossipSettings()
        self.stats = GossipStats()
        self._host = host
        self._wall_clock = wall_clock
        self._topics: dict[str, Validator] = {}
        self._pubsub: GuardedPubsub | None = None
        self._router: GossipSub | None = None
        self._on_ready: list[Callable[[], None]] = []
        self._running = False
        self._ready_once = False
        self._nursery: trio.Nursery | None = None
        #: Joined topics with a live subscription, and the scope of the task that drains it.
        self._subscribed: dict[str, trio.CancelScope] = {}
        self._last_verdict: tuple[rpc_pb2.Message, bool] | None = None

    def check_host_free(self) -> None:
        """Raise :class:`ConfigError` if a pubsub service already runs on the host."""
        taken = registered_pubsub_protocols(self._host)
        if taken:
            raise ConfigError(
                f"another pubsub service already handles {taken[0]} on this host; run one "
                "AvailabilityService per host (a Peer starts its own unless gossip=False)"
            )

    def join(self, topic: str, validator: Validator) -> None:
        """Subscribe to ``topic`` with ``validator``: at once if running, else when it runs.

        Joining a joined topic replaces its validator.
        """
        self._topics[topic] = validator
        if self._nursery is not None and topic not in self._subscribed:
            self._nursery.start_soon(self._subscribe, topic)

    def leave(self, topic: str) -> None:
        """Unsubscribe from ``topic`` (no-op if not joined)."""
        if self._topics.pop(topic, None) is None:
            return
        scope = self._subscribed.pop(topic, None)
        if scope is not None:
            scope.cancel()
        if isinstance(self._router, LeanGossipSub):
            self._router.own_last.pop(topic, None)
        if self._nursery is not None:
            self._nursery.start_soon(self._unsubscribe, topic)

    def topics(self) -> frozenset[str]:
        """The joined topics."""
        return frozenset(self._topics)

    def announced_topics(self) -> frozenset[str]:
        """Every topic some neighbour has announced a subscription to."""
        ps = self._pubsub
        if ps is None:
            return frozenset()
        return frozenset(t for t, peers in list(ps.peer_topics.items()) if peers)

    def subscribers(self, topic: str) -> frozenset[str]:
        """Base58 ids of the neighbours that announced a subscription to ``topic``."""
        ps = self._pubsub
        return frozenset(str(p) for p in ps.peer_topics.get(topic, ())) if ps is not None else frozenset()

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` each time pubsub is (re)started and subscribed."""
        self._on_ready.append(callback)

    @property
    def running(self) -> bool:
        """Whether pubsub runs and is subscribed."""
        return self._pubsub is not None and self._pubsub.manager.is_running

    @property
    def local_peer_id(self) -> str:
        return str(self._host.get_id())

    def peers(self) -> frozenset[str]:
        """Base58 ids of the neighbours this peer has an open pubsub stream to."""
        ps = self._pubsub
        return frozenset(str(p) for p in ps.peers) if ps is not None else frozenset()

    def deferred_streams(self) -> int:
        """Pubsub streams not opened to new connections so far, for lack of a subscription."""
        ps = self._pubsub
        return ps.deferred if ps is not None else 0

    def awaited_streams(self) -> int:
        """Pubsub streams not opened (yet) on connections this peer dialed: the listener speaks first."""
        ps = self._pubsub
        return ps.awaited if ps is not None else 0

    def neighbours(self, topic: str) -> int:
        """How many neighbours have announced a subscription to ``topic``."""
        ps = self._pubsub
        return len(ps.peer_topics.get(topic, ())) if ps is not None else 0

    def mesh_size(self, topic: str) -> int:
        """How many neighbours are in this peer's GossipSub mesh for ``topic`` (grafted at heartbeats)."""
        router = self._router
        return len(router.mesh.get(topic, ())) if router is not None else 0

    def mesh_peers(self) -> frozenset[str]:
        """Base58 ids of the neighbours in this peer's GossipSub mesh for any topic."""
        router = self._router
        if router is None:
            return frozenset()
        return frozenset(str(p) for peers in list(router.mesh.values()) for p in peers)

    async def publish(self, topics: str | Sequence[str], data: bytes) -> None:
        """Publish ``data`` as one message on ``topics`` (signed if the settings say so).

        Raises :class:`UnavailableError` if pubsub is down.
        """
        ps = self._pubsub
        if ps is None:
            raise UnavailableError("gossip is not running")
        try:
            await ps.publish(topics if isinstance(topics, str) else list(topics), data)
        except Exception as exc:
            raise UnavailableError(f"publishing failed: {describe_error(exc)}") from None

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until everything queued has been handed to the connections."""
        ps = self._pubsub
        if ps is None:
            return
        with trio.move_on_after(timeout):
            while pending_rpcs(ps):
                await trio.sleep(0.01)
            # The sending tasks have popped the RPCs; let them finish writing.
            await trio.sleep(0.05)

    # -- for tests and tools ------------------------------------------------------------

    @property
    def libp2p_pubsub(self) -> Any:
        """py-libp2p's ``Pubsub`` (while running), for tests and tools; services never need it."""
        return self._pubsub

    @property
    def libp2p_router(self) -> Any:
        """py-libp2p's ``GossipSub`` router (while running), for tests and tools."""
        return self._router

    def greet(self, peer_id: str, topics: Iterable[str]) -> bool:
        """Send neighbour ``peer_id`` this peer's latest own message on each of ``topics``.

        For a neighbour that just subscribed: it learns this peer's current record at the
        cost of one message, where a new publish would reach every subscriber. A message on
        several topics is sent once. Returns ``False`` if some topic has no such message to
        send (nothing published on it yet).
        """
        router = self._router
        if router is None or not isinstance(router, LeanGossipSub):
            return False
        sent: list[rpc_pb2.Message] = []
        complete = True
        for t in topics:
            msg = router.own_message(t)
            if msg is None:
                complete = False
            elif not any(m is msg for m in sent):
                sent.append(msg)
        if sent:
            router.send_rpc(ID.from_base58(peer_id), rpc_pb2.RPC(publish=sent))
            self.stats.greetings += len(sent)
        return complete

    def send_raw(self, peer_id: str, message: rpc_pb2.Message) -> None:
        """Queue a raw pubsub message straight to neighbour ``peer_id``, bypassing every check."""
        router = self._router
        if router is None:
            raise UnavailableError("gossip is not running")
        router.send_rpc(ID.from_base58(peer_id), rpc_pb2.RPC(publish=[message]))

    # -- running --------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once subscribed to every joined topic.

        A failure before that is raised; a failure later restarts pubsub after a backoff.
        """
        if self._running:
            raise RuntimeError("this gossip service is already running")
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
                    self.stats.restarts += 1
                    log.warning("gossip failed (%s); restarting it in %.0f s", describe_error(exc), backoff)
                task_status = trio.TASK_STATUS_IGNORED
                await trio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF[1])
        finally:
            self._running = False

    async def _run_once(self, task_status: TaskStatus[None]) -> None:
        s = self.settings
        router = build_router(
            degree=s.degree,
            degree_low=s.degree_low,
            degree_high=s.degree_high,
            heartbeat_interval=s.heartbeat_interval,
            max_messages_per_topic_per_second=s.max_messages_per_topic_per_second,
        )
        self.check_host_free()
        pubsub, notifees = build_pubsub(
            self._host,
            router,
            stream_setup_timeout=s.stream_setup_timeout,
            on_write=self._count_write,
            on_dropped=self._count_dropped,
            wall_clock=self._wall_clock,
            strict_signing=s.signed,
            message_id=s.message_id,
            lazy=s.lazy_streams,
        )
        try:
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                self._pubsub, self._router = pubsub, router
                async with trio.open_nursery() as nursery:
                    for topic in list(self._topics):
                        await self._subscribe(topic, nursery)
                    self._nursery = nursery
                    # Pubsub only notices connections made after it started.
                    for peer_id in list(self._host.get_network().get_connections_map()):
                        nursery.start_soon(pubsub.ensure_stream, peer_id)
                    nursery.start_soon(self._maintenance, pubsub, router)
                    for callback in self._on_ready:
                        callback()
                    self._ready_once = True
                    task_status.started()
        finally:
            self._pubsub = self._router = self._nursery = None
            self._subscribed.clear()
            await stop_pubsub(self._host, pubsub, router, notifees)

    async def _subscribe(self, topic: str, nursery: trio.Nursery | None = None) -> None:
        # Subscribe, then drain the subscription in a task of its own until left.
        ps, validator, tasks = self._pubsub, self._topics.get(topic), nursery or self._nursery
        if ps is None or tasks is None or validator is None or topic in self._subscribed:
            return
        scope = trio.CancelScope()
        self._subscribed[topic] = scope
        try:
            ps.set_topic_validator(topic, self._validator_of(topic), is_async_validator=False)
            subscription = await ps.subscribe(topic)
        except Exception as exc:
            self._subscribed.pop(topic, None)
            log.debug("subscribing to %s failed: %s", topic, describe_error(exc))
            return
        tasks.start_soon(_drain, subscription, scope)

    def _validator_of(self, topic: str) -> Callable[[ID, rpc_pb2.Message], bool]:
        # py-libp2p runs one validator per topic of a message, one after another with the same
        # message object: a message on several topics is judged once, by its first topic's.
        def validate(forwarder: ID, msg: rpc_pb2.Message) -> bool:
            last = self._last_verdict
            if last is not None and last[0] is msg:
                return last[1]
            validator = self._topics.get(topic)
            try:
                ok = validator is not None and bool(
                    validator(GossipMessage(bytes(msg.data), bytes(msg.from_id), str(forwarder)))
                )
            except Exception as exc:  # one that raises would stop py-libp2p's whole pubsub
                log.debug("gossip validator failed: %s", describe_error(exc))
                ok = False
            self._last_verdict = (msg, ok)
            return ok

        return validate

    async def _unsubscribe(self, topic: str) -> None:
        ps = self._pubsub
        if ps is None or topic in self._topics:
            return
        try:
            await ps.unsubscribe(topic)
            ps.remove_topic_validator(topic)
        except Exception as exc:
            log.debug("unsubscribing from %s failed: %s", topic, describe_error(exc))

    def _count_write(self, size: int) -> None:
        self.stats.bytes_sent += size
        self.stats.rpcs_sent += 1

    def _count_dropped(self) -> None:
        self.stats.dropped += 1

    async def _maintenance(self, pubsub: GuardedPubsub, router: GossipSub) -> None:
        await trio.sleep(FIRST_SUBSCRIPTION_REFRESH)
        while True:
            for topic in list(self._topics):
                try:
                    await announce_subscription(pubsub, topic)
                except Exception as exc:
                    log.debug("re-announcing the subscription to %s failed: %s", topic, describe_error(exc))
            trim_delivery_log(router, self._wall_clock())
            await trio.sleep(MAINTENANCE_INTERVAL)




async def _drain(subscription: Any, scope: trio.CancelScope) -> None:
    # The validators see every message; the subscription only has to be emptied so that its
    # 32-slot buffer never overflows.
    with scope:
        async for _ in subscription:
            pass


"""Tuning of the availability service: one dataclass.

Defaults are written once: the publish interval is the Peer's
(:attr:`~modelnet_p2p.config.PeerConfig.publish_interval`), the GossipSub settings are
:class:`~modelnet_p2p.p2p.pubsub.GossipSettings`'.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeerConfig
from ...errors import ConfigError
from ...p2p.pubsub import GossipSettings
from ...proto.availability import MAX_TTL_MS, MIN_TTL_MS, TOPIC_PREFIX, State, message_id

__all__ = ["AvailabilityConfig"]


@dataclass(frozen=True)
class AvailabilityConfig:
    """Tuning of the availability service.

    Only a peer that serves something publishes, on one topic per served capability; a peer
    receives the records of the capabilities it serves or follows. So the cost of a peer
    follows its interest, not the size of the mesh.

    Attributes:
        publish_interval: seconds between records when nothing changes (the slow refresh;
            changes of state, capabilities and load level, and new subscribers, publish at once).
        ttl: seconds a record stays valid without a newer one (announced in the
            record); ``None``: three publish intervals.
        min_publish_gap: fewest seconds between two records of this peer.
            py-libp2p drops bursts silently, so below 1 s is refused.
        load_poll_interval: seconds between polls of the load provider and the
            neighbour count, to publish early on a significant change.
        sweep_interval: fewest seconds between two sweeps that evict expired entries (the
            sweeper sleeps until the earliest expiry).
        initial_state: the state published at start.
        heartbeat_interval: GossipSub heartbeat, whole seconds (py-libp2p's default is 120).
        degree, degree_low, degree_high: GossipSub mesh degree D, D_lo, D_hi.
        max_messages_per_topic_per_second: py-libp2p's per-forwarder rate limit.
            It counts every record a neighbour relays, from all publishers, so it
            must exceed (number of peers / publish_interval).
        max_peers: most entries the table holds (a bound against floods of identities).
        seq_memory: seconds the highest sequence number of a departed peer is
            remembered, so that its old records cannot be replayed after eviction.
        leaving_linger: seconds a ``leaving`` entry stays visible before removal (capped
            by its TTL), so that the CLI and late readers of the table can see that the
            peer left.
        leave_flush_timeout: seconds :meth:`AvailabilityService.leave` waits for
            the ``leaving`` record to be handed to the network.
        stream_setup_timeout: seconds spent opening pubsub streams to peers
            that were connected before the service started.
        topic_prefix: the gossip topics' prefix; a capability's topic is the prefix and its
            normalized name (tests may isolate meshes with another prefix).
        follow_idle: seconds a followed capability's topic stays joined after its last use.
        max_topics: most topics joined at once, served and followed (py-libp2p's receivers
            ignore a neighbour's subscriptions beyond 100); the least recently used followed
            topic is left first.
        legacy_topic: the version 1 topic; a neighbour still subscribed to it is logged once.
    """

    publish_interval: float = PeerConfig.publish_interval
    ttl: float | None = None
    min_publish_gap: float = 1.0
    load_poll_interval: float = 0.25
    sweep_interval: float = 0.5
    initial_state: State = State.READY
    heartbeat_interval: int = GossipSettings.heartbeat_interval
    degree: int = GossipSettings.degree
    degree_low: int = GossipSettings.degree_low
    degree_high: int = GossipSettings.degree_high
    max_messages_per_topic_per_second: float = GossipSettings.max_messages_per_topic_per_second
    max_peers: int = 10_000
    seq_memory: float = 600.0
    leaving_linger: float = 2.0
    leave_flush_timeout: float = 1.0
    stream_setup_timeout: float = GossipSettings.stream_setup_timeout
    topic_prefix: str = TOPIC_PREFIX
    follow_idle: float = 600.0
    max_topics: int = 96
    legacy_topic: str | None = None

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
        if self.load_poll_interval <= 0 or self.sweep_interval <= 0:
            raise ConfigError("poll and sweep intervals must be positive")
        if self.max_peers < 1:
            raise ConfigError("max_peers must be at least 1")
        if self.follow_idle <= 0 or not 1 <= self.max_topics <= 100:
            raise ConfigError("follow_idle must be positive and max_topics between 1 and 100")
        if self.leaving_linger < 0 or self.seq_memory < 0:
            raise ConfigError("leaving_linger and seq_memory must not be negative")
        _ = self.gossip_settings  # checks the GossipSub settings
        object.__setattr__(self, "initial_state", State(self.initial_state))

    @property
    def effective_ttl(self) -> float:
        """The TTL in seconds: :attr:`ttl`, or three publish intervals."""
        return self.ttl if self.ttl is not None else 3 * self.publish_interval

    @property
    def gossip_settings(self) -> GossipSettings:
        """The GossipSub part of this configuration."""
        return GossipSettings(
            heartbeat_interval=self.heartbeat_interval,
            degree=self.degree,
            degree_low=self.degree_low,
            degree_high=self.degree_high,
            max_messages_per_topic_per_second=self.max_messages_per_topic_per_second,
            stream_setup_timeout=self.stream_setup_timeout,
            signed=False,
            message_id=message_id,
        )

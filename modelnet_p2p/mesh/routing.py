"""Choosing a provider for a capability: load-aware, latency-aware, with bans that back off.

The router is pure bookkeeping: it never touches the network. The peer feeds it
candidates (from discovery and availability gossip) and outcomes (from the
requests it sends), and asks it to :meth:`Router.choose`.

Default policy: *power of two choices* (Mitzenmacher, 2001). Pick two eligible
candidates at random and keep the one with the lower score. It spreads load
almost as well as always taking the least-loaded provider, without the
herding that "least loaded" causes when many callers act on the same stale
gossip at once.

Score (lower is better)::

    score = (in_flight + queue + local_in_flight + 1) / max_concurrency
            * (1 + rtt_ms / 100)
            * (1 + recent_failures)

where ``local_in_flight`` counts requests *this* peer has sent and not yet
finished (fresher than gossip), and ``rtt_ms`` is an EWMA of measured
round-trip times to the first chunk.

A provider that fails is banned for 15 s, doubling on each consecutive failure
up to 5 minutes (the Petals scheme); one success clears it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config import PeerConfig

__all__ = [
    "BAN_BASE",
    "BAN_MAX",
    "Candidate",
    "Policy",
    "Router",
    "least_loaded",
    "lowest_latency",
    "power_of_two",
    "resolve_policy",
    "trio_clock",
]

#: First ban after a failure, in seconds (as Petals does).
BAN_BASE = 15.0
#: Longest ban, in seconds.
BAN_MAX = 300.0
#: Weight of a new RTT sample in the moving average.
RTT_ALPHA = 0.3


@dataclass
class Candidate:
    """A provider of a capability, as the router sees it.

    ``state``, ``in_flight``, ``queue`` and ``max_concurrency`` come from
    availability gossip when known (``state`` is ``None`` if no gossip has been
    heard yet: such a provider is eligible but ranked after known-ready ones).
    """

    peer_id: str
    addrs: list[str] = field(default_factory=list)
    state: str | None = None
    in_flight: int = 0
    queue: int = 0
    max_concurrency: int = 0
    idempotent: bool = False
    card: Any = None
    #: The capability's name as the provider spells it (names compare without case).
    name: str | None = None


@dataclass
class _Stats:
    rtt_ms: float | None = None
    failures: int = 0
    banned_until: float = 0.0
    local_in_flight: int = 0
    successes: int = 0


#: A policy picks one candidate from a non-empty list of eligible ones.
Policy = Callable[[Sequence[Candidate], "Router"], Candidate]


def trio_clock() -> float:
    """:func:`trio.current_time` inside a trio run (so tests may use ``MockClock``), else monotonic time."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


def least_loaded(cands: Sequence[Candidate], router: Router) -> Candidate:
    """Always the candidate with the lowest load score."""
    return min(cands, key=router.load_score)


def lowest_latency(cands: Sequence[Candidate], router: Router) -> Candidate:
    """The candidate with the lowest measured RTT (unknown RTTs last), then load."""
    return min(cands, key=lambda c: (router.rtt(c.peer_id) or 1e9, router.load_score(c)))


def power_of_two(cands: Sequence[Candidate], router: Router) -> Candidate:
    """Two random candidates; the better score wins."""
    if len(cands) == 1:
        return cands[0]
    a, b = router.rng.sample(list(cands), 2)
    return a if router.score(a) <= router.score(b) else b


POLICIES: dict[str, Policy] = {
    "p2c": power_of_two,
    "least-loaded": least_loaded,
    "lowest-latency": lowest_latency,
}


def resolve_policy(policy: str | Policy) -> Policy:
    """A policy by name (:data:`POLICIES`) or as given; raises ``ValueError`` for an unknown name."""
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (known: {', '.join(POLICIES)})")
        return POLICIES[policy]
    return policy


class Router:
    """Keeps per-provider measurements and picks providers."""

    def __init__(
        self,
        policy: str | Policy = PeerConfig.routing_policy,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio_clock,
    ) -> None:
        self.policy: Policy = resolve_policy(policy)
        self.rng = rng or random.Random()
        self.clock = clock
        self._stats: dict[str, _Stats] = {}

    def _s(self, peer_id: str) -> _Stats:
        stats = self._stats.get(peer_id)
        if stats is None:
            stats = self._stats[peer_id] = _Stats()
        return stats

    # -- measurements -------------------------------------------------------------

    def rtt(self, peer_id: str) -> float | None:
        stats = self._stats.get(peer_id)
        return stats.rtt_ms if stats else None

    def banned(self, peer_id: str) -> bool:
        stats = self._stats.get(peer_id)
        return bool(stats and stats.banned_until > self.clock())

    def ban_remaining(self, peer_id: str) -> float:
        stats = self._stats.get(peer_id)
        return max(0.0, stats.banned_until - self.clock()) if stats else 0.0

    def started(self, peer_id: str) -> None:
        self._s(peer_id).local_in_flight += 1

    def finished(self, peer_id: str) -> None:
        stats = self._s(peer_id)
        stats.local_in_flight = max(0, stats.local_in_flight - 1)

    def observe_rtt(self, peer_id: str, rtt_ms: float) -> None:
        stats = self._s(peer_id)
        stats.rtt_ms = rtt_ms if stats.rtt_ms is None else (1 - RTT_ALPHA) * stats.rtt_ms + RTT_ALPHA * rtt_ms

    def success(self, peer_id: str) -> None:
        stats = self._s(peer_id)
        stats.failures = 0
        stats.banned_until = 0.0
        stats.successes += 1

    def failure(self, peer_id: str) -> float:
        """Record a failure; ban the provider with doubling backoff. Returns the ban length."""
        stats = self._s(peer_id)
        stats.failures += 1
        length = min(BAN_MAX, BAN_BASE * 2 ** (stats.failures - 1))
        stats.banned_until = self.clock() + length
        return length

    def overloaded(self, peer_id: str) -> None:
        """The provider said it is at capacity: skip it briefly, without counting a failure."""
        stats = self._s(peer_id)
        stats.banned_until = max(stats.banned_until, self.clock() + 1.0)

    # -- scoring ------------------------------------------------------------------

    def load_score(self, c: Candidate) -> float:
        local = self._stats[c.peer_id].local_in_flight if c.peer_id in self._stats else 0
        capacity = c.max_concurrency or 8
        return (c.in_flight + c.queue + local + 1) / capacity

    def score(self, c: Candidate) -> float:
        stats = self._stats.get(c.peer_id)
        rtt = stats.rtt_ms if stats and stats.rtt_ms is not None else 10.0
        failures = stats.failures if stats else 0
        unknown_state = 0.0 if c.state == "ready" else 0.5
        return self.load_score(c) * (1 + rtt / 100) * (1 + failures) + unknown_state

    def eligible(
        self, cands: Sequence[Candidate], exclude: AbstractSet[str] = frozenset()
    ) -> list[Candidate]:
        """Candidates that are not excluded, not banned, not draining/leaving and not at capacity."""
        out = []
        for c in cands:
            if c.peer_id in exclude or self.banned(c.peer_id):
                continue
            if c.state is not None and c.state != "ready":
                continue
            if c.max_concurrency and c.in_flight + self._s(c.peer_id).local_in_flight >= c.max_concurrency:
                continue
            out.append(c)
        return out

    def choose(
        self,
        cands: Sequence[Candidate],
        exclude: AbstractSet[str] = frozenset(),
        *,
        policy: str | Policy | None = None,
    ) -> Candidate | None:
        """Pick a provider (by ``policy``, or the router's own), or ``None`` if none is eligible."""
        pool = self.eligible(cands, exclude)
        if not pool:
            return None
        return (self.policy if policy is None else resolve_policy(policy))(pool, self)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-provider measurements, for status displays."""
        now = self.clock()
        return {
            pid: {
                "rtt_ms": s.rtt_ms,
                "failures": s.failures,
                "banned_for_s": max(0.0, s.banned_until - now),
                "in_flight": s.local_in_flight,
                "successes": s.successes,
            }
            for pid, s in self._stats.items()
        }

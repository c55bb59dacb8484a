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

    load  = (in_flight + queue + local_in_flight + 1) / max_concurrency
    score = (1 + LOAD_WEIGHT * load)
            * (1 + rtt_ms / 100)
            * (1 + recent_failures)
            * (1.5 if the provider's state is not known to be ready)
            / trust ** 2

where ``local_in_flight`` counts requests *this* peer has sent and not yet
finished (fresher than gossip), ``rtt_ms`` is an EWMA of measured
round-trip times to the first chunk, and ``trust`` is the provider's reputation
(below). The load is what the provider says of itself, so it only ever scales the
measured latency (by at most ``1 + LOAD_WEIGHT`` for a provider at capacity): claiming
an idle provider with room for hundreds wins nothing over an honest one that answers
faster.

Load comes from two places: the candidate's figures (availability gossip, received at
``Candidate.load_at``) and the *hints* a provider carries back on its answers
(``load`` of ``chunk``, ``end`` and ``err``, ``specs/inference.md``), which the mesh
client passes to :meth:`Router.observe_load`. The newer of the two is used; a hint
older than :data:`LOAD_HINT_TTL` is dropped, so a provider last seen busy is not
shunned forever. A hint counts this peer's own requests to the provider too; the router
takes them out (the hint's ``own``, which the provider counts by caller) and adds
``local_in_flight`` as it is now, so that its own requests are counted once, exactly,
and the hint stands only for the other callers' load.

A provider that fails is banned for 15 s, doubling on each consecutive failure
up to 5 minutes (the Petals scheme); one success clears it.

Self-reported load is only a hint. It is weighed against what this peer measures itself:
the RTT above, the bans, and the provider's :class:`~.reputation.Reputation` (successes
against errors, timeouts, stalls, verifier rejections and ensemble disagreement, kept
across restarts). The score is divided by ``trust ** 2`` (``trust`` in ``(0, 1]``, 1 for a
provider never measured), so a provider that claims to be idle and answers wrong loses to
an honest busy one after a wrong answer or two. The operator's lists
(:class:`~.reputation.PeerLists`) come first: blocked peers are never chosen, a non-empty
allow list limits the choice to its peers, and an eligible pinned peer is always preferred.
Among the rest, a provider trusted less than half as much as the most trusted eligible one
is not chosen at all (:data:`TRUST_CUTOFF`).
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
from ..proto.infer import Load
from .reputation import Reputation

__all__ = [
    "BAN_BASE",
    "BAN_MAX",
    "LOAD_HINT_TTL",
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
#: How much a full provider's score grows (x 1 + LOAD_WEIGHT) against an idle one's: being at
#: capacity weighs like 400 ms of extra latency to the first chunk.
LOAD_WEIGHT = 4.0
#: A provider trusted less than this share of the most trusted eligible one is not chosen while
#: that one is eligible: one error leaves an unknown provider at trust 0.5 and still in the
#: running; a wrong answer, or two errors, and it waits until its faults decay or nothing
#: better is left.
TRUST_CUTOFF = 0.5
#: Weight of a new RTT sample in the moving average.
RTT_ALPHA = 0.3
#: Seconds a load hint from an answer is used. A provider's in-flight count turns over about
#: as fast as its requests finish (seconds for a chat answer), and a provider the hint shows
#: busy may get no request, hence no newer hint, until the hint is dropped.
LOAD_HINT_TTL = 5.0


@dataclass
class Candidate:
    """A provider of a capability, as the router sees it.

    ``state``, ``in_flight``, ``queue`` and ``max_concurrency`` come from
    availability gossip when known (``state`` is ``None`` if no gossip has been
    heard yet: such a provider is eligible but ranked after known-ready ones).
    ``load_at`` is when those load figures were received (router clock), ``None`` if
    unknown: then a live load hint (:meth:`Router.observe_load`) takes precedence.
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
    load_at: float | None = None

    def copy(self) -> Candidate:
        """A copy with a list of addresses of its own (``dataclasses.replace(self, addrs=
        list(self.addrs))``, without its per-field work: it runs once per routed request)."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.addrs = list(self.addrs)
        return new


@dataclass
class _Stats:
    rtt_ms: float | None = None
    failures: int = 0
    banned_until: float = 0.0
    local_in_flight: int = 0
    successes: int = 0
    hint: Load | None = None
    hint_at: float = 0.0
    #: This peer's requests the hint counts (its own, in flight there when it was written).
    hint_own: int = 0


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
    return min(cands, key=lambda c: router.load_score(c) * router.penalty(c.peer_id))


def lowest_latency(cands: Sequence[Candidate], router: Router) -> Candidate:
    """The candidate with the lowest measured RTT (unknown RTTs last), then load."""
    return min(
        cands,
        key=lambda c: ((router.rtt(c.peer_id) or 1e9) * router.penalty(c.peer_id), router.load_score(c)),
    )


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
    """Keeps per-provider measurements and picks providers.

    ``reputation`` holds the providers' scores and the operator's lists (a fresh in-memory
    one if not given); ``router.reputation`` is shared with whoever reports outcomes.
    """

    def __init__(
        self,
        policy: str | Policy = PeerConfig.routing_policy,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio_clock,
        reputation: Reputation | None = None,
    ) -> None:
        self.policy: Policy = resolve_policy(policy)
        self.rng = rng or random.Random()
        self.clock = clock
        self.reputation = reputation if reputation is not None else Reputation()
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

    def observe_load(self, peer_id: str, load: Load) -> None:
        """A provider's answer said how loaded it is (received now, by the router's clock).

        The hint's ``own`` says how many of its ``in_flight`` are this peer's. A hint without
        it is taken to count every request this router has in flight there now: that errs
        low (the provider's admission then decides), where anything tighter errs high, on
        answers read out of order, and refuses requests locally on load that has gone.
        """
        stats = self._s(peer_id)
        own = load.own if load.own is not None else stats.local_in_flight
        stats.hint, stats.hint_at, stats.hint_own = load, self.clock(), own

    def load_hint(self, peer_id: str) -> Load | None:
        """The provider's last load hint, if younger than :data:`LOAD_HINT_TTL`."""
        stats = self._stats.get(peer_id)
        if stats is None or stats.hint is None or self.clock() - stats.hint_at > LOAD_HINT_TTL:
            return None
        return stats.hint

    def load_of(self, c: Candidate) -> tuple[int, int, int, int]:
        """``(in_flight, queue, max_concurrency, local_in_flight)`` as routing counts them: from
        the newer of the candidate's figures and the provider's live load hint."""
        stats = self._stats.get(c.peer_id)
        if stats is None:
            return c.in_flight, c.queue, c.max_concurrency, 0
        hint = self.load_hint(c.peer_id)
        if hint is not None and (c.load_at is None or stats.hint_at >= c.load_at):
            others = max(0, hint.in_flight - stats.hint_own)
            return others, hint.queue, hint.max_concurrency or c.max_concurrency, stats.local_in_flight
        return c.in_flight, c.queue, c.max_concurrency, stats.local_in_flight

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
        self.reputation.record(peer_id, "success")

    def failure(self, peer_id: str, event: str = "error") -> float:
        """Record a failure (a reputation ``event``: ``error``, ``timeout``, ``stall``); ban the
        provider with doubling backoff. Returns the ban length."""
        self.reputation.record(peer_id, event)
        stats = self._s(peer_id)
        stats.failures += 1
        length = min(BAN_MAX, BAN_BASE * 2.0 ** (stats.failures - 1))
        stats.banned_until = self.clock() + length
        return length

    def overloaded(self, peer_id: str) -> None:
        """The provider said it is at capacity: skip it briefly, without counting a failure."""
        stats = self._s(peer_id)
        stats.banned_until = max(stats.banned_until, self.clock() + 1.0)

    def report(self, peer_id: str, event: str) -> None:
        """An outcome found above the transport (a verifier's rejection, a lost vote...): it
        goes to the reputation only (no ban: the provider answered, just not well)."""
        self.reputation.record(peer_id, event)

    # -- scoring ------------------------------------------------------------------

    def penalty(self, peer_id: str) -> float:
        """What this peer's distrust multiplies a provider's score by: ``1 / trust ** 2``."""
        return 1.0 / self.reputation.trust(peer_id) ** 2

    def load_score(self, c: Candidate) -> float:
        in_flight, queue, capacity, local = self.load_of(c)
        return (in_flight + queue + local + 1) / (capacity or 8)

    def score(self, c: Candidate) -> float:
        stats = self._stats.get(c.peer_id)
        rtt = stats.rtt_ms if stats and stats.rtt_ms is not None else 10.0
        failures = stats.failures if stats else 0
        unknown_state = 1.0 if c.state == "ready" else 1.5
        load = 1 + LOAD_WEIGHT * self.load_score(c)
        return load * (1 + rtt / 100) * (1 + failures) * unknown_state * self.penalty(c.peer_id)

    def eligible(
        self, cands: Sequence[Candidate], exclude: AbstractSet[str] = frozenset()
    ) -> list[Candidate]:
        """Candidates that are not excluded, not blocked (or outside a non-empty allow list),
        not banned, not draining/leaving and not at capacity."""
        out = []
        lists = self.reputation.lists
        for c in cands:
            if c.peer_id in exclude or self.banned(c.peer_id) or not lists.permits(c.peer_id):
                continue
            if c.state is not None and c.state != "ready":
                continue
            in_flight, _, capacity, local = self.load_of(c)
            if capacity and in_flight + local >= capacity:
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
        """Pick a provider (by ``policy``, or the router's own), or ``None`` if none is eligible.

        An eligible pinned provider is always preferred to the others, and a provider trusted
        less than :data:`TRUST_CUTOFF` times the most trusted eligible one is passed over (with
        power of two choices, two distrusted providers drawn together would otherwise still
        get the call).
        """
        pool = self.eligible(cands, exclude)
        if not pool:
            return None
        pins = self.reputation.lists.pin
        if pins:
            pool = [c for c in pool if c.peer_id in pins] or pool
        if len(pool) > 1:  # (one candidate is always within the cut-off of itself)
            trust = {c.peer_id: self.reputation.trust(c.peer_id) for c in pool}
            best = max(trust.values())
            pool = [c for c in pool if trust[c.peer_id] >= best * TRUST_CUTOFF]
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
                "trust": round(self.reputation.trust(pid), 3),
                "load_hint": None
                if (hint := self.load_hint(pid)) is None
                else {"age_s": now - s.hint_at, "in_flight": hint.in_flight, "queue": hint.queue},
            }
            for pid, s in self._stats.items()
        }

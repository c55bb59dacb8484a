"""Admission of inference requests: fair shares of the request slots and a rate per caller.

A server has ``max_concurrency`` request slots. Fixed per-caller limits alone let a few
identities hold all of them for as long as their deadlines allow (two callers with 64 slots
each held all 128 for up to 600 s: 3 of 101 legitimate calls were served). The rules here
(``specs/network.md``, "Resource limits"):

- **Groups.** Every caller belongs to two groups: all callers (``max_concurrency`` slots)
  and the callers from its IP address (``max_concurrency_per_ip`` slots), so that Sybil
  identities on one host share one budget. A caller never holds more than
  ``max_concurrency_per_peer`` slots.
- **Fair share.** While a group has a free slot, any caller may take it (free slots are not
  wasted). When it is full, a caller holding ``k`` of its slots takes the slot of the newest
  request of the caller holding the most, if that caller holds at least ``k + 2``: that
  request is ended with ``overloaded`` (retryable). Otherwise the caller is refused with
  ``overloaded``. Each such move makes the shares more equal, so it cannot go back and
  forth: under contention every active caller ends up with about ``cap / n`` slots (``n``
  active callers), a share that shrinks as more callers want slots, and a newcomer always
  gets one while some caller holds two.
- **Rate.** Each caller has a token bucket of request starts: ``request_rate`` per second,
  up to ``request_burst`` at once. A request without a token is refused with ``overloaded``.

Refusals say in their message how long to wait (``retry after N s``). This module does no
I/O and keeps no clock: the caller passes the time (``trio.current_time()`` in the server).
Memory is bounded: a caller costs an entry while it holds a slot, and its bucket is dropped
once it has refilled.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ...errors import ConfigError, OverloadedError
from ...p2p.resources import ResourceLimits
from ...proto.session import Limits

__all__ = ["Admission", "AdmissionLimits", "AdmissionStats", "Ticket"]

log = logging.getLogger(__name__)

#: Suggested wait before retrying a request refused for want of a slot, in seconds.
SLOT_RETRY_AFTER = 1.0
#: Buckets kept before the full (idle) ones are swept.
MAX_IDLE_BUCKETS = 4096


@dataclass(frozen=True)
class AdmissionLimits:
    """The admission rules' settings (defaults: ``specs/network.md``, "Resource limits")."""

    #: Request slots over all callers.
    max_concurrency: int = Limits.max_concurrency
    #: Slots one caller (peer id) may hold, whatever its share.
    max_concurrency_per_peer: int = Limits.max_concurrency_per_peer
    #: Slots the callers from one IP address may hold together.
    max_concurrency_per_ip: int = ResourceLimits.max_concurrency_per_ip
    #: Request starts per second per caller (token bucket refill); ``0``: no rate limit.
    request_rate: float = ResourceLimits.request_rate
    #: Request starts one caller may make at once (token bucket size).
    request_burst: float = ResourceLimits.request_burst
    #: Count loopback callers per IP too (off: local processes are not grouped by address).
    limit_loopback: bool = ResourceLimits.limit_loopback
    #: Take slots from the caller holding the most (off: a full group refuses, as fixed limits do).
    preempt: bool = ResourceLimits.preempt

    @classmethod
    def of(cls, limits: Limits, res: ResourceLimits) -> AdmissionLimits:
        """The settings for a server of these ``limits``, with ``res``'s other limits."""
        return cls(
            limits.max_concurrency, limits.max_concurrency_per_peer, res.max_concurrency_per_ip,
            res.request_rate, res.request_burst, res.limit_loopback, res.preempt,
        )

    def __post_init__(self) -> None:
        if min(self.max_concurrency, self.max_concurrency_per_peer, self.max_concurrency_per_ip) < 1:
            raise ConfigError("concurrency limits must be at least 1")
        if self.request_rate < 0 or (self.request_rate > 0 and self.request_burst < 1):
            raise ConfigError("request_rate must be >= 0 and request_burst at least 1")


@dataclass(eq=False)
class Ticket:
    """One admitted request's slot; give it back with :meth:`Admission.release`."""

    peer: str
    ip: str | None
    started: float
    #: Ends the request with the given error (called when another caller takes its slot).
    preempt: Callable[[OverloadedError], None] = field(repr=False)
    released: bool = False


@dataclass(frozen=True)
class AdmissionStats:
    """A snapshot of an :class:`Admission`."""

    in_flight: int
    callers: int
    refused_rate: int
    refused_share: int
    preempted: int


@dataclass
class _Bucket:
    tokens: float
    at: float


class Admission:
    """The request slots of one server, shared fairly between callers (see the module docs)."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self._by_peer: dict[str, list[Ticket]] = {}
        self._by_ip: dict[str, set[str]] = {}
        self._total = 0
        self._buckets: dict[str, _Bucket] = {}
        self._refused_rate = 0
        self._refused_share = 0
        self._preempted = 0

    # -- counts ---------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self._total

    def held(self, peer: str) -> int:
        """Slots ``peer`` holds now."""
        return len(self._by_peer.get(peer, ()))

    def held_by_ip(self, ip: str) -> int:
        return sum(self.held(p) for p in self._by_ip.get(ip, ()))

    def share(self, peer: str, ip: str | None = None) -> int:
        """The slots ``peer`` can count on under contention, in the tighter of its two groups."""
        share = min(self._share(set(self._by_peer), peer, self.limits.max_concurrency),
                    self.limits.max_concurrency_per_peer)
        if ip is not None:
            members = self._by_ip.get(ip, set())
            share = min(share, self._share(members, peer, self.limits.max_concurrency_per_ip))
        return share

    def _share(self, members: set[str], peer: str, cap: int) -> int:
        return max(1, cap // len(members | {peer}))

    def stats(self) -> AdmissionStats:
        return AdmissionStats(
            self._total, len(self._by_peer), self._refused_rate, self._refused_share, self._preempted
        )

    # -- admission ------------------------------------------------------------------

    def admit(
        self, peer: str, ip: str | None, now: float, preempt: Callable[[OverloadedError], None]
    ) -> Ticket:
        """Take a slot for a request of ``peer`` (from ``ip``; ``None``: unknown).

        Raises :class:`OverloadedError` if the caller is out of tokens or of share. May end
        another caller's request (through its ``preempt``) to make room.
        """
        self._take_token(peer, now)
        lim = self.limits
        mine = self.held(peer)
        if mine >= lim.max_concurrency_per_peer:
            self._refuse(f"too many concurrent requests from your peer ({mine})")
        if ip is not None:
            members = self._by_ip.get(ip, set())
            used = sum(self.held(p) for p in members)
            if used >= lim.max_concurrency_per_ip:
                self._make_room(peer, members, lim.max_concurrency_per_ip, "your IP address")
        if self._total >= lim.max_concurrency:
            self._make_room(peer, set(self._by_peer), lim.max_concurrency, "this peer")
        ticket = Ticket(peer, ip, now, preempt)
        self._by_peer.setdefault(peer, []).append(ticket)
        if ip is not None:
            self._by_ip.setdefault(ip, set()).add(peer)
        self._total += 1
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give back ``ticket``'s slot (a second release, or one after preemption, does nothing)."""
        if ticket.released:
            return
        ticket.released = True
        tickets = self._by_peer.get(ticket.peer)
        if tickets is not None:
            try:
                tickets.remove(ticket)
            except ValueError:
                pass
            else:
                self._total -= 1
            if not tickets:
                del self._by_peer[ticket.peer]
                if ticket.ip is not None:
                    peers = self._by_ip.get(ticket.ip)
                    if peers is not None:
                        peers.discard(ticket.peer)
                        if not peers:
                            del self._by_ip[ticket.ip]

    def _make_room(self, peer: str, members: set[str], cap: int, where: str) -> None:
        """Free one slot of a full group for ``peer``, or refuse it."""
        mine = self.held(peer)
        share = self._share(members, peer, cap)
        held = [(self.held(p), p) for p in members if p != peer]
        most, victim = max(held) if held else (0, "")
        if most < mine + 2 or not self.limits.preempt:
            self._refuse(f"{where} is at its concurrency limit ({cap}); you hold {mine}, fair: {share}")
        ticket = self._by_peer[victim][-1]  # its newest request: the least work lost
        self.release(ticket)
        self._preempted += 1
        log.info("request of %s ended to give its slot to %s (held %d and %d)", victim, peer, most, mine)
        try:
            ticket.preempt(OverloadedError(
                f"{where} is at its concurrency limit and your peer held the most slots ({most}; a fair "
                f"share is {share}); retry after {SLOT_RETRY_AFTER:g} s"
            ))
        except Exception as exc:  # the slot is free whatever the callback does
            log.debug("preempting a request failed: %r", exc)

    def _refuse(self, why: str) -> None:
        self._refused_share += 1
        raise OverloadedError(f"{why}; retry after {SLOT_RETRY_AFTER:g} s")

    def _take_token(self, peer: str, now: float) -> None:
        rate, burst = self.limits.request_rate, self.limits.request_burst
        if rate <= 0:
            return
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= MAX_IDLE_BUCKETS:
                self._sweep(now)
            bucket = self._buckets[peer] = _Bucket(burst, now)
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1:
            self._refused_rate += 1
            wait = math.ceil((1 - bucket.tokens) / rate * 100) / 100
            raise OverloadedError(f"too many requests from your peer; retry after {wait:g} s")
        bucket.tokens -= 1

    def _sweep(self, now: float) -> None:
        rate, burst = self.limits.request_rate, self.limits.request_burst
        for peer in [p for p, b in self._buckets.items() if b.tokens + (now - b.at) * rate >= burst]:
            del self._buckets[peer]
        while len(self._buckets) >= MAX_IDLE_BUCKETS:  # all busy: forget the oldest
            del self._buckets[min(self._buckets, key=lambda p: self._buckets[p].at)]

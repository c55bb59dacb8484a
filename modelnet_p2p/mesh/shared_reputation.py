"""Shared reputation (optional, off by default: ``PeerConfig.share_reputation``).

Each peer that opts in gossips its own scores of the providers it has used
(:mod:`modelnet_p2p.proto.reputation`, ``specs/reputation.md``) every ``interval`` seconds,
and hears the others'. What it hears is *hearsay*, weighed by the sharer's own score here:

- a sharer counts only if this peer has itself had a successful answer from it (an unknown
  identity is worth nothing, so a crowd of fresh Sybils moves nothing), and then with weight
  ``trust(sharer) ** 2 * min(1, n / EVIDENCE_FULL)``, ``n`` being the outcomes the sharer's
  score rests on;
- a sharer's word about itself, or about this peer, is ignored;
- the weights of one subject add up to at most :data:`MAX_WEIGHT` (hearsay never counts for
  more than two outcomes of this peer's own), and :meth:`Reputation.trust` blends it in by
  that weight against this peer's own evidence;
- what a sharer said expires after :data:`HEARSAY_TTL`; at most one message per sharer per
  ``interval / 2`` is taken, and at most :data:`MAX_SUBJECTS` subjects and
  :data:`MAX_SHARERS` sharers per subject are kept.

The gossip layer signs every message and checks the origin's signature (``specs/availability.md``,
"Gossip"), so a sharer cannot be impersonated.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import trio

from ..errors import ModelNetError
from ..proto.peerid import peer_id_text
from ..proto.reputation import MAX_ENTRIES, decode, encode
from .reputation import Reputation

__all__ = [
    "EVIDENCE_FULL",
    "HEARSAY_TTL",
    "MAX_SHARERS",
    "MAX_SUBJECTS",
    "MAX_WEIGHT",
    "SHARE_INTERVAL",
    "SharedReputation",
]

log = logging.getLogger(__name__)

#: Seconds between two messages of this peer.
SHARE_INTERVAL = 300.0
#: Seconds what a sharer said is used.
HEARSAY_TTL = 3600.0
#: Outcomes behind a shared score for it to count fully.
EVIDENCE_FULL = 10
#: Most weight the hearsay about one subject may have (in outcomes of this peer's own).
MAX_WEIGHT = 2.0
#: Subjects remembered, and sharers per subject.
MAX_SUBJECTS = 1024
MAX_SHARERS = 8


class GossipMessageLike(Protocol):
    @property
    def data(self) -> bytes: ...
    @property
    def origin(self) -> bytes: ...


class GossipLike(Protocol):
    """The part of :class:`~modelnet_p2p.p2p.pubsub.Gossip` used here."""

    def join(self, topic: str, validator: Callable[[GossipMessageLike], bool]) -> None: ...

    async def publish(self, topics: str, data: bytes) -> None: ...


class SharedReputation:
    """Gossips this peer's scores and keeps the hearsay (see the module docstring)."""

    def __init__(
        self,
        reputation: Reputation,
        local_peer: str,
        *,
        interval: float = SHARE_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reputation = reputation
        self.local_peer = local_peer
        self.interval = interval
        self.clock = clock
        #: subject -> sharer -> (trust, evidence, when heard)
        self._heard: dict[str, dict[str, tuple[float, int, float]]] = {}
        self._last_from: dict[str, float] = {}
        self.accepted = 0
        self.rejected = 0
        reputation.hearsay = self.hearsay

    # -- what this peer says ---------------------------------------------------------------

    def message(self) -> bytes | None:
        """This peer's own scores, most evidence first (``None`` if it has none to share)."""
        scored = [(pid, *self.reputation.evidence(pid)) for pid in self.reputation.peers()]
        scored = [s for s in scored if s[2] > 0 and s[0] != self.local_peer]
        if not scored:
            return None
        scored.sort(key=lambda s: -s[2])
        return encode(scored[:MAX_ENTRIES])

    async def publish(self, gossip: GossipLike, topic: str) -> bool:
        data = self.message()
        if data is None:
            return False
        await gossip.publish(topic, data)
        return True

    async def run(self, gossip: GossipLike, topic: str) -> None:
        """Join ``topic`` and share every :attr:`interval` seconds (run it in the peer's nursery)."""
        gossip.join(topic, self.validate)
        while True:
            await trio.sleep(self.interval)
            try:
                await self.publish(gossip, topic)
            except Exception as exc:  # gossip is soft state: a failed round is tried next time
                log.debug("sharing reputation failed: %r", exc)

    # -- what others say ---------------------------------------------------------------------

    def validate(self, msg: GossipMessageLike) -> bool:
        """The topic's validator: take a message in (``True``: forward it) or refuse it."""
        try:
            sharer = peer_id_text(bytes(msg.origin))
            entries = decode(bytes(msg.data))
        except (ModelNetError, ValueError) as exc:
            self.rejected += 1
            log.debug("bad reputation message: %s", exc)
            return False
        now = self.clock()
        if now - self._last_from.get(sharer, -1e18) < self.interval / 2:
            self.rejected += 1
            return False  # too often: neither taken nor forwarded
        self._last_from[sharer] = now
        if len(self._last_from) > MAX_SUBJECTS:
            self._last_from.pop(next(iter(self._last_from)))
        if sharer != self.local_peer:
            for subject, trust, n in entries:
                if subject not in (sharer, self.local_peer):
                    self._note(subject, sharer, trust, n, now)
        self.accepted += 1
        return True

    def _note(self, subject: str, sharer: str, trust: float, n: int, now: float) -> None:
        heard = self._heard.pop(subject, None) or {}
        heard[sharer] = (trust, n, now)
        while len(heard) > MAX_SHARERS:
            heard.pop(min(heard, key=lambda s: heard[s][2]))
        self._heard[subject] = heard  # most recently heard last
        while len(self._heard) > MAX_SUBJECTS:
            self._heard.pop(next(iter(self._heard)))

    def weight_of(self, sharer: str) -> float:
        """What a sharer's word weighs here: nothing unless this peer has had an answer from it."""
        if self.reputation.counts(sharer).get("success", 0) < 1:
            return 0.0
        own, _ = self.reputation.evidence(sharer)
        return own**2

    def hearsay(self, subject: str) -> tuple[float, float] | None:
        """``(trust, weight)`` of what trusted sharers said of ``subject``, or ``None``."""
        heard = self._heard.get(subject)
        if not heard:
            return None
        now = self.clock()
        total = weighted = 0.0
        for sharer, (trust, n, at) in heard.items():
            if now - at > HEARSAY_TTL:
                continue
            w = self.weight_of(sharer) * min(1.0, n / EVIDENCE_FULL)
            total += w
            weighted += w * trust
        if total <= 0:
            return None
        return weighted / total, min(MAX_WEIGHT, total)


def share_reputation(
    reputation: Reputation, local_peer: str, gossip: GossipLike, topic: str, nursery: trio.Nursery
) -> SharedReputation:
    """Start sharing ``reputation`` on ``topic`` in ``nursery``; returns the running sharer."""
    shared = SharedReputation(reputation, local_peer)
    nursery.start_soon(shared.run, gossip, topic)
    return shared

"""Peers heard of in lookup answers, kept as seeds for later lookups.

A lookup learns of far more peers than it asks: every answer lists up to k closer peers
with their addresses. The routing table keeps only peers that answered this peer or sent
it a request, so in a large mesh the table seldom holds the peers closest to a new key,
and each lookup (an announce's especially) must dial its way there hop by hop: each hop
a new connection, about 13 ms of CPU at each end, and on a busy machine a tenth of a
second or more. Seeding a lookup with the peers heard of that are closest to its key
lets its first hop go to the closest peers directly.

Closer-peer lists come from strangers, so a heard peer is a seed only once two different
peers have listed it (one hostile server cannot plant peers alone), only while its
addresses are still remembered (``ttl``), and it is dropped on its first failure. The set
is bounded (least recently heard out first). Sans-I/O: the caller passes the times and the
key hashes.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["MAX_HEARD", "HeardPeers"]

#: Peers remembered at most (each a few hundred bytes with its peerstore addresses).
MAX_HEARD = 1024


@dataclass
class _Entry:
    key_hash: int
    reporter: str
    heard_at: float
    confirmed: bool = False


class HeardPeers:
    """A bounded set of peers heard of, each with the hash its distances are counted from.

    Args:
        ttl: seconds a peer stays a seed after it was last heard of (as long as its
            addresses stay in the peerstore).
        limit: peers kept at most.
    """

    def __init__(self, *, ttl: float, limit: int = MAX_HEARD) -> None:
        self.ttl = ttl
        self.limit = limit
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def note(self, peer_id: str, key_hash: int, reporter: str, now: float) -> None:
        """``reporter`` listed ``peer_id`` (whose key hash is ``key_hash``) at ``now``."""
        if peer_id == reporter:
            return
        entry = self._entries.get(peer_id)
        if entry is None:
            self._entries[peer_id] = _Entry(key_hash, reporter, now)
            while len(self._entries) > self.limit:
                self._entries.popitem(last=False)
            return
        if entry.reporter != reporter:
            entry.confirmed = True
        entry.heard_at = now
        self._entries.move_to_end(peer_id)

    def drop(self, peer_id: str) -> None:
        """Forget ``peer_id`` (it failed)."""
        self._entries.pop(peer_id, None)

    def seeds(self, target: int, count: int, now: float) -> list[str]:
        """The ``count`` confirmed, fresh peers closest to ``target`` (XOR of key hashes)."""
        cutoff = now - self.ttl
        near = heapq.nsmallest(
            count,
            (
                (e.key_hash ^ target, pid)
                for pid, e in self._entries.items()
                if e.confirmed and e.heard_at >= cutoff
            ),
        )
        return [pid for _, pid in near]

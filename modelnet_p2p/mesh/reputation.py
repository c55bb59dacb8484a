"""Reputation without a chain: this peer's own score of every provider it has used.

Nothing here is shared or signed: each peer scores the providers it has called from what
it has seen itself, and routing (:mod:`.routing`) weighs every provider's self-reported
load by that score. A provider that lies about its load, answers wrong, stalls or fails
is chosen less, however good its own figures look.

Events (:data:`WEIGHTS`) and where they come from:

- ``success``: an answer ended cleanly (the mesh client);
- ``error``: the provider failed the request (``internal``, ``unavailable``, a broken
  protocol, a failed dial), ``timeout``: the deadline ran out while it held the request,
  ``stall``: it sent nothing for ``stall_timeout`` seconds mid-stream (the mesh client);
- ``rejected``: a verifier rejected its answer, ``disagreed``: its answer lost an ensemble's
  majority vote (the collaboration patterns, :mod:`.collab.patterns`);
- ``broken_receipt``: a hook for receipts that do not verify (the access-control work).

The score (:meth:`Reputation.trust`) is a fraction in ``(0, 1]``::

    trust = (good + PRIOR) / (good + PRIOR + bad)

where ``good`` is the decayed sum of successes and ``bad`` the decayed, weighted sum of
the rest (:data:`WEIGHTS`); both halve every :data:`HALF_LIFE` seconds of wall time, so an
old fault fades and a provider can earn its way back. An unknown provider has trust 1:
innocent until measured. Routing divides its load score by ``trust ** 2``.

Operators steer it with three lists (:class:`PeerLists`, from ``PeerConfig.pin_peers``,
``allow_peers`` and ``block_peers``): a blocked peer is never routed to, a non-empty allow
list routes only to its peers, and pinned peers are preferred whenever one is eligible.

The scores persist in a small JSON file beside the key file (``<key>.reputation.json``),
written atomically (a temporary file renamed over the old one), at most
:data:`MAX_PEERS` entries (the least recently seen are dropped), and a corrupt or
oversized file is logged and ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "EVENTS",
    "HALF_LIFE",
    "MAX_FILE_BYTES",
    "MAX_PEERS",
    "PRIOR",
    "WEIGHTS",
    "PeerLists",
    "Reputation",
    "reputation_path",
]

log = logging.getLogger(__name__)

#: Weight of each bad event against one success. A wrong answer costs the caller a whole
#: call and a check, so it weighs more than a plain error; a stall holds the caller for
#: ``stall_timeout`` seconds, so it weighs more than an error that returns at once.
WEIGHTS: dict[str, float] = {
    "error": 1.0,
    "timeout": 1.0,
    "stall": 2.0,
    "disagreed": 3.0,
    "rejected": 4.0,
    "broken_receipt": 8.0,
}
#: Every event :meth:`Reputation.record` accepts.
EVENTS = frozenset({"success", *WEIGHTS})
#: Successes assumed before any is seen (an unknown provider's trust is 1).
PRIOR = 1.0
#: Seconds of wall time in which an event's weight halves (6 h: a provider that misbehaved
#: this morning is still avoided this afternoon, and forgiven by tomorrow).
HALF_LIFE = 6 * 3600.0
#: Providers remembered (about 200 bytes each on disk: the file stays under 256 KiB).
MAX_PEERS = 1024
#: A reputation file larger than this is not read (it cannot be one of ours).
MAX_FILE_BYTES = 1 << 20
#: Seconds between saves of a changed reputation while the peer runs.
SAVE_INTERVAL = 30.0
FILE_VERSION = 1


def reputation_path(identity: object) -> Path | None:
    """Where the reputation of a peer with this identity setting is kept: beside the key file
    (``peer.key`` -> ``peer.key.reputation.json``); ``None`` for an identity without a file."""
    if isinstance(identity, (str, os.PathLike)):
        key = Path(identity)
        return key.with_name(key.name + ".reputation.json")
    return None


@dataclass(frozen=True)
class PeerLists:
    """The operator's say over routing (``PeerConfig.pin_peers``, ``allow_peers``, ``block_peers``)."""

    pin: frozenset[str] = frozenset()
    allow: frozenset[str] = frozenset()
    block: frozenset[str] = frozenset()

    @classmethod
    def of(cls, pin: Iterable[str] = (), allow: Iterable[str] = (), block: Iterable[str] = ()) -> PeerLists:
        return cls(frozenset(pin), frozenset(allow), frozenset(block))

    def permits(self, peer_id: str) -> bool:
        """Whether routing may choose ``peer_id`` at all."""
        if peer_id in self.block:
            return False
        return not self.allow or peer_id in self.allow or peer_id in self.pin

    def label(self, peer_id: str) -> str:
        if peer_id in self.block:
            return "blocked"
        if peer_id in self.pin:
            return "pinned"
        if peer_id in self.allow:
            return "allowed"
        return ""


@dataclass
class _Entry:
    good: float = 0.0
    bad: float = 0.0
    #: Wall time ``good`` and ``bad`` were last decayed to.
    at: float = 0.0
    #: Undecayed count of each event, for display.
    counts: dict[str, int] = field(default_factory=dict)

    def decay(self, now: float) -> None:
        if now > self.at:
            factor = 0.5 ** ((now - self.at) / HALF_LIFE)
            self.good *= factor
            self.bad *= factor
            self.at = now

    def to_json(self) -> dict[str, Any]:
        return {
            "good": round(self.good, 4),
            "bad": round(self.bad, 4),
            "at": round(self.at, 1),
            "n": self.counts,
        }

    @classmethod
    def from_json(cls, raw: Any) -> _Entry | None:
        if not isinstance(raw, dict):
            return None
        good, bad, at, counts = raw.get("good"), raw.get("bad"), raw.get("at"), raw.get("n", {})
        numbers = (good, bad, at)
        if not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers
        ):
            return None
        if not isinstance(counts, dict):
            return None
        clean = {
            k: v
            for k, v in counts.items()
            if k in EVENTS and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        }
        return cls(max(0.0, float(good)), max(0.0, float(bad)), float(at), clean)  # type: ignore[arg-type]


#: ``listener(peer_id, event)``: called for each event recorded (a hook, e.g. for shared scores).
Listener = Callable[[str, str], None]


class Reputation:
    """Scores of the providers this peer has used (see the module docstring).

    Args:
        path: the file to load from and save to; ``None``: kept in memory only.
        lists: the operator's pin, allow and block lists.
        clock: wall time in seconds (injectable for tests); scores decay by it.
        max_peers: providers remembered; the least recently seen are forgotten first.
    """

    def __init__(
        self,
        path: Path | None = None,
        *,
        lists: PeerLists | None = None,
        clock: Callable[[], float] = time.time,
        max_peers: int = MAX_PEERS,
    ) -> None:
        self.path = path
        self.lists = lists or PeerLists()
        self.clock = clock
        self.max_peers = max_peers
        self._entries: dict[str, _Entry] = {}
        self.listeners: list[Listener] = []
        #: Other peers' scores, if shared reputation runs (``mesh/shared_reputation.py``):
        #: ``hearsay(peer_id)`` is ``(trust, weight)`` or ``None``.
        self.hearsay: Callable[[str], tuple[float, float] | None] | None = None
        self.dirty = False
        if path is not None:
            self.load()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    # -- events and scores ------------------------------------------------------------

    def record(self, peer_id: str, event: str, weight: float = 1.0) -> None:
        """Count one ``event`` (one of :data:`EVENTS`) for ``peer_id``, scaled by ``weight``."""
        if event not in EVENTS:
            raise ValueError(f"unknown reputation event {event!r} (known: {', '.join(sorted(EVENTS))})")
        if not peer_id:
            return
        now = self.clock()
        entry = self._entries.pop(peer_id, None) or _Entry(at=now)
        entry.decay(now)
        if event == "success":
            entry.good += weight
        else:
            entry.bad += WEIGHTS[event] * weight
        entry.counts[event] = entry.counts.get(event, 0) + 1
        self._entries[peer_id] = entry  # most recently seen last
        while len(self._entries) > self.max_peers:
            self._entries.pop(next(iter(self._entries)))
        self.dirty = True
        for listener in self.listeners:
            try:
                listener(peer_id, event)
            except Exception:
                log.exception("reputation listener failed")

    def trust(self, peer_id: str) -> float:
        """This peer's trust in ``peer_id``, in ``(0, 1]`` (1 for a provider never measured).

        With shared reputation, other peers' scores (:attr:`hearsay`) are blended in by their
        weight against this peer's own evidence: ``blend = weight / (weight + evidence + PRIOR)``,
        so what this peer has measured itself soon outweighs what it was told.
        """
        entry = self._entries.get(peer_id)
        good = bad = 0.0
        if entry is not None:
            factor = 0.5 ** (max(0.0, self.clock() - entry.at) / HALF_LIFE)
            good, bad = entry.good * factor, entry.bad * factor
        own = (good + PRIOR) / (good + PRIOR + bad)
        told = self.hearsay(peer_id) if self.hearsay is not None else None
        if told is None:
            return own
        trust, weight = told
        blend = weight / (weight + good + bad + PRIOR)
        return max(1e-3, (1 - blend) * own + blend * trust)

    def evidence(self, peer_id: str) -> tuple[float, int]:
        """``(own trust, outcomes seen)`` of ``peer_id``, without hearsay (what is shared)."""
        entry = self._entries.get(peer_id)
        if entry is None:
            return 1.0, 0
        factor = 0.5 ** (max(0.0, self.clock() - entry.at) / HALF_LIFE)
        good, bad = entry.good * factor, entry.bad * factor
        return (good + PRIOR) / (good + PRIOR + bad), sum(entry.counts.values())

    def peers(self) -> list[str]:
        """The providers scored, least recently seen first."""
        return list(self._entries)

    def counts(self, peer_id: str) -> dict[str, int]:
        entry = self._entries.get(peer_id)
        return dict(entry.counts) if entry else {}

    def forget(self, peer_id: str) -> None:
        if self._entries.pop(peer_id, None) is not None:
            self.dirty = True

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per provider (and per listed peer), lowest trust first, for ``modelnet status``."""
        ids = list(self._entries) + sorted(
            (self.lists.pin | self.lists.allow | self.lists.block) - set(self._entries)
        )
        rows = [
            {
                "peer_id": pid,
                "trust": round(self.trust(pid), 3),
                "list": self.lists.label(pid),
                **self.counts(pid),
            }
            for pid in ids
        ]
        return sorted(rows, key=lambda r: (r["trust"], r["peer_id"]))

    # -- persistence --------------------------------------------------------------------

    def load(self) -> None:
        """Read :attr:`path` (a missing, corrupt or oversized file leaves the scores empty)."""
        if self.path is None:
            return
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read reputation file %s: %s; starting afresh", self.path, exc)
            return
        if len(data) > MAX_FILE_BYTES:
            log.warning("reputation file %s is over %d bytes; ignored", self.path, MAX_FILE_BYTES)
            return
        try:
            raw = json.loads(data)
            peers = raw["peers"] if isinstance(raw, dict) and raw.get("version") == FILE_VERSION else None
            if not isinstance(peers, dict):
                raise ValueError("no peers table of a known version")
        except (ValueError, KeyError, UnicodeDecodeError) as exc:
            log.warning("reputation file %s is corrupt (%s); starting afresh", self.path, exc)
            return
        self._entries = _entries_of(peers, self.max_peers)

    def save(self) -> None:
        """Write the scores to :attr:`path` atomically (a no-op without a path)."""
        if self.path is None:
            return
        body = json.dumps(
            {
                "version": FILE_VERSION,
                "peers": {pid: e.to_json() for pid, e in self._entries.items()},
            },
            separators=(",", ":"),
        ).encode()
        directory = self.path.parent
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot save reputation file %s: %s", self.path, exc)
            return
        self.dirty = False

    def save_if_dirty(self) -> None:
        if self.dirty:
            self.save()

    async def save_forever(self, interval: float = SAVE_INTERVAL) -> None:
        """Save every ``interval`` seconds while something changed (run it in the peer's nursery)."""
        while True:
            await trio.sleep(interval)
            self.save_if_dirty()


def _entries_of(peers: Mapping[str, Any], limit: int) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for pid, raw in list(peers.items())[-limit:]:
        entry = _Entry.from_json(raw)
        if isinstance(pid, str) and pid and entry is not None:
            entries[pid] = entry
    return entries

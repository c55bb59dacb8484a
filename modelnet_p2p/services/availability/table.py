"""The soft-state table of everyone's availability: validate, enter, expire, watch.

:class:`AvailabilityTable` is the receiving half of the availability service, with no network:
:meth:`AvailabilityTable.offer` takes the bytes of a gossip message and the binary peer id of
its publisher, checks them (size, strict encoding, origin, record signature, sequence number)
and enters an accepted record; entries expire when their TTL passes without a newer record.

Times are :func:`trio.current_time` seconds, so a table runs under ``trio.testing.MockClock``
like any other trio code.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from ...errors import ProtocolError
from ...proto.availability import (
    MAX_MESSAGE_SIZE,
    MAX_TTL_MS,
    MIN_TTL_MS,
    AvailabilityRecord,
    SignedRecord,
    State,
    open_envelope,
)
from ...proto.peerid import b58encode
from .config import AvailabilityConfig

__all__ = ["AvailabilityChange", "AvailabilityEntry", "AvailabilityTable", "TableStats"]

log = logging.getLogger(__name__)

#: Longest sleep of the sweeper, in seconds (it also forgets old sequence numbers).
SWEEP_IDLE = 60.0


@dataclass(frozen=True, slots=True)
class AvailabilityEntry:
    """One row of the availability table.

    Times are :func:`trio.current_time` seconds. ``local`` marks this peer's own record.
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
        """Seconds since the last record from this peer arrived (read inside ``trio.run``)."""
        return max(0.0, trio.current_time() - self.last_seen)

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
    """A change of the table, as delivered to :meth:`AvailabilityTable.subscribe` channels.

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
class TableStats:
    """Counters of the receiving side."""

    validated: int = 0
    #: Record signatures checked: at most one per distinct record received (duplicates are
    #: dropped by message id before validation), none for malformed or misattributed ones.
    verified: int = 0
    accepted: int = 0
    #: Rejections by reason: oversized, malformed, origin_mismatch, bad_signature, stale,
    #: table_full, internal.
    rejected: Counter[str] = field(default_factory=Counter)
    evicted: int = 0
    dropped_notifications: int = 0


def _describe_origin(origin: bytes) -> str:
    try:
        return b58encode(origin)
    except Exception:
        return origin.hex()[:16]


class AvailabilityTable:
    """Live availability entries by peer id, fed by :meth:`offer`, emptied by :meth:`sweep`.

    Args:
        local_peer_id: this peer's id (base58); its own entry is marked ``local``.
        config: TTL bounds, table size, sequence memory and the ``leaving`` linger come from it.
    """

    def __init__(self, local_peer_id: str, config: AvailabilityConfig | None = None) -> None:
        self.local_peer_id = local_peer_id
        self.config = config or AvailabilityConfig()
        self.stats = TableStats()
        self._entries: dict[str, AvailabilityEntry] = {}
        self._seq_high: dict[str, tuple[int, float]] = {}
        self._version = 0
        self._changed = trio.Event()
        self._watchers: list[trio.MemorySendChannel[AvailabilityChange]] = []

    # -- receiving ----------------------------------------------------------------------

    def offer(self, data: bytes, origin: bytes) -> bool:
        """Check the gossip message ``data`` published by ``origin`` (binary peer id); enter it if valid.

        Returns whether it was accepted (only accepted messages are forwarded). Never raises.
        """
        try:
            return self._validate(data, origin)
        except Exception as exc:
            self.stats.rejected["internal"] += 1
            log.debug("availability validator failed: %r", exc)
            return False

    def _reject(self, reason: str, origin: bytes, detail: str = "") -> bool:
        self.stats.rejected[reason] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rejected availability record from %s: %s %s", _describe_origin(origin), reason, detail)
        return False

    def _validate(self, data: bytes, origin: bytes) -> bool:
        self.stats.validated += 1
        # 1. size, before any parsing.
        if len(data) > MAX_MESSAGE_SIZE:
            return self._reject("oversized", origin, f"{len(data)} bytes")
        # 2. strict decoding of envelope and record.
        try:
            signed = open_envelope(data, verify=False)
        except ProtocolError as exc:
            return self._reject("malformed", origin, exc.message)
        # 3. the record names the peer that published the gossip message.
        if signed.peer_id_bytes != origin:
            return self._reject("origin_mismatch", origin)
        # 4. the record's own signature, by the key behind its peer id.
        self.stats.verified += 1
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
        now = trio.current_time()
        ttl = min(max(record.ttl_ms, MIN_TTL_MS), MAX_TTL_MS) / 1000
        if record.state is State.LEAVING:
            ttl = min(ttl, self.config.leaving_linger)
        prev = self._entries.get(record.peer_id)
        entry = AvailabilityEntry(
            record=record,
            first_seen=prev.first_seen if prev is not None else now,
            last_seen=now,
            expires_at=now + ttl,
            size=signed.size,
            local=record.peer_id == self.local_peer_id,
        )
        self._entries[record.peer_id] = entry
        self._seq_high[record.peer_id] = (record.seq, now)
        self._notify(AvailabilityChange("added" if prev is None else "updated", record.peer_id, entry, prev))

    # -- expiry -------------------------------------------------------------------------

    async def run_sweeper(self) -> None:
        """Sweep when the earliest entry expires (at most every ``config.sweep_interval``
        seconds, and at least every :data:`SWEEP_IDLE` seconds), until cancelled.

        An idle table costs no wake-ups: the sweeper sleeps until the next expiry, or until a
        change brings an earlier one.
        """
        while True:
            now = trio.current_time()
            earliest = min((e.expires_at for e in self._entries.values()), default=math.inf)
            wake = max(min(earliest, now + SWEEP_IDLE), now + self.config.sweep_interval)
            changed = self._changed
            with trio.move_on_at(wake):
                await changed.wait()
            if trio.current_time() < wake:  # a change: sleep again with its expiry counted
                await trio.sleep(self.config.sweep_interval)
            self.sweep()

    def sweep(self) -> int:
        """Evict expired entries now; returns how many."""
        now = trio.current_time()
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

    # -- reading ------------------------------------------------------------------------

    def table(self) -> dict[str, AvailabilityEntry]:
        """Live entries by peer id (base58), this peer's own included (``local=True``)."""
        now = trio.current_time()
        return {pid: e for pid, e in self._entries.items() if e.expires_at > now}

    def get(self, peer_id: str) -> AvailabilityEntry | None:
        entry = self._entries.get(peer_id)
        return entry if entry is not None and entry.expires_at > trio.current_time() else None

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

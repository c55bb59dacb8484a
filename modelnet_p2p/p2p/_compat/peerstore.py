"""Forget the peers nobody needs any more: py-libp2p 0.8.1's peerstore never does.

Upstream behaviours worked around (the canaries in ``tests/test_compat_peerstore.py`` fail
once upstream changes them):

- **Every identity ever seen stays.** A peer that connected once keeps its entry (public
  key, addresses, identify's protocol list, its signed peer record) after it disconnects.
  Only ``PeerStore.start_cleanup_task`` expires entries, and nothing in the host or the
  swarm starts it; the store's hard cap (``max_peers``, 1,000) is the only bound. Sybils
  that connect and leave therefore fill it: a victim of the hostile-peer benchmark held 604
  peers after one run, about 170 objects tracked by the garbage collector each, which every
  full collection walks.
- **Upstream's own expiry would forget peers in use.** Its cleanup deletes the whole entry of
  any peer whose address TTL ran out, connected or not: identify's protocol list and the key
  of a peer with an open connection go with it. Its cap (on every ``add_addrs`` over 1,000)
  sorts the whole store and evicts without looking at connections either.

:class:`PeerstoreSweeper` forgets instead, every :data:`SWEEP_INTERVAL` seconds, the peers
that no one needs: those with no open connection and named by none of the sources given to
:meth:`PeerstoreSweeper.start`. A :class:`~modelnet_p2p.Peer` gives the connection
manager's protected peers (bootstrap peers, relay reservations, the gossip mesh), the DHT's
routing table, and its availability table (gossiping providers, which a call may name by
peer id alone, so their addresses must stay). Such
an *idle* peer is forgotten once it has been idle for :data:`IDLE_GRACE` seconds, and
earlier, once idle for :data:`MIN_IDLE` seconds, while the store holds more than
:data:`MAX_PEERS` entries: the longest idle first, until it is back at the bound (peers in
use count towards it but are never forgotten; a peer just named by a DHT answer is dialed
within the minimum, not forgotten under the lookup).
Idleness is measured from the first sweep that found the peer idle; an entry whose
addresses were updated since (``add_addrs``: a dial, a DHT answer naming it) counts as
idle from then. Forgetting is ``clear_peerdata``: the next dial needs addresses again,
which the dialer, DHT answers and cards supply.

Times come from an injected clock (:func:`trio.current_time` by default), so tests drive
:meth:`PeerstoreSweeper.sweep` without sleeping. A source that fails skips the sweep: a
peer is forgotten only when it is known not to be needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from ..ids import parse_id

__all__ = [
    "IDLE_GRACE",
    "MAX_FORGET_PER_SWEEP",
    "MAX_PEERS",
    "MIN_IDLE",
    "SWEEP_INTERVAL",
    "PeerstoreStats",
    "PeerstoreSweeper",
]

log = logging.getLogger(__name__)

#: Entries the sweeper keeps the peerstore at, at most, by forgetting idle peers (upstream's
#: own cap is 1,000). Peers in use count too but are never forgotten: a peer with more
#: connections than this (its limit is 192 by default) keeps only the idle peers of the last
#: :data:`MIN_IDLE` seconds. At about 170 tracked objects per entry, 128 entries are some 22k
#: objects (1,000 were 170k).
MAX_PEERS = 128
#: Seconds a peer is idle, at least, before it is forgotten for the bound: a peer named by a
#: DHT answer is dialed within a lookup's few seconds, and three sweeps pass first.
MIN_IDLE = 30.0
#: Seconds an idle peer is remembered (go-libp2p keeps an address of unknown standing for 2
#: minutes, its ``TempAddrTTL``): long enough to redial a peer just met without a lookup,
#: short enough that Sybils passing through are gone within minutes.
IDLE_GRACE = 120.0
#: Seconds between two sweeps. A sweep walks the store once (at most about 1,000 entries).
SWEEP_INTERVAL = 10.0
#: Peers forgotten in one sweep, at most (each pass stays short; the next one goes on).
MAX_FORGET_PER_SWEEP = 512


@dataclass(frozen=True)
class PeerstoreStats:
    """A snapshot of a :class:`PeerstoreSweeper`."""

    #: Entries in the peerstore now.
    peers: int
    #: Of those, peers the last sweep found idle (no connection, not kept) and still held.
    idle: int
    #: Peers forgotten since the sweeper started.
    forgotten: int
    #: Sweeps run (skipped ones not counted).
    sweeps: int
    #: Sweeps skipped because a source failed.
    skipped: int


class PeerstoreSweeper:
    """Forgets idle peers of a host's peerstore (see the module docs).

    Args:
        max_peers: forget idle peers, the longest idle first, while the store holds more.
        min_idle: seconds a peer is idle before it may be forgotten for ``max_peers``.
        idle_grace: seconds after which an idle peer is forgotten in any case.
        interval: seconds between two sweeps of :meth:`run`.
        clock: the time in seconds (monotonic; :func:`trio.current_time` by default).
    """

    def __init__(
        self,
        *,
        max_peers: int = MAX_PEERS,
        min_idle: float = MIN_IDLE,
        idle_grace: float = IDLE_GRACE,
        interval: float = SWEEP_INTERVAL,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if max_peers < 1 or min_idle < 0 or idle_grace < 0 or interval <= 0:
            raise ValueError("max_peers must be >= 1, min_idle and idle_grace >= 0, interval > 0")
        self.max_peers = max_peers
        self.min_idle = min_idle
        self.idle_grace = idle_grace
        self.interval = interval
        self.clock = clock
        self._host: IHost | None = None
        self._sources: list[Callable[[], Iterable[str]]] = []
        #: Idle peers: (when first found idle, the entry's last address update then).
        self._idle: dict[ID, tuple[float, int]] = {}
        self._forgotten = 0
        self._sweeps = 0
        self._skipped = 0

    def start(
        self, host: IHost, nursery: trio.Nursery, keep: Sequence[Callable[[], Iterable[str]]] = ()
    ) -> None:
        """Sweep ``host``'s peerstore in ``nursery`` every ``interval`` seconds until cancelled.

        ``keep``: callables asked at each sweep for peer ids (base58 text) that must stay.
        """
        self.attach(host, keep)
        nursery.start_soon(self.run)

    def attach(self, host: IHost, keep: Sequence[Callable[[], Iterable[str]]] = ()) -> None:
        """Sweep ``host``'s peerstore from now on (without starting :meth:`run`)."""
        self._host = host
        self._sources = list(keep)
        self._idle.clear()

    async def run(self) -> None:
        """Sweep every ``interval`` seconds, forever."""
        while True:
            await trio.sleep(self.interval)
            try:
                self.sweep()
            except Exception as exc:  # a failed pass must not stop the next ones
                log.warning("sweeping the peerstore failed: %r", exc)

    def _kept(self) -> set[ID] | None:
        kept: set[ID] = set()
        for source in self._sources:
            try:
                names = list(source())
            except Exception as exc:
                log.debug("peerstore keep source failed, sweep skipped: %r", exc)
                return None
            for name in names:
                try:
                    kept.add(parse_id(str(name)))
                except Exception:
                    continue  # not a peer id: names nobody
        return kept

    def sweep(self) -> int:
        """One pass: forget the idle peers due now; returns how many were forgotten."""
        host = self._host
        if host is None:
            return 0
        kept = self._kept()
        if kept is None:
            self._skipped += 1
            return 0
        kept.add(host.get_id())
        kept.update(host.get_connected_peers())  # peers with an open connection
        store = host.get_peerstore()
        entries: dict[ID, Any] = getattr(store, "peer_data_map", {})
        now = self.clock()
        peers = store.peer_ids()
        idle: list[tuple[float, ID]] = []
        seen: dict[ID, tuple[float, int]] = {}
        for pid in peers:
            if pid in kept:
                continue
            data = entries.get(pid)
            touched = int(data.get_last_identified()) if data is not None else 0
            since, last = self._idle.get(pid, (now, touched))
            if last != touched:  # its addresses were updated since: idle from now
                since = now
            seen[pid] = (since, touched)
            idle.append((since, pid))
        self._idle = seen
        idle.sort(key=lambda item: item[0])  # the longest idle first
        excess = len(peers) - self.max_peers
        due = [
            pid for n, (since, pid) in enumerate(idle)
            if now - since >= self.idle_grace or (n < excess and now - since >= self.min_idle)
        ]
        due = due[:MAX_FORGET_PER_SWEEP]
        for pid in due:
            self._forget(store, pid)
        self._sweeps += 1
        self._forgotten += len(due)
        if due:
            log.debug("forgot %d idle peers (%d left in the peerstore)", len(due), len(peers) - len(due))
        return len(due)

    def _forget(self, store: Any, pid: ID) -> None:
        self._idle.pop(pid, None)
        try:
            store.clear_peerdata(pid)  # the entry and its signed peer record
        except KeyError:
            pass  # gone already
        channels = getattr(store, "addr_update_channels", None)
        if isinstance(channels, dict):
            channels.pop(pid, None)

    def stats(self) -> PeerstoreStats:
        """Counts for tests, benchmarks and ``modelnet status``."""
        peers = len(self._host.get_peerstore().peer_ids()) if self._host is not None else 0
        return PeerstoreStats(
            peers=peers,
            idle=len(self._idle),
            forgotten=self._forgotten,
            sweeps=self._sweeps,
            skipped=self._skipped,
        )

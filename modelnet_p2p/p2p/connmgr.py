"""The connection manager: keep the number of open connections between two watermarks.

Nothing else closes a connection that nobody uses: py-libp2p 0.8.1's swarm accepts up to
its cap (256) and its own pruner only starts above 300 (the host is built so). A peer in a
growing mesh would otherwise keep every DHT contact, every caller and every provider it
ever met. The rule (``specs/network.md``, "Connection management"):

- When more than ``high`` connections are open, close idle unprotected ones, the least
  recently used first, until ``low`` are left (or no candidate is left).
- A connection younger than ``grace_period`` seconds is never closed: it was made for a
  reason that has not had its chance yet.
- Never closed (protected):

  - connections to peers protected with :meth:`ConnManager.protect` (under a tag; the
    peer stays protected until every tag is removed), for example the bootstrap peers;
  - connections to peers a *source* names (callables given to :meth:`ConnManager.keep`,
    asked at each trim): the GossipSub mesh, the peers holding a relay reservation here;
  - connections in use: carrying an open stream of any protocol but the long-lived pubsub
    streams that every gossiping pair keeps. Open circuits and the inference streams kept
    for reuse (:class:`~modelnet_p2p.p2p.pool.StreamPool`) are open streams, so they count
    as in use; the pool closes a kept stream after 20 s idle, and then its connection can go.

Hard limits (``specs/network.md``, "Resource limits", with :class:`~.resources.ResourceLimits`):
the watermarks are soft, and a peer could be locked out by anyone who opens connections
faster than the grace period lets them go (256 idle connections locked new peers out: 0 of 8
could connect). So the manager also enforces, at once on every new connection:

- at most ``max_connections_per_ip`` connections from one IP address: its idle ones are
  closed first (those that never carried a stream but identify and ping, the oldest first,
  then the least recently used; one younger than ``NEWCOMER_GRACE`` counts as used when it
  opened), then its newest ones;
- at most ``max_connections_per_peer`` to one peer id (the same order);
- at most ``max_connections`` in all: idle unprotected connections are closed, grace period
  or not: those of the address holding the most connections first, in the same order (a
  newcomer's connection is young, and carries its first call soon). A connection carrying a
  stream (but identify and ping, which every new connection runs, and streams whose protocol
  is not agreed yet) is in use and stays.

Within each of these orders, the connections of peers already closed over a limit within
the penalty window (strikes) go first, for the total even when they are in use: Sybils that
redial as fast as they are closed make room before a newcomer does. A peer closed
``connection_strikes`` times within ``penalty_window`` seconds is refused for
``penalty_time`` seconds: its connections are closed right after their security handshake,
before the muxer and any service sees them.

Inbound streams (:class:`~.resources.StreamGate`): each remote peer may open
``stream_rate`` streams a second (bursts of ``stream_burst``), all protocols together; a
stream over it waits its turn (at most ``stream_wait`` seconds) or is reset before its
protocol is negotiated; with ``stream_strikes`` set (off by default), that many resets
within the penalty window make the peer refused as above (its connections closed at once,
its streams reset unread).

Protected peers are never closed by these limits either, nor refused. The swarm's own caps are set above
``max_connections`` (``_compat/rcmgr.py``), so that the choice is made here and not by a
swarm that refuses every newcomer once full.

"Used" is the opening or closing of a stream other than a pubsub stream. A trimmed peer is
not forgotten: its addresses stay in the peerstore and the next stream to it redials. Times
are :func:`trio.current_time` values, so tests can drive the manager with a mock clock.
The manager checks at once (at most once a second) when a new connection takes the count
over ``high``, and then every ``check_interval`` seconds for as long as the count stays over
``high``; under it, the manager sleeps (an idle peer pays no wake-ups for it).
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, cast

import trio
from libp2p.abc import INetConn, INetStream, INotifee

from ._compat.goaway import mark_pruned
from ._compat.host import gate_inbound
from ._compat.peerstore import PeerstoreStats, PeerstoreSweeper
from .resources import Penalties, ResourceLimits, StreamGate, conn_ip

__all__ = ["ConnManager", "ConnStats", "PeerstoreStats", "PeerstoreSweeper", "peer_id_of_addr"]

log = logging.getLogger(__name__)

#: Protocols of streams that stay open as long as the connection (pubsub keeps one per neighbour).
LONG_LIVED_PROTOCOLS: tuple[str, ...] = ("/meshsub/", "/floodsub/")
#: Protocols every connection runs by itself: a connection that carried only these did no work.
HOUSEKEEPING_PROTOCOLS: tuple[str, ...] = ("/ipfs/id/", "/ipfs/ping/")
#: Seconds between two checks triggered by new connections.
MIN_CHECK_GAP = 1.0
#: Seconds a trimmed connection is given to close.
CLOSE_TIMEOUT = 2.0
#: Seconds a new connection that has carried no stream yet counts, for the hard limits, as
#: used when it opened rather than as one that did no work (a newcomer's first call comes
#: after its handshakes; Sybils holding the slots had done work, and it was closed first).
NEWCOMER_GRACE = 5.0


def peer_id_of_addr(addr: str) -> str | None:
    """The peer id a multiaddr ends with (``.../p2p/<id>``), or ``None``."""
    parts = str(addr).rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "p2p" and parts[-1]:
        return parts[-1]
    return None


@dataclass(frozen=True)
class ConnStats:
    """A snapshot of a :class:`ConnManager`."""

    #: Open connections now.
    connections: int
    #: Of those, connections carrying an open stream (pubsub streams aside).
    in_use: int
    #: Of those, connections to protected peers (by tag or by a source).
    protected: int
    #: Connections the manager has closed (or begun to close) since it was made.
    trimmed: int
    #: Trims that closed at least one connection.
    trims: int
    #: Connections closed because a hard limit was exceeded (per IP, per peer, in total).
    limited: int
    low: int
    high: int
    #: Inbound streams reset before negotiation: over their peer's rate, or of a refused peer.
    streams_refused: int = 0
    #: Inbound connections closed after the security handshake because their peer was refused.
    connections_refused: int = 0
    #: Peers refused now.
    peers_refused: int = 0


@dataclass
class _Conn:
    opened: float
    last_used: float
    peer: str = ""
    ip: str | None = None
    #: Carried a stream of a protocol other than the housekeeping ones.
    worked: bool = False


class _Notifee:
    """Stream and connection events from the swarm (it calls these by name)."""

    def __init__(self, manager: ConnManager) -> None:
        self.manager = manager

    async def opened_stream(self, network: Any, stream: INetStream) -> None:
        self.manager.used(stream)

    async def closed_stream(self, network: Any, stream: INetStream) -> None:
        self.manager.used(stream)

    async def connected(self, network: Any, conn: INetConn) -> None:
        self.manager.connected(conn)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        self.manager.disconnected(conn)

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


def _long_lived(stream: INetStream) -> bool:
    try:
        protocol = stream.get_protocol()
    except Exception:
        return False
    return protocol is not None and any(p in str(protocol) for p in LONG_LIVED_PROTOCOLS)


def _housekeeping(stream: INetStream) -> bool:
    """Whether ``stream`` is identify or ping, or its protocol is not known (yet)."""
    try:
        protocol = stream.get_protocol()
    except Exception:
        return True
    return protocol is None or any(p in str(protocol) for p in HOUSEKEEPING_PROTOCOLS)


def _conn_peer(conn: INetConn) -> str:
    return str(conn.muxed_conn.peer_id)


class ConnManager:
    """Trims idle connections of one host down to ``low`` once more than ``high`` are open.

    Args:
        low: connections left after a trim.
        high: a trim starts when more than this many are open.
        grace_period: seconds a new connection is safe from trimming.
        check_interval: seconds between periodic checks.

    Make it before the host runs (protect peers at any time), then :meth:`start` it in the
    peer's nursery once the host runs.
    """

    def __init__(
        self,
        *,
        low: int,
        high: int,
        grace_period: float,
        check_interval: float,
        limits: ResourceLimits | None = None,
    ) -> None:
        if low < 0 or high < low or high < 1:
            raise ValueError("connection watermarks need 0 <= low <= high and high >= 1")
        if grace_period < 0 or check_interval <= 0:
            raise ValueError("grace_period must be >= 0 and check_interval positive")
        self.low = low
        self._high = high
        self.grace_period = grace_period
        self.check_interval = check_interval
        self._tags: dict[str, set[str]] = {}
        self._sources: list[Callable[[], Iterable[str]]] = []
        self._conns: dict[int, _Conn] = {}
        self._host: Any = None
        self._notifee: _Notifee | None = None
        self._wake = trio.Event()
        self._trimmed = 0
        self._trims = 0
        #: The hard limits (see the module docs).
        self.limits = limits or ResourceLimits()
        self._limited = 0
        self._over_limit = trio.Event()
        #: Strikes and refused peers (see the module docs).
        self.penalties = Penalties(self.limits.penalty_window, self.limits.penalty_time)
        #: The inbound stream admission, asked before each stream's protocol negotiation.
        self.streams = StreamGate(
            self.limits, self.penalties, trio.current_time, on_refused=self._refuse, exempt=self.is_protected
        )
        self._conns_refused = 0
        self._nursery: trio.Nursery | None = None
        #: Muxed connections this manager closed (gone with the connection objects).
        self._closed_here: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def high(self) -> int:
        """A trim starts when more than this many connections are open (settable; a lower
        mark is checked at once)."""
        return self._high

    @high.setter
    def high(self, value: int) -> None:
        self._high = value
        if self._host is not None:
            self._wake.set()

    # -- protection ------------------------------------------------------------------

    def protect(self, peer_id: str, tag: str) -> None:
        """Never trim connections to ``peer_id`` while it holds ``tag`` (or any other tag)."""
        self._tags.setdefault(str(peer_id), set()).add(tag)

    def unprotect(self, peer_id: str, tag: str) -> bool:
        """Remove ``tag`` from ``peer_id``; returns whether the peer is still protected."""
        tags = self._tags.get(str(peer_id))
        if tags is None:
            return False
        tags.discard(tag)
        if not tags:
            del self._tags[str(peer_id)]
            return False
        return True

    def protect_addrs(self, addrs: Iterable[str], tag: str) -> None:
        """:meth:`protect` the peer each multiaddr names (``.../p2p/<id>``; others are skipped)."""
        for addr in addrs:
            peer_id = peer_id_of_addr(str(addr))
            if peer_id is not None:
                self.protect(peer_id, tag)

    def closed_here(self, muxed_conn: object) -> bool:
        """Whether this manager closed that connection (idle, over a limit, or its peer refused):
        its peer did not leave, and was alive until then."""
        try:
            return muxed_conn in self._closed_here
        except TypeError:  # not weakly referenceable: never one of ours
            return False

    def is_protected(self, peer_id: str) -> bool:
        """Whether ``peer_id`` holds a tag or a source names it now."""
        return str(peer_id) in self._tags or str(peer_id) in self._named_by_sources()

    def protected_peers(self) -> set[str]:
        """Every peer id protected now: by a tag or named by a source."""
        return self._protected_now()

    def keep(self, source: Callable[[], Iterable[str]]) -> None:
        """Also protect, at each trim, the peer ids ``source()`` returns (it must be cheap).

        Give sources after :meth:`start`: each start forgets those of the last run.
        """
        self._sources.append(source)

    def _named_by_sources(self) -> set[str]:
        named: set[str] = set()
        for source in self._sources:
            try:
                named.update(str(p) for p in source())
            except Exception as exc:  # a failing source protects nothing; it must not stop trims
                log.debug("connection protection source failed: %r", exc)
        return named

    # -- events ------------------------------------------------------------------------

    def connected(self, conn: INetConn) -> None:
        now = trio.current_time()
        record = self._record(conn, now)
        if self._host is None:
            return
        if len(self._conns) > self.high:
            self._wake.set()
        over = len(self._conns) > self.limits.max_connections
        if over or self._over_ip(record.ip) or self._over_peer(record.peer):
            self._over_limit.set()

    def _record(self, conn: INetConn, now: float) -> _Conn:
        record = self._conns.get(id(conn.muxed_conn))
        if record is None:
            ip = conn_ip(conn.muxed_conn, limit_loopback=self.limits.limit_loopback)
            record = self._conns[id(conn.muxed_conn)] = _Conn(now, now, _conn_peer(conn), ip)
        return record

    def _over_ip(self, ip: str | None) -> bool:
        if ip is None:
            return False
        return sum(1 for r in self._conns.values() if r.ip == ip) > self.limits.max_connections_per_ip

    def _over_peer(self, peer: str) -> bool:
        return sum(1 for r in self._conns.values() if r.peer == peer) > self.limits.max_connections_per_peer

    def disconnected(self, conn: INetConn) -> None:
        self._conns.pop(id(conn.muxed_conn), None)

    def used(self, stream: INetStream) -> None:
        if _long_lived(stream):
            return
        record = self._conns.get(id(stream.muxed_conn))
        if record is not None:
            record.last_used = trio.current_time()
            if not record.worked and not _housekeeping(stream):
                record.worked = True

    # -- running -----------------------------------------------------------------------

    async def start(self, host: Any, nursery: trio.Nursery) -> None:
        """Watch ``host``'s connections and trim them in ``nursery`` until it is cancelled."""
        self._host = host
        self._sources.clear()  # the services of the last run are gone
        self._conns.clear()
        self._wake = trio.Event()
        self._over_limit = trio.Event()
        self._notifee = _Notifee(self)
        # INotifee is an interface the swarm calls by method name; the plain object serves.
        host.get_network().register_notifee(cast(INotifee, self._notifee))
        self._nursery = nursery
        if not gate_inbound(host, admit_peer=self._admit_peer, admit_stream=self.streams.admit):
            log.warning("cannot gate inbound connections and streams: no per-peer stream rate")
        for conn in self._open_conns():
            self.connected(conn)
        nursery.start_soon(self._run)
        nursery.start_soon(self._run_limits)

    async def _run_limits(self) -> None:
        while True:
            await self._over_limit.wait()
            self._over_limit = trio.Event()
            try:
                await self.enforce_limits()
            except Exception as exc:  # a failed pass must not stop the next ones
                log.warning("enforcing the connection limits failed: %r", exc)

    async def _run(self) -> None:
        over = False
        try:
            while True:
                # Under the high mark nothing can be trimmed: sleep until a new connection
                # takes the count over it. Over it (a trim left more than ``high``: the rest
                # were young, in use or protected), look again every check_interval.
                with trio.move_on_after(self.check_interval if over else math.inf):
                    await self._wake.wait()
                self._wake = trio.Event()
                over = len(self._open_conns()) > self.high
                if over:
                    await self.trim()
                    over = len(self._open_conns()) > self.high
                    await trio.sleep(MIN_CHECK_GAP)
        finally:
            host, self._host = self._host, None
            if host is not None and self._notifee is not None:
                try:
                    host.get_network().remove_notifee(cast(INotifee, self._notifee))
                except Exception:
                    pass

    def _open_conns(self) -> list[INetConn]:
        if self._host is None:
            return []
        try:
            conns: list[INetConn] = list(self._host.get_network().get_connections())
        except Exception:
            return []
        return [c for c in conns if not c.is_closed]

    def _in_use(self, conn: INetConn) -> bool:
        try:
            streams = conn.get_streams()
        except Exception:
            return True
        return any(not _long_lived(s) for s in streams)

    def _working(self, conn: INetConn) -> bool:
        """In use for the hard limits: carrying a stream other than pubsub, identify and ping.

        A stream still negotiating its protocol does not count: a remote that never answers
        the negotiation of the streams this peer opens to it would otherwise look busy forever.
        """
        try:
            streams = conn.get_streams()
        except Exception:
            return True
        return any(not _long_lived(s) and not _housekeeping(s) for s in streams)

    def candidates(self, protected: Collection[str] | None = None) -> list[INetConn]:
        """The connections a trim may close now, the least recently used first."""
        now = trio.current_time()
        protected = self._protected_now() if protected is None else protected
        out: list[tuple[float, INetConn]] = []
        conns = self._open_conns()
        live = {id(conn.muxed_conn) for conn in conns}
        for key in [k for k in self._conns if k not in live]:
            del self._conns[key]  # missed a disconnect: the id may be reused
        for conn in conns:
            record = self._record(conn, now)
            if self._in_use(conn):
                record.last_used = now
                continue
            if now - record.opened < self.grace_period or _conn_peer(conn) in protected:
                continue
            out.append((record.last_used, conn))
        out.sort(key=lambda item: item[0])
        return [conn for _, conn in out]

    # -- refused peers -------------------------------------------------------------------

    def _admit_peer(self, peer: str) -> bool:
        if not self.penalties.refused(peer, trio.current_time()) or self.is_protected(peer):
            return True
        self._conns_refused += 1
        return False

    def _refuse(self, peer: str) -> None:
        """``peer`` was just refused: close its connections (unless it is protected)."""
        if self._nursery is None or self.is_protected(peer):
            return
        log.info("refusing peer %s for %.0f s (streams over its rate)", peer, self.limits.penalty_time)
        self._nursery.start_soon(self._close_peer, peer)

    async def _close_peer(self, peer: str) -> None:
        conns = [c for c in self._open_conns() if _conn_peer(c) == peer]
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(self._close_now, conn)

    def _protected_now(self) -> set[str]:
        return set(self._tags) | self._named_by_sources()

    async def trim(self) -> int:
        """Close idle unprotected connections down to ``low`` if more than ``high`` are open.

        Returns how many were closed.
        """
        count = len(self._open_conns())
        if count <= self.high:
            return 0
        victims = self.candidates()[: count - self.low]
        if not victims:
            return 0
        log.debug("trimming %d of %d connections (low %d, high %d)", len(victims), count, self.low, self.high)
        self._trimmed += len(victims)
        self._trims += 1
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for conn in victims:
                    nursery.start_soon(self._close, conn)
        return len(victims)

    async def _close(self, conn: INetConn) -> None:
        if self._in_use(conn):  # a stream opened since the choice: keep it
            self._trimmed -= 1
            return
        await self._close_now(conn, "a trimmed connection")

    def over_limits(self) -> list[INetConn]:
        """The connections to close now to bring every hard limit back (see the module docs)."""
        now = trio.current_time()
        protected = self._protected_now()
        conns = [c for c in self._open_conns() if _conn_peer(c) not in protected]
        records = {id(c.muxed_conn): self._record(c, now) for c in self._open_conns()}
        chosen: dict[int, INetConn] = {}
        in_use = {id(c.muxed_conn): self._working(c) for c in conns}
        strikes = {r.peer: self.penalties.strikes(r.peer, "connection", now) for r in records.values()}

        def age(c: INetConn) -> tuple[int, bool, float]:
            # peers with the most strikes first; then those that did no work, the oldest
            # first; then the least recently used (a connection younger than NEWCOMER_GRACE
            # counts as used when it opened: it has not had its chance to work yet)
            rec = records[id(c.muxed_conn)]
            worked = rec.worked or now - rec.opened < NEWCOMER_GRACE
            return (-strikes.get(rec.peer, 0), worked, rec.last_used if worked else rec.opened)

        def idle_first(group: list[INetConn]) -> list[INetConn]:
            # idle ones (see age); then the rest, newest first
            idle = sorted((c for c in group if not in_use[id(c.muxed_conn)]), key=age)
            busy = sorted((c for c in group if in_use[id(c.muxed_conn)]),
                          key=lambda c: -records[id(c.muxed_conn)].opened)
            return idle + busy

        def group_limit(key: Callable[[_Conn], str | None], limit: int) -> None:
            counts: dict[str, int] = {}
            for rec in records.values():
                k = key(rec)
                if k is not None:
                    counts[k] = counts.get(k, 0) + 1
            for k, n in counts.items():
                if n <= limit:
                    continue
                group = [c for c in conns if key(records[id(c.muxed_conn)]) == k]
                for conn in idle_first(group)[: n - limit]:
                    chosen[id(conn.muxed_conn)] = conn

        group_limit(lambda r: r.ip, self.limits.max_connections_per_ip)
        group_limit(lambda r: r.peer, self.limits.max_connections_per_peer)
        excess = len(records) - len(chosen) - self.limits.max_connections
        if excess > 0:
            per_ip: dict[str | None, int] = {}
            for rec in records.values():
                per_ip[rec.ip] = per_ip.get(rec.ip, 0) + 1
            # idle ones, and those of peers with strikes even if in use (repeat offenders)
            idle = [
                c for c in conns
                if (not in_use[id(c.muxed_conn)] or strikes.get(records[id(c.muxed_conn)].peer, 0) > 0)
                and id(c.muxed_conn) not in chosen
            ]

            def rank(c: INetConn) -> tuple[int, tuple[int, bool, float]]:
                rec = records[id(c.muxed_conn)]
                return (-per_ip.get(rec.ip, 1) if rec.ip is not None else -1, age(c))

            for conn in sorted(idle, key=rank)[:excess]:
                chosen[id(conn.muxed_conn)] = conn
        return list(chosen.values())

    async def enforce_limits(self) -> int:
        """Close the connections over a hard limit now; returns how many."""
        victims = self.over_limits()
        if not victims:
            return 0
        log.info("closing %d connections over the connection limits (%d open)",
                 len(victims), len(self._conns))
        self._limited += len(victims)
        now = trio.current_time()
        for conn in victims:
            self.penalties.strike(_conn_peer(conn), "connection", now, self.limits.connection_strikes)
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for conn in victims:
                    nursery.start_soon(self._close_now, conn)
        return len(victims)

    async def _close_now(self, conn: INetConn, what: str = "a connection over the limits") -> None:
        self._closed_here.add(conn.muxed_conn)
        mark_pruned(conn.muxed_conn)  # its peer learns we let it go, not that we left
        try:
            await conn.close()
        except Exception as exc:
            log.debug("closing %s failed: %r", what, exc)
        self.disconnected(conn)

    def stats(self) -> ConnStats:
        """Counts for tests, benchmarks and ``modelnet status``."""
        conns = self._open_conns()
        protected = self._protected_now()
        return ConnStats(
            connections=len(conns),
            in_use=sum(1 for c in conns if self._in_use(c)),
            protected=sum(1 for c in conns if _conn_peer(c) in protected),
            trimmed=self._trimmed,
            trims=self._trims,
            limited=self._limited,
            low=self.low,
            high=self.high,
            streams_refused=self.streams.rate_limited + self.streams.refused,
            connections_refused=self._conns_refused,
            peers_refused=self.penalties.refused_now(trio.current_time()),
        )

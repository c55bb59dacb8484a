"""What the dashboard shows, gathered from one running peer: :class:`MeshWatch`.

The watch keeps a bounded memory of every peer this peer has known (from availability
gossip, from verified capability cards, from its own connections), so that a peer that
leaves shows as ``leaving`` and then ``gone`` with the time it was last seen, rather than
vanish. It also follows the capabilities its neighbours serve (as ``modelnet status``
does), and looks up their cards now and then for tasks, versions and addresses.

Two views, both plain JSON:

* :meth:`MeshWatch.snapshot`: everything the page draws (peers, graph, capabilities by
  task, recent traces, this peer);
* :meth:`MeshWatch.health`: the health API, ``/api/v1/state`` (``specs/health-api.md``).

Times in the JSON are seconds since the Unix epoch (``last_seen``) or seconds ago
(``age_s``); inside the watch they are trio time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..config import VERSION
from ..p2p.addresses import is_circuit_addr

if TYPE_CHECKING:
    from ..peer import Peer

__all__ = [
    "CARD_REFRESH",
    "GONE_AFTER",
    "HEALTH_VERSION",
    "MAX_PEERS",
    "MAX_TRACES",
    "MeshWatch",
    "PeerSeen",
]

log = logging.getLogger(__name__)

#: Version of the health API's JSON (``specs/health-api.md``).
HEALTH_VERSION = 1
#: Peers remembered at most; the one seen longest ago is forgotten first.
MAX_PEERS = 1024
#: Seconds a peer that is neither in gossip nor connected stays listed (as ``gone``).
GONE_AFTER = 600.0
#: Seconds between two refreshes of the view (and of following the neighbours' topics).
TICK = 1.0
#: Seconds before the cards of a capability are looked up again (new names: at once).
CARD_REFRESH = 30.0
#: Seconds one round of card lookups may take.
CARD_TIMEOUT = 5.0
#: Seconds between two browses of the whole mesh's cards (the first one at start).
BROWSE_INTERVAL = 30.0
#: Capability names looked up per round at most.
MAX_LOOKUPS = 32
#: Traces shown at most (newest first).
MAX_TRACES = 20


@dataclass
class PeerSeen:
    """One peer as the dashboard remembers it."""

    peer_id: str
    first_seen: float
    last_seen: float
    #: ``ready``/``busy``/``draining``/``leaving`` from gossip, ``connected`` (no record but a
    #: connection), ``known`` (a card only), or ``gone``.
    state: str = "known"
    load: dict[str, Any] = field(default_factory=dict)
    #: name -> {"version", "tasks", "available"}
    capabilities: dict[str, dict[str, Any]] = field(default_factory=dict)
    addrs: tuple[str, ...] = ()
    connected: bool = False
    in_gossip: bool = False
    local: bool = False

    def reachability(self) -> str:
        """``direct`` (a direct address or connection), ``relayed`` (circuit addresses only), ``unknown``."""
        if self.addrs:
            return "relayed" if all(is_circuit_addr(a) for a in self.addrs) else "direct"
        return "direct" if self.connected else "unknown"

    def relays(self) -> list[str]:
        """Peer ids of the relays named in this peer's circuit addresses."""
        out = []
        for a in self.addrs:
            # ``<relay addr>/p2p/<relay id>/p2p-circuit``, with or without ``/p2p/<target>``
            relay_part, sep, _ = a.partition("/p2p-circuit")
            _, has_id, relay = relay_part.rstrip("/").rpartition("/p2p/")
            if sep and has_id and relay and "/" not in relay and relay not in out:
                out.append(relay)
        return out


def _key(p: PeerSeen) -> tuple[Any, ...]:
    caps = tuple(
        (n, c.get("version"), c.get("available"), tuple(c.get("tasks") or ()))
        for n, c in sorted(p.capabilities.items())
    )
    return (p.peer_id, p.state, p.connected, tuple(sorted(p.load.items())), p.addrs, caps)


def _wall(t: float, now_trio: float, now_wall: float) -> float:
    return now_wall - max(0.0, now_trio - t)


class MeshWatch:
    """The dashboard's view of the mesh around ``peer`` (see the module docstring).

    Run :meth:`run` in the peer's nursery (:meth:`ensure_running` does, once); read
    :meth:`snapshot` and :meth:`health`; :meth:`wait_changed` returns after the next
    refresh that changed anything.
    """

    def __init__(self, peer: Peer, *, follow: bool = True, card_refresh: float = CARD_REFRESH) -> None:
        self.peer = peer
        self.follow = follow
        self.card_refresh = card_refresh
        self.peers: dict[str, PeerSeen] = {}
        #: Bumped by every refresh that changed what the page shows.
        self.version = 0
        self._changed = trio.Event()
        self._last_key: Any = None
        self._running = False
        self._looked_up: dict[str, float] = {}

    # -- running -------------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Start :meth:`run` in the peer's nursery unless it runs already."""
        if not self._running:
            self._running = True
            self.peer.nursery.start_soon(self.run)

    async def run(self) -> None:
        """Refresh every :data:`TICK` s, look cards up every ``card_refresh`` s; until cancelled."""
        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._cards_forever)
                while True:
                    self.refresh()
                    await trio.sleep(TICK)
        finally:
            self._running = False

    async def wait_changed(self, version: int, timeout: float) -> int:
        """Wait until :attr:`version` differs from ``version`` (or ``timeout`` s); the version now."""
        with trio.move_on_after(timeout):
            while self.version == version:
                await self._changed.wait()
        return self.version

    async def _cards_forever(self) -> None:
        browsed = -math.inf
        while True:
            try:
                if trio.current_time() - browsed >= BROWSE_INTERVAL:
                    browsed = trio.current_time()
                    await self.browse()
                await self.lookup_cards()
            except Exception as exc:  # a failed round is retried next time
                log.debug("dashboard card lookups failed: %r", exc)
            await trio.sleep(TICK)

    async def browse(self) -> int:
        """List every capability card of the mesh (the browse index, ``specs/capability.md``), so
        that serving peers whose gossip does not reach this peer are listed too; cards found."""
        cards = await self.peer.discover(timeout=CARD_TIMEOUT, limit=MAX_PEERS)
        for card in cards:
            self._note_card(card)
        return len(cards)

    async def lookup_cards(self) -> int:
        """Look up the cards of the capabilities seen in gossip: new names at once, the others
        every ``card_refresh`` s; returns the cards found."""
        now = trio.current_time()
        names = sorted(
            {n for p in self.peers.values() for n in p.capabilities if not p.local}
            | {n for e in self.peer.availability_table().values() for n, _ in e.capabilities}
        )
        due = [n for n in names if now - self._looked_up.get(n, -math.inf) >= self.card_refresh]
        found = 0
        with trio.move_on_after(CARD_TIMEOUT):
            for name in due[:MAX_LOOKUPS]:
                cards = await self.peer.discover(model=name, timeout=CARD_TIMEOUT)
                self._looked_up[name] = trio.current_time()
                for card in cards:
                    self._note_card(card)
                    found += 1
        if len(self._looked_up) > 4 * MAX_PEERS:
            self._looked_up.clear()
        return found

    def _note_card(self, card: Any) -> None:
        if card.peer_id == self.peer.peer_id:
            return
        p = self._seen(card.peer_id)
        if p is None:
            return
        p.addrs = tuple(card.addrs)
        if p.state == "known":  # a card only: it was alive when the lookup found it
            p.last_seen = trio.current_time()
        for cap in card.capabilities:
            entry = p.capabilities.setdefault(cap.name, {"version": cap.version, "available": False})
            entry["version"] = cap.version
            entry["tasks"] = list(cap.tasks)
        self.refresh()

    # -- the view ------------------------------------------------------------------------

    def _seen(self, pid: str) -> PeerSeen | None:
        p = self.peers.get(pid)
        if p is None:
            if len(self.peers) >= MAX_PEERS:
                oldest = min(self.peers.values(), key=lambda q: q.last_seen)
                if oldest.local:
                    return None
                del self.peers[oldest.peer_id]
            now = trio.current_time()
            p = self.peers[pid] = PeerSeen(pid, now, now)
        return p

    def _connected(self) -> set[str]:
        try:
            return {str(pid) for pid in self.peer.host.get_network().get_connections_map()}
        except Exception:
            return set()

    def refresh(self) -> None:
        """Fold gossip and connections into the memory; bump :attr:`version` if the page would change."""
        peer = self.peer
        now = trio.current_time()
        if self.follow and peer.availability is not None:
            try:
                peer.availability.follow_neighbours()
            except Exception as exc:
                log.debug("follow_neighbours failed: %r", exc)
        table = peer.availability_table()
        connected = self._connected()
        me = self._seen(peer.peer_id)
        if me is not None:
            me.local, me.connected, me.last_seen = True, True, now
            me.addrs = tuple(peer.addrs)
            me.capabilities = {
                c.name: {"version": c.version, "tasks": list(c.tasks), "available": True}
                for c in peer.capabilities
            }
            me.state = "draining" if peer.inference.draining else "ready"
            me.load = {"in_flight": peer.inference.in_flight, "max_concurrency": peer.limits.max_concurrency}
        for pid, entry in table.items():
            if pid == peer.peer_id:
                continue
            p = self._seen(pid)
            if p is None:
                continue
            r = entry.record
            p.in_gossip = True
            p.last_seen = max(p.last_seen, entry.last_seen)
            p.state = str(r.state)
            p.load = {
                "in_flight": r.in_flight,
                "queue": r.queue,
                "max_concurrency": r.max_concurrency,
                "latency_ms": r.latency_ms,
                "tokens_per_s": round(r.tokens_per_s, 1),
            }
            announced = dict(r.capabilities)
            for name, version in announced.items():
                cap = p.capabilities.setdefault(name, {"tasks": []})
                cap["version"] = version
            for name, cap in p.capabilities.items():
                cap["available"] = name in announced
        for pid in connected:
            if pid == peer.peer_id:
                continue
            p = self._seen(pid)
            if p is not None:
                p.last_seen = now
        for pid, p in list(self.peers.items()):
            if p.local:
                continue
            p.connected = pid in connected
            if pid not in table:
                if p.in_gossip:  # its record expired or it said goodbye and the entry went
                    p.in_gossip = False
                    p.state = "gone"
                    for cap in p.capabilities.values():
                        cap["available"] = False
                if p.connected and p.state in ("known", "gone"):
                    p.state = "connected"
                elif not p.connected and p.state == "connected":
                    p.state = "gone"
                if not p.connected and now - p.last_seen > GONE_AFTER:
                    del self.peers[pid]
        key: list[Any] = [_key(p) for p in sorted(self.peers.values(), key=lambda q: q.peer_id)]
        key.append(self._traces_key())
        if key != self._last_key:
            self._last_key = key
            self.version += 1
            self._changed.set()
            self._changed = trio.Event()

    def _traces(self) -> list[dict[str, Any]]:
        log_ = getattr(self.peer, "trace_log", None)
        return log_.recent(MAX_TRACES) if log_ is not None else []

    def _traces_key(self) -> Any:
        log_ = getattr(self.peer, "trace_log", None)
        return log_.key() if log_ is not None else None

    # -- JSON ------------------------------------------------------------------------------

    def _peer_json(self, p: PeerSeen, now_trio: float, now_wall: float) -> dict[str, Any]:
        return {
            "peer_id": p.peer_id,
            "local": p.local,
            "state": p.state,
            "connected": p.connected,
            "reachability": p.reachability(),
            "relays": p.relays(),
            "last_seen": round(_wall(p.last_seen, now_trio, now_wall), 3),
            "age_s": round(max(0.0, now_trio - p.last_seen), 1),
            "load": dict(p.load),
            "capabilities": [
                {
                    "name": n,
                    "version": c.get("version", ""),
                    "tasks": list(c.get("tasks") or ()),
                    "available": bool(c.get("available")),
                }
                for n, c in sorted(p.capabilities.items())
            ],
            "addrs": list(p.addrs),
        }

    def _graph(self, rows: Iterable[PeerSeen]) -> dict[str, Any]:
        me = self.peer.peer_id
        nodes, edges = [], []
        seen: set[tuple[str, str]] = set()
        ids = set()
        for p in rows:
            ids.add(p.peer_id)
            nodes.append({"id": p.peer_id, "state": p.state, "local": p.local})
        for p in rows:
            if p.local:
                continue
            relays = p.relays()
            if p.connected:  # "relayed": this peer is its relay (others reach it through here)
                kind = "relayed" if me in relays else "connection"
                edges.append({"a": me, "b": p.peer_id, "kind": kind})
                seen.add((me, p.peer_id))
            for relay in relays:
                if relay in ids and (relay, p.peer_id) not in seen:
                    edges.append({"a": relay, "b": p.peer_id, "kind": "relayed"})
                    seen.add((relay, p.peer_id))
        return {"nodes": nodes, "edges": edges}

    def this_peer(self) -> dict[str, Any]:
        """This peer: id, network, version, addresses and reachability."""
        peer = self.peer
        addrs = peer.addrs
        relayed = [a for a in addrs if is_circuit_addr(a)]
        return {
            "peer_id": peer.peer_id,
            "network": peer.network,
            "version": VERSION,
            "addrs": addrs,
            "reachability": {
                "configured": peer.config.reachability,
                "mode": "private" if peer.needs_relay else "public",
                "relayed": bool(relayed),
                "relay_addrs": relayed,
                "direct_addrs": [a for a in addrs if not is_circuit_addr(a)],
            },
            "connections": len(self._connected()),
        }

    def capabilities(self) -> dict[str, dict[str, Any]]:
        """Capability name -> version(s), tasks and the peers providing it (live or not)."""
        out: dict[str, dict[str, Any]] = {}
        for p in self.peers.values():
            for name, c in p.capabilities.items():
                cap = out.setdefault(
                    name, {"name": name, "tasks": [], "versions": [], "providers": [], "live": 0}
                )
                for t in c.get("tasks") or ():
                    if t not in cap["tasks"]:
                        cap["tasks"].append(t)
                if c.get("version") and c["version"] not in cap["versions"]:
                    cap["versions"].append(c["version"])
                cap["providers"].append(p.peer_id)
                if c.get("available") and p.state not in ("gone", "leaving"):
                    cap["live"] += 1
        return dict(sorted(out.items()))

    def snapshot(self) -> dict[str, Any]:
        """Everything the page draws, as JSON."""
        now_trio, now_wall = trio.current_time(), time.time()
        rows = sorted(self.peers.values(), key=lambda p: (not p.local, p.peer_id))
        caps = self.capabilities()
        by_task: dict[str, list[str]] = {}
        for name, cap in caps.items():
            for task in cap["tasks"] or ["(unknown task)"]:
                by_task.setdefault(task, []).append(name)
        return {
            "version": self.version,
            "time": now_wall,
            "self": self.this_peer(),
            "peers": [self._peer_json(p, now_trio, now_wall) for p in rows],
            "graph": self._graph(rows),
            "capabilities": list(caps.values()),
            "by_task": dict(sorted(by_task.items())),
            "traces": self._traces(),
        }

    def health(self) -> dict[str, Any]:
        """The health API's JSON (``specs/health-api.md``, version :data:`HEALTH_VERSION`)."""
        states = Counter(p.state for p in self.peers.values())
        present = [p for p in self.peers.values() if p.state != "gone"]
        caps = self.capabilities()
        me = self.this_peer()
        return {
            "version": HEALTH_VERSION,
            "time": time.time(),
            "network": me["network"],
            "peer_id": me["peer_id"],
            "mesh_size": len(present),
            "peers_by_state": dict(sorted(states.items())),
            "capabilities": [
                {
                    "name": c["name"],
                    "tasks": c["tasks"],
                    "versions": c["versions"],
                    "providers": len(c["providers"]),
                    "live_providers": c["live"],
                }
                for c in caps.values()
            ],
            "reachability": me["reachability"],
            "connections": me["connections"],
        }

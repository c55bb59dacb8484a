"""Who a remote is, for the resource limits: its peer id and the IP address it connects from.

Limits per IP address (connections, request slots, relay reservations; ``specs/network.md``,
"Resource limits") make the Sybil identities of one host share one budget. Every local
process connects from the loopback address, though, so a mesh of local peers (tests,
benchmarks, a machine running many workers) would share a single budget: loopback
addresses are left out of the per-IP limits unless ``limit_loopback`` is set. A relayed
connection comes from its relay's address; it is counted under the relay's peer id instead
(``relay:<id>``), so peers behind one relay do not share the relay's own budget.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["Penalties", "ResourceLimits", "StreamGate", "TokenBuckets", "conn_ip", "ip_key", "remote_ip"]

#: Remote peers a :class:`TokenBuckets` or :class:`Penalties` remembers at most (the least
#: recently seen are forgotten first: a forgotten peer starts with a full bucket, no strikes).
MAX_TRACKED_PEERS = 4096


@dataclass(frozen=True)
class ResourceLimits:
    """What one peer grants remote peers: connections, request slots, relay reservations.

    The defaults, their reasons and what a remote sees when it hits one are in
    ``specs/network.md``, "Resource limits". ``PeerConfig.resource_limits`` holds one.
    """

    #: Apply the per-IP limits to loopback addresses too (off: local processes share 127.0.0.1).
    limit_loopback: bool = False
    # -- connections (p2p/connmgr.py) --
    #: Connections open at once; over it, idle ones are closed at once (grace or not).
    max_connections: int = 192
    #: Connections open at once to one peer id.
    max_connections_per_peer: int = 8
    #: Connections open at once from one IP address.
    max_connections_per_ip: int = 32
    # -- inference request slots (services/inference/admission.py) --
    #: Request slots the callers from one IP address hold together.
    max_concurrency_per_ip: int = 64
    #: Request starts per second per caller (token bucket); 0: no rate limit. One caller with 8
    #: requests at a time made about 600/s on loopback (the hostile benchmark's caller, quiet).
    request_rate: float = 1000.0
    #: Request starts one caller may make at once (the bucket's size).
    request_burst: float = 2000.0
    #: When the slots are full, end the newest request of the caller holding the most to admit
    #: one of a caller holding two fewer (off: a full server refuses every new request).
    preempt: bool = True
    # -- circuit relay (relays only: services/relay.py) --
    #: Reservations held at once.
    relay_max_reservations: int = 128
    #: Reservations held at once by the peers of one IP address.
    relay_max_reservations_per_ip: int = 8
    #: Seconds a reservation lasts unless refreshed.
    relay_reservation_ttl: int = 3600
    #: Circuits open at once to one reserving peer.
    relay_max_circuits_per_peer: int = 64
    #: Seconds a circuit may last (twice the longest request a server runs by default).
    relay_max_circuit_duration: int = 1200
    #: Bytes a circuit may carry, both directions together.
    relay_max_circuit_bytes: int = 64 << 20
    # -- inbound streams and repeat offenders (p2p/connmgr.py, before protocol negotiation) --
    #: Inbound streams one peer may open per second, all protocols together (token bucket),
    #: checked before their protocol is negotiated: a stream over it waits its turn, at most
    #: ``stream_wait`` seconds; one that would wait longer is reset. 0: no limit. The hostile
    #: benchmark's legitimate caller opened 25-75 a second; a DHT request flood 100-230.
    stream_rate: float = 64.0
    #: Inbound streams one peer may open at once (the bucket's size).
    stream_burst: float = 256.0
    #: Seconds a stream over the rate may wait for its turn (so at most ``stream_rate *
    #: stream_wait`` streams of one peer wait at once).
    stream_wait: float = 0.5
    #: Streams reset for the rate within ``penalty_window`` after which the peer is refused;
    #: 0: never (the default: a caller over its request rate, ``request_rate``, has its
    #: requests refused, stops reusing streams and opens one per call; in the hostile
    #: benchmark such a caller at 1,000+ calls/s was refused for good, 20,761 failed calls).
    stream_strikes: int = 0
    #: Connections closed over a connection limit within ``penalty_window`` after which the
    #: peer is refused (Sybils redialing as fast as they are closed).
    connection_strikes: int = 3
    #: Seconds over which strikes count.
    penalty_window: float = 60.0
    #: Seconds a refused peer is refused: its connections are closed, new ones closed right
    #: after the security handshake, its streams reset unread.
    penalty_time: float = 30.0

    def __post_init__(self) -> None:
        counts = (
            self.max_connections, self.max_connections_per_peer, self.max_connections_per_ip,
            self.max_concurrency_per_ip, self.relay_max_reservations,
            self.relay_max_reservations_per_ip, self.relay_reservation_ttl,
            self.relay_max_circuits_per_peer, self.relay_max_circuit_duration, self.relay_max_circuit_bytes,
        )
        if min(counts) < 1:
            raise ConfigError("resource limits must be at least 1")
        if self.request_rate < 0 or (self.request_rate > 0 and self.request_burst < 1):
            raise ConfigError("request_rate must be >= 0 and request_burst at least 1")
        if self.stream_rate < 0 or (self.stream_rate > 0 and self.stream_burst < 1) or self.stream_wait < 0:
            raise ConfigError("stream_rate and stream_wait must be >= 0 and stream_burst at least 1")
        if self.stream_strikes < 0 or self.connection_strikes < 1:
            raise ConfigError("stream_strikes must be >= 0 and connection_strikes at least 1")
        if self.penalty_window <= 0 or self.penalty_time < 0:
            raise ConfigError("penalty_window must be positive and penalty_time >= 0")


class TokenBuckets:
    """A token bucket per key (``rate`` tokens a second, at most ``burst``); sans-I/O.

    At most ``max_keys`` keys are remembered; the least recently used is forgotten first.
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = MAX_TRACKED_PEERS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float, max_wait: float = 0.0) -> float | None:
        """Take one token of ``key``'s bucket at time ``now``: the seconds to wait for it
        (0: at once), or ``None`` if it would come later than ``max_wait`` seconds from now
        (nothing is taken then). A token waited for is taken at once (the bucket goes below
        zero), so the waits of several takers queue up.
        """
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate if self.rate > 0 else math.inf
        ok = wait <= max_wait
        self._buckets[key] = (tokens - 1.0 if ok else tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait if ok else None

    def __len__(self) -> int:
        return len(self._buckets)


class Penalties:
    """Strikes against remote peers, and the peers refused for them; sans-I/O.

    A peer that collects ``threshold`` strikes of one kind within ``window`` seconds is
    refused for ``duration`` seconds (its strikes start again from 0). At most ``max_peers``
    peers are remembered, the least recently struck forgotten first (a peer still refused is
    forgotten only when every remembered peer is).
    """

    def __init__(self, window: float, duration: float, *, max_peers: int = MAX_TRACKED_PEERS) -> None:
        self.window = window
        self.duration = duration
        self.max_peers = max_peers
        #: (peer, kind) -> (strikes, time of the first in the window)
        self._strikes: OrderedDict[tuple[str, str], tuple[int, float]] = OrderedDict()
        self._until: OrderedDict[str, float] = OrderedDict()
        #: Peers refused since this was made.
        self.refusals = 0

    def strike(self, peer: str, kind: str, now: float, threshold: int) -> bool:
        """Count a strike of ``kind`` against ``peer``; ``True`` if that makes it refused now."""
        key = (peer, kind)
        count, since = self._strikes.pop(key, (0, now))
        if now - since > self.window:
            count, since = 0, now
        count += 1
        if count >= threshold:
            self.refuse(peer, now)
            return True
        self._strikes[key] = (count, since)
        while len(self._strikes) > self.max_peers:
            self._strikes.popitem(last=False)
        return False

    def strikes(self, peer: str, kind: str, now: float) -> int:
        """The strikes of ``kind`` against ``peer`` within the window."""
        count, since = self._strikes.get((peer, kind), (0, now))
        return count if now - since <= self.window else 0

    def refuse(self, peer: str, now: float) -> None:
        """Refuse ``peer`` for ``duration`` seconds from ``now``."""
        self._until.pop(peer, None)
        self._until[peer] = now + self.duration
        self.refusals += 1
        for key in [k for k in self._strikes if k[0] == peer]:
            del self._strikes[key]
        while len(self._until) > self.max_peers:
            self._until.popitem(last=False)

    def refused(self, peer: str, now: float) -> bool:
        """Whether ``peer`` is refused at ``now``."""
        until = self._until.get(peer)
        if until is None:
            return False
        if now >= until:
            del self._until[peer]
            return False
        return True

    def refused_now(self, now: float) -> int:
        """Peers refused at ``now``."""
        return sum(1 for until in self._until.values() if until > now)


class StreamGate:
    """Admission of inbound streams before protocol negotiation: a rate per remote peer.

    :meth:`admit` is asked for every inbound stream, with its remote peer id. A stream of a
    refused peer (:class:`Penalties`) is refused (the caller resets it unread); a stream over
    the peer's ``stream_rate`` waits for its turn, at most ``stream_wait`` seconds, and is
    refused if its turn is further away (the peer has that many streams waiting already).
    ``stream_strikes`` refusals for the rate within the penalty window (if set) make the
    peer refused, and ``on_refused(peer)`` is called (the connection manager closes its
    connections). ``exempt(peer)`` peers (protected ones) are limited by the rate but never
    refused.
    """

    def __init__(
        self,
        limits: ResourceLimits,
        penalties: Penalties,
        clock: Callable[[], float],
        *,
        on_refused: Callable[[str], None] | None = None,
        exempt: Callable[[str], bool] | None = None,
    ) -> None:
        self.limits = limits
        self.penalties = penalties
        self.clock = clock
        self.on_refused = on_refused
        self.exempt = exempt
        self._buckets = TokenBuckets(limits.stream_rate, limits.stream_burst)
        #: Streams admitted (of them, delayed for the rate), refused for the rate, and refused
        #: because their peer was.
        self.admitted = 0
        self.delayed = 0
        self.rate_limited = 0
        self.refused = 0

    def admit(self, peer: str) -> float | None:
        """Seconds an inbound stream of ``peer`` waits before its protocol negotiation (0: none),
        or ``None``: refused."""
        now = self.clock()
        if self.penalties.refused(peer, now):
            self.refused += 1
            return None
        if self.limits.stream_rate <= 0:
            self.admitted += 1
            return 0.0
        wait = self._buckets.take(peer, now, self.limits.stream_wait)
        if wait is not None:
            self.admitted += 1
            if wait > 0:
                self.delayed += 1
            return wait
        self.rate_limited += 1
        if self.limits.stream_strikes <= 0 or (self.exempt is not None and self.exempt(peer)):
            return None
        if self.penalties.strike(peer, "stream", now, self.limits.stream_strikes):
            if self.on_refused is not None:
                self.on_refused(peer)
        return None


def ip_key(ip: str | None, *, limit_loopback: bool = False) -> str | None:
    """The key the per-IP limits count ``ip`` under, or ``None`` (not limited per IP)."""
    if not ip:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip  # a key already (relay:<id>) or an unparsable name: counted as is
    if addr.is_loopback and not limit_loopback:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _relayed_via(conn: Any) -> str | None:
    try:
        relayed = "RELAY" in str(conn.get_connection_type()).upper()
    except Exception:
        relayed = False
    for addr in _addrs(conn):
        text = str(addr)
        if "/p2p-circuit" in text:
            parts = text.split("/p2p-circuit")[0].split("/")
            if len(parts) >= 2 and parts[-2] == "p2p":
                return f"relay:{parts[-1]}"
            return "relay:?"
    return "relay:?" if relayed else None


def _addrs(conn: Any) -> list[Any]:
    try:
        return list(conn.get_transport_addresses())
    except Exception:
        return []


def conn_ip(muxed_conn: Any, *, limit_loopback: bool = False) -> str | None:
    """The per-IP key of a (muxed) connection, or ``None``."""
    relay = _relayed_via(muxed_conn)
    if relay is not None:
        return relay
    try:
        remote = muxed_conn.get_remote_address()
    except Exception:
        remote = None
    if not remote:
        return None
    return ip_key(str(remote[0]), limit_loopback=limit_loopback)


def remote_ip(stream: Any, *, limit_loopback: bool = False) -> str | None:
    """The per-IP key of the connection ``stream`` runs on, or ``None``."""
    muxed = getattr(stream, "muxed_conn", None)
    if muxed is not None:
        return conn_ip(muxed, limit_loopback=limit_loopback)
    try:
        remote = stream.get_remote_address()
    except Exception:
        return None
    return ip_key(str(remote[0]), limit_loopback=limit_loopback) if remote else None

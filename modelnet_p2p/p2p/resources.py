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
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["ResourceLimits", "conn_ip", "ip_key", "remote_ip"]


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

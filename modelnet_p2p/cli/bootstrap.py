"""The profile ``modelnet bootstrap`` runs with: hardened for the public internet off ``local``.

A bootstrap node is the one address everybody has: a DHT server and a circuit relay that
serves no model. Off the ``local`` network (``--network testnet`` or a private mesh), and
listening beyond loopback, it faces strangers, so :func:`bootstrap_overrides` also

- requires a fixed identity (its peer id is in everyone's bootstrap list) and a fixed port;
- takes itself to be publicly dialable (it never reserves a relay slot elsewhere, and its
  card, were it to announce one, would list its direct addresses);
- announces nothing: it serves no capability, so it places no card, no provider record and
  no availability record (``specs/capability.md``, ``specs/availability.md``);
- keeps more connections than a peer (every newcomer dials it), but few per peer and per IP
  address, and grants relay reservations and circuits within tight bounds
  (:data:`PUBLIC_LIMITS`; per-peer DHT request rates are the DHT server's own,
  ``specs/capability.md``, "Limits").

Every bootstrap node also answers dial-back requests (:mod:`~modelnet_p2p.services.dialback`,
``specs/dialback.md``): ``modelnet doctor`` asks it whether the asking peer can be dialed.

On ``local``, or on loopback only (``modelnet mesh up``), it keeps the plain profile (an
ephemeral key and any port are fine for a mesh on one machine).
"""

from __future__ import annotations

import ipaddress
from dataclasses import fields
from typing import Any

import click
import multiaddr

from ..config import PEER_SETTINGS, Config
from ..p2p.network import protocol_id
from ..peer import Peer
from ..proto.capability import Capability
from ..services.dialback import PROTOCOL_ID as DIALBACK_PROTOCOL_ID
from ..services.dialback import DialbackServer

__all__ = [
    "BOOTSTRAP_PEER",
    "PUBLIC_CONNECTIONS",
    "PUBLIC_LIMITS",
    "bootstrap_overrides",
    "serve_dialback",
    "start_bootstrap_services",
]

#: Every bootstrap node: a DHT server that relays circuits for private peers.
BOOTSTRAP_PEER: dict[str, Any] = {"relay_hop": True, "dht_mode": "server"}
#: Connection watermarks (low, high) of a public bootstrap node: every newcomer dials it, and
#: a peer's 16/32 would close the connections of peers still joining.
PUBLIC_CONNECTIONS = (256, 384)
#: Resource limits of a public bootstrap node (``specs/network.md``, "Resource limits").
PUBLIC_LIMITS: dict[str, Any] = {
    # connections: room for a few hundred peers, few per peer id and per IP address
    "max_connections": 512,
    "max_connections_per_peer": 4,
    "max_connections_per_ip": 16,
    # it serves no model: a caller gets few request slots and starts
    "max_concurrency_per_ip": 8,
    "request_rate": 5.0,
    "request_burst": 10.0,
    # the relay: reservations for the private peers of a test mesh, bounded per IP address,
    # circuits short and small (a relay carries requests, not model weights)
    "relay_max_reservations": 256,
    "relay_max_reservations_per_ip": 4,
    "relay_reservation_ttl": 3600,
    "relay_max_circuits_per_peer": 16,
    "relay_max_circuit_duration": 600,
    "relay_max_circuit_bytes": 16 << 20,
}


def _loopback_only(addrs: list[str]) -> bool:
    try:
        ips = [ipaddress.ip_address(_ip(a)) for a in addrs]
    except ValueError:
        return False
    return bool(ips) and all(ip.is_loopback for ip in ips)


def _ip(addr: str) -> str:
    maddr = multiaddr.Multiaddr(addr)
    for proto in ("ip4", "ip6"):
        try:
            return str(maddr.value_for_protocol(proto))
        except Exception:
            continue
    return ""


def _fixed_port(addr: str) -> bool:
    try:
        return int(multiaddr.Multiaddr(addr).value_for_protocol("tcp") or 0) != 0
    except Exception:
        return False


def bootstrap_overrides(cfg: Config) -> dict[str, Any]:
    """The :class:`~modelnet_p2p.Peer` settings of a bootstrap node for ``cfg``'s network.

    Off ``local`` and listening beyond loopback, raises :class:`click.UsageError` without a
    fixed identity or a fixed listen port.
    """
    out = dict(BOOTSTRAP_PEER)
    if cfg.network == "local" or _loopback_only(cfg.listen):
        return out
    if not cfg.identity:
        raise click.UsageError(
            f"a bootstrap node of {cfg.network!r} needs a fixed identity (its peer id is in everyone's "
            "bootstrap list): give --identity bootstrap.key (created if missing)"
        )
    if not cfg.listen or not all(_fixed_port(a) for a in cfg.listen):
        raise click.UsageError(
            f"a bootstrap node of {cfg.network!r} needs a fixed port (it is in everyone's bootstrap list): "
            "give --listen /ip4/0.0.0.0/tcp/4001"
        )
    out.update(
        reachability="public", connections_low=PUBLIC_CONNECTIONS[0], connections_high=PUBLIC_CONNECTIONS[1]
    )
    if "resource_limits" in PEER_SETTINGS:  # the per-peer and per-IP limits (p2p/resources.py)
        from ..p2p.resources import ResourceLimits

        known = {f.name for f in fields(ResourceLimits)}
        out["resource_limits"] = ResourceLimits(**{k: v for k, v in PUBLIC_LIMITS.items() if k in known})
    return out


def serve_dialback(peer: Peer) -> DialbackServer:
    """Answer dial-back requests on ``peer`` (``specs/dialback.md``); the server, for its counts."""
    server = DialbackServer()
    peer.host.set_stream_handler(protocol_id(DIALBACK_PROTOCOL_ID, peer.network), server.handle_stream)  # type: ignore[arg-type]
    return server


async def start_bootstrap_services(peer: Peer) -> list[Capability]:
    """What a bootstrap node serves besides the DHT and the relay: dial-back (no capability)."""
    serve_dialback(peer)
    return []

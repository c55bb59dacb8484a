"""Asking a connected peer what it is: libp2p identify, read on demand (for ``modelnet doctor``).

py-libp2p identifies each new connection in the background and keeps only part of the
answer (the protocols go to the peerstore, the observed address to a manager that may be
off). :func:`identify` opens its own ``/ipfs/id/1.0.0`` stream and returns the whole
answer: the protocols the peer serves, how it sees us (the observed address), its agent
and listen addresses. :func:`port_taken` tells whether a listen port is held by another
process (py-libp2p's own listener would bind it anyway, see :mod:`._compat.host`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.peer.id import ID

from ..errors import ConfigError
from ._compat.host import check_port_free
from .host import Host
from .stream import close_quietly

__all__ = [
    "IDENTIFY_PROTOCOL_ID",
    "MAX_IDENTIFY_SIZE",
    "PeerIdentity",
    "identify",
    "port_taken",
    "stream_remote_ip",
]

log = logging.getLogger(__name__)

#: Largest identify answer read, in bytes (a peer lists some tens of protocols and addresses).
MAX_IDENTIFY_SIZE = 64 * 1024


@dataclass(frozen=True)
class PeerIdentity:
    """What a peer says of itself in identify, and how it sees us (``observed_addr``)."""

    peer_id: str
    protocols: tuple[str, ...]
    listen_addrs: tuple[str, ...]
    observed_addr: str | None
    agent_version: str
    protocol_version: str


def _addr(raw: bytes) -> str | None:
    try:
        return str(multiaddr.Multiaddr(raw)) if raw else None
    except Exception:
        return None


async def identify(host: Host, peer_id: str, *, timeout: float = 5.0) -> PeerIdentity | None:
    """Identify the connected peer ``peer_id``; ``None`` if it does not answer within ``timeout``."""
    data = bytearray()
    with trio.move_on_after(timeout):
        try:
            stream = await host.new_stream(ID.from_base58(peer_id), [TProtocol(IDENTIFY_PROTOCOL_ID)])
        except Exception as exc:
            log.debug("identify %s: no stream: %r", peer_id, exc)
            return None
        try:
            while len(data) < MAX_IDENTIFY_SIZE:
                try:
                    chunk = await stream.read(MAX_IDENTIFY_SIZE - len(data))
                except Exception:  # StreamEOF: the answer is complete
                    break
                if not chunk:
                    break
                data += chunk
        finally:
            await close_quietly(stream, 1.0)
    if not data:
        return None
    try:
        msg = parse_identify_response(bytes(data))
    except Exception as exc:
        log.debug("identify %s: bad answer: %r", peer_id, exc)
        return None
    return PeerIdentity(
        peer_id=peer_id,
        protocols=tuple(str(p) for p in msg.protocols),
        listen_addrs=tuple(a for a in (_addr(raw) for raw in msg.listen_addrs) if a),
        observed_addr=_addr(msg.observed_addr),
        agent_version=msg.agent_version,
        protocol_version=msg.protocol_version,
    )


def port_taken(addr: str | multiaddr.Multiaddr) -> str | None:
    """Why ``addr``'s fixed TCP port cannot be listened on (another listener holds it), or ``None``."""
    try:
        check_port_free(multiaddr.Multiaddr(str(addr)))
    except ConfigError as exc:
        return exc.message
    except Exception:
        return None
    return None


def stream_remote_ip(stream: Any) -> str | None:
    """The IP address ``stream``'s connection comes from; ``None`` if relayed or unknown."""
    try:
        conn = stream.muxed_conn
        if "RELAY" in str(conn.get_connection_type()).upper():
            return None
        remote = stream.get_remote_address()
    except Exception:
        return None
    if not remote:
        return None
    return str(remote[0])

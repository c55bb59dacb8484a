"""Closing a connection with a GO_AWAY code that says why (``specs/network.md``, "Connection management").

Upstream: py-libp2p's swarm closes every yamux connection with GO_AWAY 0 (normal
termination), whether the host shuts down or its connection manager only lets an idle
connection go, so the other side cannot tell a peer that left from one that is alive. Here
the connection manager's closes send go-libp2p's ``ConnGarbageCollected`` code (0x1005), and
the other side reads the code of the last frame it received (:class:`.yamux.LeanYamux` keeps
the last frame header read).
"""

from __future__ import annotations

import struct

from libp2p.stream_muxer.yamux.yamux import (
    GO_AWAY_CONN_GARBAGE_COLLECTED,
    HEADER_SIZE,
    TYPE_GO_AWAY,
    YAMUX_HEADER_FORMAT,
)

from .yamux import LeanYamux

__all__ = ["GO_AWAY_PRUNED", "mark_pruned", "pruned_by_peer"]

#: The GO_AWAY code of a connection that its peer's connection manager let go (go-libp2p's
#: ConnGarbageCollected, 0x1005): the peer is alive, it only closed an idle connection.
GO_AWAY_PRUNED = GO_AWAY_CONN_GARBAGE_COLLECTED


def mark_pruned(muxed_conn: object) -> None:
    """Make the close of this connection tell its peer it was let go, not shut down
    (GO_AWAY :data:`GO_AWAY_PRUNED`; ``specs/network.md``, "Connection management")."""
    if isinstance(muxed_conn, LeanYamux):
        muxed_conn.close_code = GO_AWAY_PRUNED


def pruned_by_peer(muxed_conn: object) -> bool:
    """Whether the last frame the peer sent on this (closed) connection was a GO_AWAY saying
    that its connection manager let the connection go: the peer is alive."""
    header = getattr(muxed_conn, "_last_header", b"") if isinstance(muxed_conn, LeanYamux) else b""
    if len(header) != HEADER_SIZE:
        return False
    _, typ, _, _, code = struct.unpack(YAMUX_HEADER_FORMAT, header)
    return bool(typ == TYPE_GO_AWAY and code == GO_AWAY_PRUNED)

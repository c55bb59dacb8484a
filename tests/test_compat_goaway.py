"""Canaries and tests of ``modelnet_p2p.p2p._compat.goaway``: py-libp2p closes every connection
with GO_AWAY 0 (normal), whoever closes it and why; a connection manager's close here sends
0x1005 (ConnGarbageCollected), and the other side reads it."""

from __future__ import annotations

import struct

import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import GO_AWAY_NORMAL, TYPE_GO_AWAY, YAMUX_HEADER_FORMAT

from modelnet_p2p import Peer
from modelnet_p2p.p2p._compat.goaway import GO_AWAY_PRUNED, pruned_by_peer
from modelnet_p2p.p2p.notify import on_disconnect


async def _closed_by(closer: str) -> tuple[object, bytes]:
    """Connect two peers, let ``closer`` ("host": a plain disconnect; "manager": a trim)
    close the connection, and return what the other side's muxed connection last read."""
    async with Peer(gossip=False) as a, Peer(gossip=False) as b:
        await a.connect(b.addrs[0])
        seen: list[object] = []
        done = trio.Event()

        def heard(peer: str, conn: object) -> None:
            if peer == b.peer_id:
                seen.append(conn)
                done.set()

        stop = on_disconnect(a.host, heard)
        if closer == "host":
            await b.host.disconnect(ID.from_base58(a.peer_id))
        else:
            b.connmgr.grace_period = b.connmgr.low = 0
            b.connmgr.high = 0  # b trims every idle connection
        with trio.fail_after(20):
            await done.wait()
        stop()
        return seen[0], bytes(getattr(seen[0], "_last_header", b""))


def _code(header: bytes) -> tuple[int, int]:
    _, typ, _, _, code = struct.unpack(YAMUX_HEADER_FORMAT, header)
    return typ, code


async def test_upstream_closes_with_the_normal_go_away_code() -> None:
    """Canary: a plain close sends GO_AWAY 0, which says nothing of why."""
    conn, header = await _closed_by("host")
    assert _code(header) == (TYPE_GO_AWAY, GO_AWAY_NORMAL)
    assert not pruned_by_peer(conn)


async def test_a_connection_manager_close_says_it_let_the_connection_go() -> None:
    conn, header = await _closed_by("manager")
    assert _code(header) == (TYPE_GO_AWAY, GO_AWAY_PRUNED) == (TYPE_GO_AWAY, 0x1005)
    assert pruned_by_peer(conn)


def test_pruned_by_peer_refuses_what_is_not_a_lean_connection() -> None:
    assert not pruned_by_peer(object())

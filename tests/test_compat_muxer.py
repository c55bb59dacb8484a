"""Tests of ``modelnet_p2p.p2p._compat.muxer``. Its canary (upstream builds a plain ``Yamux``
whatever class is configured) is in ``test_compat_yamux.py``, beside the in-memory pipe it
uses."""

from __future__ import annotations

from libp2p.peer.id import ID

from modelnet_p2p.p2p._compat.muxer import ClassHonouringMuxer
from modelnet_p2p.p2p._compat.yamux import LeanYamux
from modelnet_p2p.testing import open_peers


async def test_both_ends_of_a_connection_get_the_configured_class() -> None:
    async with open_peers(2) as (a, b):
        await a.connect(b.addrs[0])
        assert isinstance(a.host.get_network().upgrader.muxer_multistream, ClassHonouringMuxer)  # type: ignore[attr-defined]
        for here, there in ((a, b), (b, a)):
            conns = here.host.get_network().get_connections(ID.from_base58(there.peer_id))
            assert conns and all(isinstance(c.muxed_conn, LeanYamux) for c in conns)

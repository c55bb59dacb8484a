"""Helpers for tests, ours and users': start a small mesh of real peers on loopback.

::

    from modelnet_p2p.testing import open_peers

    async def test_my_model():
        async with open_peers(3) as (a, b, c):
            b.serve("echo", echo)
            assert (await a.call(b.addrs[0], "echo", "hi")).text == "hi"

All peers run in the caller's trio run, listen on 127.0.0.1 with a free port,
and are connected to the first peer. Leaving the block stops them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from .peer import Peer

__all__ = ["open_peers"]


@asynccontextmanager
async def open_peers(n: int, **peer_kwargs: Any) -> AsyncIterator[list[Peer]]:
    """Start ``n`` peers on 127.0.0.1; peers 1..n-1 are connected to peer 0."""
    if n < 1:
        raise ValueError("n must be at least 1")
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(n):
            kwargs = dict(peer_kwargs)  # the default listen address is loopback, any free port
            if i > 0:
                kwargs.setdefault("bootstrap", [peers[0].addrs[0]])
            peers.append(await stack.enter_async_context(Peer(**kwargs)))
        yield peers

"""Helpers for tests, ours and users': start a small mesh of real peers on loopback.

::

    from modelnet_p2p.testing import open_peers

    async def test_my_model():
        async with open_peers(3) as (a, b, c):
            b.serve("echo", echo)
            assert (await a.call(b.addrs[0], "echo", "hi")).text == "hi"

All peers run in the caller's trio run, listen on 127.0.0.1 with a free port,
and are connected to the first peer. Leaving the block stops them all.

A mesh larger than one process can drive (py-libp2p gossip fills a core at about 15-20
peers) spans worker processes: :func:`open_worker` starts one
(:mod:`modelnet_p2p.testing.worker`: K peers and a JSON-lines command protocol),
:func:`open_workers` several at once. Their peers can bootstrap from yours or yours from
theirs::

    from modelnet_p2p.testing import open_peers, open_worker

    async def test_a_mesh_of_two_processes():
        async with open_worker(10, serve={3: [{"name": "echo"}]}) as w:
            async with open_peers(2, bootstrap=[w.peers[0]["addr"]]) as (a, b):
                assert (await w.request({"cmd": "announce"}))["announced"] == 1
                cards = await a.discover(model="echo")
                assert (await a.call(cards[0].dial_addrs[0], "echo", "hi")).text == "answer from echo"
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from ..peer import Peer
from .cluster import Worker, WorkerError, open_worker, open_workers, random_links, worker_command

__all__ = [
    "Worker",
    "WorkerError",
    "open_peers",
    "open_worker",
    "open_workers",
    "random_links",
    "worker_command",
]


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

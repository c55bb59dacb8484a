"""A tarpit for tests of hostile peers: a TCP listener that accepts and never speaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import trio

__all__ = ["MAX_HELD", "tarpit"]

#: Connections a tarpit holds open at most; later ones are closed at once.
MAX_HELD = 512


@asynccontextmanager
async def tarpit() -> AsyncIterator[str]:
    """A TCP listener on 127.0.0.1 that accepts connections and never says a word; yields
    its multiaddr (``/ip4/127.0.0.1/tcp/<port>``). Leaving the block closes it."""
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:
        if len(held) >= MAX_HELD:
            await stream.aclose()
            return
        held.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        yield f"/ip4/127.0.0.1/tcp/{port}"
        nursery.cancel_scope.cancel()

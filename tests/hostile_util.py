"""What the hostile tests' attackers share (not a test module)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo


async def keep_connected(
    host: IHost, info: PeerInfo, *, pause: float, use: Callable[[IHost], Awaitable[object]] | None = None
) -> None:
    """Forever: keep a connection from ``host`` to ``info``'s peer, redialing whenever it was
    closed (checked every ``pause`` seconds), and run ``use(host)`` on each new one; failures
    are ignored (an attacker just tries again)."""
    while True:
        if not host.get_network().get_connections(info.peer_id):
            unblock = getattr(host.get_network(), "unblock_peer", None)
            if unblock is not None:  # py-libp2p blocks a peer for 60 s after a failed dial
                unblock(info.peer_id)
            with trio.move_on_after(5):
                try:
                    await host.connect(info)
                    if use is not None:
                        await use(host)
                except Exception:
                    pass
        await trio.sleep(pause)

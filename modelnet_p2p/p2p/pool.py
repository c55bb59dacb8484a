"""Idle inference streams kept for the next request to the same provider.

Opening a stream costs a multistream-select negotiation: about 2.4 ms of a
4.4 ms tiny request in py-libp2p 0.8.1, measured. A client that offers
``keep`` and gets it back (``specs/inference.md``, "Stream reuse") parks the
stream here; the next request to that peer takes it instead of opening one.

Every parked stream is closed after :data:`POOL_IDLE` seconds, before the
server's own idle timeout (60 s), and at most :data:`POOL_PER_PEER` are kept
per peer, so yamux's per-connection stream slots are never hoarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio
from libp2p.abc import INetStream

__all__ = ["POOL_IDLE", "POOL_PER_PEER", "StreamPool"]

#: Seconds a stream may sit idle in the pool.
POOL_IDLE = 20.0
#: Idle streams kept per peer.
POOL_PER_PEER = 8


class StreamPool:
    """Idle streams by peer id. Not thread-safe: use from the peer's trio loop."""

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[INetStream, float]]] = {}
        self._closing: list[INetStream] = []

    def acquire(self, peer: str) -> INetStream | None:
        """The most recently parked stream to ``peer``, or ``None``."""
        streams = self._idle.get(peer)
        while streams:
            stream, _ = streams.pop()
            if not getattr(stream, "is_closed", False):
                return stream
        return None

    def release_to(self, peer: str) -> Callable[[INetStream], None]:
        def release(stream: INetStream) -> None:
            streams = self._idle.setdefault(peer, [])
            streams.append((stream, time.monotonic()))
            while len(streams) > POOL_PER_PEER:
                old, _ = streams.pop(0)
                self._closing.append(old)

        return release

    def idle_count(self, peer: str | None = None) -> int:
        if peer is not None:
            return len(self._idle.get(peer, []))
        return sum(len(v) for v in self._idle.values())

    async def sweep_forever(self, interval: float = 5.0) -> None:
        """Close streams idle longer than :data:`POOL_IDLE` (runs in the peer's nursery)."""
        while True:
            await trio.sleep(interval)
            await self.sweep()

    async def sweep(self, max_idle: float = POOL_IDLE) -> None:
        now = time.monotonic()
        for peer in list(self._idle):
            keep = [(s, t) for s, t in self._idle[peer] if now - t < max_idle]
            self._closing.extend(s for s, t in self._idle[peer] if now - t >= max_idle)
            if keep:
                self._idle[peer] = keep
            else:
                del self._idle[peer]
        await self._close_pending()

    async def close_all(self) -> None:
        for streams in self._idle.values():
            self._closing.extend(s for s, _ in streams)
        self._idle.clear()
        await self._close_pending()

    async def _close_pending(self) -> None:
        pending, self._closing = self._closing, []
        with trio.CancelScope(shield=True):
            for stream in pending:
                with trio.move_on_after(1):
                    try:
                        await stream.close()
                    except Exception:
                        try:
                            await stream.reset()
                        except Exception:
                            pass

"""Idle inference streams kept for the next request to the same provider.

Opening a stream costs a multistream-select negotiation: about 2.4 ms of a
4.4 ms tiny request in py-libp2p 0.8.1, measured. A client that offers
``keep`` and gets it back (``specs/inference.md``, "Stream reuse") parks the
stream here; the next request to that peer takes it instead of opening one.

Only streams whose last request ended cleanly with ``end.keep`` are parked (the
client session decides that, :attr:`~modelnet_p2p.proto.session.ClientSession.reusable`);
a stream that saw an error, a reset or an end of stream is never handed back.

Every parked stream is closed after :data:`POOL_IDLE` seconds, before the
server's own idle timeout (60 s), and at most :data:`POOL_PER_PEER` are kept
per peer, so yamux's per-connection stream slots are never hoarded. The sweeper sleeps
until the oldest parked stream falls due (and while the pool is empty, until a stream is
parked), so an idle pool costs no wake-ups. Times are :func:`trio.current_time` values, so
tests can drive the pool with a mock clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from .stream import Stream, close_quietly

__all__ = ["POOL_IDLE", "POOL_PER_PEER", "PoolStats", "StreamPool"]

#: Seconds a stream may sit idle in the pool.
POOL_IDLE = 20.0
#: Idle streams kept per peer.
POOL_PER_PEER = 8
#: Seconds a due stream may wait for its sweep, so that one wake-up closes several.
SWEEP_SLACK = 1.0


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`StreamPool` since it was made."""

    #: Streams idle in the pool now.
    idle: int
    #: Streams handed back after a clean request with ``keep``.
    parked: int
    #: Requests that took a kept stream instead of opening one.
    reused: int
    #: Streams closed because they were idle too long, or one too many for their peer.
    closed: int


class StreamPool:
    """Idle streams by peer id. Not thread-safe: use from the peer's trio loop."""

    def __init__(self, *, max_idle: float = POOL_IDLE, per_peer: int = POOL_PER_PEER) -> None:
        self.max_idle = max_idle
        self.per_peer = per_peer
        self._idle: dict[str, list[tuple[Stream, float]]] = {}
        self._closing: list[Stream] = []
        self._parked = 0
        self._reused = 0
        self._closed = 0
        self._parked_event = trio.Event()

    def acquire(self, peer: str) -> Stream | None:
        """The most recently parked stream to ``peer`` that has not idled too long, or ``None``."""
        streams = self._idle.get(peer)
        now = trio.current_time()
        while streams:
            stream, since = streams.pop()
            if now - since >= self.max_idle:
                self._closing.append(stream)
                continue
            if not streams:
                del self._idle[peer]
            self._reused += 1
            return stream
        self._idle.pop(peer, None)
        return None

    def release(self, peer: str, stream: Stream) -> None:
        """Park ``stream`` (to ``peer``) for a next request. Only for a stream whose last request
        ended cleanly with ``end.keep``."""
        streams = self._idle.setdefault(peer, [])
        streams.append((stream, trio.current_time()))
        self._parked += 1
        self._parked_event.set()
        while len(streams) > self.per_peer:
            old, _ = streams.pop(0)
            self._closing.append(old)

    def release_to(self, peer: str) -> Callable[[Stream], None]:
        """:meth:`release` bound to ``peer`` (what the inference client calls)."""

        def release(stream: Stream) -> None:
            self.release(peer, stream)

        return release

    def idle_count(self, peer: str | None = None) -> int:
        """Streams idle in the pool, to ``peer`` or to anyone."""
        if peer is not None:
            return len(self._idle.get(peer, []))
        return sum(len(v) for v in self._idle.values())

    def stats(self) -> PoolStats:
        return PoolStats(self.idle_count(), self._parked, self._reused, self._closed)

    def next_due(self) -> float | None:
        """When the oldest parked stream will have idled :attr:`max_idle` (``None``: none parked)."""
        oldest = min((t for streams in self._idle.values() for _, t in streams), default=None)
        return None if oldest is None else oldest + self.max_idle

    async def sweep_forever(self, slack: float = SWEEP_SLACK) -> None:
        """Close streams idle longer than :attr:`max_idle` (runs in the peer's nursery).

        Sleeps until the oldest parked stream is due (plus ``slack``, so that streams due
        close together go in one sweep), or while none is parked, until one is.
        """
        while True:
            due = self.next_due()
            if due is None:
                self._parked_event = trio.Event()
                await self._parked_event.wait()
                # The stream just parked falls due max_idle from now, any parked later after it:
                # sleep until then, whether or not it is taken meanwhile (a busy caller takes and
                # parks a stream per request; waking to look each time cost a scheduler pass each).
                due = trio.current_time() + self.max_idle
            await trio.sleep_until(due + slack)
            await self.sweep()

    async def sweep(self, max_idle: float | None = None) -> None:
        """Close the streams idle for ``max_idle`` seconds or more (default :attr:`max_idle`)."""
        limit = self.max_idle if max_idle is None else max_idle
        now = trio.current_time()
        for peer in list(self._idle):
            keep = [(s, t) for s, t in self._idle[peer] if now - t < limit]
            self._closing.extend(s for s, t in self._idle[peer] if now - t >= limit)
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
        for stream in pending:
            self._closed += 1
            await close_quietly(stream, timeout=1.0)

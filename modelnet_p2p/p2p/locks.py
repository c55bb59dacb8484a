"""Locks that cost no trip through trio's scheduler when they are free.

``trio.Lock.acquire`` ends in a schedule point even when nobody holds the lock: every task
that may run, runs, before the holder goes on. On a path taken at every stream read and
write that is one scheduler pass each. :class:`FastLock` (not even a cancel point when free)
serves the Noise and yamux fast paths; :class:`QuickLock` (still a cancel point) serves
py-libp2p's ``NetStream`` and hypercorn's send lock.
"""

from __future__ import annotations

import trio

__all__ = ["FastLock", "QuickLock"]


class FastLock:
    """A ``trio.Lock`` stand-in that takes the lock without a checkpoint when it is free.

    Upstream takes a lock (a trip through trio's scheduler even when nobody holds it) several
    times per frame, read and write; the critical sections stay mutually exclusive, only the
    free case skips the schedule point. Not a cancel point when free (the Noise and yamux
    fast paths rely on that); held, it waits as a ``trio.Lock`` does. ``trio.Lock`` cannot
    be subclassed, hence the wrapper.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class QuickLock(FastLock):
    """A ``trio.Lock`` stand-in taken without a schedule point when free.

    Still a cancel point (a cancelled task gets ``trio.Cancelled`` at ``async with``, as with
    ``trio.Lock``); held, it waits as a ``trio.Lock`` does (first come, first served), and
    only its holder may release it.
    """

    __slots__ = ()

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        await super().acquire()

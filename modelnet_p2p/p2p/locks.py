"""A lock that costs no trip through trio's scheduler when it is free.

``trio.Lock.acquire`` ends in a schedule point even when nobody holds the lock: every task
that may run, runs, before the holder goes on. On a path taken at every stream read and
write (py-libp2p's ``NetStream``, hypercorn's send lock) that is one scheduler pass each.
"""

from __future__ import annotations

import trio

__all__ = ["QuickLock"]


class QuickLock:
    """A ``trio.Lock`` stand-in taken without a schedule point when free.

    Still a cancel point (a cancelled task gets ``trio.Cancelled`` at ``async with``, as with
    ``trio.Lock``); held, it waits as a ``trio.Lock`` does (first come, first served), and
    only its holder may release it. ``trio.Lock`` cannot be subclassed, hence the wrapper.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

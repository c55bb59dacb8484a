"""Workaround of py-libp2p 0.8.1's ``NetStream``: a trip through trio's scheduler at every
read and write.

Upstream behaviour corrected (the canaries in ``tests/test_compat_netstream.py`` fail once
upstream changes it):

- **Every read and write of a stream yields to the scheduler, even with nothing to wait
  for.** ``NetStream.read`` and ``NetStream.write`` check the stream's state under
  ``_state_lock``, a ``trio.Lock``, before they call the muxed stream; ``trio.Lock.acquire``
  ends in a schedule point even when the lock is free, so every task that may run, runs,
  before the read or write goes on. The lock guards no await in either (the state check is
  a few comparisons), so the pass buys nothing. Traced (a trio instrument, 256-chunk and
  one-chunk requests on a kept stream, provider and client in two processes): 3 of the
  provider's 13 task steps per request (its two writes and one read) and 3 of the client's
  6 (its request's write and two reads) were this lock.

:func:`install` makes the swarm build its streams as :class:`LeanNetStream`: upstream's
``NetStream`` with a :class:`~modelnet_p2p.p2p.locks.QuickLock` as its state lock. It is
taken without a schedule point when free, is still a cancel point, and when held waits as
``trio.Lock`` does, so the state transitions stay mutually exclusive (``close_read``,
``close_write`` and ``reset`` still hold it across their awaits). The bytes on the wire are
the same; only when other tasks run changes. It is process-wide (the swarm builds streams
in ``libp2p.network.connection.swarm_connection``, with no per-host hook), idempotent, and
reverted by :func:`uninstall`.
"""

from __future__ import annotations

import logging
from typing import Any

from libp2p.network.connection import swarm_connection
from libp2p.network.stream.net_stream import NetStream

from ..locks import QuickLock

__all__ = ["LeanNetStream", "install", "installed", "uninstall"]

log = logging.getLogger(__name__)


class LeanNetStream(NetStream):
    """Upstream's ``NetStream`` whose state lock does not yield when free (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if hasattr(self, "_state_lock"):
            self._state_lock = QuickLock()  # type: ignore[assignment]


def installed() -> bool:
    """Whether the swarm builds :class:`LeanNetStream`."""
    return getattr(swarm_connection, "NetStream", None) is LeanNetStream


def install() -> bool:
    """Have the swarm build its streams as :class:`LeanNetStream` (idempotent); ``False``
    (nothing changed) if py-libp2p does not build them where this expects."""
    current = getattr(swarm_connection, "NetStream", None)
    if current is LeanNetStream:
        return True
    if current is not NetStream:
        log.info("py-libp2p builds its streams elsewhere: their state lock stays a trio.Lock")
        return False
    swarm_connection.NetStream = LeanNetStream  # type: ignore[attr-defined]
    return True


def uninstall() -> None:
    """Undo :func:`install` (streams made meanwhile keep their lock)."""
    if installed():
        swarm_connection.NetStream = NetStream  # type: ignore[attr-defined]

"""Joining again: a peer left with no connection dials its bootstrap peers again.

A peer whose bootstrap peers did not answer when it started (a busy machine, a bootstrap
node restarting), or that lost every connection later, would otherwise run alone until
it is restarted: nobody knows it, and it knows nobody. While it has no connection at all,
:func:`keep_joined` dials the bootstrap peers again after 1, 2, 4, ... seconds (at most
:data:`MAX_RETRY`), and joins the DHT through those that answer. A peer with any
connection is left alone: its DHT keeps its routing table filled.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

__all__ = ["CHECK_INTERVAL", "FIRST_RETRY", "MAX_RETRY", "keep_joined"]

log = logging.getLogger(__name__)

#: Seconds between two checks of a connected peer, the first pause before dialing again,
#: and the longest pause between two attempts (doubled after each failed attempt).
CHECK_INTERVAL = 5.0
FIRST_RETRY = 1.0
MAX_RETRY = 60.0


async def keep_joined(
    alone: Callable[[], bool],
    join: Callable[[], Awaitable[bool]],
    *,
    check_interval: float = CHECK_INTERVAL,
    first_retry: float = FIRST_RETRY,
    max_retry: float = MAX_RETRY,
) -> None:
    """Forever: while ``alone()``, call ``join()`` (dial the bootstrap peers and join the DHT
    through those that answered; True if any did), with a growing pause after each failure.

    Runs on trio's clock (a test's ``MockClock`` drives it without sleeping).
    """
    delay = first_retry
    while True:
        if not alone():
            delay = first_retry
            await trio.sleep(check_interval)
            continue
        await trio.sleep(delay)
        if not alone():
            continue
        log.info("no connection left: dialing the bootstrap peers again")
        try:
            joined = await join()
        except Exception as exc:  # a failed attempt must not end the loop
            log.debug("joining again failed: %r", exc)
            joined = False
        if joined:
            log.info("joined the mesh again")
            delay = first_retry
        else:
            delay = min(delay * 2, max_retry)

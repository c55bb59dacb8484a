"""Checks of routing-table peers whose last connection closed (``specs/capability.md``, "The lookup").

A DHT server adds every DHT server that calls it to its routing table (once identify shows
that it serves the DHT), and drops a peer only after ``MAX_FAILURES`` requests in a row for
which no stream opened (:mod:`.kad`). A server called by many short-lived peers (callers that
come and go, Sybils) seldom sends them a request itself, so those that left would stay in its
table, and it would go on naming them in its answers to others.

So when the last connection to a peer of the table closes, that peer is checked: one DHT
request with a short deadline (``timeout``), and while no stream opens to it, another one
``gap`` seconds later, up to ``attempts`` in all. Each request counts under the failure rule
like any other: a peer that takes the stream stays (even if it answers late: slow is not
gone), one that cannot be reached is dropped. A peer is never dropped for closing, and a
connection this peer closed itself (the connection manager trimming an idle one, or closing
one over a limit) is not checked at all: its peer was alive, and a check would dial again
what was just closed to save it. Nor is one that its peer's connection manager closed (a
yamux GO_AWAY with code 0x1005, ``specs/network.md``), for the same reason. Such a peer,
if it leaves later, is dropped when next asked.

What it costs:

- nothing while no connection closes (no task runs, nothing wakes up);
- at most one check per peer at a time, ``concurrency`` at once, and ``MAX_QUEUED``
  waiting (closes past that are not checked: the failure rule still catches those peers
  when they are next asked);
- a peer found alive is not checked again on a close for ``recheck_after`` seconds (at most
  ``MAX_REMEMBERED`` such peers are remembered), so that trims and the checks' own dials do
  not chase each other: one dial per table peer per ``recheck_after`` at most.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

__all__ = [
    "CHECK_CONCURRENCY",
    "CHECK_GAP",
    "CHECK_TIMEOUT",
    "MAX_QUEUED",
    "MAX_REMEMBERED",
    "RECHECK_AFTER",
    "TableChecker",
]

log = logging.getLogger(__name__)

#: Seconds one check request may take, dial included (a lookup's request timeout).
CHECK_TIMEOUT = 5.0
#: Seconds between two check requests to a peer to which no stream opened (one failure may
#: be a busy moment; the next request should not fall in the same one).
CHECK_GAP = 5.0
#: Checks running at once, at most.
CHECK_CONCURRENCY = 4
#: Peers waiting for a check, at most.
MAX_QUEUED = 256
#: Seconds during which a peer found alive is not checked again when a connection closes
#: (py-libp2p's routing-table refresh interval).
RECHECK_AFTER = 600.0
#: Peers found alive that are remembered, at most (the oldest are forgotten first).
MAX_REMEMBERED = 1024


class TableChecker:
    """Checks the routing-table peers whose last connection closed (see the module docs).

    Args:
        nursery: where checks run (no task runs while none is due).
        in_table: whether a peer (base58 id) is in the routing table.
        connected: whether the host holds an open connection to a peer.
        probe: sends one request to a peer within ``timeout`` seconds, counting it under the
            failure rule; returns whether a stream opened.
        attempts: requests at most per check (the failure rule's ``MAX_FAILURES``).
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        in_table: Callable[[str], bool],
        connected: Callable[[str], bool],
        probe: Callable[[str, float], Awaitable[bool]],
        attempts: int,
        timeout: float = CHECK_TIMEOUT,
        gap: float = CHECK_GAP,
        concurrency: int = CHECK_CONCURRENCY,
        recheck_after: float = RECHECK_AFTER,
    ) -> None:
        if attempts < 1 or concurrency < 1 or timeout <= 0 or gap < 0 or recheck_after < 0:
            raise ValueError("bad table check settings")
        self._nursery = nursery
        self._in_table = in_table
        self._connected = connected
        self._probe = probe
        self.attempts = attempts
        self.timeout = timeout
        self.gap = gap
        self.concurrency = concurrency
        self.recheck_after = recheck_after
        self._queue: dict[str, None] = {}  # in order of arrival
        self._running: set[str] = set()
        self._workers = 0
        self._alive: dict[str, float] = {}  # trio time each was found alive, oldest first
        self._ended = trio.Event()
        #: Checks ended so far; of them, checks after which the peer had left the table.
        self.checks = 0
        self.dropped = 0
        #: Closes not checked because MAX_QUEUED peers were waiting.
        self.overflowed = 0
        #: Whether closes are checked at all (tests of the failure rule alone turn it off).
        self.enabled = True

    @property
    def busy(self) -> int:
        """Peers being checked or waiting for a check now."""
        return len(self._queue) + len(self._running)

    def closed(self, peer: str) -> None:
        """A connection to ``peer`` closed: check it if it is in the table and no other
        connection to it is open. Never blocks."""
        if not self.enabled or peer in self._queue or peer in self._running:
            return
        if not self._in_table(peer) or self._connected(peer):
            return
        seen = self._alive.get(peer)
        if seen is not None and trio.current_time() - seen < self.recheck_after:
            return
        if len(self._queue) >= MAX_QUEUED:
            self.overflowed += 1
            return
        self._queue[peer] = None
        if self._workers < self.concurrency:
            self._workers += 1
            self._nursery.start_soon(self._work)

    async def wait_check(self) -> None:
        """Return once the next check has ended (for tests and tools)."""
        await self._ended.wait()

    async def _work(self) -> None:
        try:
            while self._queue:
                peer = next(iter(self._queue))
                del self._queue[peer]
                self._running.add(peer)
                try:
                    if not await self._check(peer):
                        self.dropped += 1
                except Exception as exc:  # a check must never take the DHT down
                    log.debug("checking DHT peer %s failed: %r", peer, exc)
                finally:
                    self._running.discard(peer)
                    self.checks += 1
                    self._ended.set()
                    self._ended = trio.Event()
        finally:
            self._workers -= 1

    async def _check(self, peer: str) -> bool:
        """Whether ``peer`` is still in the table once checked."""
        for attempt in range(self.attempts):
            if attempt:
                await trio.sleep(self.gap)
            if not self._in_table(peer):
                return False
            if self._connected(peer) or await self._probe(peer, self.timeout):
                self._remember(peer)
                return True
        return self._in_table(peer)

    def _remember(self, peer: str) -> None:
        self._alive.pop(peer, None)
        if len(self._alive) >= MAX_REMEMBERED:
            del self._alive[next(iter(self._alive))]
        self._alive[peer] = trio.current_time()

"""Interest in a capability: follow its availability records, and be reachable by them.

Availability gossip costs in proportion to interest (``specs/availability.md``): a peer
receives the records of a capability only while it serves or *follows* it, on that
capability's own topic. :class:`Interest` is what routing calls each time it looks a
capability's providers up:

* it follows the capability (a use: the topic is left after the service's ``follow_idle``);
* if fewer than ``degree_low`` neighbours share the topic, it dials a few of the providers
  that discovery found, in the background, so that their records can reach this peer. GossipSub
  only forwards to connected peers, and nothing else connects a caller to the providers before
  its first call.

:meth:`Interest.meet` does the same for a capability this peer starts serving: one lookup of
the other providers (once the announce that makes this peer discoverable has ended), so that
a capability's providers are linked and its topic's mesh holds together however many serve it.

Bounded: at most ``max_dials`` dials per call, and never two at once to one peer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from ..proto.card import CapabilityCard

__all__ = ["Following", "Interest"]

log = logging.getLogger(__name__)

#: Most providers dialled per lookup to join a capability's gossip (GossipSub's D).
MAX_DIALS = 6


class Following(Protocol):
    """What :class:`Interest` needs of the availability service."""

    def follow(self, capability: str) -> None: ...
    def needs_neighbours(self, capability: str) -> bool: ...


class Interest:
    """Follows capabilities and connects to their providers' gossip.

    Args:
        gossip: the availability service (``follow``, ``needs_neighbours``), or ``None``
            while there is none.
        is_connected: ``is_connected(peer_id)``.
        connect: dials one address (with ``/p2p/``); raises on failure.
        nursery: where the dials run (the peer's).
        local_peer: this peer's id, never dialled.
        lookup: ``lookup(capability)``: a provider lookup that ends in :meth:`note` (routing's).
        max_dials: most dials started per call.
        before_meet: awaited (at most ``lookup_timeout`` s) before :meth:`meet`'s lookup, e.g.
            the end of the announce of the capability just served, so that the two do not
            compete for the peer's CPU (the announce is what makes it discoverable).
    """

    def __init__(
        self,
        gossip: Callable[[], Following | None],
        is_connected: Callable[[str], bool],
        connect: Callable[[str], Awaitable[object]],
        nursery: Callable[[], trio.Nursery],
        local_peer: str,
        lookup: Callable[[str], Awaitable[object]],
        *,
        max_dials: int = MAX_DIALS,
        lookup_timeout: float = 10.0,
        before_meet: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._gossip = gossip
        self._connected = is_connected
        self._connect = connect
        self._nursery = nursery
        self.local_peer = local_peer
        self._lookup = lookup
        self.max_dials = max_dials
        self.lookup_timeout = lookup_timeout
        self._dialling: set[str] = set()
        self._before_meet = before_meet

    def meet(self, capability: str) -> None:
        """This peer starts serving ``capability``: look its other providers up, in the background."""
        if self._gossip() is None:
            return
        try:
            nursery = self._nursery()
        except RuntimeError:  # not running yet: the first lookup by a caller links us
            return
        nursery.start_soon(self._meet, capability)

    async def _meet(self, capability: str) -> None:
        if self._before_meet is not None:
            with trio.move_on_after(self.lookup_timeout):
                await self._before_meet()
        with trio.move_on_after(self.lookup_timeout):
            try:
                await self._lookup(capability)
            except Exception as exc:
                log.debug("looking up the other providers of %s failed: %r", capability, exc)

    def note(self, capability: str, cards: Iterable[CapabilityCard]) -> None:
        """Routing looked ``capability`` up and found ``cards``: follow it, connect if needed."""
        gossip = self._gossip()
        if gossip is None:
            return
        try:
            gossip.follow(capability)
            if not gossip.needs_neighbours(capability):
                return
        except Exception as exc:  # interest must never break routing
            log.debug("following %s failed: %r", capability, exc)
            return
        started = 0
        for card in cards:
            pid = card.peer_id
            if started >= self.max_dials:
                break
            if pid == self.local_peer or pid in self._dialling or self._connected(pid):
                continue
            addrs = sorted(card.dial_addrs, key=lambda a: "/p2p-circuit" in a)  # direct first
            if not addrs:
                continue
            self._dialling.add(pid)
            self._nursery().start_soon(self._dial, pid, addrs)
            started += 1

    async def _dial(self, pid: str, addrs: list[str]) -> None:
        try:
            for addr in addrs:
                try:
                    await self._connect(addr)
                    return
                except Exception as exc:
                    log.debug("could not connect to %s for gossip: %r", addr, exc)
        finally:
            self._dialling.discard(pid)

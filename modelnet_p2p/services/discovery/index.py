"""Browsing: every capability of the mesh, with no criteria (``specs/capability.md``, "Browse index").

Every peer that serves something also provides under one well-known key, the *index key*
(Petals' ``_petals.models`` plays the same part). A browse is a network-complete
``GET_PROVIDERS`` lookup of that key, and each provider's card is fetched and verified
exactly as a filtered discovery does: provider records are hints, cards are the truth.

The scale limit is the per-key cap: a DHT server keeps at most
:data:`~.lookup.MAX_PROVIDERS_PER_KEY` providers of one key and ignores newer ones until
some expire. In a mesh with more serving peers than that, the index lists a subset; an
answer that lists the cap is the sign. The browse then walks the task keys of the cards it
found (each capped alike, but spread over other servers), up to :data:`MAX_TASK_KEYS` of
them, so a browse of a mesh of thousands returns up to the cap from the index and then
whatever the task keys add, at most :data:`MAX_BROWSE_CARDS` cards in all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import trio

from ...p2p.kad import KadKind, KadPeer, KadResponse
from ...proto.capability import Capability, normalize
from ...proto.card import CapabilityCard, card_keys, provider_key, task_key
from .lookup import CARD_FETCH_CONCURRENCY, MAX_PROVIDERS_PER_KEY, Lookups
from .query import Query

__all__ = [
    "INDEX_KEY",
    "INDEX_LABEL",
    "MAX_BROWSE_CARDS",
    "MAX_BROWSE_PROVIDERS",
    "MAX_TASK_KEYS",
    "announced_keys",
    "browse",
    "find_or_browse",
    "is_browse",
]

log = logging.getLogger(__name__)

#: The record label of the index key (as ``task:chat`` is of a task key).
INDEX_LABEL = "index"
#: The well-known provider key every serving peer provides under:
#: ``provider_key("index", "all")``, a sha2-256 multihash like every provider key.
INDEX_KEY = provider_key("index", "all")
#: Cards one browse delivers at most (a ``limit`` may ask for fewer).
MAX_BROWSE_CARDS = 4096
#: Providers one browse fetches cards of, at most, over all the keys it walks: bounds the
#: work that answers listing made-up providers can cause.
MAX_BROWSE_PROVIDERS = 8192
#: Task keys a browse walks after the index when the index is full.
MAX_TASK_KEYS = 64
#: An answer listing this many providers of the index means the index may be full (the
#: servers' per-key cap); the browse then walks the task keys too. Module-level so that
#: tests can run a mesh whose servers keep fewer providers per key.
FULL_AT = MAX_PROVIDERS_PER_KEY

FindCards = Callable[..., Awaitable[None]]


class Discovery(Protocol):
    """What :func:`find_or_browse` uses of :class:`~.service.Discovery`."""

    card: CapabilityCard | None
    wall_clock: Callable[[], float]

    @property
    def lookups(self) -> Lookups: ...

    async def joined(self) -> bool: ...

    async def find(
        self, query: Query, send: trio.MemorySendChannel[CapabilityCard], *, limit: int | None = None
    ) -> None: ...


def announced_keys(capabilities: Iterable[Capability]) -> list[tuple[str, bytes]]:
    """Every ``(label, key)`` an announce provides under: the card's keys, and the index key
    if the card lists any capability (an empty card is not browsable)."""
    keys = card_keys(capabilities)
    return [*keys, (INDEX_LABEL, INDEX_KEY)] if keys else keys


def is_browse(query: Query) -> bool:
    """Whether ``query`` gives no criterion (a browse of everything)."""
    return query.task is None and query.model is None and not query.tags


async def browse(
    lookups: Lookups,
    send: trio.MemorySendChannel[CapabilityCard],
    *,
    limit: int | None = None,
    own_card: Callable[[], CapabilityCard | None] = lambda: None,
    wall_clock: Callable[[], float] = time.time,
) -> int:
    """Send every verified card of the mesh to ``send``, each peer once; return the count.

    First the index key; if any answer listed :data:`FULL_AT` providers, then the task
    keys of the cards found, in the order first seen, at most :data:`MAX_TASK_KEYS`.
    Each key's card fetches finish before the next key is walked (its tasks join the
    walk). Stops after ``limit`` (at most :data:`MAX_BROWSE_CARDS`) cards; the caller
    bounds the time.
    """
    me = lookups.kad.peer_id
    most = MAX_BROWSE_CARDS if limit is None else min(limit, MAX_BROWSE_CARDS)
    seen: set[str] = set()
    tasks: dict[bytes, str] = {}  # task keys to walk if the index is full, in the order first seen
    full = False
    sent = 0
    limiter = trio.CapacityLimiter(CARD_FETCH_CONCURRENCY)

    with trio.CancelScope() as everything:

        def deliver(card: CapabilityCard | None) -> None:
            nonlocal sent
            if card is None or not card.capabilities or sent >= most:
                return
            for cap in card.capabilities:
                for task in cap.tasks:
                    if len(tasks) < MAX_TASK_KEYS:
                        tasks.setdefault(task_key(task), normalize(task))
            try:
                send.send_nowait(card)  # unbounded channel: no checkpoint between check and count
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                everything.cancel()  # nobody is listening any more
                return
            sent += 1
            if sent >= most:
                everything.cancel()

        async def fetch(provider: KadPeer) -> None:
            async with limiter:
                card = await lookups.fetch_card(provider.peer_id, provider.addrs)
            deliver(card)

        async def walk(label: str, key: bytes) -> None:
            async with trio.open_nursery() as fetches:  # ends once every card of this key is in

                def on_response(_peer: str, resp: KadResponse) -> None:
                    nonlocal full
                    if label == INDEX_LABEL and len(resp.providers) >= FULL_AT:
                        full = True
                    for provider in resp.providers:
                        if len(seen) >= MAX_BROWSE_PROVIDERS:
                            return
                        if provider.peer_id in seen:
                            continue
                        seen.add(provider.peer_id)
                        if provider.peer_id != me:
                            fetches.start_soon(fetch, provider)
                        else:
                            own = own_card()
                            if own is not None and not own.expired(int(wall_clock() * 1000)):
                                deliver(own)

                await lookups.closest(key, KadKind.GET_PROVIDERS, on_response)
            log.debug("browse: %s walked, %d providers seen, %d cards sent", label, len(seen), sent)

        await walk(INDEX_LABEL, INDEX_KEY)
        walked: set[bytes] = set()
        while full and len(seen) < MAX_BROWSE_PROVIDERS:
            todo = [(k, t) for k, t in tasks.items() if k not in walked]
            if not todo:
                break
            key, task = todo[0]
            walked.add(key)
            await walk(f"task:{task}", key)
    return sent


def find_or_browse(discovery: Discovery) -> FindCards:
    """``find(query, send, limit=...)``: :meth:`Discovery.find`, or a :func:`browse` when
    ``query`` gives no criterion (after the same wait for the peer's join)."""

    async def find(
        query: Query, send: trio.MemorySendChannel[CapabilityCard], *, limit: int | None = None
    ) -> None:
        if not is_browse(query):
            await discovery.find(query, send, limit=limit)
            return
        await discovery.joined()
        await browse(
            discovery.lookups,
            send,
            limit=limit,
            own_card=lambda: discovery.card,
            wall_clock=discovery.wall_clock,
        )

    return find

"""Providers of a capability: capability cards (discovery) joined with availability gossip.

Cards say *who* serves a capability and where to dial it; they are signed,
slow to change, and cached here for :data:`PROVIDER_CACHE_TTL` seconds.
Gossip says *how* each provider is doing right now: its state (``ready``,
``draining``, ``leaving``...) and load. :class:`Providers` joins the two into
routing :class:`~modelnet_p2p.mesh.routing.Candidate` objects; a provider that
gossips a capability but whose card the lookup missed is added too (without
addresses: the dialer then uses what it already knows of the peer).

It sees the services only through callables (a lookup, the gossip table and, optionally, one
provider's gossip entry), so it can be driven by anything (a peer, a test, a gateway with a
static provider list).

Also here: :func:`search_cards` (a discovery lookup as an iterator of cards) and
:func:`mesh_rows` (the whole mesh as gossip joined with cards, for ``status``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from ..errors import BadRequestError
from ..proto.capability import normalize
from ..proto.card import CapabilityCard
from ..services.availability import MeshViewRow, mesh_view
from ..services.discovery import Query
from .routing import Candidate

__all__ = [
    "LOOKUP_TIMEOUT",
    "PROVIDERS_TIMEOUT",
    "PROVIDER_CACHE_TTL",
    "Discover",
    "GossipEntry",
    "GossipTable",
    "Providers",
    "card_targets",
    "mesh_rows",
    "same_capability",
    "search_cards",
]

log = logging.getLogger(__name__)

#: Seconds a capability's provider list (from the DHT) is reused before looking again.
PROVIDER_CACHE_TTL = 10.0
#: Seconds a discovery lookup may take unless the caller says otherwise.
LOOKUP_TIMEOUT = 10.0
#: Seconds a lookup of a capability's providers for routing (or of the mesh view) may take.
PROVIDERS_TIMEOUT = 5.0


class GossipRecord(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def queue(self) -> int: ...
    @property
    def max_concurrency(self) -> int: ...


class GossipEntry(Protocol):
    """The part of an availability-table entry that routing reads."""

    @property
    def state(self) -> object: ...
    @property
    def capabilities(self) -> tuple[tuple[str, str], ...]: ...
    @property
    def record(self) -> GossipRecord: ...


#: ``discover(capability, timeout)``: the verified cards of the capability's providers.
Discover = Callable[[str, float], Awaitable[list[CapabilityCard]]]
#: The live availability table by peer id (this peer's own entry may be included).
GossipTable = Callable[[], Mapping[str, GossipEntry]]
#: ``find(query, send, limit=...)``: send every verified card matching ``query`` to ``send``.
FindCards = Callable[..., Awaitable[None]]


def same_capability(a: str, b: str) -> bool:
    """Whether two capability names name the same capability (compared after ``normalize()``,
    as discovery and the inference server compare them; ``specs/capability.md``)."""
    return normalize(a) == normalize(b)


def _dial_order(addrs: Iterable[str]) -> list[str]:
    """Relayed addresses first: a private peer announces only those (see ``specs/network.md``)."""
    return sorted(addrs, key=lambda a: "/p2p-circuit" not in a)


def card_targets(cards: Iterable[CapabilityCard], local_peer: str) -> list[str]:
    """One target per card other than ``local_peer``'s: its first address to dial, else its peer id."""
    targets = []
    for card in cards:
        if card.peer_id != local_peer:
            addrs = _dial_order(card.dial_addrs)
            targets.append(addrs[0] if addrs else card.peer_id)
    return targets


async def search_cards(
    find: FindCards,
    nursery: trio.Nursery,
    *,
    task: str | None = None,
    model: str | None = None,
    version: str | None = None,
    tags: Sequence[str] | str = (),
    limit: int | None = None,
    timeout: float = LOOKUP_TIMEOUT,
) -> AsyncIterator[CapabilityCard]:
    """Yield each card ``find`` verifies, as it arrives; leaving the loop stops the search.

    The search runs in ``nursery`` for at most ``timeout`` seconds; a failing
    lookup is logged and ends the iteration (it never takes the peer down).
    """
    tag_list = (tags,) if isinstance(tags, str) else tuple(tags)
    if version is not None and model is None:
        raise BadRequestError("version needs model")
    if limit is not None and limit < 1:
        raise BadRequestError("limit must be at least 1")
    query = Query(task=task, model=model, version=version, tags=tag_list)
    send, recv = trio.open_memory_channel[CapabilityCard](math.inf)
    scope = trio.CancelScope()

    async def search() -> None:
        async with send:
            with scope, trio.move_on_after(timeout):
                try:
                    await find(query, send, limit=limit)
                except Exception as exc:  # never let a lookup take the peer down
                    log.warning("discovery of %s failed: %r", query, exc)

    nursery.start_soon(search)
    try:
        async with recv:
            async for card in recv:
                yield card
    finally:
        scope.cancel()


async def mesh_rows(
    discover: Callable[..., Awaitable[list[CapabilityCard]]],
    gossip: Callable[[], Mapping[str, Any]],
    *,
    timeout: float = PROVIDERS_TIMEOUT,
    discover_task: str | None = None,
) -> list[MeshViewRow]:
    """The mesh: every peer in gossip, joined with the verified cards of what it serves.

    Every capability name seen in gossip is looked up (``discover(model=name)``),
    plus ``discover_task`` (``discover(task)``), within ``timeout`` in all.
    """
    names = {name for entry in gossip().values() for name, _ in entry.capabilities}
    cards: dict[str, list[Any]] = {}
    found: list[CapabilityCard] = []
    with trio.move_on_after(timeout):
        for name in sorted(names):
            found.extend(await discover(model=name, timeout=timeout))
        if discover_task:
            found.extend(await discover(discover_task, timeout=timeout))
    for card in found:
        cards.setdefault(card.peer_id, [])
        for cap in card.capabilities:
            if all(c.name != cap.name for c in cards[card.peer_id]):
                cards[card.peer_id].append(cap)
    # Read the table again: the lookups took time, and entries may have expired.
    return mesh_view(gossip(), cards)


class Providers:
    """Candidates for a capability, from cards (cached) and gossip (always fresh).

    Args:
        discover: looks cards up (``Peer.discover(model=...)``).
        gossip: the availability table, or ``None`` without gossip.
        local_peer: this peer's id, never a candidate.
        cache_ttl: seconds a lookup's cards are reused.
        interest: called with the capability and its cards on every lookup, cached or not
            (:meth:`~modelnet_p2p.mesh.interest.Interest.note`: follow its gossip).
        gossip_entry: one provider's live entry of the table (``None``: not in it), so that
            :meth:`among` looks up the providers it was given instead of walking the whole
            table; without it, :meth:`among` reads ``gossip``.
    """

    def __init__(
        self,
        discover: Discover,
        gossip: GossipTable | None,
        local_peer: str,
        *,
        cache_ttl: float = PROVIDER_CACHE_TTL,
        interest: Callable[[str, list[CapabilityCard]], None] | None = None,
        gossip_entry: Callable[[str], GossipEntry | None] | None = None,
    ) -> None:
        self._discover = discover
        self.interest = interest
        self._gossip = gossip
        self._gossip_entry = gossip_entry
        self.local_peer = local_peer
        self.cache_ttl = cache_ttl
        self._cache: dict[str, tuple[float, list[CapabilityCard]]] = {}

    def forget(self, capability: str | None = None) -> None:
        """Drop cached cards (of one capability, or all)."""
        if capability is None:
            self._cache.clear()
        else:
            self._cache.pop(capability, None)

    async def cards(self, capability: str, *, timeout: float, refresh: bool = False) -> list[CapabilityCard]:
        now = trio.current_time()
        cached = self._cache.get(capability)
        if cached is None or refresh or now - cached[0] > self.cache_ttl:
            cards = await self._discover(capability, timeout)
            self._cache[capability] = (trio.current_time(), cards)
            return cards
        return cached[1]

    async def candidates(
        self, capability: str, *, timeout: float = PROVIDERS_TIMEOUT, refresh: bool = False
    ) -> list[Candidate]:
        """Every known provider of ``capability`` other than this peer, as routing candidates."""
        cards = await self.cards(capability, timeout=timeout, refresh=refresh)
        if self.interest is not None:
            self.interest(capability, cards)
        return self._as_candidates(capability, cards)

    def known(self, capability: str) -> list[Candidate]:
        """The candidates of the last lookup of ``capability``, however old, with gossip joined
        in; no lookup (for a failover, which should not wait for one)."""
        cached = self._cache.get(capability)
        return self._as_candidates(capability, cached[1] if cached is not None else [])

    def _as_candidates(self, capability: str, cards: list[CapabilityCard]) -> list[Candidate]:
        found: dict[str, Candidate] = {}
        for card in cards:
            if card.peer_id == self.local_peer:
                continue
            cap = next((c for c in card.capabilities if same_capability(c.name, capability)), None)
            found[card.peer_id] = Candidate(
                peer_id=card.peer_id,
                addrs=_dial_order(card.dial_addrs),
                idempotent=bool(cap and cap.idempotent),
                max_concurrency=(cap.max_concurrency or 0) if cap else 0,
                card=card,
                name=cap.name if cap else None,
            )
        self.join(capability, found, add_missing=True)
        return list(found.values())

    def join(self, capability: str, found: dict[str, Candidate], *, add_missing: bool = False) -> None:
        """Fill in state and load from gossip.

        With ``add_missing``, also add the gossiping providers that ``found`` lacks.
        """
        if self._gossip is None:
            return
        for pid, entry in self._gossip().items():
            if pid == self.local_peer:
                continue
            cand = found.get(pid)
            if cand is None:
                serves = any(same_capability(name, capability) for name, _ in entry.capabilities)
                if not (add_missing and serves):
                    continue
                cand = found[pid] = Candidate(peer_id=pid)
            _fill(cand, entry)

    def among(self, capability: str, given: Sequence[Candidate]) -> list[Candidate]:
        """Copies of caller-given candidates (a static provider list) with gossip joined in."""
        found = {c.peer_id: c.copy() for c in given}
        if self._gossip_entry is None:
            self.join(capability, found)
            return list(found.values())
        for pid, cand in found.items():  # what join does for these, one lookup each
            if pid != self.local_peer and (entry := self._gossip_entry(pid)) is not None:
                _fill(cand, entry)
        return list(found.values())


def _fill(cand: Candidate, entry: GossipEntry) -> None:
    """Take state and load from a provider's gossip."""
    cand.state = str(entry.state)
    cand.in_flight = entry.record.in_flight
    cand.queue = entry.record.queue
    cand.load_at = getattr(entry, "last_seen", None)  # against answers' load hints (routing)
    if entry.record.max_concurrency:
        cand.max_concurrency = entry.record.max_concurrency

"""The models the gateway serves: routes built from capability cards, and their JSON shapes.

A :class:`ModelRoute` is one OpenAI ``model``: a capability name with its tasks
and, when configured or discovered, its providers. :func:`routes_from_cards`
(pure) folds verified capability cards into routes; :class:`Catalog` keeps them,
from a static list or from discovery (cached for ``ttl`` seconds, refreshed in
the background when stale). :func:`model_json` and :func:`agent_card` (pure)
render them for ``/v1/models`` and the A2A agent card.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..config import VERSION
from ..errors import ModelNetError
from ..proto.card import CapabilityCard, normalize
from .conventions import CHAT, EMBEDDING, OPENAI_TASKS, TEXT_GENERATION

__all__ = ["Catalog", "Directory", "ModelRoute", "agent_card", "model_json", "peer_of", "routes_from_cards"]

log = logging.getLogger(__name__)


class Directory(Protocol):
    """What the catalog needs of a peer: its id, a nursery for background work, and discovery."""

    @property
    def peer_id(self) -> str: ...

    @property
    def nursery(self) -> trio.Nursery: ...

    async def discover(
        self, task: str | None = None, *, model: str | None = None, timeout: float = ...
    ) -> list[CapabilityCard]: ...


@dataclass(frozen=True)
class ModelRoute:
    """A model the gateway serves, and where to send it.

    Attributes:
        name: the capability name, which is the OpenAI ``model``.
        tasks: its tasks (:data:`modelnet_p2p.openai.conventions.OPENAI_TASKS` and others).
        providers: targets (multiaddrs ending in ``/p2p/<id>``, or peer ids)
            serving it. Empty: leave the choice to the mesh's routing.
        idempotent: a broken stream may be replayed on another provider.
        discovered: found by discovery (the mesh's routing may be used) rather
            than configured.
    """

    name: str
    tasks: tuple[str, ...] = (CHAT, TEXT_GENERATION)
    providers: tuple[str, ...] = ()
    idempotent: bool = False
    description: str = ""
    tags: tuple[str, ...] = ()
    max_concurrency: int | None = None
    input_modalities: tuple[str, ...] = ()
    output_modalities: tuple[str, ...] = ()
    discovered: bool = False


def peer_of(target: str) -> str:
    """The peer id in a target (a multiaddr ending in ``/p2p/<id>``, or a peer id)."""
    return target.rsplit("/p2p/", 1)[1] if "/p2p/" in target else target


def routes_from_cards(
    cards: Sequence[CapabilityCard], own_peer_id: str = "", tasks: Sequence[str] = OPENAI_TASKS
) -> dict[str, ModelRoute]:
    """One route per capability name (normalized) that has one of ``tasks``, over every card.

    A capability is idempotent only if every provider says so. ``own_peer_id``
    (the gateway's own peer, which cannot call itself) is left out.
    """
    wanted = {normalize(t) for t in tasks}
    acc: dict[str, dict[str, Any]] = {}
    for card in sorted(cards, key=lambda c: c.peer_id):
        if card.peer_id == own_peer_id:
            continue
        addrs = sorted(card.dial_addrs, key=lambda a: "/p2p-circuit" in a)
        target = addrs[0] if addrs else card.peer_id
        for cap in card.capabilities:
            if not wanted & {normalize(t) for t in cap.tasks}:
                continue
            entry = acc.setdefault(
                normalize(cap.name),
                {
                    "name": cap.name,
                    "tasks": list(cap.tasks),
                    "providers": [],
                    "idempotent": True,
                    "description": cap.description,
                    "tags": list(cap.tags),
                    "max_concurrency": cap.max_concurrency,
                    "input_modalities": cap.input_modalities,
                    "output_modalities": cap.output_modalities,
                },
            )
            entry["tasks"] += [t for t in cap.tasks if t not in entry["tasks"]]
            entry["tags"] += [t for t in cap.tags if t not in entry["tags"]]
            entry["idempotent"] = entry["idempotent"] and cap.idempotent
            if target not in entry["providers"]:
                entry["providers"].append(target)
    return {
        key: ModelRoute(
            name=e["name"],
            tasks=tuple(e["tasks"]),
            providers=tuple(e["providers"]),
            idempotent=e["idempotent"],
            description=e["description"],
            tags=tuple(e["tags"]),
            max_concurrency=e["max_concurrency"],
            input_modalities=tuple(e["input_modalities"]),
            output_modalities=tuple(e["output_modalities"]),
            discovered=True,
        )
        for key, e in acc.items()
    }


class Catalog:
    """The models the gateway can route to: a static list, or the mesh's (via discovery, cached)."""

    def __init__(
        self,
        peer: Directory,
        static: Sequence[ModelRoute] | None,
        tasks: Sequence[str],
        ttl: float,
        lookup_timeout: float,
    ) -> None:
        self.peer = peer
        self.tasks = tuple(tasks)
        self.ttl = ttl
        self.lookup_timeout = lookup_timeout
        self._static = None if static is None else {normalize(r.name): r for r in static}
        self._routes: dict[str, ModelRoute] = {}
        self._fetched_at = -math.inf
        self._refreshing = False
        self._lock = trio.Lock()
        self._missing: dict[str, float] = {}
        #: Every provider peer id discovery ever returned.
        self.peers_seen: set[str] = set()
        if static is not None:
            for route in static:
                self.peers_seen.update(peer_of(t) for t in route.providers)

    @property
    def cached(self) -> list[ModelRoute]:
        """The routes known now, without a lookup."""
        return list((self._static if self._static is not None else self._routes).values())

    async def routes(self) -> list[ModelRoute]:
        """Every route; looks the mesh up if the cache is empty, refreshes it in the background if stale."""
        if self._static is not None:
            return list(self._static.values())
        age = trio.current_time() - self._fetched_at
        if self._fetched_at == -math.inf:
            await self.refresh()
        elif age > self.ttl and not self._refreshing:
            self._refreshing = True
            self.peer.nursery.start_soon(self._background_refresh)
        return list(self._routes.values())

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        finally:
            self._refreshing = False

    async def refresh(self) -> None:
        """Look up every provider of the catalog's tasks now."""
        async with self._lock:
            if trio.current_time() - self._fetched_at < min(self.ttl, 0.5):
                return  # another request just did it
            cards: dict[str, CapabilityCard] = {}

            async def lookup(task: str) -> None:
                try:
                    found = await self.peer.discover(task=task, timeout=self.lookup_timeout)
                except ModelNetError as exc:
                    log.debug("discovery of task %s failed: %s", task, exc)
                    return
                for card in found:
                    old = cards.get(card.peer_id)
                    if old is None or card.seq > old.seq:
                        cards[card.peer_id] = card

            async with trio.open_nursery() as nursery:
                for task in self.tasks:
                    nursery.start_soon(lookup, task)
            self._routes = routes_from_cards(list(cards.values()), self.peer.peer_id, self.tasks)
            self.peers_seen.update(p for p in cards if p != self.peer.peer_id)
            self._fetched_at = trio.current_time()

    async def resolve(self, name: str) -> ModelRoute | None:
        """The route of model ``name`` (case-insensitive), looking the mesh up for a name not cached."""
        key = normalize(name)
        if self._static is not None:
            return self._static.get(key)
        await self.routes()
        route = self._routes.get(key)
        if route is not None:
            return route
        now = trio.current_time()
        if self._missing.get(key, -math.inf) > now:
            return None
        try:
            cards = await self.peer.discover(model=name, timeout=self.lookup_timeout)
        except ModelNetError:
            cards = []
        found = routes_from_cards(cards, self.peer.peer_id, self.tasks).get(key)
        if found is None:
            if len(self._missing) > 1024:
                self._missing.clear()
            self._missing[key] = now + self.ttl
            return None
        self.peers_seen.update(c.peer_id for c in cards if c.peer_id != self.peer.peer_id)
        self._routes[key] = found
        return found


def model_json(route: ModelRoute, created: int) -> dict[str, Any]:
    """A route as an OpenAI model object (with the mesh's details under ``x-modelnet``)."""
    return {
        "id": route.name,
        "object": "model",
        "created": created,
        "owned_by": "modelnet",
        "x-modelnet": {
            "tasks": list(route.tasks),
            "providers": len(route.providers),
            "description": route.description,
            "tags": list(route.tags),
            "idempotent": route.idempotent,
        },
    }


def agent_card(
    routes: Sequence[ModelRoute], *, base_url: str, peer_id: str, network: str, bearer: bool
) -> dict[str, Any]:
    """The routes as one A2A agent card (protocol 0.3.0), one skill per model.

    ``base_url``: where the gateway is reached (the card's ``url`` is its
    ``/v1``); ``bearer``: the API needs a bearer token.
    """
    routes = sorted(routes, key=lambda r: r.name)
    skills = []
    for r in routes:
        skills.append(
            {
                "id": r.name,
                "name": r.name,
                "description": r.description or f"{r.name}: {', '.join(r.tasks)}",
                "tags": list(dict.fromkeys((*r.tasks, *r.tags))),
                "inputModes": ["text/plain"],
                "outputModes": ["application/json"] if EMBEDDING in r.tasks else ["text/plain"],
            }
        )
    providers = {peer_of(p) for r in routes for p in r.providers}
    card: dict[str, Any] = {
        "protocolVersion": "0.3.0",
        "name": "modelnet gateway",
        "description": (
            f"OpenAI-compatible gateway into the modelnet mesh '{network}': "
            f"{len(routes)} models served by {len(providers)} peers."
        ),
        "url": base_url.rstrip("/") + "/v1",
        "version": VERSION,
        "capabilities": {"streaming": True, "pushNotifications": False},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": skills,
        "x-modelnet": {
            "peerId": peer_id,
            "network": network,
            "interface": "openai",
            "endpoints": ["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"],
            "providers": {r.name: len(r.providers) for r in routes},
        },
    }
    if bearer:
        card["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        card["security"] = [{"bearer": []}]
    return card

"""The mesh as a peer sees it: availability entries joined with capability cards, by peer id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .table import AvailabilityEntry

__all__ = ["CapabilityView", "MeshViewRow", "mesh_view"]


@dataclass(frozen=True, slots=True)
class CapabilityView:
    """One capability of a peer, as seen through availability and discovery together."""

    name: str
    version: str
    #: Listed in the peer's live availability record.
    available: bool
    #: The discovery card for it, if one is known.
    card: Any = None


@dataclass(frozen=True, slots=True)
class MeshViewRow:
    """A peer as the CLI shows it: availability entry (if live) joined with its cards."""

    peer_id: str
    availability: AvailabilityEntry | None
    capabilities: tuple[CapabilityView, ...]

    @property
    def state(self) -> str:
        return str(self.availability.state) if self.availability is not None else "unknown"

    def to_dict(self) -> dict[str, Any]:
        a = self.availability
        return {
            "peer_id": self.peer_id,
            "state": self.state,
            "availability": a.to_dict() if a is not None else None,
            "capabilities": [
                {"name": c.name, "version": c.version, "available": c.available, "card": c.card is not None}
                for c in self.capabilities
            ],
        }


def _card_name_version(card: Any) -> tuple[str, str] | None:
    if isinstance(card, Mapping):
        name, version = card.get("name"), card.get("version", "")
    else:
        name, version = getattr(card, "name", None), getattr(card, "version", "")
    if not isinstance(name, str) or not name:
        return None
    return name, "" if version is None else str(version)


def mesh_view(
    table: Mapping[str, AvailabilityEntry],
    cards: Mapping[str, Any] | None = None,
) -> list[MeshViewRow]:
    """Join the availability table with discovered capability cards, by peer id.

    ``cards`` maps a peer id to its cards: a sequence of objects with
    ``.name``/``.version`` attributes or of dicts with those keys (or a single
    such card). Peers known from only one side appear too, with
    ``availability=None`` or with no cards. Rows are sorted by peer id.
    """
    cards = cards or {}
    rows: list[MeshViewRow] = []
    for pid in sorted(set(table) | set(cards)):
        entry = table.get(pid)
        raw = cards.get(pid, ())
        if isinstance(raw, Mapping) or hasattr(raw, "name") or not isinstance(raw, Iterable):
            raw = (raw,)
        by_name: dict[str, tuple[str, Any]] = {}
        for card in raw:
            nv = _card_name_version(card)
            if nv is not None:
                by_name[nv[0]] = (nv[1], card)
        announced = dict(entry.capabilities) if entry is not None else {}
        views: list[CapabilityView] = []
        for name in sorted(set(announced) | set(by_name), key=lambda n: n.encode()):
            version = announced.get(name, by_name.get(name, ("", None))[0])
            card = by_name.get(name, ("", None))[1]
            views.append(CapabilityView(name, version, name in announced, card))
        rows.append(MeshViewRow(pid, entry, tuple(views)))
    return rows

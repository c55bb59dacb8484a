"""``modelnet discover``: verified capability cards from the DHT, with their availability."""

from __future__ import annotations

import json
from contextlib import nullcontext
from typing import Any

import click
import trio

from ..config import Config
from ..peer import Peer
from .common import make_peer, run_async
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

__all__ = ["card_rows", "discover_command"]

#: Seconds to search unless --timeout says otherwise.
DISCOVER_TIMEOUT = 10.0
#: Most seconds spent waiting for the found providers' availability records.
HEAR_TIMEOUT = 2.0


def card_rows(
    cards: list[Any], availability: dict[str, Any], query: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One row per matching capability of each card (the ``--json`` ``capabilities`` list)."""
    rows = []
    for card in sorted(cards, key=lambda c: c.peer_id):
        entry = availability.get(card.peer_id)
        for cap in card.matching(**query) if query else card.capabilities:
            rows.append(
                {
                    "peer_id": card.peer_id,
                    "capability": cap.name,
                    "version": cap.version,
                    "tasks": list(cap.tasks) if getattr(cap, "tasks", None) else [cap.task],
                    "tags": list(cap.tags),
                    "description": cap.description,
                    "addrs": card.dial_addrs,
                    "expires_at_ms": card.expires_at,
                    "state": entry.to_dict()["state"] if entry is not None else None,
                    "in_flight": entry.to_dict().get("in_flight") if entry is not None else None,
                }
            )
    return rows


@click.command("discover")
@click.option("--task", help="Only capabilities with this task.")
@click.option("--model", help="Only capabilities with this name.")
@click.option("--version", "model_version", help="With --model: only this version.")
@click.option(
    "--tag", "tags", multiple=True, help="Only capabilities with this tag (repeatable: all must match)."
)
@click.option("--limit", type=click.IntRange(1), help="Stop after this many peers.")
@click.option("--timeout", default=DISCOVER_TIMEOUT, show_default=True, help="Seconds to search.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@peer_options()
@pass_state
def discover_command(
    state: State,
    task: str | None,
    model: str | None,
    model_version: str | None,
    tags: tuple[str, ...],
    limit: int | None,
    timeout: float,
    as_json: bool,
    peer: PeerOptions,
) -> None:
    """Find models in the mesh: a table of verified capability cards, with their availability."""
    if not (task or model or tags):
        raise click.UsageError("give at least one of --task, --model or --tag")
    cfg, _ = state.config(peer)
    require_bootstrap(cfg)
    run_async(_discover, cfg, task, model, model_version, tags, limit, timeout, as_json)


async def _hear_providers(peer: Peer, cards: list[Any]) -> None:
    """Follow the found capabilities' gossip and wait (briefly) for their providers' records."""
    if peer.availability is None or not cards:
        return
    for name in sorted({c.name for card in cards for c in card.capabilities}):
        peer.interest.note(name, cards)
    wanted, availability = {card.peer_id for card in cards}, peer.availability
    with trio.move_on_after(HEAR_TIMEOUT):
        while not wanted <= set(availability.table()):
            await availability.wait_changed(availability.version)


async def _discover(
    cfg: Config,
    task: str | None,
    model: str | None,
    version: str | None,
    tags: tuple[str, ...],
    limit: int | None,
    timeout: float,
    as_json: bool,
) -> None:
    from rich.console import Console

    async with make_peer(cfg, require_bootstrap=True) as peer:
        spinner = nullcontext() if as_json else Console(stderr=True).status("looking up the DHT...")
        with spinner:
            cards = await peer.discover(
                task, model=model, version=version, tags=tags, limit=limit, timeout=timeout
            )
            await _hear_providers(peer, cards)
        availability = peer.availability_table()
    rows = card_rows(cards, availability, {"task": task, "model": model, "version": version, "tags": tags})
    if as_json:
        click.echo(json.dumps({"peers": len(cards), "capabilities": rows}, indent=2))
        return
    if not rows:
        click.echo("no matching capability found")
        return
    from rich.table import Table

    table = Table(title=f"{len(cards)} peers, {len(rows)} capabilities")
    for col in ("peer", "capability", "version", "tasks", "tags", "state"):
        table.add_column(col, no_wrap=col in ("peer", "capability"))
    table.add_column("description", max_width=40, overflow="ellipsis", no_wrap=True)
    for r in rows:
        table.add_row(
            "…" + r["peer_id"][-8:],
            r["capability"],
            r["version"],
            ", ".join(r["tasks"]),
            ", ".join(r["tags"]),
            r["state"] or "-",
            r["description"],
        )
    Console().print(table)

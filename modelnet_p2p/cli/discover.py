"""``modelnet discover``: verified capability cards from the DHT, with their availability."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import click
import trio

from ..config import Config
from ..peer import Peer
from .common import make_peer, run_async
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

__all__ = ["card_rows", "discover_command", "sort_rows"]

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


#: Seconds allowed for each ping of ``--sort latency``.
PING_TIMEOUT = 2.0
#: Pings ``--sort latency`` has in flight at once.
PING_CONCURRENCY = 16
SORT_KEYS = ("load", "latency")


def _load_key(row: dict[str, Any]) -> tuple[int, float]:
    """Ready providers first, then by in-flight requests per slot; no gossip last."""
    if row["state"] is None:
        return (2, 0.0)
    slots = max(1, row.get("max_concurrency") or 1)
    return (0 if row["state"] == "ready" else 1, ((row["in_flight"] or 0) + (row.get("queue") or 0)) / slots)


def sort_rows(rows: list[dict[str, Any]], by: str) -> list[dict[str, Any]]:
    """``rows`` ordered by ``load`` (state, then load per slot) or ``latency`` (ping; unknown last)."""
    if by == "load":
        return sorted(rows, key=lambda r: (_load_key(r), r["peer_id"]))
    inf = float("inf")
    return sorted(rows, key=lambda r: (inf if r.get("latency_ms") is None else r["latency_ms"], r["peer_id"]))


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
@click.option(
    "--stream",
    is_flag=True,
    help="Print each capability as soon as its card is verified (with --json: one JSON object a line).",
)
@click.option(
    "--sort",
    "sort_by",
    type=click.Choice(SORT_KEYS),
    help="Join the cards with availability: order by load (gossip) or latency (ping).",
)
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
    stream: bool,
    sort_by: str | None,
    peer: PeerOptions,
) -> None:
    """Find models in the mesh: a table of verified capability cards, with their availability.

    With no --task, --model or --tag, browse: every capability the mesh offers
    (the DHT's browse index, see specs/capability.md).
    """
    if model_version and not model:
        raise click.UsageError("--version needs --model")
    if stream and sort_by:
        raise click.UsageError("--stream prints as cards arrive; --sort needs them all: give one of them")
    cfg, _ = state.config(peer)
    require_bootstrap(cfg)
    opts = _Options(task, model, model_version, tags, limit, timeout, as_json, stream, sort_by)
    run_async(_discover, cfg, opts)


@dataclass(frozen=True)
class _Options:
    task: str | None
    model: str | None
    version: str | None
    tags: tuple[str, ...]
    limit: int | None
    timeout: float
    as_json: bool
    stream: bool
    sort_by: str | None

    def query(self) -> dict[str, Any] | None:
        if not (self.task or self.model or self.tags):
            return None  # a browse: every capability of each card
        return {"task": self.task, "model": self.model, "version": self.version, "tags": self.tags}


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


async def _latencies(peer: Peer, cards: list[Any]) -> dict[str, float | None]:
    """Ping round trips (ms) to the found peers, at most PING_CONCURRENCY at once."""
    out: dict[str, float | None] = {}
    limiter = trio.CapacityLimiter(PING_CONCURRENCY)

    async def one(pid: str) -> None:
        async with limiter:
            out[pid] = await peer.ping(pid, timeout=PING_TIMEOUT)

    async with trio.open_nursery() as nursery:
        for card in cards:
            if card.peer_id != peer.peer_id:
                nursery.start_soon(one, card.peer_id)
    return out


def _print_line(row: dict[str, Any]) -> None:
    tasks = ", ".join(row["tasks"])
    click.echo(
        f"…{row['peer_id'][-8:]}  {row['capability']} {row['version']}  [{tasks}]  {row['description']}"
    )


async def _discover(cfg: Config, o: _Options) -> None:
    from rich.console import Console

    query = o.query()
    cards: list[Any] = []
    async with make_peer(cfg, require_bootstrap=True) as peer:
        label = "browsing the mesh..." if query is None else "looking up the DHT..."
        quiet = o.as_json or o.stream
        spinner = nullcontext() if quiet else Console(stderr=True).status(label)
        with spinner:
            found = peer.discover_iter(
                o.task, model=o.model, version=o.version, tags=o.tags, limit=o.limit, timeout=o.timeout
            )
            async for card in found:
                cards.append(card)
                if o.stream:
                    for row in card_rows([card], {}, query):
                        if o.as_json:
                            click.echo(json.dumps({"event": "capability", **row}))
                        else:
                            _print_line(row)
            if o.stream:
                rows = card_rows(cards, {}, query)
                if o.as_json:
                    click.echo(json.dumps({"event": "done", "peers": len(cards), "capabilities": len(rows)}))
                elif not rows:
                    click.echo("no matching capability found")
                return
            await _hear_providers(peer, cards)
            latency = await _latencies(peer, cards) if o.sort_by == "latency" else {}
        availability = peer.availability_table()
    rows = card_rows(cards, availability, query)
    for r in rows:
        entry = availability.get(r["peer_id"])
        r["max_concurrency"] = entry.to_dict().get("max_concurrency") if entry is not None else None
        r["queue"] = entry.to_dict().get("queue") if entry is not None else None
        if o.sort_by == "latency":
            r["latency_ms"] = latency.get(r["peer_id"])
    if o.sort_by:
        rows = sort_rows(rows, o.sort_by)
    if o.as_json:
        click.echo(json.dumps({"peers": len(cards), "capabilities": rows}, indent=2))
        return
    if not rows:
        click.echo("no matching capability found")
        return
    from rich.table import Table

    table = Table(title=f"{len(cards)} peers, {len(rows)} capabilities")
    cols = ["peer", "capability", "version", "tasks", "tags", "state"]
    if o.sort_by:
        cols.append("load" if o.sort_by == "load" else "latency")
    for col in cols:
        table.add_column(col, no_wrap=col in ("peer", "capability"))
    table.add_column("description", max_width=40, overflow="ellipsis", no_wrap=True)
    for r in rows:
        cells = ["…" + r["peer_id"][-8:], r["capability"], r["version"], ", ".join(r["tasks"]),
                 ", ".join(r["tags"]), r["state"] or "-"]  # fmt: skip
        if o.sort_by == "load":
            cells.append(
                "-" if r["state"] is None else f"{r['in_flight'] or 0}/{r['max_concurrency'] or '?'}"
            )
        elif o.sort_by == "latency":
            cells.append("-" if r.get("latency_ms") is None else f"{r['latency_ms']:.0f} ms")
        table.add_row(*cells, r["description"])
    Console().print(table)

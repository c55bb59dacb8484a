"""``modelnet status``: the mesh as this peer sees it (gossip joined with cards, round-trip times),
and this peer's reputation of the providers it has used (``mesh/reputation.py``): a ``trust``
column in the mesh table, and a section with every scored or listed (pinned, allowed, blocked)
peer and its counts. A peer run with the same key file (``--identity``) reads the scores that
``modelnet serve`` or any other run of that key saved beside it."""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

import click
import trio

from ..config import Config
from ..peer import Peer
from .common import make_peer, run_async
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

__all__ = ["reputation_rows", "reputation_table", "status_command"]

#: Seconds between refreshes with --watch.
WATCH_INTERVAL = 2.0
#: Seconds to listen to gossip before the first view.
GOSSIP_WAIT = 3.0
#: Seconds the mesh view and each ping may take.
VIEW_TIMEOUT = 5.0
PING_TIMEOUT = 2.0
#: Seconds between two rounds of following the neighbours' capabilities.
FOLLOW_INTERVAL = 0.5


async def _status_rows(peer: Peer, ping: bool) -> list[dict[str, Any]]:
    rows = []
    for row in await peer.mesh_view(timeout=VIEW_TIMEOUT):
        if row.peer_id == peer.peer_id:
            continue
        d = row.to_dict()
        a = d.get("availability") or {}
        d.update(
            {
                "in_flight": a.get("in_flight"),
                "max_concurrency": a.get("max_concurrency"),
                "latency_ms": a.get("latency_ms"),
                "tokens_per_s": a.get("tokens_per_s"),
                "age_s": a.get("age_s"),
                "rtt_ms": (await peer.ping(row.peer_id, timeout=PING_TIMEOUT)) if ping else None,
                "trust": _trust(peer, row.peer_id),
            }
        )
        rows.append(d)
    return rows


def _trust(peer: Peer, peer_id: str) -> float | None:
    """This peer's trust in ``peer_id``, ``None`` if it has never scored it."""
    return round(peer.reputation.trust(peer_id), 3) if peer_id in peer.reputation else None


def _status_table(rows: list[dict[str, Any]], me: str) -> Any:
    from rich.table import Table

    table = Table(title=f"mesh seen from …{me[-8:]}: {len(rows)} peers")
    for col in ("peer", "state", "capabilities", "load", "latency", "tok/s", "rtt", "age", "trust"):
        table.add_column(col, no_wrap=col != "capabilities")
    for r in rows:
        load = f"{r['in_flight']}/{r['max_concurrency']}" if r["in_flight"] is not None else "-"
        table.add_row(
            "…" + r["peer_id"][-8:],
            r["state"],
            ", ".join(c["name"] for c in r["capabilities"]) or "-",
            load,
            f"{r['latency_ms']:.0f} ms" if r["latency_ms"] else "-",
            f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-",
            f"{r['rtt_ms']:.1f} ms" if r["rtt_ms"] is not None else "-",
            f"{r['age_s']:.1f} s" if r["age_s"] is not None else "-",
            f"{r['trust']:.2f}" if r.get("trust") is not None else "-",
        )
    return table


#: Counts shown in the reputation section, in order.
REPUTATION_COUNTS = ("success", "error", "timeout", "stall", "rejected", "disagreed", "broken_receipt")


def reputation_rows(peer: Peer) -> list[dict[str, Any]]:
    """This peer's reputation of every provider it has scored or its config lists, lowest trust first."""
    return peer.reputation.snapshot()


def reputation_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"reputation: {len(rows)} providers (lowest trust first)")
    for col in ("peer", "trust", "list", *REPUTATION_COUNTS):
        table.add_column(col, no_wrap=True)
    for r in rows:
        counts = [str(r.get(name, 0)) for name in REPUTATION_COUNTS]
        table.add_row("…" + r["peer_id"][-8:], f"{r['trust']:.2f}", r["list"] or "-", *counts)
    return table


def _views(rows: list[dict[str, Any]], peer: Peer) -> Any:
    from rich.console import Group

    scores = reputation_rows(peer)
    return Group(_status_table(rows, peer.peer_id), *([reputation_table(scores)] if scores else []))


@click.command("status")
@click.option("--watch", is_flag=True, help="Refresh live until Ctrl-C.")
@click.option(
    "--interval", default=WATCH_INTERVAL, show_default=True, help="Seconds between refreshes with --watch."
)
@click.option(
    "--wait",
    default=GOSSIP_WAIT,
    show_default=True,
    help="Seconds to listen to gossip before the first view.",
)
@click.option("--no-ping", is_flag=True, help="Do not measure round-trip times.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON line per view).")
@peer_options()
@pass_state
def status_command(
    state: State,
    watch: bool,
    interval: float,
    wait: float,
    no_ping: bool,
    as_json: bool,
    peer: PeerOptions,
) -> None:
    """The mesh as this peer sees it: peers, capabilities, state, load and round-trip time."""
    cfg, _ = state.config(peer)
    require_bootstrap(cfg)
    try:
        run_async(_status, cfg, watch, interval, wait, not no_ping, as_json)
    except KeyboardInterrupt:
        pass


async def _follow_neighbours(peer: Peer) -> None:
    # A view of the mesh follows every capability its neighbours serve (availability costs
    # in proportion to interest: a peer hears only the capabilities it follows).
    while peer.availability is not None:
        peer.availability.follow_neighbours()
        await trio.sleep(FOLLOW_INTERVAL)


async def _status(cfg: Config, watch: bool, interval: float, wait: float, ping: bool, as_json: bool) -> None:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with make_peer(cfg, require_bootstrap=True) as peer, trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            nursery.start_soon(_follow_neighbours, peer)
            if as_json:
                await trio.sleep(wait)
                while True:
                    rows = await _status_rows(peer, ping)
                    view = {"peer_id": peer.peer_id, "time": time.time(), "peers": rows}
                    click.echo(json.dumps({**view, "reputation": reputation_rows(peer)}))
                    sys.stdout.flush()
                    if not watch:
                        break
                    await trio.sleep(interval)
            else:
                with console.status("listening to the mesh..."):
                    await trio.sleep(wait)
                    rows = await _status_rows(peer, ping)
                if not watch:
                    console.print(_views(rows, peer))
                else:
                    with Live(_views(rows, peer), console=console, auto_refresh=False) as live:
                        while True:
                            await trio.sleep(interval)
                            rows = await _status_rows(peer, ping)
                            live.update(_views(rows, peer), refresh=True)
            nursery.cancel_scope.cancel()

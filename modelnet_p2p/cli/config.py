"""``modelnet config show`` and ``modelnet id``: what this node would start with."""

from __future__ import annotations

import json

import click

from ..p2p.identity import Identity
from .options import PeerOptions, State, identity_option, pass_state, peer_options

__all__ = ["config_group", "id_command"]

#: The key file ``modelnet id`` uses when neither --identity nor the configuration names one.
DEFAULT_KEY_FILE = "modelnet.key"


@click.command("id")
@identity_option(
    "--identity",
    dest="identity_path",
    help=f"Key file; created (mode 0600) if missing. Default: the configured identity or {DEFAULT_KEY_FILE}.",
)
@pass_state
def id_command(state: State, identity_path: str | None) -> None:
    """Print this node's peer id, creating the identity file if needed."""
    cfg, _ = state.config(PeerOptions(identity=identity_path))
    ident = Identity.load_or_create(cfg.identity or DEFAULT_KEY_FILE)
    click.echo(str(ident.peer_id))


@click.group("config")
def config_group() -> None:
    """Inspect the configuration."""


@config_group.command("show")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@peer_options()
@pass_state
def config_show(state: State, as_json: bool, peer: PeerOptions) -> None:
    """Print the configuration after merging file, environment and flags, with each value's source."""
    cfg, sources = state.config(peer)
    values = cfg.as_dict()
    if as_json:
        click.echo(json.dumps({"config": values, "sources": sources}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="modelnet configuration", show_lines=False)
    table.add_column("setting")
    table.add_column("value")
    table.add_column("source", style="dim")
    for key, value in values.items():
        shown = ", ".join(value) if isinstance(value, list) else ("" if value is None else str(value))
        table.add_row(key, shown or "-", sources[key])
    Console().print(table)

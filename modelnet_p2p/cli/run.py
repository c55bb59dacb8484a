"""``modelnet run``: a workflow file (pipelines, ensembles, routers, draft-and-verify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..config import Config
from ..errors import ConfigError
from ..mesh.collab import load_workflow, receipt_tree, run_workflow, verify_receipt_tree
from ..proto.receipt import ReceiptError
from .common import make_peer, run_async
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

__all__ = ["run_command"]


@click.command("run")
@click.argument("workflow_file", type=click.Path(dir_okay=False))
@click.option("--input", "input_text", help="Input for the workflow (default: the file's input).")
@click.option("--timeout", type=float, help="Deadline for the whole workflow (default: the file's, or 60 s).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer and the trace tree as JSON.")
@click.option(
    "--receipts",
    "receipts_file",
    type=click.Path(dir_okay=False),
    help="Ask every step for a signed receipt; check the tree of receipts, write it to FILE.",
)
@peer_options()
@pass_state
def run_command(
    state: State,
    workflow_file: str,
    input_text: str | None,
    timeout: float | None,
    as_json: bool,
    receipts_file: str | None,
    peer: PeerOptions,
) -> None:
    """Run a workflow file (pipelines, ensembles, routers, draft-and-verify; see specs/workflow.md)."""
    try:
        text = Path(workflow_file).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read workflow {workflow_file}: {exc.strerror}") from None
    workflow = load_workflow(text)
    cfg, _ = state.config(peer)
    require_bootstrap(cfg, "so the workflow can find models")
    run_async(_run_workflow, cfg, workflow, input_text, timeout, as_json, receipts_file)


async def _run_workflow(
    cfg: Config,
    workflow: dict[str, Any],
    input_text: str | None,
    timeout: float | None,
    as_json: bool,
    receipts_file: str | None = None,
) -> None:
    async with make_peer(cfg, require_bootstrap=True) as peer:
        result = await run_workflow(peer, workflow, input_text, timeout=timeout, receipts=bool(receipts_file))
    if receipts_file:  # specs/inference.md, "Trees of receipts"
        tree = receipt_tree(
            result.trace, workflow.get("input") if input_text is None else input_text, result.output
        )
        Path(receipts_file).write_text(json.dumps(tree))
        try:
            verify_receipt_tree(tree)
        except ReceiptError as exc:
            raise ConfigError(
                f"{receipts_file} written, but its tree of receipts does not hold: {exc}"
            ) from None
        click.echo(f"{receipts_file}: tree of receipts checked and written", err=True)
    if as_json:
        click.echo(json.dumps({"output": result.output, "trace": result.trace.to_json()}, default=repr))
        return
    click.echo(result.text)
    click.echo(click.style(result.trace.render(), dim=True), err=True)

"""``modelnet verify``: check a signed receipt offline (``specs/inference.md``, "Signed receipts")."""

from __future__ import annotations

import json
from typing import Any

import click

from ..errors import ConfigError
from ..mesh.collab import RECEIPT_CHAIN_FORMAT, RECEIPT_TREE_FORMAT, verify_receipt_chain, verify_receipt_tree
from ..proto.receipt import verify_receipt_file

__all__ = ["verify_command"]

#: Largest receipt file read: the receipt itself is at most 4 KiB, but the file may hold the
#: whole answer (its chunks) and the input.
MAX_FILE_SIZE = 64 << 20


def _load(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError(f"{path} is larger than {MAX_FILE_SIZE >> 20} MiB")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON: {exc}") from None


@click.command("verify")
@click.argument("receipt_file", metavar="RECEIPT.json", type=click.Path(dir_okay=False))
@click.option("--provider", metavar="PEER_ID", help="The peer id that must have signed it.")
@click.option("--json", "as_json", is_flag=True, help="Print the verified receipt as JSON.")
def verify_command(receipt_file: str, provider: str | None, as_json: bool) -> None:
    """Check a receipt file offline: its signature, and the chunks (or their digests) and the
    input (or its digest) that the file holds. Exit 0 if it holds, 1 (with the reason) if not."""
    obj = _load(receipt_file)
    if isinstance(obj, dict) and obj.get("format") in (RECEIPT_CHAIN_FORMAT, RECEIPT_TREE_FORMAT):
        steps = (verify_receipt_tree if obj["format"] == RECEIPT_TREE_FORMAT else verify_receipt_chain)(obj)
        if as_json:
            click.echo(json.dumps({"ok": True, "receipts": [r.summary() for r in steps]}, indent=1))
        else:  # specs/inference.md, "Chains of receipts" and "Trees of receipts"
            click.echo(f"ok: {len(steps)} signed steps, every link checked")
            for r in steps:
                click.echo(f"  {r.capability!r} answered by {r.provider} ({r.chunks} chunks)")
        return
    receipt = verify_receipt_file(obj, provider=provider)
    checked = ["signature"]
    if isinstance(obj, dict):
        if "chunks" in obj or "chunk_digests" in obj:
            checked.append("chunks" if "chunks" in obj else "chunk digests")
        if "input" in obj or "input_digest" in obj:
            checked.append("input" if "input" in obj else "input digest")
        if provider or obj.get("provider"):
            checked.append("provider")
    if as_json:
        click.echo(json.dumps({"ok": True, "checked": checked, "receipt": receipt.summary()}, indent=1))
        return
    click.echo(
        f"ok: {receipt.capability!r} answered by {receipt.provider} "
        f"({receipt.chunks} chunks, finish {receipt.finish_reason!r}, "
        f"{receipt.ended_ms - receipt.started_ms} ms); checked: {', '.join(checked)}"
    )
    if "chunks" not in checked and "chunk digests" not in checked:
        click.echo("note: the file holds no chunks nor digests: only the signature was checked", err=True)

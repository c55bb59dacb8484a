"""``modelnet ask``: one request, streamed as it arrives."""

from __future__ import annotations

import json
from typing import Any

import click
import trio

from ..config import Config
from ..errors import ModelNetError
from ..peer import Peer
from ..proto.receipt import ReceiptCheck, receipt_file
from ..services.access import using_token
from .common import make_peer, run_async
from .options import PeerOptions, State, pass_state, peer_options

__all__ = ["ask_command", "parse_params"]

#: Seconds the whole request may take unless --timeout says otherwise.
ASK_TIMEOUT = 60.0


def parse_params(pairs: tuple[str, ...]) -> dict[str, Any]:
    """``k=v`` pairs; values are JSON if they parse as JSON, else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--param")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@click.command("ask")
@click.argument("capability")
@click.argument("prompt")
@click.option("--param", "-p", "params", multiple=True, help="Request parameter key=value (repeatable).")
@click.option(
    "--peer", "target", help="Ask this provider (multiaddr with /p2p/); default: let the mesh choose."
)
@click.option(
    "--timeout", default=ASK_TIMEOUT, show_default=True, help="Deadline for the whole request, in seconds."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming."
)
@click.option(
    "--token",
    envvar="MODELNET_TOKEN",
    help="Capability token to send with the request (`modelnet token issue`; env MODELNET_TOKEN).",
)
@click.option(
    "--receipt", "receipt_out", type=click.Path(dir_okay=False),
    help="Ask for a signed receipt; write it with the prompt and chunks to this file (`modelnet verify`).",
)  # fmt: skip
@peer_options()
@pass_state
def ask_command(
    state: State,
    capability: str,
    prompt: str,
    params: tuple[str, ...],
    target: str | None,
    timeout: float,
    as_json: bool,
    token: str | None,
    receipt_out: str | None,
    peer: PeerOptions,
) -> None:
    """Ask CAPABILITY about PROMPT; stream the answer as it arrives."""
    cfg, _ = state.config(peer)
    if not target and not cfg.bootstrap:
        raise click.UsageError("give --peer ADDR, or --bootstrap ADDR to let the mesh choose")
    with using_token(token.strip() if token else None):
        run_async(_ask, cfg, capability, prompt, parse_params(params), target, timeout, as_json, receipt_out)


async def _ask(
    cfg: Config,
    capability: str,
    prompt: str,
    params: dict[str, Any],
    target: str | None,
    timeout: float,
    as_json: bool,
    receipt_out: str | None = None,
) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("joining the mesh..."):  # shown only on a terminal
        peer = await make_peer(cfg, require_bootstrap=bool(cfg.bootstrap)).__aenter__()
    try:
        await _ask_with(peer, capability, prompt, params, target, timeout, as_json, receipt_out)
    finally:
        await peer.__aexit__(None, None, None)


async def _ask_with(
    peer: Peer,
    capability: str,
    prompt: str,
    params: dict[str, Any],
    target: str | None,
    timeout: float,
    as_json: bool,
    receipt_out: str | None = None,
) -> None:
    started = trio.current_time()
    chunks: list[Any] = []
    asked = receipt_out is not None
    stream = peer.infer(target, capability, prompt, timeout=timeout, receipt=asked, **params)
    async with stream:
        async for chunk in stream:
            chunks.append(chunk)
            if not as_json:
                click.echo(
                    chunk if isinstance(chunk, str) else json.dumps(chunk), nl=not isinstance(chunk, str)
                )
    elapsed = trio.current_time() - started
    info = stream.info
    if receipt_out is not None:
        _write_receipt(receipt_out, info.receipt, prompt, chunks)
    if as_json:
        text = "".join(c for c in chunks if isinstance(c, str))
        click.echo(
            json.dumps(
                {
                    "capability": capability,
                    "peer": info.peer,
                    "chunks": chunks,
                    "text": text,
                    "finish_reason": info.finish_reason,
                    "usage": info.usage,
                    "latency_s": round(elapsed, 4),
                    "trace": {"attempts": info.attempts},
                }
            )
        )
        return
    if chunks and isinstance(chunks[-1], str):
        click.echo()
    if len(info.attempts) > 1:
        for attempt in info.attempts:
            line = f"  tried …{attempt['peer'][-8:]}: {attempt['status']}"
            if attempt.get("error"):
                line += f" ({attempt['error']})"
            click.echo(click.style(line, dim=True), err=True)
    tokens = info.usage.get("tokens", len(chunks))
    click.echo(
        click.style(
            f"— answered by {info.peer} in {elapsed * 1000:.0f} ms, {tokens} tokens, "
            f"finish: {info.finish_reason}",
            dim=True,
        ),
        err=True,
    )


def _write_receipt(path: str, check: ReceiptCheck | None, prompt: str, chunks: list[Any]) -> None:
    """Write the answer's receipt file (``specs/inference.md``, "Signed receipts")."""
    if check is None:
        raise ModelNetError("the provider sent no receipt (it does not sign answers)")
    with open(path, "w") as f:
        json.dump(receipt_file(check.data, input=prompt, chunks=chunks), f, indent=1)
    if check.error is not None:
        raise check.error  # written anyway, so that it can be shown
    click.echo(click.style(f"— signed receipt checked and written to {path}", dim=True), err=True)

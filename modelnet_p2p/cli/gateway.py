"""``modelnet gateway``: the OpenAI API, backed by the mesh."""

from __future__ import annotations

import signal
from functools import partial

import click
import trio

from ..config import Config
from ..openai.keys import GatewayKeys
from ..openai.settings import GatewayConfig
from .common import env_secret, gateway_extra_missing, make_peer, run_async
from .dashboard import metrics_option, serve_until_stopped
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

__all__ = ["gateway_command"]


@click.command("gateway")
@click.option(
    "--listen",
    "http_listen",
    default=GatewayConfig.listen,
    show_default=True,
    help="HOST:PORT of the OpenAI-compatible HTTP API.",
)
@click.option(
    "--api-key-env",
    help="Environment variable holding the bearer token clients must send (required off loopback).",
)
@click.option(
    "--keys-file",
    type=click.Path(dir_okay=False),
    default=GatewayConfig.keys_file,
    help="TOML file of API keys, each with its mesh token and rate limit (mode 0600; see specs/token.md).",
)
@click.option("--no-auth", is_flag=True, help="Allow a non-loopback --listen without a bearer token.")
@click.option(
    "--timeout",
    "request_timeout",
    default=GatewayConfig.request_timeout,
    show_default=True,
    help="Seconds one request may take.",
)
@click.option(
    "--routing",
    type=click.Choice(["mesh", "local"]),
    default=GatewayConfig.routing,
    show_default=True,
    help="Who picks providers: the peer's routing, or the gateway's over discovered providers.",
)
@metrics_option
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@peer_options(
    listen=("--p2p-listen",), listen_help="The peer's listen multiaddr (repeatable).", reachability=False
)
@pass_state
def gateway_command(
    state: State,
    http_listen: str,
    api_key_env: str | None,
    keys_file: str | None,
    no_auth: bool,
    request_timeout: float,
    routing: str,
    metrics_listen: str | None,
    as_json: bool,
    watch_stdin: bool,
    peer: PeerOptions,
) -> None:
    """Serve the OpenAI API (models, chat, completions, embeddings) backed by the mesh, until Ctrl-C.

    \b
    Also: GET /.well-known/agent-card.json, /healthz, /metrics (Prometheus), /dashboard/ (the mesh page).
    """
    cfg, _ = state.config(peer)
    require_bootstrap(cfg, "so the gateway can find models")
    api_key = env_secret(api_key_env, "--api-key-env")
    keys = GatewayKeys.load(keys_file) if keys_file else None  # refused before the peer starts
    try:
        run_async(
            _gateway,
            cfg,
            http_listen,
            api_key,
            keys,
            no_auth,
            request_timeout,
            routing,
            as_json,
            watch_stdin,
            metrics_listen,
        )
    except KeyboardInterrupt:
        pass


async def _gateway(
    cfg: Config,
    http_listen: str,
    api_key: str | None,
    keys: GatewayKeys | None,
    no_auth: bool,
    request_timeout: float,
    routing: str,
    as_json: bool,
    watch_stdin: bool,
    metrics_listen: str | None = None,
) -> None:
    try:
        from ..openai.app import serve_gateway
    except ImportError as exc:
        raise gateway_extra_missing("the gateway needs", exc) from None

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with make_peer(cfg, require_bootstrap=True) as peer:
            binds = await peer.nursery.start(
                partial(
                    serve_gateway,
                    peer,
                    http_listen,
                    api_key,
                    keys=keys,
                    allow_no_auth=no_auth,
                    request_timeout=request_timeout,
                    routing=routing,
                )
            )
            await serve_until_stopped(
                peer,
                "OpenAI-compatible gateway",
                binds,
                http_listen,
                path="/v1",
                metrics_listen=metrics_listen,
                as_json=as_json,
                signals=signals,
                watch_stdin=watch_stdin,
            )

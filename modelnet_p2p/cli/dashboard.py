"""``modelnet dashboard``: a live web page of the mesh, and ``--metrics-listen`` for every command."""

from __future__ import annotations

import signal
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import click
import trio

from ..config import Config
from .common import emit, gateway_extra_missing, make_peer, run_async, wait_for_stop
from .options import PeerOptions, State, pass_state, peer_options, require_bootstrap

if TYPE_CHECKING:
    from ..peer import Peer

__all__ = ["DASHBOARD_LISTEN", "dashboard_command", "metrics_option", "serve_until_stopped", "start_metrics"]

#: Where the dashboard listens unless told otherwise: loopback only.
DASHBOARD_LISTEN = "127.0.0.1:8070"
METRICS_HELP = "Serve Prometheus metrics of this peer on HOST:PORT (GET /metrics)."

F = TypeVar("F", bound=Callable[..., Any])


def metrics_option(fn: F) -> F:
    """The ``--metrics-listen HOST:PORT`` option (also ``MODELNET_METRICS_LISTEN``)."""
    return click.option(
        "--metrics-listen", "metrics_listen", envvar="MODELNET_METRICS_LISTEN", help=METRICS_HELP
    )(fn)


async def start_metrics(peer: Peer, listen: str | None, as_json: bool = False) -> list[str]:
    """Serve ``peer``'s metrics on ``listen`` in its nursery (nothing if ``None``); the URLs."""
    if not listen:
        return []
    from ..dashboard.metrics import peer_registry, serve_metrics

    urls: list[str] = await peer.nursery.start(partial(serve_metrics, peer_registry(peer), listen))
    emit(as_json, "metrics", f"metrics on {', '.join(urls)}", urls=urls)
    return urls


async def serve_until_stopped(
    peer: Peer,
    what: str,
    binds: list[str],
    http_listen: str,
    *,
    path: str,
    metrics_listen: str | None,
    as_json: bool,
    signals: Any,
    watch_stdin: bool,
) -> None:
    """For a web face started on ``binds`` (its URLs): start the metrics, print the ready
    event (``what`` on the first URL and ``path``), and wait for a signal (or stdin's end)."""
    await start_metrics(peer, metrics_listen, as_json)
    url = binds[0] if binds else f"http://{http_listen}"
    text = f"{what} on {url}{path} (peer {peer.peer_id})"
    emit(as_json, "ready", text, url=url, peer_id=peer.peer_id, addrs=peer.addrs)
    await wait_for_stop(signals, watch_stdin)
    emit(as_json, "stopped", "stopped")


@click.command("dashboard")
@click.option(
    "--listen",
    "http_listen",
    default=DASHBOARD_LISTEN,
    show_default=True,
    help="HOST:PORT of the web page (loopback by default).",
)
@metrics_option
@click.option("--json", "as_json", is_flag=True, help="Print events as JSON lines.")
@click.option("--exit-on-stdin-eof", "watch_stdin", is_flag=True, hidden=True)
@peer_options(listen=("--p2p-listen",), listen_help="The peer's listen multiaddr (repeatable).")
@pass_state
def dashboard_command(
    state: State,
    http_listen: str,
    metrics_listen: str | None,
    as_json: bool,
    watch_stdin: bool,
    peer: PeerOptions,
) -> None:
    """Serve a live web page of the mesh (peers, graph, capabilities, traces) until Ctrl-C.

    \b
    Also: GET /api/v1/state (health JSON), /api/v1/mesh, /api/v1/events (SSE), /metrics.
    """
    cfg, _ = state.config(peer)
    require_bootstrap(cfg, "so the dashboard can see the mesh")
    try:
        from ..dashboard.app import serve_dashboard  # noqa: F401  (fail before the peer starts)
    except ImportError as exc:
        raise gateway_extra_missing("the dashboard needs", exc) from None
    try:
        run_async(_dashboard, cfg, http_listen, metrics_listen, as_json, watch_stdin)
    except KeyboardInterrupt:
        pass


async def _dashboard(
    cfg: Config, http_listen: str, metrics_listen: str | None, as_json: bool, watch_stdin: bool
) -> None:
    from ..dashboard.app import serve_dashboard

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with make_peer(cfg, require_bootstrap=True) as peer:
            binds = await peer.nursery.start(partial(serve_dashboard, peer, http_listen))
            await serve_until_stopped(
                peer,
                "dashboard",
                binds,
                http_listen,
                path="/",
                metrics_listen=metrics_listen,
                as_json=as_json,
                signals=signals,
                watch_stdin=watch_stdin,
            )

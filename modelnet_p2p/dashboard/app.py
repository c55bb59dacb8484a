"""The dashboard's HTTP side: a starlette app over a :class:`~.state.MeshWatch`.

================================  ==========================================================
``GET /``                         the page (``static/index.html``; no CDN, no build step)
``GET /static/{app.js,style.css}``  its script and style
``GET /api/v1/state``             the health API (``specs/health-api.md``)
``GET /api/v1/mesh``              everything the page draws, as one JSON object
``GET /api/v1/events``            the same object as server-sent events, on every change
                                  (and at least every :data:`RESEND` s, for the ages)
``GET /metrics``                  Prometheus text (:mod:`.metrics`)
================================  ==========================================================

The page uses relative URLs, so the same app serves at ``/`` (``modelnet dashboard``) or
mounted under a prefix (the gateway's ``/dashboard/``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from .metrics import CONTENT_TYPE, peer_registry, split_listen
from .state import MeshWatch

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..peer import Peer

__all__ = ["MAX_SUBSCRIBERS", "RESEND", "Dashboard", "serve_dashboard"]

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

#: Event streams open at once; more get 503.
MAX_SUBSCRIBERS = 32
#: Seconds between two events when nothing changed (the page's ages stay current).
RESEND = 5.0
#: The static bundle: file name -> content type.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _static(name: str) -> bytes:
    return resources.files(__package__ or "modelnet_p2p.dashboard").joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard of one running peer: ``.app`` (ASGI) and the :class:`MeshWatch` it reads.

    The watch starts in the peer's nursery with the first request (or call
    :meth:`MeshWatch.ensure_running` yourself). ``authorize``: a check every request must
    pass (else 401), e.g. the gateway's bearer token.
    """

    def __init__(
        self,
        peer: Peer,
        *,
        watch: MeshWatch | None = None,
        registry: CollectorRegistry | None = None,
        authorize: Callable[[Request], bool] | None = None,
    ) -> None:
        self.peer = peer
        self.authorize = authorize
        self.watch = watch or MeshWatch(peer)
        self.registry = registry or peer_registry(peer)
        self.subscribers = 0
        self._files = {name: _static(name) for name in STATIC}
        get = ["GET"]
        handlers: list[tuple[str, Handler]] = [
            ("/", self._index),
            ("/static/{name}", self._file),
            ("/api/v1/state", self._state),
            ("/api/v1/mesh", self._mesh),
            ("/api/v1/events", self._events),
            ("/metrics", self._metrics),
        ]
        self.app = Starlette(routes=[Route(path, self._guard(fn), methods=get) for path, fn in handlers])

    def _guard(self, fn: Handler) -> Handler:
        async def handle(request: Request) -> Response:
            if self.authorize is not None and not self.authorize(request):
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            return await fn(request)

        return handle

    async def _index(self, request: Request) -> Response:
        self.watch.ensure_running()
        return Response(self._files["index.html"], media_type=STATIC["index.html"])

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC or name == "index.html":
            return PlainTextResponse("not found\n", status_code=404)
        return Response(self._files[name], media_type=STATIC[name], headers={"cache-control": "no-cache"})

    async def _state(self, request: Request) -> Response:
        self.watch.ensure_running()
        return JSONResponse(self.watch.health())

    async def _mesh(self, request: Request) -> Response:
        self.watch.ensure_running()
        return JSONResponse(self.watch.snapshot())

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)

    async def _events(self, request: Request) -> Response:
        self.watch.ensure_running()
        if self.subscribers >= MAX_SUBSCRIBERS:
            return PlainTextResponse("too many event streams open\n", status_code=503)
        self.subscribers += 1
        return StreamingResponse(
            self._event_body(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    async def _event_body(self) -> AsyncIterator[bytes]:
        try:
            version = -1
            while True:
                snapshot = self.watch.snapshot()
                version = snapshot["version"]
                yield b"event: mesh\ndata: " + json.dumps(snapshot, separators=(",", ":")).encode() + b"\n\n"
                await self.watch.wait_changed(version, RESEND)
        finally:
            self.subscribers -= 1


async def serve_dashboard(
    peer: Peer,
    listen: str = "127.0.0.1:8070",
    *,
    dashboard: Dashboard | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard of ``peer`` on ``listen`` (``HOST:PORT``; port 0 picks one) until cancelled.

    Start it in the peer's nursery; ``task_status.started`` gets the bound URLs.
    """
    split_listen(listen)  # a ConfigError before anything binds
    board = dashboard or Dashboard(peer)
    board.watch.ensure_running()
    config = HyperConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = logging.getLogger("modelnet_p2p.dashboard.http")
    config.graceful_timeout = 1.0
    config.include_server_header = False
    async with trio.open_nursery() as nursery:
        serve: Any = partial(
            hypercorn_serve,
            cast(Any, board.app),
            config,
            shutdown_trigger=shutdown_trigger or trio.sleep_forever,
        )
        binds: list[str] = await nursery.start(serve)
        log.info("dashboard on %s", ", ".join(binds))
        task_status.started(binds)

"""An OpenAI-compatible HTTP API backed by the mesh: ``modelnet gateway``.

::

    modelnet gateway --listen 127.0.0.1:8080 --bootstrap /ip4/.../p2p/...

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="llama3.2:latest", messages=[...], stream=True)

or, from a program (under trio, with a running :class:`~modelnet_p2p.Peer`)::

    binds = await peer.nursery.start(partial(serve_gateway, peer, "127.0.0.1:8080"))

Endpoints:

========================================  ======================================================
``GET /v1/models``, ``/v1/models/{id}``   the mesh's chat, text-generation and embedding
                                          capabilities (found by discovery, cached for
                                          ``discovery_ttl`` seconds), or a static list
``POST /v1/chat/completions``             streamed (SSE, ``data: [DONE]``) or not
``POST /v1/completions``                  streamed or not
``POST /v1/embeddings``                   ``encoding_format`` ``float`` or ``base64``
``GET /.well-known/agent-card.json``      the mesh's capabilities as one A2A agent card
``GET /healthz``                          liveness, peer id, connected peers
``GET /metrics``                          Prometheus text: requests, errors, latency,
                                          time to first chunk, failovers, peers seen
``GET /dashboard/``                       the live mesh page and its health API
                                          (:mod:`modelnet_p2p.dashboard`)
========================================  ======================================================

Requests travel by the conventions of :mod:`modelnet_p2p.openai.conventions`, routed by
the ``model`` field to a capability of that name:

* Every request goes through the peer's one mesh client (``peer.mesh_client``,
  :mod:`modelnet_p2p.mesh.client`): load-aware choice (power of two choices
  over in-flight counts, measured time to first chunk and gossiped load), bans
  that back off, one table of measurements shared with the peer's own calls.
  Models found by discovery are left to the mesh's provider lookup; models
  listed with explicit ``providers`` (or all, with ``routing="local"``) are
  routed among those providers with the gateway's ``policy``.
* Failover: a retryable failure (``unavailable``, ``overloaded``, a provider
  that no longer serves the model) before the first chunk is retried on
  another provider, up to ``max_attempts`` providers in all. A non-streamed
  answer that breaks part-way is started over on a provider not tried yet,
  whatever the capability. A stream that breaks after chunks went out is
  continued on another provider only for an idempotent capability, and only
  if the new answer's first characters match what was sent; only the rest is
  sent on (:mod:`.calls`).
* Errors are OpenAI's error JSON, ``{"error": {"message", "type", "param",
  "code"}}``: unknown model → 404 (``model_not_found``); a provider at
  capacity (``overloaded``) → 429; no provider reachable (``unavailable``) →
  503; deadline → 504 (``x-should-retry: false``); a bad request → 400 with the
  field in ``param``; a bad API key → 401. An error after a stream started is
  sent as a last ``data: {"error": ...}`` event (the ``openai`` client raises it).
* A streamed answer's headers go out with its first chunk, so that an error
  before it keeps its HTTP status. Every answer names the provider that served
  it in ``x-modelnet-peer``. A request may ask for a shorter deadline than
  ``request_timeout`` with the header ``x-modelnet-timeout: <seconds>``.

Auth: with ``api_key`` or ``keys``, every ``/v1`` endpoint and ``/metrics`` need
``Authorization: Bearer <key>``; ``/healthz`` and the agent card stay open.
Listening on an address other than loopback without a key is refused
unless ``allow_no_auth`` is set. ``keys`` (a key file, :mod:`.keys`) maps each
bearer key to a mesh capability token, carried by every mesh request made for
that key (so providers serving with ``--require-token`` see the key's rights), and
to a rate limit: a key over its rate gets 429 with ``Retry-After`` on ``/v1``,
without a mesh call. A provider that refuses the key's token answers 403.

The HTTP server is hypercorn's trio worker running the starlette app in the
peer's own trio loop: no second event loop, and every task stops with the peer.
(uvicorn runs only on asyncio: a second loop in a thread would put a cross-thread
hop on every write.) A streamed answer's events are rendered from a template and
written in batches (:mod:`.sse`), and hypercorn's writes are joined (the headers with the
first events, the last events with the end: :mod:`._hypercorn`); the peer's stream pool
keeps ``warm_streams`` idle streams per provider, so bursts of requests do not open new ones.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from ..dashboard.app import Dashboard
from ..errors import ConfigError, ModelNetError
from ..mesh.routing import POLICIES
from ..services.access import using_token
from . import _hypercorn
from .calls import Caller
from .catalog import Catalog, ModelRoute, agent_card, model_json, routes_from_cards
from .conventions import CHAT, EMBEDDING, OPENAI_TASKS, TEXT_GENERATION
from .errors import GatewayError, from_mesh_error, rate_limited, unauthorized
from .keys import GatewayKey, GatewayKeys, RateLimited, digest
from .metrics import Metrics
from .settings import GatewayConfig
from .sse import EventStream, Frames
from .translate import (
    Answer,
    ChatFrames,
    CompletionFrames,
    batch_texts,
    chat_response,
    completion_response,
    embedding_vectors,
    embeddings_response,
    model_name,
    parse_body,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_timeout,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..peer import Peer

__all__ = [
    "Gateway",
    "GatewayError",
    "Metrics",
    "ModelRoute",
    "is_loopback",
    "routes_from_cards",
    "serve_gateway",
]

log = logging.getLogger(__name__)

#: Largest request body accepted, in bytes.
MAX_BODY = GatewayConfig.max_body
#: Embedding batches sent at once for one request.
EMBEDDING_CONCURRENCY = GatewayConfig.embedding_concurrency

Handler = Callable[[Request], Awaitable[Response]]
#: Where :class:`_KeyToken` leaves the request's :class:`~.keys.GatewayKey` in the ASGI scope.
_SCOPE_KEY = "modelnet.gateway_key"


def _bearer(authorization: str) -> str:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class _KeyToken:
    """ASGI middleware: the mesh requests made for a request carry its API key's token.

    Set around the whole request (its handler and a streamed body after it, and any
    task they start), so a stream that fails over part-way still sends the token.
    """

    def __init__(self, app: Any, keys: GatewayKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        key = self.keys.lookup(_bearer(auth.decode("latin-1")))
        scope[_SCOPE_KEY] = key
        with using_token(key.token if key is not None else None):
            await self.app(scope, receive, send)


class _ErrorResponse(JSONResponse):
    def __init__(self, err: GatewayError) -> None:
        super().__init__(err.body(), status_code=err.status, headers=err.headers)
        self.error_code = err.code or err.type


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen {listen!r} must be HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ConfigError(f"--listen {listen!r} has no host")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Asked(Protocol):
    """What a checked chat or text completion body offers (:class:`.translate.ChatRequest`, ...)."""

    stream: bool
    params: dict[str, Any]
    include_usage: bool

    def input_for(self, tasks: Sequence[str]) -> Any: ...


@dataclass(frozen=True)
class _Generation:
    """How one of the two text endpoints differs from the other; :meth:`Gateway._generate` does the rest."""

    endpoint: str
    id_prefix: str
    tasks: tuple[str, ...]
    what: str
    parse: Callable[[Mapping[str, Any]], _Asked]
    frames: Callable[[str, int, str, bool], Frames]
    respond: Callable[[str, int, str, Answer], dict[str, Any]]


_CHAT = _Generation(
    endpoint="/v1/chat/completions",
    id_prefix="chatcmpl-",
    tasks=(CHAT, TEXT_GENERATION),
    what="chat completions",
    parse=parse_chat,
    frames=ChatFrames,
    respond=chat_response,
)
_COMPLETIONS = _Generation(
    endpoint="/v1/completions",
    id_prefix="cmpl-",
    tasks=(TEXT_GENERATION, CHAT),
    what="text completions",
    parse=parse_completion,
    frames=CompletionFrames,
    respond=completion_response,
)


class Gateway:
    """The OpenAI API over a running :class:`~modelnet_p2p.Peer` (see the module docstring).

    The defaults are :class:`~.settings.GatewayConfig`'s.

    Args:
        peer: a running peer (inside ``async with``).
        models: a static list of routes; ``None`` (the default): the mesh's
            capabilities, found by discovery.
        api_key: a bearer key clients may send (no token, no rate limit); ``None``: no such key.
        keys: API keys with their mesh tokens and rates (:class:`~.keys.GatewayKeys`, or the
            path of a key file); with neither ``api_key`` nor ``keys``: no auth.
        request_timeout: seconds each request may take, unless the client sends
            a smaller ``x-modelnet-timeout`` header.
        tasks: the tasks looked up for ``/v1/models``.
        discovery_ttl: seconds the discovered model list is reused.
        lookup_timeout: seconds one discovery lookup may take.
        max_attempts: providers tried for one request.
        routing: for models found by discovery, ``"mesh"`` (the mesh's own
            provider lookup) or ``"local"`` (only the providers the gateway's
            discovery found). Models with explicit ``providers`` always go to those.
        policy: the routing policy for a route's own providers
            (:data:`modelnet_p2p.mesh.routing.POLICIES`).
        warm_streams: idle streams the peer's stream pool keeps per provider, at least
            (:attr:`~.settings.GatewayConfig.warm_streams`).
    """

    def __init__(
        self,
        peer: Peer,
        *,
        models: Sequence[ModelRoute] | None = None,
        api_key: str | None = None,
        keys: GatewayKeys | str | os.PathLike[str] | None = None,
        request_timeout: float = GatewayConfig.request_timeout,
        tasks: Sequence[str] = OPENAI_TASKS,
        discovery_ttl: float = GatewayConfig.discovery_ttl,
        lookup_timeout: float = GatewayConfig.lookup_timeout,
        max_attempts: int = GatewayConfig.max_attempts,
        routing: str = GatewayConfig.routing,
        policy: str = GatewayConfig.policy,
        warm_streams: int = GatewayConfig.warm_streams,
    ) -> None:
        if routing not in ("mesh", "local"):
            raise ConfigError(f"routing must be mesh or local, not {routing!r}")
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        if policy not in POLICIES:
            raise ConfigError(f"unknown routing policy {policy!r} (known: {', '.join(POLICIES)})")
        if warm_streams < 0:
            raise ConfigError("warm_streams must not be negative")
        self.peer = peer
        # Keep a warm stream for each of up to warm_streams concurrent requests to a provider:
        # the pool's own bound (8) closes the rest after every burst, to be opened again.
        peer.stream_pool.per_peer = max(peer.stream_pool.per_peer, warm_streams)
        self.api_key = api_key or None
        self.keys = _all_keys(keys, self.api_key)
        self.request_timeout = request_timeout
        self.metrics = Metrics(peer)
        self.catalog = Catalog(peer, models, tasks, discovery_ttl, lookup_timeout)
        self.calls = Caller(
            peer.mesh_client,
            self.catalog,
            self.metrics,
            max_attempts=max_attempts,
            routing=routing,
            policy=policy,
        )
        self.started = int(time.time())
        #: Where the gateway listens (``http://host:port``), once serving.
        self.base_url = ""
        get, post = ["GET"], ["POST"]
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._wrap("/v1/models", self._models), methods=get),
                Route("/v1/models/{model:path}", self._wrap("/v1/models/{model}", self._model), methods=get),
                Route("/v1/chat/completions", self._wrap("/v1/chat/completions", self._chat), methods=post),
                Route("/v1/completions", self._wrap("/v1/completions", self._completions), methods=post),
                Route("/v1/embeddings", self._wrap("/v1/embeddings", self._embeddings), methods=post),
                Route(
                    "/.well-known/agent-card.json",
                    self._wrap("/.well-known/agent-card.json", self._agent_card, auth=False),
                    methods=get,
                ),
                Route("/healthz", self._wrap("/healthz", self._healthz, auth=False), methods=get),
                Route("/metrics", self._wrap("/metrics", self._metrics), methods=get),
                # the mesh page (modelnet_p2p.dashboard), behind the same bearer token if any
                Mount("/dashboard", app=Dashboard(peer, authorize=self._authorized).app),
            ],
            middleware=[] if self.keys is None else [Middleware(_KeyToken, keys=self.keys)],
        )

    async def serve(
        self,
        listen: str = GatewayConfig.listen,
        *,
        allow_no_auth: bool = False,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve HTTP on ``listen`` (``HOST:PORT``; port 0 picks one) until cancelled or ``shutdown_trigger``.

        ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:8080"]``).
        """
        host, _ = split_listen(listen)
        if not is_loopback(host) and self.keys is None and not allow_no_auth:
            raise ConfigError(
                f"the gateway would listen on {host}, which is not loopback, without auth: "
                "give an API key (--api-key-env VAR), or allow it explicitly (--no-auth)"
            )
        config = HyperConfig()
        config.bind = [listen]
        config.accesslog = None
        config.errorlog = logging.getLogger("modelnet_p2p.gateway.http")
        config.graceful_timeout = 2.0
        config.keep_alive_timeout = 75.0
        config.include_server_header = False
        _hypercorn.install()  # headers with the first events, the last events with the end
        async with trio.open_nursery() as nursery:
            serve = partial(
                hypercorn_serve,
                cast(Any, self.app),
                config,
                shutdown_trigger=shutdown_trigger or trio.sleep_forever,
            )
            binds: list[str] = await nursery.start(serve)
            self.base_url = binds[0] if binds else ""
            log.info("OpenAI-compatible gateway on %s", ", ".join(binds))
            task_status.started(binds)

    # -- plumbing --------------------------------------------------------------------------

    def _key(self, request: Request) -> GatewayKey | None:
        """The request's API key entry (found by :class:`_KeyToken`), or ``None``."""
        if self.keys is None:
            return None
        if _SCOPE_KEY in request.scope:
            return cast("GatewayKey | None", request.scope[_SCOPE_KEY])
        return self.keys.lookup(_bearer(request.headers.get("authorization", "")))

    def _authorized(self, request: Request) -> bool:
        return self.keys is None or self._key(request) is not None

    def _admit(self, endpoint: str, request: Request) -> None:
        """Raise the 401 of a missing or wrong key, or the 429 of a key over its rate."""
        if self.keys is None:
            return
        key = self._key(request)
        if key is None:
            raise unauthorized()
        if endpoint.startswith("/v1/"):
            try:
                self.keys.take(key)
            except RateLimited as exc:
                log.debug("API key %r over its rate of %s/min", key.name, key.rate)
                raise rate_limited(str(exc), exc.retry_after, key.rate) from None

    def _wrap(self, endpoint: str, fn: Handler, auth: bool = True) -> Handler:
        """``fn`` behind auth, with errors as OpenAI's error JSON, counted in the metrics."""

        async def handle(request: Request) -> Response:
            started = trio.current_time()
            self.metrics.in_flight += 1
            streaming = False
            try:
                try:
                    if auth:
                        self._admit(endpoint, request)
                    response = await fn(request)
                except GatewayError as exc:
                    response = _ErrorResponse(exc)
                except ModelNetError as exc:
                    response = _ErrorResponse(from_mesh_error(exc))
                if isinstance(response, EventStream):
                    streaming = True
                    outcome = response.outcome

                    def done() -> None:
                        self.metrics.in_flight -= 1
                        err = outcome.error
                        status, code = (err.status, err.code) if err else (200, None)
                        self.metrics.done(endpoint, status, trio.current_time() - started, code)

                    response.on_done = done
                    return response
                code = response.error_code if isinstance(response, _ErrorResponse) else None
                self.metrics.done(endpoint, response.status_code, trio.current_time() - started, code)
                return response
            finally:
                if not streaming:
                    self.metrics.in_flight -= 1

        return handle

    async def _body(self, request: Request) -> dict[str, Any]:
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise GatewayError(
                    413, f"request body larger than {MAX_BODY} bytes", code="request_too_large"
                )
            parts.append(part)
        return parse_body(b"".join(parts))

    def _deadline(self, request: Request) -> float:
        timeout = parse_timeout(request.headers.get("x-modelnet-timeout"), self.request_timeout)
        return trio.current_time() + timeout

    async def _route(self, body: Mapping[str, Any], wanted: Sequence[str], what: str) -> ModelRoute:
        model = model_name(body)
        route = await self.catalog.resolve(model)
        if route is None:
            raise GatewayError(
                404,
                f"The model `{model}` does not exist or no peer in the mesh serves it.",
                param="model",
                code="model_not_found",
            )
        if not set(wanted) & set(route.tasks):
            raise GatewayError(
                400,
                f"The model `{route.name}` ({', '.join(route.tasks)}) does not serve {what}.",
                param="model",
                code="invalid_model",
            )
        return route

    async def _stream(
        self,
        endpoint: str,
        route: ModelRoute,
        input: Any,
        params: dict[str, Any],
        deadline: float,
        frames: Frames,
    ) -> EventStream:
        rest, outcome, first = await self.calls.start(endpoint, route, input, params, deadline)
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-modelnet-peer": outcome.peer}
        return EventStream(rest, outcome, first, frames, headers)

    # -- endpoints -------------------------------------------------------------------------

    async def _models(self, request: Request) -> Response:
        routes = sorted(await self.catalog.routes(), key=lambda r: r.name)
        return JSONResponse({"object": "list", "data": [model_json(r, self.started) for r in routes]})

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        route = await self.catalog.resolve(name)
        if route is None:
            raise GatewayError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        return JSONResponse(model_json(route, self.started))

    async def _chat(self, request: Request) -> Response:
        return await self._generate(request, _CHAT)

    async def _completions(self, request: Request) -> Response:
        return await self._generate(request, _COMPLETIONS)

    async def _generate(self, request: Request, kind: _Generation) -> Response:
        """A chat or text completion: streamed as server-sent events, or answered whole."""
        body = await self._body(request)
        deadline = self._deadline(request)
        asked = kind.parse(body)
        route = await self._route(body, kind.tasks, kind.what)
        cid, created, endpoint = kind.id_prefix + secrets.token_hex(12), int(time.time()), kind.endpoint
        input = asked.input_for(route.tasks)
        if asked.stream:
            frames = kind.frames(cid, created, route.name, asked.include_usage)
            return await self._stream(endpoint, route, input, asked.params, deadline, frames)
        chunks, outcome = await self.calls.collect(endpoint, route, input, asked.params, deadline)
        answer = Answer(chunks, outcome.finish_reason, outcome.usage)
        return JSONResponse(
            kind.respond(cid, created, route.name, answer), headers={"x-modelnet-peer": outcome.peer}
        )

    async def _embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        deadline = self._deadline(request)
        asked = parse_embeddings(body)
        route = await self._route(body, (EMBEDDING,), "embeddings")
        batches = batch_texts(asked.texts)
        results = await self.calls.collect_all(
            "/v1/embeddings", route, batches, asked.params, deadline, concurrency=EMBEDDING_CONCURRENCY
        )
        done = [
            (embedding_vectors(chunks, len(batch), o.peer), o)
            for batch, (chunks, o) in zip(batches, results, strict=True)
        ]
        answer = embeddings_response(route.name, asked.encoding, [(v, o.usage) for v, o in done])
        peers = ",".join(dict.fromkeys(o.peer for _, o in done))
        return JSONResponse(answer, headers={"x-modelnet-peer": peers})

    async def _agent_card(self, request: Request) -> Response:
        card = agent_card(
            await self.catalog.routes(),
            base_url=str(request.base_url),
            peer_id=self.peer.peer_id,
            network=self.peer.network,
            bearer=self.keys is not None,
        )
        return JSONResponse(card)

    def _connected_peers(self) -> int:
        try:
            return len(self.peer.host.get_network().get_connections_map())
        except Exception:
            return 0

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "peer_id": self.peer.peer_id,
                "network": self.peer.network,
                "connected_peers": self._connected_peers(),
                "models": len(self.catalog.cached),
            }
        )

    async def _metrics(self, request: Request) -> Response:
        gauges = {
            "modelnet_gateway_peers_seen": (
                "Provider peers seen (by discovery or answering).",
                float(len(self.catalog.peers_seen)),
            ),
            "modelnet_gateway_connected_peers": ("Peers connected now.", float(self._connected_peers())),
            "modelnet_gateway_models": ("Models known now.", float(len(self.catalog.cached))),
        }
        text = self.metrics.render(gauges)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _all_keys(keys: GatewayKeys | str | os.PathLike[str] | None, api_key: str | None) -> GatewayKeys | None:
    """The gateway's keys: those of ``keys`` (a key file's path is read), and ``api_key``."""
    loaded = GatewayKeys.load(keys) if isinstance(keys, str | os.PathLike) else keys
    if api_key is None:
        return loaded
    extra = GatewayKey(name="api-key", sha256=digest(api_key))
    if loaded is None:
        return GatewayKeys([extra])
    loaded.add(extra)
    return loaded


async def serve_gateway(
    peer: Peer,
    listen: str = GatewayConfig.listen,
    api_key: str | None = None,
    *,
    allow_no_auth: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve the OpenAI API backed by ``peer``'s mesh on ``listen`` until cancelled.

    Start it in the peer's nursery so it stops with the peer::

        binds = await peer.nursery.start(partial(serve_gateway, peer, "127.0.0.1:8080"))

    ``options`` go to :class:`Gateway` (``models``, ``request_timeout``, ...).
    """
    gateway = Gateway(peer, api_key=api_key, **options)
    await gateway.serve(
        listen, allow_no_auth=allow_no_auth, shutdown_trigger=shutdown_trigger, task_status=task_status
    )

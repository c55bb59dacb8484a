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
========================================  ======================================================

Requests travel by the conventions of :mod:`modelnet_p2p.openai.conventions`, routed by
the ``model`` field to a capability of that name:

* Models found by discovery go to the mesh's own routing
  (``peer.infer(None, ...)``: load-aware choice from discovery and
  availability gossip, failover, mid-stream replay for idempotent
  capabilities). Models listed with explicit ``providers`` (or all, with
  ``routing="local"``) are routed by the gateway itself with the same
  :class:`~modelnet_p2p.mesh.routing.Router` (power of two choices over in-flight
  counts, measured time to first chunk and gossiped load, bans that back off).
* Failover: a retryable failure (``unavailable``, ``overloaded``, a provider
  that no longer serves the model) before the first chunk is retried on
  another provider, up to ``max_attempts`` providers in all. A non-streamed
  answer is retried from scratch whatever its progress, on a provider not
  tried yet (also when the mesh itself would not replay it). A stream that
  breaks after chunks went out is continued on another provider only for an
  idempotent capability: under local routing the replay's first characters
  must match what was sent, and only the rest is sent on.
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

Auth: with ``api_key``, every ``/v1`` endpoint and ``/metrics`` need
``Authorization: Bearer <api_key>``; ``/healthz`` and the agent card stay open.
Listening on an address other than loopback without an ``api_key`` is refused
unless ``allow_no_auth`` is set.

The HTTP server is hypercorn's trio worker running the starlette app in the
peer's own trio loop: no second event loop, and every task stops with the peer.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import logging
import math
import secrets
import struct
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..errors import (
    BadRequestError,
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthorizedError,
    UnavailableError,
)
from ..mesh.routing import Candidate, Router
from ..proto.card import CapabilityCard, normalize
from .conventions import (
    CHAT,
    EMBEDDING,
    EMBEDDING_BATCH,
    GENERATION_PARAMS,
    OPENAI_TASKS,
    TEXT_GENERATION,
    error_param,
    messages_to_prompt,
    vectors_of,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..peer import InferenceStream, Peer

__all__ = ["Gateway", "GatewayError", "Metrics", "ModelRoute", "routes_from_cards", "serve_gateway"]

log = logging.getLogger(__name__)

#: Seconds a request may take when the client does not say (header ``x-modelnet-timeout``).
DEFAULT_REQUEST_TIMEOUT = 600.0
#: Largest request body accepted, in bytes.
MAX_BODY = 8 * 1024 * 1024
#: Embedding batches sent at once for one request.
EMBEDDING_CONCURRENCY = 4
#: Server-sent events produced ahead of the HTTP writer.
SSE_BUFFER = 64
#: Bytes of input text in one mesh embedding request (the frame limit is 1 MiB).
EMBEDDING_BATCH_BYTES = 256 * 1024
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})


# -- routes: what the gateway can call -----------------------------------------------------


@dataclass(frozen=True)
class ModelRoute:
    """A model the gateway serves, and where to send it.

    Attributes:
        name: the capability name, which is the OpenAI ``model``.
        tasks: its tasks (:data:`modelnet_p2p.openai.conventions.OPENAI_TASKS` and others).
        providers: targets (multiaddrs ending in ``/p2p/<id>``, or peer ids)
            serving it. Empty: leave the choice to the mesh's routing.
        idempotent: a broken stream may be replayed on another provider.
        discovered: found by discovery (the mesh's routing may be used) rather
            than configured.
    """

    name: str
    tasks: tuple[str, ...] = (CHAT, TEXT_GENERATION)
    providers: tuple[str, ...] = ()
    idempotent: bool = False
    description: str = ""
    tags: tuple[str, ...] = ()
    max_concurrency: int | None = None
    input_modalities: tuple[str, ...] = ()
    output_modalities: tuple[str, ...] = ()
    discovered: bool = False


def _peer_of(target: str) -> str:
    return target.rsplit("/p2p/", 1)[1] if "/p2p/" in target else target


def routes_from_cards(
    cards: Sequence[CapabilityCard], own_peer_id: str = "", tasks: Sequence[str] = OPENAI_TASKS
) -> dict[str, ModelRoute]:
    """One route per capability name (normalized) that has one of ``tasks``, over every card.

    A capability is idempotent only if every provider says so. ``own_peer_id``
    (the gateway's own peer, which cannot call itself) is left out.
    """
    wanted = {normalize(t) for t in tasks}
    acc: dict[str, dict[str, Any]] = {}
    for card in sorted(cards, key=lambda c: c.peer_id):
        if card.peer_id == own_peer_id:
            continue
        addrs = sorted(card.dial_addrs, key=lambda a: "/p2p-circuit" in a)
        target = addrs[0] if addrs else card.peer_id
        for cap in card.capabilities:
            if not wanted & {normalize(t) for t in cap.tasks}:
                continue
            entry = acc.setdefault(
                normalize(cap.name),
                {
                    "name": cap.name,
                    "tasks": list(cap.tasks),
                    "providers": [],
                    "idempotent": True,
                    "description": cap.description,
                    "tags": list(cap.tags),
                    "max_concurrency": cap.max_concurrency,
                    "input_modalities": cap.input_modalities,
                    "output_modalities": cap.output_modalities,
                },
            )
            entry["tasks"] += [t for t in cap.tasks if t not in entry["tasks"]]
            entry["tags"] += [t for t in cap.tags if t not in entry["tags"]]
            entry["idempotent"] = entry["idempotent"] and cap.idempotent
            if target not in entry["providers"]:
                entry["providers"].append(target)
    return {
        key: ModelRoute(
            name=e["name"],
            tasks=tuple(e["tasks"]),
            providers=tuple(e["providers"]),
            idempotent=e["idempotent"],
            description=e["description"],
            tags=tuple(e["tags"]),
            max_concurrency=e["max_concurrency"],
            input_modalities=tuple(e["input_modalities"]),
            output_modalities=tuple(e["output_modalities"]),
            discovered=True,
        )
        for key, e in acc.items()
    }


class Catalog:
    """The models the gateway can route to: a static list, or the mesh's (via discovery, cached)."""

    def __init__(
        self,
        peer: Peer,
        static: Sequence[ModelRoute] | None,
        tasks: Sequence[str],
        ttl: float,
        lookup_timeout: float,
    ) -> None:
        self.peer = peer
        self.tasks = tuple(tasks)
        self.ttl = ttl
        self.lookup_timeout = lookup_timeout
        self._static = None if static is None else {normalize(r.name): r for r in static}
        self._routes: dict[str, ModelRoute] = {}
        self._fetched_at = -math.inf
        self._refreshing = False
        self._lock = trio.Lock()
        self._missing: dict[str, float] = {}
        #: Every provider peer id discovery ever returned.
        self.peers_seen: set[str] = set()
        if static is not None:
            for route in static:
                self.peers_seen.update(_peer_of(t) for t in route.providers)

    @property
    def cached(self) -> list[ModelRoute]:
        """The routes known now, without a lookup."""
        return list((self._static if self._static is not None else self._routes).values())

    async def routes(self) -> list[ModelRoute]:
        """Every route; looks the mesh up if the cache is empty, refreshes it in the background if stale."""
        if self._static is not None:
            return list(self._static.values())
        age = trio.current_time() - self._fetched_at
        if self._fetched_at == -math.inf:
            await self.refresh()
        elif age > self.ttl and not self._refreshing:
            self._refreshing = True
            self.peer.nursery.start_soon(self._background_refresh)
        return list(self._routes.values())

    async def _background_refresh(self) -> None:
        try:
            await self.refresh()
        finally:
            self._refreshing = False

    async def refresh(self) -> None:
        """Look up every provider of the catalog's tasks now."""
        async with self._lock:
            if trio.current_time() - self._fetched_at < min(self.ttl, 0.5):
                return  # another request just did it
            cards: dict[str, CapabilityCard] = {}

            async def lookup(task: str) -> None:
                try:
                    found = await self.peer.discover(task=task, timeout=self.lookup_timeout)
                except ModelNetError as exc:
                    log.debug("discovery of task %s failed: %s", task, exc)
                    return
                for card in found:
                    old = cards.get(card.peer_id)
                    if old is None or card.seq > old.seq:
                        cards[card.peer_id] = card

            async with trio.open_nursery() as nursery:
                for task in self.tasks:
                    nursery.start_soon(lookup, task)
            self._routes = routes_from_cards(list(cards.values()), self.peer.peer_id, self.tasks)
            self.peers_seen.update(p for p in cards if p != self.peer.peer_id)
            self._fetched_at = trio.current_time()

    async def resolve(self, name: str) -> ModelRoute | None:
        """The route of model ``name`` (case-insensitive), looking the mesh up for a name not cached."""
        key = normalize(name)
        if self._static is not None:
            return self._static.get(key)
        await self.routes()
        route = self._routes.get(key)
        if route is not None:
            return route
        now = trio.current_time()
        if self._missing.get(key, -math.inf) > now:
            return None
        try:
            cards = await self.peer.discover(model=name, timeout=self.lookup_timeout)
        except ModelNetError:
            cards = []
        found = routes_from_cards(cards, self.peer.peer_id, self.tasks).get(key)
        if found is None:
            if len(self._missing) > 1024:
                self._missing.clear()
            self._missing[key] = now + self.ttl
            return None
        self.peers_seen.update(c.peer_id for c in cards if c.peer_id != self.peer.peer_id)
        self._routes[key] = found
        return found


# -- metrics ---------------------------------------------------------------------------------

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(_BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(_BUCKETS):
            if value <= bound:
                self.counts[i] += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())


class Metrics:
    """The gateway's counters, rendered in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.first_chunk: dict[str, _Histogram] = {}
        self.chunks: Counter[str] = Counter()
        self.failovers = 0
        self.in_flight = 0

    def done(self, endpoint: str, status: int, seconds: float, error_code: str | None) -> None:
        self.requests[(endpoint, str(status))] += 1
        if error_code:
            self.errors[(endpoint, error_code)] += 1
        self.latency.setdefault(endpoint, _Histogram()).observe(seconds)

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("modelnet_gateway_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f"modelnet_gateway_requests_total{{{_labels(endpoint=endpoint, status=status)}}} {n}")
        head("modelnet_gateway_errors_total", "counter", "Requests that failed, by endpoint and error code.")
        for (endpoint, code), n in sorted(self.errors.items()):
            out.append(f"modelnet_gateway_errors_total{{{_labels(endpoint=endpoint, code=code)}}} {n}")
        for name, table, text in (
            ("modelnet_gateway_request_duration_seconds", self.latency, "Seconds from request to last byte."),
            (
                "modelnet_gateway_first_chunk_seconds",
                self.first_chunk,
                "Seconds from request to first chunk.",
            ),
        ):
            head(name, "histogram", text)
            for endpoint, h in sorted(table.items()):
                for bound, count in zip(_BUCKETS, h.counts, strict=True):
                    labels = _labels(endpoint=endpoint, le=repr(bound))
                    out.append(f"{name}_bucket{{{labels}}} {count}")
                out.append(f"{name}_bucket{{{_labels(endpoint=endpoint, le='+Inf')}}} {h.n}")
                out.append(f"{name}_sum{{{_labels(endpoint=endpoint)}}} {h.total:.6f}")
                out.append(f"{name}_count{{{_labels(endpoint=endpoint)}}} {h.n}")
        head("modelnet_gateway_chunks_total", "counter", "Chunks received from the mesh, by endpoint.")
        for endpoint, n in sorted(self.chunks.items()):
            out.append(f"modelnet_gateway_chunks_total{{{_labels(endpoint=endpoint)}}} {n}")
        head("modelnet_gateway_failovers_total", "counter", "Requests moved to another provider.")
        out.append(f"modelnet_gateway_failovers_total {self.failovers}")
        head("modelnet_gateway_in_flight", "gauge", "Requests being answered now.")
        out.append(f"modelnet_gateway_in_flight {self.in_flight}")
        for name, (text, value) in gauges.items():
            head(name, "gauge", text)
            out.append(f"{name} {value:g}")
        return "\n".join(out) + "\n"


# -- errors ------------------------------------------------------------------------------------


class GatewayError(Exception):
    """An error answer in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> _ErrorResponse:
        return _ErrorResponse(self)


class _ErrorResponse(JSONResponse):
    def __init__(self, err: GatewayError) -> None:
        super().__init__(err.body(), status_code=err.status, headers=err.headers)
        self.error_code = err.code or err.type


def _invalid(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


def from_mesh_error(exc: ModelNetError) -> GatewayError:
    """The HTTP answer for a mesh error (see the module docstring)."""
    if isinstance(exc, NotFoundError):
        return GatewayError(
            404,
            f"No reachable peer serves this model: {exc.message}",
            param="model",
            code="model_not_found",
        )
    if isinstance(exc, OverloadedError):
        return GatewayError(
            429, exc.message, "rate_limit_error", code="overloaded", headers={"retry-after": "1"}
        )
    if isinstance(exc, UnavailableError | CancelledError):
        return GatewayError(503, exc.message, "server_error", code=exc.code, headers={"retry-after": "1"})
    if isinstance(exc, DeadlineExceededError):
        return GatewayError(
            504, exc.message, "server_error", code="deadline_exceeded", headers={"x-should-retry": "false"}
        )
    if isinstance(exc, BadRequestError | ConfigError):
        return GatewayError(400, exc.message, param=error_param(exc), code="bad_request")
    if isinstance(exc, UnauthorizedError):
        return GatewayError(403, exc.message, "permission_error", code="unauthorized")
    if isinstance(exc, ProtocolError):
        return GatewayError(502, exc.message, "server_error", code="protocol_error")
    return GatewayError(500, exc.message, "server_error", code=exc.code)


def _retryable(exc: ModelNetError) -> bool:
    return exc.retryable or isinstance(exc, OverloadedError | NotFoundError)


# -- request parsing ---------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


_NUMBER_PARAMS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "repetition_penalty",
)
_INT_PARAMS = ("max_tokens", "seed", "top_k")


def _generation_params(body: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key in GENERATION_PARAMS:
        value = body.get(key)
        if value is None:
            continue
        if key in _NUMBER_PARAMS and not _is_number(value):
            raise _invalid(key, f"'{key}' must be a number", "invalid_type")
        if key in _INT_PARAMS and not _is_int(value):
            raise _invalid(key, f"'{key}' must be an integer", "invalid_type")
        if key == "stop" and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
        ):
            raise _invalid(key, "'stop' must be a string or a list of strings", "invalid_type")
        if key in ("logit_bias", "response_format") and not isinstance(value, dict):
            raise _invalid(key, f"'{key}' must be an object", "invalid_type")
        if key == "user" and not isinstance(value, str):
            raise _invalid(key, "'user' must be a string", "invalid_type")
        params[key] = value
    mct = body.get("max_completion_tokens")
    if mct is not None:
        if not _is_int(mct):
            raise _invalid(
                "max_completion_tokens", "'max_completion_tokens' must be an integer", "invalid_type"
            )
        params.setdefault("max_tokens", mct)
    if "max_tokens" in params and params["max_tokens"] < 1:
        raise _invalid("max_tokens", "'max_tokens' must be at least 1")
    return params


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(key, f"'{key}' must be a boolean", "invalid_type")
    return value


def _unsupported(body: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = body.get(key)
        if key == "n":
            if value not in (None, 1):
                raise _invalid("n", "only 'n': 1 is supported by this gateway", "unsupported_value")
        elif value not in (None, False, [], {}, 0):
            raise _invalid(key, f"'{key}' is not supported by this gateway", "unsupported_parameter")


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages", "Missing required parameter: 'messages'.", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "'messages' must be a non-empty array of messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid("messages", f"'messages[{i}]' must be an object", "invalid_type")
        if m.get("role") not in _ROLES:
            raise _invalid("messages", f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _invalid(
                "messages", f"'messages[{i}].content' must be a string or an array", "invalid_type"
            )
    return messages


def _text_of(chunk: Any) -> str:
    return chunk if isinstance(chunk, str) else json.dumps(chunk, default=repr)


def _finish(reason: str | None) -> str:
    return reason if reason in _FINISH_REASONS else "stop"


def _usage(usage: Mapping[str, Any], completion_chunks: int) -> dict[str, int]:
    def num(key: str) -> int | None:
        value: Any = usage.get(key)
        return int(value) if _is_number(value) else None

    prompt = num("prompt_tokens") or 0
    completion = num("completion_tokens")
    if completion is None:
        completion = num("tokens")
    if completion is None:
        completion = completion_chunks
    total = num("total_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": total if total is not None else prompt + completion,
    }


def _split_listen(listen: str) -> tuple[str, int]:
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


# -- streaming answers -------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one routed request produced besides its chunks."""

    peer: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    first_chunk_at: float | None = None
    error: GatewayError | None = None


class _Reset:
    """Yielded by a buffered routed request when an attempt failed: drop the chunks so far."""


_RESET = _Reset()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that stops its source when the client goes away.

    The body is pulled from ``events`` while a second task watches for the
    client's disconnect; either way the source is closed (which cancels the
    mesh request) before ``on_done`` is called.
    """

    def __init__(
        self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str], outcome: _Outcome
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=dict(headers))
        self.events = events
        self.outcome = outcome
        self.on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The events are produced in one task and written in another, which joins
        # every event that is ready into one write: a burst of chunks from the mesh
        # costs one HTTP write, and the first event never waits for company.
        to_writer, from_producer = trio.open_memory_channel[bytes](SSE_BUFFER)
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            nursery.cancel_scope.cancel()
                            return

                async def produce() -> None:
                    async with to_writer:
                        async for data in self.events:
                            try:
                                to_writer.send_nowait(data)
                            except trio.WouldBlock:
                                await to_writer.send(data)

                nursery.start_soon(watch)
                nursery.start_soon(produce)
                async with from_producer:
                    async for data in from_producer:
                        batch = [data]
                        while True:
                            try:
                                batch.append(from_producer.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        body = b"".join(batch) if len(batch) > 1 else data
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await self.events.aclose()
            if self.on_done is not None:
                self.on_done()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# -- the gateway --------------------------------------------------------------------------------


class Gateway:
    """The OpenAI API over a running :class:`~modelnet_p2p.Peer` (see the module docstring).

    Args:
        peer: a running peer (inside ``async with``).
        models: a static list of routes; ``None`` (the default): the mesh's
            capabilities, found by discovery.
        api_key: the bearer token clients must send; ``None``: no auth.
        request_timeout: seconds each request may take, unless the client sends
            a smaller ``x-modelnet-timeout`` header.
        tasks: the tasks looked up for ``/v1/models``.
        discovery_ttl: seconds the discovered model list is reused.
        lookup_timeout: seconds one discovery lookup may take.
        max_attempts: providers tried for one request.
        routing: for models found by discovery, ``"mesh"`` (the peer's own
            routing, ``peer.infer(None, ...)``) or ``"local"`` (the gateway's,
            over the providers discovery found). Models with explicit
            ``providers`` are always routed by the gateway.
        policy: the local routing policy (:data:`modelnet_p2p.mesh.routing.POLICIES`).
    """

    def __init__(
        self,
        peer: Peer,
        *,
        models: Sequence[ModelRoute] | None = None,
        api_key: str | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        tasks: Sequence[str] = OPENAI_TASKS,
        discovery_ttl: float = 10.0,
        lookup_timeout: float = 3.0,
        max_attempts: int = 3,
        routing: str = "mesh",
        policy: str = "p2c",
    ) -> None:
        if routing not in ("mesh", "local"):
            raise ConfigError(f"routing must be mesh or local, not {routing!r}")
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        self.peer = peer
        self.api_key = api_key or None
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.routing = routing
        self.router = Router(policy)
        self.metrics = Metrics()
        self.catalog = Catalog(peer, models, tasks, discovery_ttl, lookup_timeout)
        self.started = int(time.time())
        #: Where the gateway listens (``http://host:port``), once serving.
        self.base_url = ""
        self.app = Starlette(
            routes=[
                Route("/v1/models", self._wrap("/v1/models", self._models), methods=["GET"]),
                Route(
                    "/v1/models/{model:path}", self._wrap("/v1/models/{model}", self._model), methods=["GET"]
                ),
                Route(
                    "/v1/chat/completions", self._wrap("/v1/chat/completions", self._chat), methods=["POST"]
                ),
                Route("/v1/completions", self._wrap("/v1/completions", self._completions), methods=["POST"]),
                Route("/v1/embeddings", self._wrap("/v1/embeddings", self._embeddings), methods=["POST"]),
                Route(
                    "/.well-known/agent-card.json",
                    self._wrap("/.well-known/agent-card.json", self._agent_card, auth=False),
                    methods=["GET"],
                ),
                Route("/healthz", self._wrap("/healthz", self._healthz, auth=False), methods=["GET"]),
                Route("/metrics", self._wrap("/metrics", self._metrics), methods=["GET"]),
            ]
        )

    # -- serving ----------------------------------------------------------------------------

    async def serve(
        self,
        listen: str = "127.0.0.1:8080",
        *,
        allow_no_auth: bool = False,
        shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
        task_status: TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve HTTP on ``listen`` (``HOST:PORT``; port 0 picks one) until cancelled or ``shutdown_trigger``.

        ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:8080"]``).
        """
        host, _ = _split_listen(listen)
        if not is_loopback(host) and not self.api_key and not allow_no_auth:
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
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(
                partial(
                    hypercorn_serve,
                    cast(Any, self.app),
                    config,
                    shutdown_trigger=shutdown_trigger or trio.sleep_forever,
                )
            )
            self.base_url = binds[0] if binds else ""
            log.info("OpenAI-compatible gateway on %s", ", ".join(binds))
            task_status.started(binds)

    # -- plumbing ------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        )

    def _wrap(
        self, endpoint: str, fn: Callable[[Request], Awaitable[Response]], auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            started = time.monotonic()
            self.metrics.in_flight += 1
            streaming = False
            try:
                try:
                    if auth and not self._authorized(request):
                        raise GatewayError(
                            401,
                            "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                            code="invalid_api_key",
                        )
                    response = await fn(request)
                except GatewayError as exc:
                    response = exc.response()
                except ModelNetError as exc:
                    response = from_mesh_error(exc).response()
                if isinstance(response, EventStream):
                    streaming = True
                    outcome = response.outcome

                    def done() -> None:
                        self.metrics.in_flight -= 1
                        err = outcome.error
                        self.metrics.done(
                            endpoint,
                            err.status if err else 200,
                            time.monotonic() - started,
                            err.code if err else None,
                        )

                    response.on_done = done
                    return response
                code = response.error_code if isinstance(response, _ErrorResponse) else None
                self.metrics.done(endpoint, response.status_code, time.monotonic() - started, code)
                return response
            finally:
                if not streaming:
                    self.metrics.in_flight -= 1

        return handle

    async def _json(self, request: Request) -> dict[str, Any]:
        size = 0
        parts = []
        async for part in request.stream():
            size += len(part)
            if size > MAX_BODY:
                raise GatewayError(
                    413, f"request body larger than {MAX_BODY} bytes", code="request_too_large"
                )
            parts.append(part)
        try:
            body = json.loads(b"".join(parts))
        except ValueError:
            raise GatewayError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
        return body

    def _deadline(self, request: Request) -> float:
        timeout = self.request_timeout
        raw = request.headers.get("x-modelnet-timeout")
        if raw:
            try:
                asked = float(raw)
            except ValueError:
                raise _invalid(
                    "x-modelnet-timeout", "the x-modelnet-timeout header must be seconds"
                ) from None
            if not (asked > 0 and math.isfinite(asked)):
                raise _invalid("x-modelnet-timeout", "the x-modelnet-timeout header must be positive")
            timeout = min(timeout, asked)
        return trio.current_time() + timeout

    async def _route(self, body: Mapping[str, Any], wanted: Sequence[str], what: str) -> ModelRoute:
        model = body.get("model")
        if model is None:
            raise _invalid("model", "Missing required parameter: 'model'.", "missing_required_parameter")
        if not isinstance(model, str) or not model:
            raise _invalid("model", "'model' must be a non-empty string", "invalid_type")
        route = await self.catalog.resolve(model)
        if route is None:
            raise GatewayError(
                404,
                f"The model `{model}` does not exist or no peer in the mesh serves it.",
                param="model",
                code="model_not_found",
            )
        if not set(wanted) & set(route.tasks):
            raise _invalid(
                "model",
                f"The model `{route.name}` ({', '.join(route.tasks)}) does not serve {what}.",
                "invalid_model",
            )
        return route

    # -- routing ---------------------------------------------------------------------------

    def _use_mesh(self, route: ModelRoute) -> bool:
        if not route.providers:
            return True
        return route.discovered and self.routing == "mesh"

    def _candidate(self, route: ModelRoute, target: str) -> Candidate:
        pid = _peer_of(target)
        cand = Candidate(
            peer_id=pid,
            addrs=[target],
            idempotent=route.idempotent,
            max_concurrency=route.max_concurrency or 0,
        )
        table = getattr(self.peer, "availability", None)
        entry = table.get(pid) if table is not None and hasattr(table, "get") else None
        record = getattr(entry, "record", None)
        if record is not None:
            cand.state = str(getattr(record, "state", "ready"))
            cand.in_flight = int(getattr(record, "in_flight", 0))
            cand.queue = int(getattr(record, "queue", 0))
            cand.max_concurrency = int(getattr(record, "max_concurrency", 0)) or cand.max_concurrency
        return cand

    async def _pick(self, route: ModelRoute, tried: set[str]) -> tuple[str | None, str | None] | None:
        """(target, peer id) to try next; (None, None): the mesh chooses; None: no provider left."""
        if self._use_mesh(route):
            return None, None
        cands = [self._candidate(route, t) for t in route.providers]
        choice = self.router.choose(cands, exclude=tried)
        if choice is None:
            rest = [c for c in cands if c.peer_id not in tried]
            if not rest:
                return None
            choice = min(rest, key=lambda c: self.router.ban_remaining(c.peer_id))  # all banned: least so
        return choice.addrs[0], choice.peer_id

    async def _routed(
        self,
        endpoint: str,
        route: ModelRoute,
        input: Any,
        params: dict[str, Any],
        deadline: float,
        outcome: _Outcome,
        *,
        buffered: bool,
    ) -> AsyncGenerator[Any, None]:
        """The chunks of one request, with provider choice and failover.

        ``buffered``: the consumer keeps nothing it has not finished, so any
        failed attempt may be retried from scratch (a :data:`_RESET` says so).
        Otherwise a stream is continued on another provider after chunks went
        out only for an idempotent capability, skipping what was already sent.
        """
        sent_parts: list[str] = []
        sent_chars = 0
        sent_other = 0
        tried: set[str] = set()
        last: ModelNetError | None = None
        started = time.monotonic()
        for _ in range(self.max_attempts):
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise last or DeadlineExceededError("deadline exceeded before a provider answered")
            picked = await self._pick(route, tried)
            if picked is None:
                raise last or UnavailableError(f"no provider of {route.name} left to try")
            target, pid = picked
            avoid = tuple(tried) if target is None else ()
            stream: InferenceStream = self.peer.infer(
                target, route.name, input, timeout=remaining, avoid=avoid, **params
            )
            replay = "".join(sent_parts) if sent_chars else ""
            skip_other = sent_other
            pos = 0
            if pid is not None:
                self.router.started(pid)
            try:
                async with stream:
                    async for chunk in stream:
                        outcome.peer = stream.info.peer
                        if outcome.first_chunk_at is None:
                            outcome.first_chunk_at = time.monotonic()
                            self.metrics.first_chunk.setdefault(endpoint, _Histogram()).observe(
                                outcome.first_chunk_at - started
                            )
                        self.metrics.chunks[endpoint] += 1
                        if isinstance(chunk, str) and pos < len(replay):
                            head = chunk[: len(replay) - pos]
                            if head != replay[pos : pos + len(head)]:
                                raise UnavailableError(
                                    "the provider that took over answered differently; cannot go on"
                                )
                            pos += len(head)
                            chunk = chunk[len(head) :]
                            if not chunk:
                                continue
                        elif not isinstance(chunk, str) and skip_other:
                            skip_other -= 1
                            continue
                        if not buffered:
                            if isinstance(chunk, str):
                                sent_parts.append(chunk)
                                sent_chars += len(chunk)
                                pos += len(chunk)
                            else:
                                sent_other += 1
                        outcome.chunks += 1
                        yield chunk
                info = stream.info
                outcome.peer = info.peer
                outcome.finish_reason = info.finish_reason
                outcome.usage = dict(info.usage)
                if pid is not None:
                    self.router.success(pid)
                    if info.first_chunk_at is not None:
                        self.router.observe_rtt(pid, (info.first_chunk_at - info.started) * 1000)
                else:
                    self.metrics.failovers += max(0, len(getattr(info, "attempts", ())) - 1)
                self.catalog.peers_seen.add(info.peer)
                return
            except ModelNetError as exc:
                if pid is not None:
                    if isinstance(exc, OverloadedError):
                        self.router.overloaded(pid)
                    elif _retryable(exc):
                        self.router.failure(pid)
                    tried.add(pid)
                    delivered = sent_chars or sent_other
                    retry = _retryable(exc) and not (delivered and not route.idempotent)
                else:
                    # The mesh routed it and already failed over as far as it would. What is
                    # left: an answer it would not replay elsewhere (not idempotent) after some
                    # chunks, which a buffered request may still start over on another provider.
                    attempts = getattr(stream.info, "attempts", ())
                    tried.update(a["peer"] for a in attempts if a.get("peer"))
                    self.metrics.failovers += max(0, len(attempts) - 1)
                    retry = buffered and exc.retryable and exc.chunks_delivered > 0
                if not retry or isinstance(exc, DeadlineExceededError) or trio.current_time() >= deadline:
                    raise
                last = exc
                self.metrics.failovers += 1
                log.info("%s failed (%s); trying another provider", route.name, exc)
                if buffered and outcome.chunks:
                    outcome.chunks = 0
                    yield _RESET
            finally:
                if pid is not None:
                    self.router.finished(pid)
        assert last is not None
        raise last

    async def _collect(
        self, endpoint: str, route: ModelRoute, input: Any, params: dict[str, Any], deadline: float
    ) -> tuple[list[Any], _Outcome]:
        outcome = _Outcome()
        chunks: list[Any] = []
        gen = self._routed(endpoint, route, input, params, deadline, outcome, buffered=True)
        try:
            async for chunk in gen:
                if chunk is _RESET:
                    chunks.clear()
                else:
                    chunks.append(chunk)
        finally:
            await gen.aclose()
        return chunks, outcome

    async def _stream(
        self,
        endpoint: str,
        route: ModelRoute,
        input: Any,
        params: dict[str, Any],
        deadline: float,
        render: Callable[[AsyncGenerator[Any, None], _Outcome, list[Any]], AsyncGenerator[bytes, None]],
    ) -> EventStream:
        """Start a routed request and wait for its first chunk (early errors keep their status)."""
        outcome = _Outcome()
        gen = self._routed(endpoint, route, input, params, deadline, outcome, buffered=False)
        first: list[Any] = []
        try:
            first.append(await gen.__anext__())
        except StopAsyncIteration:
            pass
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await gen.aclose()
            raise
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no", "x-modelnet-peer": outcome.peer}
        return EventStream(render(gen, outcome, first), headers, outcome)

    async def _sse_body(
        self,
        gen: AsyncGenerator[Any, None],
        outcome: _Outcome,
        first: list[Any],
        frame: Callable[[str | None, str | None], dict[str, Any]],
        opening: dict[str, Any] | None,
        usage_frame: Callable[[dict[str, int]], dict[str, Any]] | None,
    ) -> AsyncGenerator[bytes, None]:
        try:
            if opening is not None:
                yield _sse(opening)
            for chunk in first:
                yield _sse(frame(_text_of(chunk), None))
            async for chunk in gen:
                yield _sse(frame(_text_of(chunk), None))
            yield _sse(frame(None, _finish(outcome.finish_reason)))
            if usage_frame is not None:
                yield _sse(usage_frame(_usage(outcome.usage, outcome.chunks)))
            yield b"data: [DONE]\n\n"
        except ModelNetError as exc:
            outcome.error = from_mesh_error(exc)
            yield _sse(outcome.error.body())
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await gen.aclose()

    # -- endpoints -------------------------------------------------------------------------

    def _model_json(self, route: ModelRoute) -> dict[str, Any]:
        return {
            "id": route.name,
            "object": "model",
            "created": self.started,
            "owned_by": "modelnet",
            "x-modelnet": {
                "tasks": list(route.tasks),
                "providers": len(route.providers),
                "description": route.description,
                "tags": list(route.tags),
                "idempotent": route.idempotent,
            },
        }

    async def _models(self, request: Request) -> Response:
        routes = sorted(await self.catalog.routes(), key=lambda r: r.name)
        return JSONResponse({"object": "list", "data": [self._model_json(r) for r in routes]})

    async def _model(self, request: Request) -> Response:
        name = request.path_params["model"]
        route = await self.catalog.resolve(name)
        if route is None:
            raise GatewayError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        return JSONResponse(self._model_json(route))

    async def _chat(self, request: Request) -> Response:
        body = await self._json(request)
        deadline = self._deadline(request)
        messages = _messages(body)
        stream = _flag(body, "stream")
        _unsupported(body, "n", "tools", "functions", "logprobs")
        params = _generation_params(body)
        route = await self._route(body, (CHAT, TEXT_GENERATION), "chat completions")
        input: Any = messages if CHAT in route.tasks else messages_to_prompt(messages)
        cid = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        endpoint = "/v1/chat/completions"
        if not stream:
            chunks, outcome = await self._collect(endpoint, route, input, params, deadline)
            text = "".join(_text_of(c) for c in chunks)
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": route.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": _finish(outcome.finish_reason),
                        }
                    ],
                    "usage": _usage(outcome.usage, len(chunks)),
                },
                headers={"x-modelnet-peer": outcome.peer},
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            out: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": route.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            if include_usage:
                out["usage"] = None
            return out

        def frame(text: str | None, finish: str | None) -> dict[str, Any]:
            return chunk({} if text is None else {"content": text}, finish)

        def usage_frame(usage: dict[str, int]) -> dict[str, Any]:
            out = chunk({}, None)
            out["choices"] = []
            out["usage"] = usage
            return out

        def render(
            gen: AsyncGenerator[Any, None], outcome: _Outcome, first: list[Any]
        ) -> AsyncGenerator[bytes, None]:
            opening = chunk({"role": "assistant", "content": ""}, None)
            return self._sse_body(gen, outcome, first, frame, opening, usage_frame if include_usage else None)

        return await self._stream(endpoint, route, input, params, deadline, render)

    async def _completions(self, request: Request) -> Response:
        body = await self._json(request)
        deadline = self._deadline(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if prompt is None:
            raise _invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
        if not isinstance(prompt, str):
            raise _invalid("prompt", "'prompt' must be a string (one prompt per request; no token arrays)")
        stream = _flag(body, "stream")
        _unsupported(body, "n", "best_of", "echo", "suffix", "logprobs")
        params = _generation_params(body)
        route = await self._route(body, (TEXT_GENERATION, CHAT), "text completions")
        input: Any = prompt if TEXT_GENERATION in route.tasks else [{"role": "user", "content": prompt}]
        cid = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        endpoint = "/v1/completions"
        if not stream:
            chunks, outcome = await self._collect(endpoint, route, input, params, deadline)
            return JSONResponse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": route.name,
                    "choices": [
                        {
                            "text": "".join(_text_of(c) for c in chunks),
                            "index": 0,
                            "logprobs": None,
                            "finish_reason": _finish(outcome.finish_reason),
                        }
                    ],
                    "usage": _usage(outcome.usage, len(chunks)),
                },
                headers={"x-modelnet-peer": outcome.peer},
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True

        def frame(text: str | None, finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": route.name,
                "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        def usage_frame(usage: dict[str, int]) -> dict[str, Any]:
            out = frame(None, None)
            out["choices"] = []
            out["usage"] = usage
            return out

        def render(
            gen: AsyncGenerator[Any, None], outcome: _Outcome, first: list[Any]
        ) -> AsyncGenerator[bytes, None]:
            return self._sse_body(gen, outcome, first, frame, None, usage_frame if include_usage else None)

        return await self._stream(endpoint, route, input, params, deadline, render)

    async def _embeddings(self, request: Request) -> Response:
        body = await self._json(request)
        deadline = self._deadline(request)
        raw = body.get("input")
        if raw is None:
            raise _invalid("input", "Missing required parameter: 'input'.", "missing_required_parameter")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts:
            raise _invalid(
                "input", "'input' must be a string or a non-empty array of strings", "invalid_type"
            )
        if not all(isinstance(t, str) for t in texts):
            raise _invalid("input", "'input' must be strings: token arrays are not supported", "invalid_type")
        if any(not t for t in texts):
            raise _invalid("input", "'input' cannot contain an empty string")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise _invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'")
        params: dict[str, Any] = {}
        if body.get("dimensions") is not None:
            if not _is_int(body["dimensions"]) or body["dimensions"] < 1:
                raise _invalid("dimensions", "'dimensions' must be a positive integer")
            params["dimensions"] = body["dimensions"]
        if body.get("user") is not None:
            if not isinstance(body["user"], str):
                raise _invalid("user", "'user' must be a string", "invalid_type")
            params["user"] = body["user"]
        route = await self._route(body, (EMBEDDING,), "embeddings")
        batches: list[list[str]] = [[]]
        size = 0
        for text in texts:
            n = len(text.encode())
            if batches[-1] and (len(batches[-1]) >= EMBEDDING_BATCH or size + n > EMBEDDING_BATCH_BYTES):
                batches.append([])
                size = 0
            batches[-1].append(text)
            size += n
        results: list[tuple[list[list[float]], _Outcome] | None] = [None] * len(batches)

        async def run(i: int, limiter: trio.CapacityLimiter) -> None:
            async with limiter:
                chunks, outcome = await self._collect("/v1/embeddings", route, batches[i], params, deadline)
            vectors: list[list[float]] = []
            try:
                for c in chunks:
                    vectors.extend(vectors_of(c))
            except ValueError as exc:
                raise ProtocolError(f"provider {outcome.peer} sent a bad embedding: {exc}") from None
            if len(vectors) != len(batches[i]):
                raise ProtocolError(
                    f"provider {outcome.peer} sent {len(vectors)} embeddings for {len(batches[i])} inputs"
                )
            results[i] = (vectors, outcome)

        limiter = trio.CapacityLimiter(EMBEDDING_CONCURRENCY)
        if len(batches) == 1:
            await run(0, limiter)
        else:
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(len(batches)):
                        nursery.start_soon(run, i, limiter)
            except BaseExceptionGroup as group:
                errors = _leaves(group)
                mesh = [e for e in errors if isinstance(e, ModelNetError)]
                if mesh:
                    raise mesh[0] from None
                raise
        data: list[dict[str, Any]] = []
        prompt_tokens = 0
        peers = []
        for result in results:
            assert result is not None
            vectors, outcome = result
            peers.append(outcome.peer)
            usage = outcome.usage.get("prompt_tokens") or outcome.usage.get("total_tokens") or 0
            prompt_tokens += int(usage) if _is_number(usage) else 0
            for vector in vectors:
                if encoding == "base64":
                    value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                else:
                    value = vector
                data.append({"object": "embedding", "index": len(data), "embedding": value})
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": route.name,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
            },
            headers={"x-modelnet-peer": ",".join(dict.fromkeys(peers))},
        )

    async def _agent_card(self, request: Request) -> Response:
        routes = sorted(await self.catalog.routes(), key=lambda r: r.name)
        base = str(request.base_url).rstrip("/")
        skills = []
        for r in routes:
            skill: dict[str, Any] = {
                "id": r.name,
                "name": r.name,
                "description": r.description or f"{r.name}: {', '.join(r.tasks)}",
                "tags": list(dict.fromkeys((*r.tasks, *r.tags))),
            }
            outputs = ["application/json"] if EMBEDDING in r.tasks else ["text/plain"]
            skill["inputModes"] = ["text/plain"]
            skill["outputModes"] = outputs
            skills.append(skill)
        from ..config import VERSION

        providers = {_peer_of(p) for r in routes for p in r.providers}
        card: dict[str, Any] = {
            "protocolVersion": "0.3.0",
            "name": "modelnet gateway",
            "description": (
                f"OpenAI-compatible gateway into the modelnet mesh '{self.peer.network}': "
                f"{len(routes)} models served by {len(providers)} peers."
            ),
            "url": base + "/v1",
            "version": VERSION,
            "capabilities": {"streaming": True, "pushNotifications": False},
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": skills,
            "x-modelnet": {
                "peerId": self.peer.peer_id,
                "network": self.peer.network,
                "interface": "openai",
                "endpoints": ["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"],
                "providers": {r.name: len(r.providers) for r in routes},
            },
        }
        if self.api_key is not None:
            card["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            card["security"] = [{"bearer": []}]
        return JSONResponse(card)

    def _connected_peers(self) -> int:
        try:
            return len(self.peer.host.get_network().get_connections_map())  # type: ignore[attr-defined]
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
        text = self.metrics.render(
            {
                "modelnet_gateway_peers_seen": (
                    "Provider peers seen (by discovery or answering).",
                    float(len(self.catalog.peers_seen)),
                ),
                "modelnet_gateway_connected_peers": ("Peers connected now.", float(self._connected_peers())),
                "modelnet_gateway_models": ("Models known now.", float(len(self.catalog.cached))),
            }
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


async def serve_gateway(
    peer: Peer,
    listen: str = "127.0.0.1:8080",
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

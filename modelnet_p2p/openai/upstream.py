"""Serve an existing OpenAI-compatible model server on the mesh.

::

    modelnet serve openai+http://127.0.0.1:11434/v1 [--model NAME ...] [--api-key-env VAR]

or, from a program (under trio, with a running :class:`~modelnet_p2p.Peer`)::

    upstream = await serve_upstream(peer, "http://127.0.0.1:11434/v1")

The adapter reads the server's ``GET /models`` and serves one capability per
model (restricted to ``models`` when given): ``chat`` (which also accepts a
prompt, as ``text-generation``) or ``embedding``. The OpenAI listing does not
say which models embed; names that look like embedding models
(``nomic-embed-text``, ``all-minilm``, ``bge-m3``, ``text-embedding-3-small``,
...) are served as ``embedding``, the rest as ``chat``; ``NAME=TASK`` in
``models`` says it explicitly. The request and answer formats follow the mesh
conventions of :mod:`modelnet_p2p.openai.conventions`.

* Chat and text generation are always requested with ``stream: true`` and
  ``stream_options.include_usage``; each SSE delta goes out as a mesh chunk as
  soon as it arrives. Leaving the request (the caller cancels, or its deadline
  passes) closes the upstream HTTP response, which stops the generation there.
* Embeddings are passed through (``encoding_format: "float"``), one chunk per input.
* Upstream failures become mesh errors: HTTP 429 and 503 → ``overloaded``;
  timeouts, refused connections and dropped streams → ``unavailable``
  (retryable: the caller's router may fail over); 401/403 (the peer's own key
  is refused) → ``unavailable``; 404 → ``not_found``; any other 4xx →
  ``bad_request`` (naming the upstream's ``param`` by the ``"field: ..."``
  convention); other 5xx → ``internal`` (502 and 504 → ``unavailable``).
* A health task polls ``GET /models`` (every ``health_interval`` seconds, every
  ``retry_interval`` while down). When the upstream goes down, or a request
  finds it unreachable, the adapter turns not ready: its handlers answer
  ``unavailable`` at once and the peer's availability state becomes
  ``joining``; when it answers again the state returns to ``ready``.

The HTTP client is an :class:`httpx.AsyncClient`, running in the peer's trio loop.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import struct
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import trio

from ..errors import (
    BadRequestError,
    ConfigError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)
from ..proto.capability import Capability
from ..services.inference.handlers import Handler, InferenceRequest
from .conventions import (
    CHAT,
    EMBEDDING,
    EMBEDDING_PARAMS,
    GENERATION_PARAMS,
    OPENAI_TASKS,
    REQUEST_FIELDS,
    TEXT_GENERATION,
    param_error,
    usage_counts,
)

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from ..peer import Peer

__all__ = [
    "SCHEME_PREFIX",
    "OpenAIUpstream",
    "UpstreamModel",
    "guess_task",
    "is_upstream_target",
    "parse_model_spec",
    "parse_upstream_target",
    "serve_upstream",
]

log = logging.getLogger(__name__)

#: ``modelnet serve`` targets that start with this are OpenAI-compatible servers.
SCHEME_PREFIX = "openai+"

_EMBEDDING_NAME = re.compile(
    r"embed|minilm|mpnet|sentence-|(^|[/_:.-])(bge|gte|e5|mxbai|snowflake-arctic-embed)([/_:.-]|$)",
    re.IGNORECASE,
)


def is_upstream_target(target: str) -> bool:
    """Whether a ``modelnet serve`` target names an OpenAI-compatible server."""
    return target.startswith((SCHEME_PREFIX + "http://", SCHEME_PREFIX + "https://"))


def parse_upstream_target(target: str) -> str:
    """``openai+http://host:port/v1`` → ``http://host:port/v1`` (the API base URL).

    Raises :class:`ConfigError` for anything else.
    """
    if not is_upstream_target(target):
        raise ConfigError(f"{target!r} is not openai+http://HOST:PORT/PATH or openai+https://...")
    url = target[len(SCHEME_PREFIX) :].rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"bad upstream URL {url!r}: {exc}") from None
    if not parsed.host:
        raise ConfigError(f"upstream URL {url!r} has no host")
    if parsed.query or parsed.fragment:
        raise ConfigError(f"upstream URL {url!r} must not have a query or fragment")
    return url


def guess_task(model_id: str) -> str:
    """``"embedding"`` for names that look like embedding models, else ``"chat"``."""
    return EMBEDDING if _EMBEDDING_NAME.search(model_id) else CHAT


def parse_model_spec(spec: str) -> tuple[str, str | None]:
    """``"NAME"`` or ``"NAME=TASK"`` → (name, task or ``None``)."""
    name, sep, task = spec.rpartition("=")
    if sep and task in OPENAI_TASKS and name:
        return name, task
    if sep and name and task not in OPENAI_TASKS:
        raise ConfigError(f"--model {spec!r}: unknown task {task!r} (use {', '.join(OPENAI_TASKS)})")
    if not spec:
        raise ConfigError("--model needs a name")
    return spec, None


@dataclass(frozen=True)
class UpstreamModel:
    """A model the upstream serves, and the mesh task it is served as."""

    id: str
    task: str = CHAT
    owned_by: str = ""


@dataclass
class _StreamState:
    done: bool = False


# -- error mapping ------------------------------------------------------------------


def _error_fields(body: Any) -> tuple[str, str | None]:
    """(message, param) from an error answer in OpenAI's, Ollama's, llama.cpp's or FastAPI's shape."""
    if isinstance(body, Mapping):
        err = body.get("error", body)
        if isinstance(err, Mapping):
            message = err.get("message") or err.get("detail") or json.dumps(err)[:300]
            param = err.get("param")
            return str(message), param if isinstance(param, str) else None
        if isinstance(err, str):
            return err, None
        detail = body.get("detail")
        if detail is not None:
            return str(detail)[:300], None
    text = str(body).strip()
    return (text[:300] or "no details"), None


def status_error(status: int, body: Any) -> ModelNetError:
    """The mesh error for an upstream HTTP error answer (see the module docstring)."""
    message, param = _error_fields(body)
    if status in (429, 503):
        return OverloadedError(f"upstream is overloaded (HTTP {status}): {message}")
    if status == 408:
        return UnavailableError(f"upstream timed out (HTTP 408): {message}")
    if status in (401, 403):
        return UnavailableError(f"upstream refused this peer's credentials (HTTP {status}): {message}")
    if status == 404:
        return NotFoundError(f"upstream does not serve it (HTTP 404): {message}", retryable=True)
    if 400 <= status < 500:
        if param and param in REQUEST_FIELDS:
            return param_error(param, message)
        return BadRequestError(message)
    if status in (502, 504):
        return UnavailableError(f"upstream gateway error (HTTP {status}): {message}")
    return InternalError(f"upstream failed (HTTP {status}): {message}")


def _event_error(obj: Any) -> ModelNetError:
    """The mesh error for an error event inside an SSE stream."""
    message, param = _error_fields(obj)
    err = obj.get("error") if isinstance(obj, Mapping) else None
    kind = ""
    if isinstance(err, Mapping):
        kind = f"{err.get('type') or ''} {err.get('code') or ''}".lower()
    if "rate_limit" in kind or "overloaded" in kind:
        return OverloadedError(f"upstream is overloaded: {message}")
    if "invalid_request" in kind:
        return param_error(param, message) if param in REQUEST_FIELDS else BadRequestError(message)
    return InternalError(f"upstream failed mid-answer: {message}")


def _json_or_text(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


async def _sse(lines: AsyncIterator[str]) -> AsyncGenerator[tuple[str, str], None]:
    """(event, data) of each server-sent event (https://html.spec.whatwg.org/#server-sent-events)."""
    event = ""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data:
        yield event or "message", "\n".join(data)


def _decode_vector(raw: Any) -> list[float]:
    if isinstance(raw, str):  # base64 of little-endian float32, from a server that ignored "float"
        blob = base64.b64decode(raw)
        if len(blob) % 4:
            raise InternalError("upstream sent a base64 embedding whose size is not a multiple of 4")
        return list(struct.unpack(f"<{len(blob) // 4}f", blob))
    if isinstance(raw, list) and raw and all(isinstance(x, int | float) for x in raw):
        return [float(x) for x in raw]
    raise InternalError("upstream sent an embedding that is not a list of numbers")


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise param_error("input", "must be a text or a non-empty list of texts")


# -- the upstream --------------------------------------------------------------------------


class OpenAIUpstream:
    """One OpenAI-compatible server: its models, the handlers that call it, its health.

    Args:
        base_url: the API base, e.g. ``http://127.0.0.1:11434/v1`` (``/models``,
            ``/chat/completions``, ... are appended).
        api_key: sent as ``Authorization: Bearer ...`` when given.
        connect_timeout: seconds allowed to connect.
        read_timeout: seconds allowed between two pieces of an answer.
        health_interval: seconds between health checks while up.
        retry_interval: seconds between health checks while down.
        include_usage: ask for ``stream_options.include_usage`` (token counts).
        idempotent_generation: announce chat and text generation as idempotent
            (only true for greedy decoding: a router may then replay a broken
            stream on another provider). Embeddings are always idempotent.
        tags: discovery tags added to every capability.
        transport: an httpx transport (tests).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        health_interval: float = 5.0,
        retry_interval: float = 1.0,
        include_usage: bool = True,
        idempotent_generation: bool = False,
        tags: Sequence[str] = (),
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.health_interval = health_interval
        self.retry_interval = retry_interval
        self.include_usage = include_usage
        self.idempotent_generation = idempotent_generation
        self.tags = tuple(tags)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            headers=headers,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            transport=transport,
            follow_redirects=False,
        )
        #: False while the upstream is known to be down; handlers then refuse at once.
        self.ready = True
        #: What :func:`serve_upstream` served on the peer.
        self.capabilities: list[Capability] = []
        self._listeners: list[Callable[[bool], None]] = []
        self._poke = trio.Event()
        self._why_down = ""

    # -- lifecycle and health -------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP client (its connections)."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self._client.aclose()

    async def __aenter__(self) -> OpenAIUpstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def add_listener(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(ready)`` whenever the upstream goes down or comes back."""
        self._listeners.append(listener)

    def _set_ready(self, ready: bool, why: str = "") -> None:
        if ready == self.ready:
            return
        self.ready = ready
        if ready:
            log.info("upstream %s is back", self.base_url)
        else:
            self._why_down = why
            log.warning("upstream %s is down: %s", self.base_url, why)
            self._poke.set()  # the monitor checks again soon, at the shorter interval
        for listener in list(self._listeners):
            try:
                listener(ready)
            except Exception as exc:  # a listener never takes the adapter down
                log.warning("availability listener failed: %r", exc)

    def _require_ready(self) -> None:
        if not self.ready:
            raise UnavailableError(f"upstream is down ({self._why_down or 'health check failed'})")

    async def check(self) -> tuple[bool, str]:
        """One health check: ``GET /models``. Returns (up, why not)."""
        try:
            resp = await self._client.get(
                "models", timeout=httpx.Timeout(min(self.read_timeout, 10.0), connect=self.connect_timeout)
            )
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if resp.status_code in (401, 403):
            return False, f"HTTP {resp.status_code}: the upstream refuses this peer's API key"
        if resp.status_code >= 500 and resp.status_code != 503:
            return False, f"HTTP {resp.status_code}"
        return True, ""

    async def monitor(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check the upstream's health until cancelled, turning :attr:`ready` on and off.

        Started (``task_status``) once the first check is done.
        """
        while True:
            up, why = await self.check()
            self._set_ready(up, why)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            with trio.move_on_after(self.health_interval if self.ready else self.retry_interval):
                await self._poke.wait()
            self._poke = trio.Event()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The adapter's background task: :meth:`monitor`, then close the client when cancelled."""
        try:
            await self.monitor(task_status=task_status)
        finally:
            await self.aclose()

    # -- models ------------------------------------------------------------------------

    async def list_models(self) -> list[UpstreamModel]:
        """The upstream's models (``GET /models``), each with the task it would be served as."""
        body = await self._request_json("GET", "models", None, self.read_timeout)
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            raise InternalError(f"GET {self.base_url}/models did not answer an OpenAI model list")
        out = []
        for item in data:
            if isinstance(item, Mapping) and isinstance(item.get("id"), str) and item["id"]:
                owner = item.get("owned_by")
                out.append(
                    UpstreamModel(item["id"], guess_task(item["id"]), owner if isinstance(owner, str) else "")
                )
        return out

    async def wait_models(self, timeout: float) -> list[UpstreamModel]:
        """:meth:`list_models`, retried while the upstream is unreachable, for at most ``timeout`` seconds."""
        deadline = trio.current_time() + timeout
        while True:
            try:
                return await self.list_models()
            except (UnavailableError, OverloadedError) as exc:
                if trio.current_time() + self.retry_interval >= deadline:
                    raise UnavailableError(
                        f"cannot list the models of {self.base_url}: {exc.message}"
                    ) from None
                log.info("waiting for upstream %s: %s", self.base_url, exc.message)
                await trio.sleep(self.retry_interval)
            except NotFoundError:
                raise ConfigError(
                    f"{self.base_url}/models does not exist: give the API base URL (it usually ends in /v1)"
                ) from None

    def capability(self, model: UpstreamModel) -> Capability:
        """The capability ``model`` is served as."""
        if model.task == EMBEDDING:
            return Capability(
                name=model.id,
                task=EMBEDDING,
                description=f"{model.id} embeddings, from an OpenAI-compatible server",
                tags=("openai-compatible", *self.tags),
                idempotent=True,
                input_modalities=("text",),
                output_modalities=("embedding",),
            )
        tasks = (CHAT, TEXT_GENERATION) if model.task == CHAT else (TEXT_GENERATION,)
        return Capability(
            name=model.id,
            task=tasks[0],
            tasks=tasks,
            description=f"{model.id}, from an OpenAI-compatible server",
            tags=("openai-compatible", *self.tags),
            idempotent=self.idempotent_generation,
            input_modalities=("text",),
            output_modalities=("text",),
        )

    def handler(self, model: UpstreamModel) -> Handler:
        """The mesh handler that calls ``model`` upstream."""
        name = model.id
        if model.task == EMBEDDING:

            async def embed(request: InferenceRequest) -> AsyncIterator[list[float]]:
                for vector in await self.embed(name, request.input, request.params, request):
                    yield vector

            return embed

        async def generate(request: InferenceRequest) -> AsyncIterator[str]:
            async for text in self.generate(name, request.input, request.params, request):
                yield text

        return generate

    def served(self, models: Iterable[UpstreamModel]) -> list[tuple[Capability, Handler]]:
        """(capability, handler) for each model, ready for :meth:`Peer.serve`."""
        return [(self.capability(m), self.handler(m)) for m in models]

    # -- calls -----------------------------------------------------------------------

    def _timeout(self, request: InferenceRequest | None) -> httpx.Timeout:
        read = self.read_timeout
        if request is not None and request.remaining < read:
            read = max(0.001, request.remaining + 0.5)  # the mesh deadline cancels the handler first
        return httpx.Timeout(read, connect=min(self.connect_timeout, read))

    def _transport_error(self, exc: httpx.HTTPError) -> ModelNetError:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            self._set_ready(False, f"{type(exc).__name__}: {exc}")
            return UnavailableError(f"upstream unreachable: {exc or type(exc).__name__}")
        if isinstance(exc, httpx.TimeoutException):
            return UnavailableError(f"upstream timed out ({type(exc).__name__})")
        if isinstance(exc, httpx.TransportError):
            self._poke.set()  # the connection broke: check the upstream's health now
            return UnavailableError(f"upstream connection failed: {exc or type(exc).__name__}")
        return InternalError(f"upstream answer could not be read: {exc}")

    async def _request_json(
        self, method: str, path: str, body: Any, read_timeout: float | httpx.Timeout
    ) -> Any:
        timeout = (
            read_timeout
            if isinstance(read_timeout, httpx.Timeout)
            else httpx.Timeout(read_timeout, connect=self.connect_timeout)
        )
        try:
            resp = await self._client.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if resp.status_code >= 400:
            raise status_error(resp.status_code, _json_or_text(resp))
        try:
            return resp.json()
        except ValueError:
            raise InternalError(f"{method} {path}: upstream answered something that is not JSON") from None

    async def _events(
        self, path: str, body: dict[str, Any], timeout: httpx.Timeout, state: _StreamState
    ) -> AsyncGenerator[Any, None]:
        """The JSON objects of an SSE answer; ``state.done`` once ``data: [DONE]`` arrives."""
        try:
            resp = await self._client.send(
                self._client.build_request("POST", path, json=body, timeout=timeout), stream=True
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        try:
            if resp.status_code >= 400:
                await resp.aread()
                raise status_error(resp.status_code, _json_or_text(resp))
            if "text/event-stream" not in resp.headers.get("content-type", ""):
                # A server that ignored "stream": the whole answer in one JSON object.
                await resp.aread()
                obj = _json_or_text(resp)
                if not isinstance(obj, Mapping):
                    raise InternalError("upstream answered neither an event stream nor JSON")
                state.done = True
                yield _as_chunk(obj)
                return
            async with aclosing(_sse(resp.aiter_lines())) as events:
                async for event, data in events:
                    if data.strip() == "[DONE]":
                        state.done = True
                        return
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        raise InternalError("upstream sent an event that is not JSON") from None
                    if event == "error" or (isinstance(obj, Mapping) and obj.get("error")):
                        raise _event_error(obj)
                    yield obj
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await resp.aclose()

    async def generate(
        self, model: str, input: Any, params: Mapping[str, Any], request: InferenceRequest | None = None
    ) -> AsyncIterator[str]:
        """Stream ``model``'s answer as text deltas.

        ``input`` is a list of messages (chat) or a prompt (text completion).
        With ``request``, its ``finish_reason`` and ``usage`` are filled in.
        """
        self._require_ready()
        if isinstance(input, str):
            path, chat = "completions", False
            body: dict[str, Any] = {"model": model, "prompt": input}
        elif (
            isinstance(input, list | tuple)
            and input
            and all(isinstance(m, Mapping) and isinstance(m.get("role"), str) for m in input)
        ):
            path, chat = "chat/completions", True
            body = {"model": model, "messages": list(input)}
        else:
            raise param_error("messages", "input must be a non-empty list of messages (or a prompt text)")
        if "max_completion_tokens" in params and "max_tokens" not in params:
            body["max_tokens"] = params["max_completion_tokens"]
        body.update({k: v for k, v in params.items() if k in GENERATION_PARAMS})
        body["stream"] = True
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        state = _StreamState()
        finish: str | None = None
        usage: Any = None
        pieces = 0
        async with aclosing(self._events(path, body, self._timeout(request), state)) as events:
            async for obj in events:
                if not isinstance(obj, Mapping):
                    continue
                if isinstance(obj.get("usage"), Mapping):
                    usage = obj["usage"]
                for choice in obj.get("choices") or ():
                    if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                        continue
                    if chat:
                        delta = choice.get("delta") or choice.get("message") or {}
                        text = delta.get("content") if isinstance(delta, Mapping) else None
                    else:
                        text = choice.get("text")
                    if isinstance(text, str) and text:
                        pieces += 1
                        yield text
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
        if not state.done and finish is None:
            raise UnavailableError("upstream closed the stream before it finished")
        if request is not None:
            request.finish_reason = finish or "stop"
            if usage:
                request.usage.update(usage_counts(usage.get("prompt_tokens"), usage.get("completion_tokens")))
            else:
                request.usage["tokens"] = pieces

    async def embed(
        self, model: str, input: Any, params: Mapping[str, Any], request: InferenceRequest | None = None
    ) -> list[list[float]]:
        """``model``'s embedding of each text in ``input``, in order."""
        self._require_ready()
        texts = _texts(input)
        body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        body.update({k: v for k, v in params.items() if k in EMBEDDING_PARAMS})
        answer = await self._request_json("POST", "embeddings", body, self._timeout(request))
        data = answer.get("data") if isinstance(answer, Mapping) else None
        if not isinstance(data, list) or len(data) != len(texts):
            got = len(data) if isinstance(data, list) else "no"
            raise InternalError(f"upstream sent {got} embeddings for {len(texts)} inputs")
        items = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, Mapping) else 0)
        vectors = [_decode_vector(d.get("embedding") if isinstance(d, Mapping) else None) for d in items]
        usage = answer.get("usage")
        if request is not None and isinstance(usage, Mapping):
            request.usage.update(usage_counts(usage.get("prompt_tokens"), None))
            request.usage.pop("total_tokens", None)
            if usage.get("total_tokens") is not None:
                request.usage["total_tokens"] = int(usage["total_tokens"])
        return vectors


def _as_chunk(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A non-streamed answer rewritten as a single stream chunk."""
    choices = []
    for choice in obj.get("choices") or ():
        if isinstance(choice, Mapping):
            c = dict(choice)
            if "message" in c and "delta" not in c:
                c["delta"] = c.pop("message")
            choices.append(c)
    return {"choices": choices, "usage": obj.get("usage")}


def _select(listed: Sequence[UpstreamModel], specs: Sequence[tuple[str, str | None]]) -> list[UpstreamModel]:
    if not specs:
        return list(listed)
    by_id = {m.id: m for m in listed}
    out = []
    for name, task in specs:
        found = by_id.get(name)
        if found is None:
            known = ", ".join(sorted(by_id)) or "none"
            raise ConfigError(f"the upstream does not list the model {name!r} (it lists: {known})")
        out.append(UpstreamModel(found.id, task or found.task, found.owned_by))
    return out


def _availability_listener(peer: Any, explicit: Any) -> Callable[[bool], None]:
    """Turns the availability state ``ready`` ↔ ``joining``; never overrides ``draining`` or ``leaving``."""

    def listener(ready: bool) -> None:
        sink = explicit if explicit is not None else getattr(peer, "availability", None)
        if sink is None or not hasattr(sink, "set_state"):
            return
        state = str(getattr(sink, "state", "ready"))
        if ready and state == "joining":
            sink.set_state("ready")
        elif not ready and state == "ready":
            sink.set_state("joining")

    return listener


async def serve_upstream(
    peer: Peer,
    base_url: str,
    *,
    models: Sequence[str] = (),
    api_key: str | None = None,
    availability: Any = None,
    startup_timeout: float = 30.0,
    **options: Any,
) -> OpenAIUpstream:
    """Serve the models of the OpenAI-compatible server at ``base_url`` on ``peer``.

    Reads the model list (waiting up to ``startup_timeout`` seconds for the
    server to answer), serves one capability per model (or per entry of
    ``models``: ``"NAME"`` or ``"NAME=TASK"``), and starts the health task in
    the peer's nursery: it stops, and the HTTP client closes, with the peer.

    ``availability`` (default: the peer's own availability gossip,
    ``peer.availability``) is any object with ``state`` and ``set_state(state)``:
    it turns from ``"ready"`` to ``"joining"`` while the upstream is down and
    back when it answers again (``"draining"`` and ``"leaving"`` are left alone).
    ``options`` go to :class:`OpenAIUpstream` (``read_timeout``, ``tags``, ...).
    A peer announces at most 16 capabilities: past the card's limits, models are
    left out with a warning (choose them with ``models``).

    Returns the :class:`OpenAIUpstream` (``.capabilities``: what was served).
    """
    specs = [parse_model_spec(m) for m in models]
    upstream = OpenAIUpstream(base_url, api_key=api_key, **options)
    try:
        chosen = _select(await upstream.wait_models(startup_timeout), specs)
        served: list[Capability] = []
        skipped: list[str] = []
        for cap, handler in upstream.served(chosen):
            try:
                peer.serve(cap, handler)
            except ConfigError as exc:
                log.warning("not serving %s: %s", cap.name, exc.message)
                skipped.append(cap.name)
                continue
            served.append(cap)
        if skipped:
            log.warning(
                "%d upstream models left out (a card holds a limited number; pick with --model): %s",
                len(skipped),
                ", ".join(skipped),
            )
        if not served:
            raise ConfigError(f"no model of {base_url} could be served")
        upstream.capabilities = served
        upstream.add_listener(_availability_listener(peer, availability))
        await peer.nursery.start(upstream.run)
    except BaseException:
        await upstream.aclose()
        raise
    return upstream

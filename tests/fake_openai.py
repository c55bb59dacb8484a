"""HTTP servers that answer like OpenAI's API and like Ollama's OpenAI-compatible endpoint.

Written from the public API references (OpenAI's "Chat Completions", "Completions",
"Embeddings" and "Models" pages; Ollama's "OpenAI compatibility" page), for the
tests of the upstream adapter and the gateway. Both serve a toy model whose
answers are deterministic:

* chat / completions: ``"You said: <the last user message>"``, one token per
  word, streamed as SSE ``data: {...}`` events and ended with ``data: [DONE]``;
* embeddings: a 32-dimension bag-of-words hash, normalized, so that texts
  sharing words score a higher cosine similarity.

The two flavors differ where the real servers do:

========================  ===============================  ================================
                          OpenAI                           Ollama
========================  ===============================  ================================
``/v1/models`` owner      ``"openai"`` / ``"system"``      ``"library"``; ids with tags
first chat chunk          ``delta: {role, content: ""}``   every delta carries ``role``
last chat chunk           ``delta: {}`` + finish_reason    ``content: ""`` + finish_reason
``system_fingerprint``    ``"fp_..."``                     ``"fp_ollama"``
usage chunk               ``choices: []`` + usage, and     ``choices: []`` + usage
                          ``usage: null`` on the others
errors                    ``type``/``code`` OpenAI's       ``type`` ``invalid_request_error``,
                          (``model_not_found``, ...)       ``not_found_error``, ``api_error``
API key                   required when configured         ignored
========================  ===============================  ================================

:class:`FakeServer` runs one in the test's own trio loop (hypercorn, trio
worker) and can be stopped and restarted on the same port, to play an upstream
that goes down and comes back. :class:`Control` injects faults.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DIMENSIONS = 32

OPENAI_MODELS = [
    ("gpt-4o-mini", "system"),
    ("text-embedding-3-small", "system"),
    ("gpt-3.5-turbo-instruct", "system"),
]
OLLAMA_MODELS = [
    ("llama3.2:latest", "library"),
    ("nomic-embed-text:latest", "library"),
]


@dataclass
class Control:
    """Faults to inject, and what the server saw.

    Attributes:
        token_delay: seconds between two streamed tokens.
        fail: HTTP statuses for the next requests to the model endpoints, in order.
        drop_after: close the next stream after this many tokens, without ``[DONE]``.
        error_event_after: send an error event after this many tokens of the next stream.
        hang: the next model request waits this long before answering anything.
        bodies: every request body received by the model endpoints.
        auth: the ``Authorization`` header of each request.
        streams_closed_early: streams the client left before they ended.
    """

    token_delay: float = 0.0
    fail: list[int] = field(default_factory=list)
    drop_after: int | None = None
    error_event_after: int | None = None
    hang: float = 0.0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    streams_closed_early: int = 0
    streams_done: int = 0


def reply_tokens(messages_or_prompt: Any) -> list[str]:
    """The toy model's answer, one token per word (with its leading space)."""
    if isinstance(messages_or_prompt, str):
        last = messages_or_prompt
    else:
        users = [m for m in messages_or_prompt if m.get("role") == "user"]
        content = users[-1].get("content", "") if users else ""
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if p.get("type") == "text")
        last = str(content)
    words = ["You", "said:", *last.split()]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def embed_text(text: str) -> list[float]:
    """A normalized bag-of-words hash: similar wordings give similar vectors."""
    vec = [0.0] * DIMENSIONS
    for word in re.findall(r"[a-z0-9]+", text.lower()):
        h = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "big")
        vec[h % DIMENSIONS] += 1.0 if (h >> 16) & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]


def _count(text: str) -> int:
    return len(text.split())


class _Flavor:
    name = "openai"
    fingerprint = "fp_44709d6fcb"

    def __init__(self, models: list[tuple[str, str]], api_key: str | None) -> None:
        self.models = models
        self.api_key = api_key

    def error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> Response:
        kind = {
            400: "invalid_request_error",
            401: "invalid_request_error",
            404: "invalid_request_error",
            429: "requests",
        }.get(status, "server_error")
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
        )

    def not_found(self, model: str) -> Response:
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1686935002, "owned_by": o} for m, o in self.models
            ],
        }

    def chat_chunk(
        self, cid: str, model: str, delta: dict[str, Any], finish: str | None, include_usage: bool
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def first_delta(self) -> dict[str, Any] | None:
        return {"role": "assistant", "content": "", "refusal": None}

    def delta(self, text: str) -> dict[str, Any]:
        return {"content": text}

    def last_delta(self) -> dict[str, Any]:
        return {}

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def completion_chunk(self, cid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }


class _Ollama(_Flavor):
    name = "ollama"
    fingerprint = "fp_ollama"

    def error(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> Response:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status
        )

    def not_found(self, model: str) -> Response:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def model_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1718141294, "owned_by": o} for m, o in self.models
            ],
        }

    def chat_chunk(
        self, cid: str, model: str, delta: dict[str, Any], finish: str | None, include_usage: bool
    ) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    def first_delta(self) -> dict[str, Any] | None:
        return None

    def delta(self, text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": text}

    def last_delta(self) -> dict[str, Any]:
        return {"role": "assistant", "content": ""}

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def completion_chunk(self, cid: str, model: str, text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": int(time.time()),
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            "model": model,
            "system_fingerprint": self.fingerprint,
        }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def make_app(flavor: str = "openai", control: Control | None = None, api_key: str | None = None) -> Starlette:
    """The ASGI app of a fake server (``flavor`` ``"openai"`` or ``"ollama"``)."""
    ctl = control or Control()
    fl: _Flavor = _Flavor(OPENAI_MODELS, api_key) if flavor == "openai" else _Ollama(OLLAMA_MODELS, None)
    served = {m for m, _ in fl.models}

    def unauthorized(request: Request) -> Response | None:
        if fl.api_key is None:
            return None
        if request.headers.get("authorization") != f"Bearer {fl.api_key}":
            return fl.error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    async def model_request(request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        ctl.auth.append(request.headers.get("authorization", ""))
        denied = unauthorized(request)
        if denied is not None:
            return None, denied
        try:
            body = await request.json()
        except ValueError:
            return None, fl.error(400, "We could not parse the JSON body of your request.")
        ctl.bodies.append(body)
        if ctl.hang:
            hang, ctl.hang = ctl.hang, 0.0
            await trio.sleep(hang)
        if ctl.fail:
            status = ctl.fail.pop(0)
            messages = {429: "Rate limit reached for requests", 503: "The engine is currently overloaded"}
            return None, fl.error(status, messages.get(status, f"failure {status}"))
        if body.get("model") not in served:
            return None, fl.not_found(str(body.get("model")))
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, int | float) or temperature > 2):
            return None, fl.error(
                400,
                f"Invalid 'temperature': expected a number at most 2, got {temperature!r}.",
                param="temperature",
                code="invalid_value",
            )
        return body, None

    async def stream_tokens(tokens: list[str]) -> AsyncIterator[tuple[int, str]]:
        drop, ctl.drop_after = ctl.drop_after, None
        fail, ctl.error_event_after = ctl.error_event_after, None
        for i, tok in enumerate(tokens):
            if drop is not None and i >= drop:
                raise _Drop()
            if fail is not None and i >= fail:
                raise _ErrorEvent()
            if ctl.token_delay:
                await trio.sleep(ctl.token_delay)
            yield i, tok

    def limited(tokens: list[str], body: dict[str, Any]) -> tuple[list[str], str]:
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit < len(tokens):
            return tokens[:limit], "length"
        return tokens, "stop"

    def sse_response(events: AsyncIterator[bytes]) -> Response:
        async def guarded() -> AsyncIterator[bytes]:
            finished = False
            try:
                async for event in events:
                    yield event
                finished = True
            except _Drop:
                finished = True  # the connection just ends, without [DONE]
            except _ErrorEvent:
                finished = True
                yield _sse(
                    {"error": {"message": "The server had an error", "type": "server_error", "param": None}}
                )
            finally:
                if finished:
                    ctl.streams_done += 1
                else:
                    ctl.streams_closed_early += 1

        return StreamingResponse(guarded(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        denied = unauthorized(request)
        return denied if denied is not None else JSONResponse(fl.model_list())

    async def chat(request: Request) -> Response:
        body, error = await model_request(request)
        if error is not None:
            return error
        assert body is not None
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return fl.error(400, "'messages' must be a non-empty array", param="messages")
        tokens, finish = limited(reply_tokens(messages), body)
        prompt = sum(_count(str(m.get("content", ""))) for m in messages)
        cid = "chatcmpl-" + hashlib.sha1(json.dumps(body).encode()).hexdigest()[:24]
        model = body["model"]
        if not body.get("stream"):
            text = "".join(tokens)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if fl.name == "openai":
                message.update(refusal=None, annotations=[])
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
            if fl.name == "openai":
                choice["logprobs"] = None
            return JSONResponse(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "system_fingerprint": fl.fingerprint,
                    "choices": [choice],
                    "usage": fl.usage(prompt, len(tokens)),
                }
            )
        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            first = fl.first_delta()
            if first is not None:
                yield _sse(fl.chat_chunk(cid, model, first, None, include_usage))
            async for _, tok in stream_tokens(tokens):
                yield _sse(fl.chat_chunk(cid, model, fl.delta(tok), None, include_usage))
            yield _sse(fl.chat_chunk(cid, model, fl.last_delta(), finish, include_usage))
            if include_usage:
                last = fl.chat_chunk(cid, model, {}, None, False)
                last["choices"] = []
                last["usage"] = fl.usage(prompt, len(tokens))
                yield _sse(last)
            yield b"data: [DONE]\n\n"

        return sse_response(events())

    async def completions(request: Request) -> Response:
        body, error = await model_request(request)
        if error is not None:
            return error
        assert body is not None
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return fl.error(400, "'prompt' must be a string", param="prompt")
        tokens, finish = limited(reply_tokens(prompt), body)
        cid = "cmpl-" + hashlib.sha1(json.dumps(body).encode()).hexdigest()[:24]
        model = body["model"]
        if not body.get("stream"):
            chunk = fl.completion_chunk(cid, model, "".join(tokens), finish)
            chunk["usage"] = fl.usage(_count(prompt), len(tokens))
            return JSONResponse(chunk)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            async for _, tok in stream_tokens(tokens):
                yield _sse(fl.completion_chunk(cid, model, tok, None))
            yield _sse(fl.completion_chunk(cid, model, "", finish))
            if include_usage:
                last = fl.completion_chunk(cid, model, "", None)
                last["choices"] = []
                last["usage"] = fl.usage(_count(prompt), len(tokens))
                yield _sse(last)
            yield b"data: [DONE]\n\n"

        return sse_response(events())

    async def embeddings(request: Request) -> Response:
        body, error = await model_request(request)
        if error is not None:
            return error
        assert body is not None
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            return fl.error(400, "'input' is invalid", param="input")
        data = []
        for i, text in enumerate(texts):
            vec = embed_text(text)
            value: Any = vec
            if body.get("encoding_format") == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(_count(t) for t in texts)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
        ]
    )


class _Drop(Exception):
    pass


class _ErrorEvent(Exception):
    pass


class FakeServer:
    """A fake server in the current trio run, on 127.0.0.1; can stop and start again on its port."""

    def __init__(self, flavor: str = "openai", api_key: str | None = None) -> None:
        self.flavor = flavor
        self.control = Control()
        self.app = make_app(flavor, self.control, api_key)
        self.port = 0
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, nursery: trio.Nursery) -> str:
        """Start (again, on the same port if it ran before); returns the API base URL."""
        binds: list[str] = await nursery.start(self._run)
        self.port = int(binds[0].rsplit(":", 1)[1])
        return self.base_url

    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = HyperConfig()
        config.bind = [f"127.0.0.1:{self.port}"]
        config.accesslog = None
        config.errorlog = None
        config.graceful_timeout = 0.1
        self._stopped = trio.Event()
        with trio.CancelScope() as scope:
            self._scope = scope
            try:
                await hypercorn_serve(self.app, config, task_status=task_status)  # type: ignore[arg-type]
            finally:
                self._stopped.set()

    async def stop(self) -> None:
        """Stop at once: the listener closes and open connections are dropped."""
        if self._scope is not None:
            self._scope.cancel()
        if self._stopped is not None:
            await self._stopped.wait()

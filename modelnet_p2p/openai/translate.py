"""OpenAI requests to mesh requests, and mesh answers to OpenAI answers: pure functions.

No I/O here. The app reads a body and calls a ``parse_*`` function, which
checks every field it uses and raises :class:`~.errors.GatewayError` (HTTP 400
naming the field) for a bad one; it then sends the mesh request and renders
what came back with the ``*_response`` functions, or, when streamed, with a
:class:`ChatFrames` or :class:`CompletionFrames` (the OpenAI chunk objects)
encoded by :func:`sse_event`.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from json.encoder import encode_basestring_ascii
from typing import Any

from ..errors import ProtocolError
from .conventions import (
    CHAT,
    EMBEDDING_BATCH,
    GENERATION_PARAMS,
    TEXT_GENERATION,
    messages_to_prompt,
    vectors_of,
)
from .errors import GatewayError, invalid

__all__ = [
    "DONE",
    "EMBEDDING_BATCH_BYTES",
    "EventTemplate",
    "ChatFrames",
    "ChatRequest",
    "CompletionFrames",
    "CompletionRequest",
    "EmbeddingRequest",
    "batch_texts",
    "chat_response",
    "completion_response",
    "embedding_vectors",
    "embeddings_response",
    "event_template",
    "finish_reason",
    "generation_params",
    "model_name",
    "parse_body",
    "parse_chat",
    "parse_completion",
    "parse_embeddings",
    "parse_timeout",
    "sse_event",
    "text_of",
    "usage",
]

#: Bytes of input text in one mesh embedding request (the frame limit is 1 MiB).
EMBEDDING_BATCH_BYTES = 256 * 1024
#: The last event of a stream that ended well.
DONE = b"data: [DONE]\n\n"

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_NUMBER_PARAMS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "repetition_penalty",
)
_INT_PARAMS = ("max_tokens", "seed", "top_k")


def is_number(x: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: Any) -> bool:
    """An int, not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


# -- requests ----------------------------------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body: a JSON object."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise GatewayError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def parse_timeout(header: str | None, default: float) -> float:
    """Seconds a request may take: ``default``, or less if the ``x-modelnet-timeout`` header asks."""
    if not header:
        return default
    try:
        asked = float(header)
    except ValueError:
        raise invalid("x-modelnet-timeout", "the x-modelnet-timeout header must be seconds") from None
    if not (asked > 0 and math.isfinite(asked)):
        raise invalid("x-modelnet-timeout", "the x-modelnet-timeout header must be positive")
    return min(default, asked)


def model_name(body: Mapping[str, Any]) -> str:
    """The ``model`` field."""
    model = body.get("model")
    if model is None:
        raise invalid("model", "Missing required parameter: 'model'.", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise invalid("model", "'model' must be a non-empty string", "invalid_type")
    return model


def generation_params(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields that travel as mesh params (``max_completion_tokens`` as ``max_tokens``)."""
    params: dict[str, Any] = {}
    for key in GENERATION_PARAMS:
        value = body.get(key)
        if value is None:
            continue
        if key in _NUMBER_PARAMS and not is_number(value):
            raise invalid(key, f"'{key}' must be a number", "invalid_type")
        if key in _INT_PARAMS and not is_int(value):
            raise invalid(key, f"'{key}' must be an integer", "invalid_type")
        if key == "stop" and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))
        ):
            raise invalid(key, "'stop' must be a string or a list of strings", "invalid_type")
        if key in ("logit_bias", "response_format") and not isinstance(value, dict):
            raise invalid(key, f"'{key}' must be an object", "invalid_type")
        if key == "user" and not isinstance(value, str):
            raise invalid(key, "'user' must be a string", "invalid_type")
        params[key] = value
    mct = body.get("max_completion_tokens")
    if mct is not None:
        if not is_int(mct):
            raise invalid(
                "max_completion_tokens", "'max_completion_tokens' must be an integer", "invalid_type"
            )
        params.setdefault("max_tokens", mct)
    if "max_tokens" in params and params["max_tokens"] < 1:
        raise invalid("max_tokens", "'max_tokens' must be at least 1")
    return params


def _flag(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(key, f"'{key}' must be a boolean", "invalid_type")
    return value


def _unsupported(body: Mapping[str, Any], *keys: str) -> None:
    for key in keys:
        value = body.get(key)
        if key == "n":
            if value not in (None, 1):
                raise invalid("n", "only 'n': 1 is supported by this gateway", "unsupported_value")
        elif value not in (None, False, [], {}, 0):
            raise invalid(key, f"'{key}' is not supported by this gateway", "unsupported_parameter")


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise invalid("messages", "Missing required parameter: 'messages'.", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array of messages", "invalid_type")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid("messages", f"'messages[{i}]' must be an object", "invalid_type")
        if m.get("role") not in _ROLES:
            raise invalid("messages", f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}")
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise invalid("messages", f"'messages[{i}].content' must be a string or an array", "invalid_type")
    return messages


@dataclass
class ChatRequest:
    """A checked ``POST /v1/chat/completions`` body."""

    messages: list[dict[str, Any]]
    stream: bool
    params: dict[str, Any]
    include_usage: bool

    def input_for(self, tasks: Sequence[str]) -> Any:
        """The mesh input for a capability with ``tasks``: the messages, or a prompt made of them."""
        return self.messages if CHAT in tasks else messages_to_prompt(self.messages)


def parse_chat(body: Mapping[str, Any]) -> ChatRequest:
    """Check a chat completions body (the ``model`` is checked by the caller)."""
    messages = _messages(body)
    stream = _flag(body, "stream")
    _unsupported(body, "n", "tools", "functions", "logprobs")
    return ChatRequest(messages, stream, generation_params(body), _include_usage(body))


@dataclass
class CompletionRequest:
    """A checked ``POST /v1/completions`` body."""

    prompt: str
    stream: bool
    params: dict[str, Any]
    include_usage: bool

    def input_for(self, tasks: Sequence[str]) -> Any:
        """The mesh input for a capability with ``tasks``: the prompt, or one user message."""
        return self.prompt if TEXT_GENERATION in tasks else [{"role": "user", "content": self.prompt}]


def parse_completion(body: Mapping[str, Any]) -> CompletionRequest:
    """Check a text completions body: one prompt (text, or a list of one text)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise invalid("prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter")
    if not isinstance(prompt, str):
        raise invalid("prompt", "'prompt' must be a string (one prompt per request; no token arrays)")
    stream = _flag(body, "stream")
    _unsupported(body, "n", "best_of", "echo", "suffix", "logprobs")
    return CompletionRequest(prompt, stream, generation_params(body), _include_usage(body))


@dataclass
class EmbeddingRequest:
    """A checked ``POST /v1/embeddings`` body."""

    texts: list[str]
    encoding: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_embeddings(body: Mapping[str, Any]) -> EmbeddingRequest:
    """Check an embeddings body: texts (no token arrays), ``encoding_format``, ``dimensions``, ``user``."""
    raw = body.get("input")
    if raw is None:
        raise invalid("input", "Missing required parameter: 'input'.", "missing_required_parameter")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise invalid("input", "'input' must be a string or a non-empty array of strings", "invalid_type")
    if not all(isinstance(t, str) for t in texts):
        raise invalid("input", "'input' must be strings: token arrays are not supported", "invalid_type")
    if any(not t for t in texts):
        raise invalid("input", "'input' cannot contain an empty string")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise invalid("encoding_format", "'encoding_format' must be 'float' or 'base64'")
    params: dict[str, Any] = {}
    if body.get("dimensions") is not None:
        if not is_int(body["dimensions"]) or body["dimensions"] < 1:
            raise invalid("dimensions", "'dimensions' must be a positive integer")
        params["dimensions"] = body["dimensions"]
    if body.get("user") is not None:
        if not isinstance(body["user"], str):
            raise invalid("user", "'user' must be a string", "invalid_type")
        params["user"] = body["user"]
    return EmbeddingRequest(texts, encoding, params)


def batch_texts(texts: Sequence[str]) -> list[list[str]]:
    """The texts in order, in batches of at most :data:`EMBEDDING_BATCH` texts and about
    :data:`EMBEDDING_BATCH_BYTES` bytes (a longer text gets a batch of its own)."""
    batches: list[list[str]] = [[]]
    size = 0
    for text in texts:
        n = len(text.encode())
        if batches[-1] and (len(batches[-1]) >= EMBEDDING_BATCH or size + n > EMBEDDING_BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(text)
        size += n
    return batches


# -- answers -----------------------------------------------------------------------------------


def text_of(chunk: Any) -> str:
    """A chunk as text: itself if text, else JSON."""
    return chunk if isinstance(chunk, str) else json.dumps(chunk, default=repr)


def finish_reason(reason: str | None) -> str:
    """An OpenAI finish reason: the provider's if OpenAI knows it, else ``"stop"``."""
    return reason if reason in _FINISH_REASONS else "stop"


def usage(counters: Mapping[str, Any], completion_chunks: int) -> dict[str, int]:
    """OpenAI's ``usage`` from a mesh answer's counters (chunks count as tokens if it gave none)."""

    def num(key: str) -> int | None:
        value: Any = counters.get(key)
        return int(value) if is_number(value) else None

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


@dataclass(frozen=True)
class Answer:
    """A whole mesh answer: its chunks, finish reason and usage counters."""

    chunks: Sequence[Any]
    finish_reason: str | None
    usage: Mapping[str, Any]


def chat_response(cid: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(text_of(c) for c in answer.chunks),
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason(answer.finish_reason),
            }
        ],
        "usage": usage(answer.usage, len(answer.chunks)),
    }


def completion_response(cid: str, created: int, model: str, answer: Answer) -> dict[str, Any]:
    """A ``text_completion`` object."""
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "text": "".join(text_of(c) for c in answer.chunks),
                "index": 0,
                "logprobs": None,
                "finish_reason": finish_reason(answer.finish_reason),
            }
        ],
        "usage": usage(answer.usage, len(answer.chunks)),
    }


@dataclass(frozen=True)
class ChatFrames:
    """The ``chat.completion.chunk`` objects of one streamed chat answer."""

    cid: str
    created: int
    model: str
    include_usage: bool

    def _chunk(self, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.cid,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def opening(self) -> dict[str, Any] | None:
        """The first event: the assistant's role."""
        return self._chunk({"role": "assistant", "content": ""}, None)

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]:
        """A text delta, or (``text=None``) the closing event with the finish reason."""
        return self._chunk({} if text is None else {"content": text}, finish)

    @cached_property
    def _text(self) -> EventTemplate:
        return event_template(self.delta)

    def text_event(self, text: str) -> bytes:
        """``sse_event(self.delta(text, None))``, from a template made once per answer."""
        return self._text.render(text)

    def text_events(self, texts: Sequence[str]) -> bytes:
        """The text events of ``texts``, one after another (:meth:`text_event` of each, joined)."""
        return self._text.render_many(texts)

    def usage_frame(self, counts: dict[str, int]) -> dict[str, Any] | None:
        """The usage event after the finish, if the client asked for it."""
        if not self.include_usage:
            return None
        out = self._chunk({}, None)
        out["choices"] = []
        out["usage"] = counts
        return out


@dataclass(frozen=True)
class CompletionFrames:
    """The ``text_completion`` objects of one streamed text completion."""

    cid: str
    created: int
    model: str
    include_usage: bool

    def opening(self) -> dict[str, Any] | None:
        """No opening event for text completions."""
        return None

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]:
        """A text delta, or (``text=None``) the closing event with the finish reason."""
        return {
            "id": self.cid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text or "", "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    @cached_property
    def _text(self) -> EventTemplate:
        return event_template(self.delta)

    def text_event(self, text: str) -> bytes:
        """``sse_event(self.delta(text, None))``, from a template made once per answer."""
        return self._text.render(text)

    def text_events(self, texts: Sequence[str]) -> bytes:
        """The text events of ``texts``, one after another (:meth:`text_event` of each, joined)."""
        return self._text.render_many(texts)

    def usage_frame(self, counts: dict[str, int]) -> dict[str, Any] | None:
        """The usage event after the finish, if the client asked for it."""
        if not self.include_usage:
            return None
        out = self.delta(None, None)
        out["choices"] = []
        out["usage"] = counts
        return out


def sse_event(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


#: Stands for the text in :func:`event_template` (a NUL-bracketed string no answer field holds
#: after the text: the fields after it are the gateway's own constants).
_MARK = "\x00modelnet-text\x00"


@dataclass(frozen=True)
class EventTemplate:
    """The bytes of a text event before and after its JSON-encoded text (:func:`event_template`)."""

    head: bytes
    tail: bytes

    def render(self, text: str) -> bytes:
        """The event carrying ``text``: what :func:`sse_event` gives, without encoding the rest again.

        ``encode_basestring_ascii`` is the string encoder ``json.dumps`` itself uses (with its
        default ``ensure_ascii``), so the bytes are the same.
        """
        return self.head + encode_basestring_ascii(text).encode() + self.tail

    @cached_property
    def _between(self) -> str:
        # what comes between two texts' JSON in a run of events: the tail, then the next head
        return (self.tail + self.head).decode("ascii")  # JSON with ensure_ascii: ASCII only

    def render_many(self, texts: Sequence[str]) -> bytes:
        """The events of ``texts``, joined: ``b"".join(map(self.render, texts))``, in one join."""
        if not texts:
            return b""
        body = self._between.join(map(encode_basestring_ascii, texts))
        return self.head + body.encode("ascii") + self.tail


def event_template(delta: Any) -> EventTemplate:
    """The template of ``sse_event(delta(text, None))`` for any text.

    ``delta`` builds an event object from a text; it is called once, with a marker, and the
    encoded event is cut at the marker's last occurrence (the text comes after the id and the
    model name, the only fields a caller chooses, and before the constant fields).
    """
    encoded = sse_event(delta(_MARK, None))
    head, mark, tail = encoded.rpartition(encode_basestring_ascii(_MARK).encode())
    if not mark:  # cannot happen for the frames of this module
        raise ValueError("the event does not carry its text")
    return EventTemplate(head, tail)


def embedding_vectors(chunks: Sequence[Any], expected: int, peer: str) -> list[list[float]]:
    """The vectors of one embedding batch's chunks; :class:`ProtocolError` unless ``expected`` of them."""
    vectors: list[list[float]] = []
    try:
        for c in chunks:
            vectors.extend(vectors_of(c))
    except ValueError as exc:
        raise ProtocolError(f"provider {peer} sent a bad embedding: {exc}") from None
    if len(vectors) != expected:
        raise ProtocolError(f"provider {peer} sent {len(vectors)} embeddings for {expected} inputs")
    return vectors


def embeddings_response(
    model: str, encoding: str, batches: Sequence[tuple[list[list[float]], Mapping[str, Any]]]
) -> dict[str, Any]:
    """The ``list`` of embeddings over every batch (its vectors, its usage counters), in order."""
    data: list[dict[str, Any]] = []
    prompt_tokens = 0
    for vectors, counters in batches:
        used = counters.get("prompt_tokens") or counters.get("total_tokens") or 0
        prompt_tokens += int(used) if is_number(used) else 0
        for vector in vectors:
            if encoding == "base64":
                value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                value = vector
            data.append({"object": "embedding", "index": len(data), "embedding": value})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }

"""Edges between the mesh and the OpenAI API, and the conventions both sides share.

Two adapters live here:

* :mod:`.upstream` serves an existing OpenAI-compatible model server
  (OpenAI, Ollama, vLLM, llama.cpp, LM Studio, ...) on the mesh:
  ``modelnet serve openai+http://127.0.0.1:11434/v1``.
* :mod:`modelnet_p2p.openai.app` serves the OpenAI HTTP API, backed by the mesh:
  ``modelnet gateway --listen 127.0.0.1:8080``.

Mesh conventions for OpenAI-style capabilities
==============================================

Any handler that follows these conventions is reachable through the gateway,
and the upstream adapter produces handlers that follow them. Field names are
OpenAI's, so that nothing needs translating at either edge.

``chat`` (task ``"chat"``)
    *input*: the list of OpenAI messages, each a map with ``role`` and
    ``content`` (text, or a list of content parts) and the optional ``name``.
    A capability that also lists the task ``"text-generation"`` accepts a
    prompt (text) as input too, as below.

    *params*: the sampling fields of the OpenAI request, as given:
    ``temperature``, ``top_p``, ``max_tokens`` (the gateway turns
    ``max_completion_tokens`` into it), ``stop``, ``seed``,
    ``presence_penalty``, ``frequency_penalty``, ``logit_bias``,
    ``response_format``, ``user``, and the common extensions ``top_k``,
    ``min_p`` and ``repetition_penalty`` (see :data:`GENERATION_PARAMS`).
    Handlers ignore the ones they do not support.

    *chunks*: text deltas (``str``), in order; their concatenation is the answer.

    *end*: ``request.finish_reason`` is OpenAI's (``"stop"``, ``"length"``, ...);
    ``request.usage`` holds ``prompt_tokens``, ``completion_tokens`` and
    ``total_tokens`` when known, plus ``tokens`` (= completion tokens, the
    counter the rest of modelnet reads).

``text-generation`` (task ``"text-generation"``)
    *input*: the prompt, text. *params*, *chunks* and *end* as for chat.

``embedding`` (task ``"embedding"``)
    *input*: a list of texts (a single text is accepted as a list of one).
    Token arrays are not part of the convention.

    *params*: ``dimensions`` and ``user`` when given.

    *chunks*: one per input, in input order, each a vector: a list of floats.
    A chunk that is a list of vectors counts as that many inputs, so a
    handler may send a batch in one chunk (mind the 1 MiB frame limit). The
    gateway splits large requests into several mesh requests of at most
    :data:`EMBEDDING_BATCH` inputs.

    *end*: ``request.usage`` holds ``prompt_tokens`` and ``total_tokens`` when known.

Errors
    Handlers raise :mod:`modelnet_p2p.errors` classes. A
    :class:`~modelnet_p2p.errors.BadRequestError` whose message starts with an
    OpenAI request field name and a colon (``"temperature: must be at most 2"``,
    see :func:`param_error`) names that field: the gateway reports it as the
    ``param`` of its HTTP 400 answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import BadRequestError, ModelNetError

__all__ = [
    "CHAT",
    "EMBEDDING",
    "EMBEDDING_BATCH",
    "EMBEDDING_PARAMS",
    "GENERATION_PARAMS",
    "OPENAI_TASKS",
    "REQUEST_FIELDS",
    "TEXT_GENERATION",
    "error_param",
    "messages_to_prompt",
    "param_error",
    "usage_counts",
    "vectors_of",
]

CHAT = "chat"
TEXT_GENERATION = "text-generation"
EMBEDDING = "embedding"
#: The tasks the OpenAI edges know how to carry.
OPENAI_TASKS: tuple[str, ...] = (CHAT, TEXT_GENERATION, EMBEDDING)

#: Request fields that travel as mesh params for chat and text generation.
GENERATION_PARAMS: frozenset[str] = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "response_format",
        "user",
        "top_k",
        "min_p",
        "repetition_penalty",
    }
)
#: Request fields that travel as mesh params for embeddings.
EMBEDDING_PARAMS: frozenset[str] = frozenset({"dimensions", "user"})
#: Most inputs the gateway puts in one mesh embedding request.
EMBEDDING_BATCH = 64

#: Every OpenAI request field a ``param`` may name (see :func:`error_param`).
REQUEST_FIELDS: frozenset[str] = GENERATION_PARAMS | {
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "n",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "encoding_format",
    "dimensions",
    "logprobs",
    "top_logprobs",
    "echo",
    "suffix",
    "best_of",
}


def param_error(param: str, message: str) -> BadRequestError:
    """A :class:`BadRequestError` that names the request field at fault (``"param: message"``)."""
    return BadRequestError(f"{param}: {message}")


def error_param(exc: ModelNetError) -> str | None:
    """The request field a :class:`BadRequestError` names by the ``"field: ..."`` convention, or ``None``."""
    if not isinstance(exc, BadRequestError):
        return None
    head, sep, _ = exc.message.partition(":")
    head = head.strip()
    if sep and head in REQUEST_FIELDS:
        return head
    return None


def usage_counts(prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, int]:
    """``request.usage`` for an answer, by the convention above (unknown counts left out)."""
    out: dict[str, int] = {}
    if prompt_tokens is not None:
        out["prompt_tokens"] = int(prompt_tokens)
    if completion_tokens is not None:
        out["completion_tokens"] = int(completion_tokens)
        out["tokens"] = int(completion_tokens)
    if prompt_tokens is not None or completion_tokens is not None:
        out["total_tokens"] = int(prompt_tokens or 0) + int(completion_tokens or 0)
    return out


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def messages_to_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """A prompt for a capability that has no ``chat`` task.

    A single user message becomes its text; a longer conversation becomes a
    transcript, one ``role: text`` line per message, ending with ``assistant:``.
    """
    if len(messages) == 1 and messages[0].get("role") == "user":
        return _content_text(messages[0].get("content"))
    lines = [f"{m.get('role', 'user')}: {_content_text(m.get('content'))}" for m in messages]
    lines.append("assistant:")
    return "\n".join(lines)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def vectors_of(chunk: Any) -> list[list[float]]:
    """The vectors in one embedding chunk: a vector (list of floats) or a list of vectors.

    Raises :class:`ValueError` for anything else.
    """
    if isinstance(chunk, list | tuple) and chunk and all(_is_number(x) for x in chunk):
        return [[float(x) for x in chunk]]
    if isinstance(chunk, list | tuple) and chunk and all(isinstance(v, list | tuple) for v in chunk):
        out = []
        for v in chunk:
            if not v or not all(_is_number(x) for x in v):
                raise ValueError("an embedding vector must be a non-empty list of numbers")
            out.append([float(x) for x in v])
        return out
    raise ValueError(f"an embedding chunk must be a vector or a list of vectors, not {type(chunk).__name__}")

"""The trace of a collaboration: which models were consulted, where, how long, and what failed.

Every pattern returns a :class:`Result`: its output and a :class:`Trace` tree
with one node per step (capability, serving peer, timing, chunks, tokens,
attempts, errors). Times are trio time (``MockClock`` in tests).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...proto.receipt import (
    Receipt,
    ReceiptCheck,
    ReceiptError,
    from_json_value,
    receipt_file,
    to_json_value,
    value_digest,
    verify_receipt_file,
)
from ..context import join_chunks
from ..routing import trio_clock

__all__ = [
    "RECEIPT_CHAIN_FORMAT",
    "TRACE_LOG_SIZE",
    "Result",
    "Trace",
    "TraceLog",
    "as_text",
    "logged",
    "receipt_chain",
    "receipt_json",
    "verify_receipt_chain",
]

#: Collaborations a :class:`TraceLog` remembers (the oldest is dropped first).
TRACE_LOG_SIZE = 32


# -- trace ---------------------------------------------------------------------------


@dataclass
class Trace:
    """One node of a collaboration's trace tree."""

    kind: str
    capability: str | None = None
    peer: str | None = None
    status: str = "running"
    started: float = field(default_factory=trio_clock)
    ended: float | None = None
    chunks: int = 0
    tokens: int | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    children: list[Trace] = field(default_factory=list)
    #: The provider's receipt for this step, as checked (steps called with receipts only).
    receipt: ReceiptCheck | None = None
    #: The step's chunks, kept with its receipt so that the chain can be checked offline.
    output: list[Any] | None = None

    def child(self, kind: str, capability: str | None = None, **detail: Any) -> Trace:
        node = Trace(kind, capability, detail=dict(detail))
        self.children.append(node)
        return node

    def finish(self, status: str = "ok", error: BaseException | str | None = None) -> None:
        self.status = status
        self.ended = trio_clock()
        if error is not None:
            self.error = str(error)

    @property
    def duration_ms(self) -> float:
        return ((self.ended or trio_clock()) - self.started) * 1000

    def peers(self) -> list[str]:
        """Every peer that served a step, depth first."""
        out = [self.peer] if self.peer else []
        for c in self.children:
            out.extend(c.peers())
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "capability": self.capability,
            "peer": self.peer,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 2),
            "chunks": self.chunks,
            "tokens": self.tokens,
            "error": self.error,
            "attempts": self.attempts,
            "detail": _jsonable(self.detail),
            "children": [c.to_json() for c in self.children],
            **({} if self.receipt is None else {"receipt": receipt_json(self.receipt)}),
        }

    def render(self, indent: str = "") -> str:
        """The tree as indented text, for terminals."""
        mark = {"ok": "✓", "error": "✗", "timeout": "⌛", "cancelled": "⊘", "skipped": "·"}.get(
            self.status, "…"
        )
        parts = [f"{mark} {self.kind}"]
        if self.capability:
            parts.append(self.capability)
        if self.peer:
            parts.append(f"@{self.peer[-8:]}")
        parts.append(f"{self.duration_ms:.0f} ms")
        if self.chunks:
            parts.append(f"{self.chunks} chunks")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens")
        for key in ("label", "vote", "round", "verdict", "members"):
            if key in self.detail:
                parts.append(f"{key}={self.detail[key]}")
        if len(self.attempts) > 1:
            parts.append(f"{len(self.attempts)} attempts")
        if self.error:
            parts.append(f"— {self.error}")
        lines = [indent + " ".join(parts)]
        for c in self.children:
            lines.append(c.render(indent + "  "))
        return "\n".join(lines)


# -- chains of receipts --------------------------------------------------------------


def receipt_json(check: ReceiptCheck) -> dict[str, Any]:
    """A step's receipt in a trace's JSON: whether it held against the answer (and why not),
    the envelope in hex, and the signed fields."""
    out: dict[str, Any] = {"ok": check.receipt is not None, "envelope": check.data.hex()}
    if check.receipt is not None:
        out.update(check.receipt.summary())
    else:
        out["reason"] = check.error.reason if check.error is not None else "malformed"
        out["error"] = str(check.error) if check.error is not None else "no receipt"
    return out


#: The ``format`` value of a chain of receipts file.
RECEIPT_CHAIN_FORMAT = "modelnet-receipt-chain/1"


def _signed(node: Trace) -> list[Trace]:
    out = [node] if node.receipt is not None else []
    for c in node.children:
        out.extend(_signed(c))
    return out


def receipt_chain(root: Trace, input: Any) -> dict[str, Any]:
    """The JSON form of a collaboration's chain of receipts: the first input and, for every
    signed step in order (depth first), its receipt file with its chunks and provider."""
    steps = []
    for node in _signed(root):
        assert node.receipt is not None
        step = receipt_file(node.receipt.data, chunks=node.output or [])
        step["provider"] = node.peer
        steps.append(step)
    return {"format": RECEIPT_CHAIN_FORMAT, "input": to_json_value(input), "steps": steps}


def verify_receipt_chain(
    chain: dict[str, Any], *, link: Callable[[list[Any]], Any] = join_chunks
) -> list[Receipt]:
    """Check a chain of receipts end to end: every step's receipt against its chunks and
    provider, the first step's input digest against ``input``, and each later step's input
    digest against ``link`` of the previous step's chunks (a pipeline's: :func:`join_chunks`).
    Raises :class:`ReceiptError` (reason ``broken_chain`` for a link that does not hold)."""
    if not isinstance(chain, dict) or chain.get("format") != RECEIPT_CHAIN_FORMAT:
        raise ReceiptError("malformed", f"not a {RECEIPT_CHAIN_FORMAT} file")
    steps = chain.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ReceiptError("malformed", "a chain of receipts needs at least one step")
    receipts: list[Receipt] = []
    expected = value_digest(from_json_value(chain.get("input")))
    for i, step in enumerate(steps):
        receipt = verify_receipt_file(step)
        if receipt.input_digest != expected:
            raise ReceiptError("broken_chain", f"step {i}'s input is not what the chain fed it")
        chunks = [from_json_value(c) for c in step.get("chunks", [])]
        expected = value_digest(link(chunks))
        receipts.append(receipt)
    return receipts


def _shape(node: Trace) -> tuple[Any, ...]:
    return (node.status, node.peer, node.chunks, tuple(_shape(c) for c in node.children))


class TraceLog:
    """The last collaborations a peer ran (their root traces, still running or done), for views
    such as the dashboard. Bounded: the oldest of more than ``size`` is dropped."""

    def __init__(self, size: int = TRACE_LOG_SIZE) -> None:
        self._items: deque[tuple[int, float, Trace]] = deque(maxlen=size)
        self._count = 0

    def add(self, trace: Trace) -> Trace:
        self._count += 1
        self._items.append((self._count, time.time(), trace))
        return trace

    def recent(self, n: int = TRACE_LOG_SIZE) -> list[dict[str, Any]]:
        """The ``n`` newest as JSON (newest first), each with ``id`` and ``started_at`` (Unix time)."""
        items = list(self._items)[-n:] if n > 0 else []
        return [{"id": i, "started_at": t, **tr.to_json()} for i, t, tr in reversed(items)]

    def key(self) -> tuple[Any, ...]:
        """Changes when a trace is added or one of them progresses (not with the clock)."""
        return (self._count, tuple(_shape(tr) for _, _, tr in self._items))

    def __len__(self) -> int:
        return len(self._items)


def logged(mesh: Any, trace: Trace) -> Trace:
    """Record the root ``trace`` in ``mesh.trace_log`` (a :class:`~modelnet_p2p.Peer`'s), if it has one."""
    log = getattr(mesh, "trace_log", None)
    if isinstance(log, TraceLog):
        log.add(trace)
    return trace


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return json.loads(json.dumps(obj, default=repr))


@dataclass
class Result:
    """The answer of a collaborative request and its trace."""

    output: Any
    trace: Trace

    @property
    def text(self) -> str:
        return as_text(self.output)


def as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return json.dumps(value, default=repr)

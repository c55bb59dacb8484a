"""Collaborative reasoning: pathways between models.

Small specialised models together do what none does alone. This module turns
the common shapes of that into a few lines each, over the mesh:

- :func:`pipeline`: ``A -> B -> C``, each step's output the next one's input;
  a step marked ``stream`` starts on each piece of its input as it arrives.
- :func:`ensemble`: fan a request out to k providers (or several capabilities)
  and aggregate: majority vote, first valid, all, or a judge capability.
- :func:`route`: a router capability (e.g. a classifier) picks the specialist.
- :func:`draft_verify`: a drafter answers, a verifier checks, the drafter
  retries with the verifier's feedback.
- :func:`run_workflow`: the same patterns, composed in a TOML file
  (``specs/workflow.md``).

Every function returns a :class:`Result`: the answer and a :class:`Trace` tree
that records, for each step, the capability, the peer that served it, timing,
chunks, retries and failures: the user's proof of which models were consulted.

Handlers reach the mesh through ``request.mesh`` (a :class:`MeshContext`):
calls made there inherit the request's deadline, cancellation and trace, and
the hop limit and the path of visited steps stop loops.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelNetError,
    OverloadedError,
    UnavailableError,
    exception_leaves,
)
from ..proto.infer import TraceContext
from ..services.inference.server import via_entry

if TYPE_CHECKING:
    from ..peer import InferenceStream, Peer
    from ..services.inference.handlers import InferenceRequest

__all__ = [
    "MeshContext",
    "Result",
    "Step",
    "Trace",
    "draft_verify",
    "ensemble",
    "pipeline",
    "route",
    "run_workflow",
]


# -- trace ---------------------------------------------------------------------------


@dataclass
class Trace:
    """One node of a collaboration's trace tree."""

    kind: str
    capability: str | None = None
    peer: str | None = None
    status: str = "running"
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    chunks: int = 0
    tokens: int | None = None
    error: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    children: list[Trace] = field(default_factory=list)

    def child(self, kind: str, capability: str | None = None, **detail: Any) -> Trace:
        node = Trace(kind, capability, detail=dict(detail))
        self.children.append(node)
        return node

    def finish(self, status: str = "ok", error: BaseException | str | None = None) -> None:
        self.status = status
        self.ended = time.monotonic()
        if error is not None:
            self.error = str(error)

    @property
    def duration_ms(self) -> float:
        return ((self.ended or time.monotonic()) - self.started) * 1000

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
        return _as_text(self.output)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    return json.dumps(value, default=repr)


# -- calling one capability with a trace node ----------------------------------------


def _collect(chunks: list[Any]) -> Any:
    """A step's output as the next step's input: text chunks joined, one chunk as itself."""
    if chunks and all(isinstance(c, str) for c in chunks):
        return "".join(chunks).strip()
    if len(chunks) == 1:
        return chunks[0]
    return chunks


async def _call(
    peer: Peer,
    node: Trace,
    capability: str,
    input: Any,
    params: Mapping[str, Any],
    deadline: float,
    target: str | None = None,
    trace: TraceContext | None = None,
    avoid: set[str] | frozenset[str] = frozenset(),
) -> Any:
    """Call one capability, recording peer, chunks and attempts in ``node``."""
    node.capability = capability
    timeout = None if math.isinf(deadline) else max(0.001, deadline - trio.current_time())
    extra: dict[str, Any] = {"avoid": avoid} if avoid and target is None else {}
    stream = peer.infer(target, capability, input, timeout=timeout, trace=trace, **extra, **dict(params))
    chunks: list[Any] = []
    try:
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
    except DeadlineExceededError as exc:
        _record(node, stream, len(chunks))
        node.finish("timeout", exc)
        raise
    except ModelNetError as exc:
        _record(node, stream, len(chunks))
        node.finish("error", exc)
        raise
    except trio.Cancelled:
        _record(node, stream, len(chunks))
        node.finish("cancelled", "cut off")
        raise
    _record(node, stream, len(chunks))
    node.finish("ok")
    return _collect(chunks)


def _record(node: Trace, stream: InferenceStream, chunks: int) -> None:
    info = stream.info
    node.peer = info.peer or None
    node.chunks = chunks
    tokens = info.usage.get("tokens") if info.usage else None
    node.tokens = tokens if isinstance(tokens, int) else None
    node.attempts = list(getattr(info, "attempts", []) or [])


def _deadline(timeout: float | None) -> float:
    return math.inf if timeout is None else trio.current_time() + timeout


# -- pipeline ----------------------------------------------------------------------


@dataclass
class Step:
    """One step of a pipeline.

    ``stream=True`` means the step can work on its input piece by piece: the
    previous step's chunks are grouped (by ``group``: ``"chunk"``, ``"sentence"``
    or ``"line"``) and each group is sent to this step as soon as it is
    complete, so this step's first output can arrive before the previous step
    has finished. Outputs keep the input order.
    """

    capability: str
    params: dict[str, Any] = field(default_factory=dict)
    target: str | None = None
    stream: bool = False
    group: str = "sentence"


def _as_step(step: Step | str | Mapping[str, Any]) -> Step:
    if isinstance(step, Step):
        return step
    if isinstance(step, str):
        return Step(step)
    if not isinstance(step, Mapping):
        raise BadRequestError(f"a step must be a capability name or a table, not {step!r}")
    unknown = set(step) - {"capability", "params", "target", "stream", "group"}
    if unknown or "capability" not in step:
        raise BadRequestError(
            f"a step needs 'capability' and may have params, target, stream, group; got {sorted(step)}"
        )
    return Step(**dict(step))


async def pipeline(
    peer: Peer,
    steps: Sequence[Step | str | Mapping[str, Any]],
    input: Any,
    *,
    timeout: float | None = None,
    trace: Trace | None = None,
) -> Result:
    """Run ``steps`` in order; each step's output is the next step's input."""
    if not steps:
        raise BadRequestError("a pipeline needs at least one step")
    root = trace or Trace("pipeline")
    deadline = _deadline(timeout)
    chain = [_as_step(s) for s in steps]
    value: Any = input
    i = 0
    try:
        while i < len(chain):
            step = chain[i]
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            if nxt is not None and nxt.stream:
                value = await _streamed_pair(peer, root, step, nxt, value, deadline)
                i += 2
            else:
                value = await _call(
                    peer, root.child("call"), step.capability, value, step.params, deadline, step.target
                )
                i += 1
    except BaseException as exc:
        root.finish("timeout" if isinstance(exc, DeadlineExceededError) else "error", exc)
        raise
    root.finish("ok")
    return Result(value, root)


def _split_ready(buffer: str, group: str) -> tuple[list[str], str]:
    """Complete groups at the front of ``buffer`` and the incomplete rest."""
    if group == "chunk":
        return ([buffer] if buffer else []), ""
    sep = "\n" if group == "line" else None
    out: list[str] = []
    start = 0
    for i, ch in enumerate(buffer):
        end = (ch == "\n") if sep else (ch in ".!?" and (i + 1 == len(buffer) or buffer[i + 1].isspace()))
        if end:
            piece = buffer[start : i + 1].strip()
            if piece:
                out.append(piece)
            start = i + 1
    return out, buffer[start:]


async def _streamed_pair(
    peer: Peer, root: Trace, first: Step, second: Step, value: Any, deadline: float
) -> Any:
    """Run ``first`` and feed its output to ``second`` group by group, as it arrives."""
    up = root.child("call", first.capability)
    down = root.child("stream", second.capability, group=second.group)
    timeout = None if math.isinf(deadline) else max(0.001, deadline - trio.current_time())
    results: dict[int, Any] = {}
    send, recv = trio.open_memory_channel[tuple[int, str]](16)

    async def feed() -> None:
        stream = peer.infer(first.target, first.capability, value, timeout=timeout, **first.params)
        buffer = ""
        n = 0
        async with send, stream:
            try:
                async for chunk in stream:
                    up.chunks += 1
                    buffer += chunk if isinstance(chunk, str) else json.dumps(chunk)
                    ready, buffer = _split_ready(buffer, second.group)
                    for piece in ready:
                        await send.send((n, piece))
                        n += 1
            except ModelNetError as exc:
                _record(up, stream, up.chunks)
                up.finish("error", exc)
                raise
            if buffer.strip():
                await send.send((n, buffer.strip()))
            _record(up, stream, up.chunks)
            up.finish("ok")

    async def work(index: int, piece: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            node = down.child("call", second.capability, piece=index)
            results[index] = await _call(
                peer, node, second.capability, piece, second.params, deadline, second.target
            )

    limiter = trio.CapacityLimiter(4)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            async with recv:
                async for index, piece in recv:
                    nursery.start_soon(work, index, piece, limiter)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None
    down.finish("ok")
    down.chunks = len(results)
    outputs = [results[i] for i in sorted(results)]
    if all(isinstance(o, str) for o in outputs):
        return " ".join(o.strip() for o in outputs)
    return outputs


# -- ensemble ----------------------------------------------------------------------


def _first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception to show for a failed fan-out: a deadline first, then any modelnet error."""
    leaves = exception_leaves(group)
    for kind in (DeadlineExceededError, ModelNetError):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    return leaves[0]


def _normalise(value: Any) -> str:
    return " ".join(_as_text(value).lower().split())


async def ensemble(
    peer: Peer,
    capability: str | Sequence[str],
    input: Any,
    *,
    k: int = 3,
    aggregate: str = "majority",
    judge: str | None = None,
    params: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
    trace: Trace | None = None,
) -> Result:
    """Ask k providers of one capability (or each of several capabilities) in parallel.

    ``aggregate`` is ``"majority"`` (the most common normalised answer; ties go
    to the earliest), ``"first"`` (the first valid answer; the others are
    cancelled), ``"all"`` (every answer, by member), or ``"judge"`` (the
    ``judge`` capability gets ``{"input": ..., "answers": [...]}`` and its
    answer is the result). Members still running at the deadline are cut off;
    failed members are left out; the rest still count. The trace says which
    members took part.
    """
    root = trace or Trace("ensemble", detail={"aggregate": aggregate})
    deadline = trio.current_time() + timeout
    member_deadline = deadline - (min(2.0, timeout / 4) if aggregate == "judge" else 0.0)
    params = dict(params or {})
    members: list[tuple[str, str | None]]
    if isinstance(capability, str):
        providers = await peer.find_providers(capability, timeout=min(5.0, timeout / 2))
        if not providers:
            raise UnavailableError(f"no provider of {capability!r} found")
        members = [(capability, p) for p in providers[:k]]
        root.capability = capability
    else:
        members = [(c, None) for c in capability]
    answers: dict[int, Any] = {}
    first_done = trio.Event()

    finished = 0

    async def member(i: int, cap: str, target: str | None) -> None:
        nonlocal finished
        node = root.child("member", cap, member=i)
        try:
            answers[i] = await _call(peer, node, cap, input, params, member_deadline, target)
        except ModelNetError:
            pass  # recorded in the node; the others still count
        finally:
            finished += 1
        if aggregate == "first" and (i in answers or finished == len(members)):
            first_done.set()

    with trio.move_on_at(member_deadline):
        async with trio.open_nursery() as nursery:
            for i, (cap, target) in enumerate(members):
                nursery.start_soon(member, i, cap, target)
            if aggregate == "first":
                await first_done.wait()
                nursery.cancel_scope.cancel()
    for node in root.children:
        if node.status == "running":
            node.finish("timeout", "cut off at the deadline")
        elif node.status == "cancelled":
            if aggregate == "first":
                node.status = "skipped"  # another member answered first
            else:
                node.status, node.error = "timeout", "cut off at the deadline"
    took_part = sorted(answers)
    root.detail["members"] = f"{len(took_part)}/{len(members)}"
    if not answers:
        root.finish("error", "no member answered")
        raise UnavailableError(f"no ensemble member answered ({len(members)} asked)")
    output: Any
    if aggregate == "majority":
        votes = Counter(_normalise(answers[i]) for i in took_part)
        best, count = max(
            votes.items(),
            key=lambda kv: (kv[1], -min(i for i in took_part if _normalise(answers[i]) == kv[0])),
        )
        output = next(answers[i] for i in took_part if _normalise(answers[i]) == best)
        root.detail["vote"] = f"{count}/{len(took_part)}"
    elif aggregate == "first":
        output = answers[took_part[0]] if len(took_part) == 1 else answers[min(took_part)]
    elif aggregate == "all":
        output = [answers[i] for i in took_part]
    elif aggregate == "judge":
        if not judge:
            raise BadRequestError("aggregate='judge' needs a judge capability")
        node = root.child("judge", judge)
        output = await _call(
            peer, node, judge, {"input": input, "answers": [answers[i] for i in took_part]}, {}, deadline
        )
    else:
        raise BadRequestError(f"unknown aggregate {aggregate!r} (majority, first, all, judge)")
    root.finish("ok")
    return Result(output, root)


# -- router ------------------------------------------------------------------------


def _label_of(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("label", "route", "capability", "class"):
            if key in value:
                return str(value[key])
    return _as_text(value).strip().split()[0] if _as_text(value).strip() else ""


async def route(
    peer: Peer,
    router: str,
    input: Any,
    routes: Mapping[str, str | Step | Mapping[str, Any]],
    *,
    default: str | Step | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    trace: Trace | None = None,
) -> Result:
    """Ask the ``router`` capability for a label, then send ``input`` to ``routes[label]``."""
    root = trace or Trace("router")
    deadline = _deadline(timeout)
    label = _label_of(await _call(peer, root.child("classify"), router, input, {}, deadline))
    root.detail["label"] = label
    chosen = routes.get(label, default)
    if chosen is None:
        root.finish("error", f"no route for label {label!r}")
        raise BadRequestError(
            f"router {router!r} chose {label!r}, which has no route and there is no default"
        )
    step = _as_step(chosen)
    output = await _call(
        peer, root.child("specialist"), step.capability, input, step.params, deadline, step.target
    )
    root.finish("ok")
    return Result(output, root)


# -- draft and verify --------------------------------------------------------------


async def draft_verify(
    peer: Peer,
    drafter: str,
    verifier: str,
    input: Any,
    *,
    rounds: int = 3,
    params: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    trace: Trace | None = None,
) -> Result:
    """The drafter answers; the verifier checks ``{"question", "answer"}``.

    The verifier answers ``{"ok": bool, "feedback": str}``. On rejection the
    drafter is asked again with params ``feedback`` and ``previous`` (and
    ``attempt``), up to ``rounds`` drafts; when the mesh chooses the drafter's
    provider, providers whose drafts were rejected are avoided. If no draft is
    accepted the result is the last draft, and the trace's status is
    ``"error"`` with the verdict.
    """
    root = trace or Trace("draft-verify")
    deadline = _deadline(timeout)
    extra: dict[str, Any] = dict(params or {})
    draft: Any = None
    rejected: set[str] = set()
    for attempt in range(1, rounds + 1):
        node = root.child("draft", round=attempt)
        try:
            draft = await _call(peer, node, drafter, input, extra, deadline, avoid=rejected)
        except (OverloadedError, UnavailableError):
            if not rejected:
                raise
            # Every other provider is unavailable: ask a rejected one again, with the feedback.
            node.attempts.append({"note": "no other provider; asking a rejected one again"})
            node.status = "running"
            draft = await _call(peer, node, drafter, input, extra, deadline)
        verdict = await _call(
            peer,
            root.child("verify", round=attempt),
            verifier,
            {"question": input, "answer": draft},
            {},
            deadline,
        )
        ok = (
            bool(verdict.get("ok"))
            if isinstance(verdict, dict)
            else _as_text(verdict).lower().startswith("ok")
        )
        feedback = verdict.get("feedback", "") if isinstance(verdict, dict) else _as_text(verdict)
        root.children[-1].detail["verdict"] = "accept" if ok else "reject"
        if not ok and node.peer:
            rejected.add(node.peer)
        if ok:
            root.detail["round"] = attempt
            root.finish("ok")
            return Result(draft, root)
        extra = {**dict(params or {}), "feedback": feedback, "previous": draft, "attempt": attempt + 1}
    root.detail["round"] = rounds
    root.finish("error", f"not accepted after {rounds} rounds")
    return Result(draft, root)


# -- inside handlers ----------------------------------------------------------------


class MeshContext:
    """``request.mesh``: the mesh as seen from inside a handler.

    Calls made through it carry the request's remaining time as their deadline,
    run inside the request's cancel scope (so cancelling the request cancels
    them, on every hop), and extend the request's trace: ``hop + 1`` and this
    step appended to the path, which lets servers stop loops.
    """

    def __init__(self, peer: Peer, request: InferenceRequest) -> None:
        self._peer = peer
        self._request = request

    def trace_context(self) -> TraceContext:
        tc = self._request.trace
        return TraceContext(
            trace_id=tc.trace_id or os.urandom(16),
            span_id=os.urandom(8),
            hops=tc.hops + 1,
            visited=(*tc.visited, via_entry(self._peer.peer_id, self._request.capability.name))[-32:],
        )

    def _timeout(self) -> float | None:
        remaining = self._request.deadline - trio.current_time()
        if math.isinf(remaining):
            return None
        if remaining <= 0:
            raise DeadlineExceededError("no time left for a nested call")
        return remaining

    def infer(
        self, target: Any = None, capability: str | None = None, input: Any = None, **params: Any
    ) -> InferenceStream:
        return self._peer.infer(
            target, capability, input, timeout=self._timeout(), trace=self.trace_context(), **params
        )

    async def call(
        self, target: Any = None, capability: str | None = None, input: Any = None, **params: Any
    ) -> Any:
        """Call a capability and return its answer (joined text, the single value, or the chunks)."""
        stream = self.infer(target, capability, input, **params)
        chunks: list[Any] = []
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        return _collect(chunks)

    def call_sync(
        self, target: Any = None, capability: str | None = None, input: Any = None, **params: Any
    ) -> Any:
        """:meth:`call` for sync handlers, which run in worker threads."""
        return trio.from_thread.run(lambda: self.call(target, capability, input, **params))


# -- workflows ----------------------------------------------------------------------

_PATTERNS = ("call", "pipeline", "ensemble", "router", "draft_verify")
_KEYS = {
    "call": {"capability", "params", "target"},
    "step": {"capability", "params", "target", "stream", "group"},
    "pipeline": {"steps"},
    "ensemble": {"capability", "capabilities", "k", "aggregate", "judge", "timeout", "params"},
    "router": {"capability", "routes", "default"},
    "draft_verify": {"drafter", "verifier", "rounds", "params"},
    "workflow": {"name", "input", "timeout", *_PATTERNS},
}


def _as_node(step: Any) -> Mapping[str, Any]:
    """A pipeline step as a workflow node: a nested pattern as it is, a capability as a call.

    In a pipeline that mixes nested patterns and plain steps, a plain step's
    ``stream`` hand-over is not used: the step runs on the previous output, whole.
    """
    if isinstance(step, Mapping) and any(p in step for p in _PATTERNS):
        return step
    if isinstance(step, str):
        return {"call": step}
    return {"call": {k: v for k, v in step.items() if k in ("capability", "params", "target")}}


def _check_keys(spec: Any, kind: str) -> None:
    if not isinstance(spec, Mapping):
        raise BadRequestError(f"workflow: {kind} must be a table")
    unknown = set(spec) - _KEYS[kind]
    if unknown:
        raise BadRequestError(
            f"workflow: unknown key(s) {', '.join(sorted(unknown))} in {kind} "
            f"(allowed: {', '.join(sorted(_KEYS[kind]))})"
        )


async def run_node(peer: Peer, node: Mapping[str, Any], input: Any, trace: Trace, deadline: float) -> Any:
    """Run one workflow node (see ``specs/workflow.md``) and return its output."""
    kinds = [k for k in _PATTERNS if k in node]
    if len(kinds) != 1:
        raise BadRequestError(
            f"a workflow node needs exactly one of {', '.join(_PATTERNS)}; got {sorted(node)}"
        )
    kind = kinds[0]
    spec = node[kind]
    timeout = None if math.isinf(deadline) else max(0.001, deadline - trio.current_time())
    if kind == "call":
        spec = {"capability": spec} if isinstance(spec, str) else spec
        _check_keys(spec, "call")
        params = dict(spec.get("params", {}))
        return await _call(
            peer,
            trace.child("call"),
            _need_str(spec, "capability"),
            input,
            params,
            deadline,
            spec.get("target"),
        )
    if kind == "pipeline":
        _check_keys(spec, "pipeline")
        steps = spec.get("steps")
        if not isinstance(steps, list) or not steps:
            raise BadRequestError("pipeline needs a non-empty list of steps")
        for st in steps:
            if isinstance(st, Mapping) and not any(p in st for p in _PATTERNS):
                _check_keys(st, "step")
            elif not isinstance(st, (str, Mapping)):
                raise BadRequestError(f"workflow: a pipeline step must be a name or a table, not {st!r}")
        node_trace = trace.child("pipeline")
        value = input
        plain = all(
            isinstance(s, str) or ("capability" in s and not any(p in s for p in _PATTERNS))
            for s in steps
            if isinstance(s, (str, Mapping))
        )
        if plain:
            result = await pipeline(peer, steps, input, timeout=timeout, trace=node_trace)
            return result.output
        for s in steps:
            value = await run_node(peer, _as_node(s), value, node_trace, deadline)
        node_trace.finish("ok")
        return value
    if kind == "ensemble":
        _check_keys(spec, "ensemble")
        spec = dict(spec)
        caps = spec.get("capabilities") or spec.get("capability")
        if caps is None:
            raise BadRequestError("ensemble needs capability or capabilities")
        result = await ensemble(
            peer,
            caps,
            input,
            k=int(spec.get("k", 3)),
            aggregate=str(spec.get("aggregate", "majority")),
            judge=spec.get("judge"),
            params=spec.get("params"),
            timeout=float(spec.get("timeout", timeout or 30.0)),
            trace=trace.child("ensemble"),
        )
        return result.output
    if kind == "router":
        _check_keys(spec, "router")
        spec = dict(spec)
        routes = dict(spec.get("routes", {}))
        default = spec.get("default")
        for candidate in (*routes.values(), default):  # fail on a bad route before any call
            if candidate is not None and not (
                isinstance(candidate, Mapping) and any(p in candidate for p in _PATTERNS)
            ):
                _as_step(candidate)
        node_trace = trace.child("router")
        label = _label_of(
            await _call(
                peer, node_trace.child("classify"), _need_str(spec, "capability"), input, {}, deadline
            )
        )
        node_trace.detail["label"] = label
        chosen = routes.get(label, default)
        if chosen is None:
            node_trace.finish("error", f"no route for label {label!r}")
            raise BadRequestError(f"router chose {label!r}, which has no route and there is no default")
        if isinstance(chosen, Mapping) and any(p in chosen for p in _PATTERNS):
            output = await run_node(peer, chosen, input, node_trace, deadline)  # a nested pattern
        else:
            step = _as_step(chosen)
            output = await _call(
                peer,
                node_trace.child("specialist"),
                step.capability,
                input,
                step.params,
                deadline,
                step.target,
            )
        node_trace.finish("ok")
        return output
    _check_keys(spec, "draft_verify")
    spec = dict(spec)
    result = await draft_verify(
        peer,
        _need_str(spec, "drafter"),
        _need_str(spec, "verifier"),
        input,
        rounds=int(spec.get("rounds", 3)),
        params=spec.get("params"),
        timeout=timeout,
        trace=trace.child("draft-verify"),
    )
    return result.output


def _need_str(spec: Mapping[str, Any], key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"workflow: {key!r} must be a capability name")
    return value


def load_workflow(text: str) -> dict[str, Any]:
    """Parse a workflow file (TOML) and check its shape."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadRequestError(f"workflow is not valid TOML: {exc}") from None
    if "workflow" not in data or not isinstance(data["workflow"], dict):
        raise BadRequestError("workflow file needs a [workflow] table")
    extra = set(data) - {"workflow"}
    if extra:
        raise BadRequestError(f"workflow file: unknown top-level table(s) {', '.join(sorted(extra))}")
    workflow = data["workflow"]
    _check_keys(workflow, "workflow")
    if sum(1 for k in _PATTERNS if k in workflow) != 1:
        raise BadRequestError(f"[workflow] needs exactly one of {', '.join(_PATTERNS)}")
    return workflow


async def run_workflow(
    peer: Peer, workflow: Mapping[str, Any], input: Any = None, *, timeout: float | None = None
) -> Result:
    """Run a parsed workflow (``[workflow]`` table) on ``input`` (or the file's ``input``)."""
    if input is None:
        input = workflow.get("input")
    if input is None:
        raise BadRequestError("no input: give one, or set input = ... in the workflow")
    timeout = timeout if timeout is not None else float(workflow.get("timeout", 60.0))
    root = Trace("workflow", detail={"name": workflow.get("name", "")})
    body = {k: v for k, v in workflow.items() if k in _PATTERNS}
    try:
        output = await run_node(peer, body, input, root, trio.current_time() + timeout)
    except BaseException as exc:
        root.finish("timeout" if isinstance(exc, DeadlineExceededError) else "error", exc)
        raise
    root.finish("ok")
    return Result(output, root)


async def stream_text(stream: AsyncIterator[Any]) -> str:
    """Join a stream's text chunks (a convenience for examples)."""
    return "".join([c async for c in stream if isinstance(c, str)])

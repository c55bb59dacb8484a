"""Collaboration patterns: pipeline, ensemble, router and draft-verify, over the mesh.

Small specialised models together do what none does alone:

- :func:`pipeline`: ``A -> B -> C``, each step's output the next one's input;
  a step marked ``stream`` starts on each piece of its input as it arrives.
- :func:`ensemble`: fan a request out to k providers (or several capabilities)
  and aggregate: majority vote, first valid, all, or a judge capability.
- :func:`route`: a router capability (e.g. a classifier) picks the specialist.
- :func:`draft_verify`: a drafter answers, a verifier checks, the drafter
  retries with the verifier's feedback.

Each takes a :class:`Mesh`: a :class:`~modelnet_p2p.Peer`, or ``request.mesh``
inside a handler (then every call inherits the request's deadline, cancellation
and trace). Either way the calls go through the peer's one mesh client.

What only a pattern can judge goes to the providers' reputation
(:mod:`modelnet_p2p.mesh.reputation`) through the mesh client's ``report``: a draft the
verifier rejects counts ``"rejected"`` against the drafter's provider, and an ensemble
member that loses a strict majority vote (at least three answers) counts ``"disagreed"``.
A mesh without a reporter (:func:`reporter_of`) just isn't told.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ...errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelNetError,
    OverloadedError,
    UnavailableError,
    exception_leaves,
)
from ..client import InferenceStream, deadline_of, remaining
from ..context import join_chunks
from ..providers import LOOKUP_TIMEOUT
from .trace import Result, Trace, as_text, logged

__all__ = [
    "Mesh",
    "Step",
    "Grouper",
    "as_step",
    "call_step",
    "deadline_of",
    "draft_verify",
    "ensemble",
    "join_pieces",
    "label_of",
    "majority_vote",
    "pipeline",
    "reporter_of",
    "route",
    "verdict_of",
    "vote_agrees",
]


class Mesh(Protocol):
    """What the patterns call: a :class:`~modelnet_p2p.Peer` or a handler's ``request.mesh``."""

    def infer(
        self,
        target: Any = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        avoid: Collection[str] = (),
        **params: Any,
    ) -> InferenceStream: ...

    async def find_providers(
        self, capability: str, *, timeout: float = LOOKUP_TIMEOUT, limit: int | None = None
    ) -> list[str]: ...


#: ``report(peer_id, event)``: an outcome for a provider's reputation (``MeshClient.report``).
Reporter = Callable[[str, str], None]


def reporter_of(mesh: Mesh) -> Reporter | None:
    """The reputation reporter behind ``mesh``: a Peer's ``mesh_client.report``, or a
    ``request.mesh``'s client's; ``None`` for a mesh that has none."""
    for name in ("mesh_client", "client"):
        report = getattr(getattr(mesh, name, None), "report", None)
        if callable(report):
            return report  # type: ignore[no-any-return]
    return None


def _report(mesh: Mesh, peer_id: str | None, event: str) -> None:
    report = reporter_of(mesh)
    if report is not None and peer_id:
        report(peer_id, event)


# -- calling one capability with a trace node ----------------------------------------


async def call_step(
    peer: Mesh,
    node: Trace,
    capability: str,
    input: Any,
    params: Mapping[str, Any],
    deadline: float,
    target: str | None = None,
    avoid: set[str] | frozenset[str] = frozenset(),
    receipt: bool = False,
) -> Any:
    """Call one capability, recording peer, chunks and attempts in ``node`` (with ``receipt``,
    also the provider's checked receipt and the chunks it covers)."""
    node.capability = capability
    timeout = remaining(deadline)
    extra: dict[str, Any] = {"avoid": avoid} if avoid and target is None else {}
    if receipt:
        extra["receipt"] = True
    stream = peer.infer(target, capability, input, timeout=timeout, **extra, **dict(params))
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
    if receipt:
        node.receipt, node.output = stream.info.receipt, chunks
    node.finish("ok")
    return join_chunks(chunks)


def _record(node: Trace, stream: InferenceStream, chunks: int) -> None:
    info = stream.info
    node.peer = info.peer or None
    node.chunks = chunks
    tokens = info.usage.get("tokens") if info.usage else None
    node.tokens = tokens if isinstance(tokens, int) else None
    node.attempts = list(info.attempts)


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


def as_step(step: Step | str | Mapping[str, Any]) -> Step:
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
    peer: Mesh,
    steps: Sequence[Step | str | Mapping[str, Any]],
    input: Any,
    *,
    timeout: float | None = None,
    trace: Trace | None = None,
    receipts: bool = False,
) -> Result:
    """Run ``steps`` in order; each step's output is the next step's input. With ``receipts``,
    each call asks for a signed receipt (a ``stream`` step's too, piece by piece):
    ``receipt_chain(result.trace, input)`` is then the chain of receipts (a tree when a step is
    streamed, ``receipt_tree``), checked end to end by ``verify_receipt_chain``."""
    if not steps:
        raise BadRequestError("a pipeline needs at least one step")
    root = trace or logged(peer, Trace("pipeline"))
    deadline = deadline_of(timeout)
    chain = [as_step(s) for s in steps]
    value: Any = input
    i = 0
    try:
        while i < len(chain):
            step = chain[i]
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            if nxt is not None and nxt.stream:
                value = await _streamed_pair(peer, root, step, nxt, value, deadline, receipts)
                i += 2
            else:
                value = await call_step(
                    peer, root.child("call"), step.capability, value, step.params, deadline, step.target,
                    receipt=receipts,
                )  # fmt: skip
                i += 1
    except BaseException as exc:
        root.finish("timeout" if isinstance(exc, DeadlineExceededError) else "error", exc)
        raise
    root.finish("ok")
    return Result(value, root)


class Grouper:
    """Cuts a stream of chunks into the pieces a ``stream`` step is fed (by ``group``), as they
    arrive: :meth:`feed` each chunk, then :meth:`finish`. Deterministic in the chunks, so a
    verifier of a receipt tree recomputes the pieces from the upstream step's chunks."""

    def __init__(self, group: str) -> None:
        self.group = group
        self.buffer = ""

    def feed(self, chunk: Any) -> list[str]:
        self.buffer += chunk if isinstance(chunk, str) else json.dumps(chunk)
        ready, self.buffer = _split_ready(self.buffer, self.group)
        return ready

    def finish(self) -> list[str]:
        rest, self.buffer = self.buffer.strip(), ""
        return [rest] if rest else []


def join_pieces(outputs: list[Any]) -> Any:
    """A ``stream`` step's output from its pieces' outputs, in input order."""
    if all(isinstance(o, str) for o in outputs):
        return " ".join(o.strip() for o in outputs)
    return outputs


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
    peer: Mesh, root: Trace, first: Step, second: Step, value: Any, deadline: float, receipts: bool
) -> Any:
    """Run ``first`` and feed its output to ``second`` group by group, as it arrives."""
    up = root.child("call", first.capability)
    down = root.child("stream", second.capability, group=second.group)
    timeout = remaining(deadline)
    results: dict[int, Any] = {}
    send, recv = trio.open_memory_channel[tuple[int, str]](16)

    async def feed() -> None:
        extra: dict[str, Any] = {"receipt": True} if receipts else {}
        stream = peer.infer(first.target, first.capability, value, timeout=timeout, **extra, **first.params)
        grouper = Grouper(second.group)
        chunks: list[Any] = []
        n = 0
        async with send, stream:
            try:
                async for chunk in stream:
                    up.chunks += 1
                    chunks.append(chunk)
                    for piece in grouper.feed(chunk):
                        await send.send((n, piece))
                        n += 1
            except ModelNetError as exc:
                _record(up, stream, up.chunks)
                up.finish("error", exc)
                raise
            for piece in grouper.finish():
                await send.send((n, piece))
            _record(up, stream, up.chunks)
            if receipts:
                up.receipt, up.output = stream.info.receipt, chunks
            up.finish("ok")

    async def work(index: int, piece: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            node = down.child("call", second.capability, piece=index)
            results[index] = await call_step(
                peer, node, second.capability, piece, second.params, deadline, second.target,
                receipt=receipts,
            )  # fmt: skip

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
    return join_pieces([results[i] for i in sorted(results)])


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
    return " ".join(as_text(value).lower().split())


def majority_vote(answers: Mapping[int, Any]) -> tuple[Any, int]:
    """The most common normalised answer of ``answers`` (by member index; ties go to the
    earliest member) and its count."""
    took_part = sorted(answers)
    votes = Counter(_normalise(answers[i]) for i in took_part)
    best, count = max(
        votes.items(),
        key=lambda kv: (kv[1], -min(i for i in took_part if _normalise(answers[i]) == kv[0])),
    )
    return next(answers[i] for i in took_part if _normalise(answers[i]) == best), count


def vote_agrees(a: Any, b: Any) -> bool:
    """Whether two answers count as the same vote."""
    return _normalise(a) == _normalise(b)


async def ensemble(
    peer: Mesh,
    capability: str | Sequence[str],
    input: Any,
    *,
    k: int = 3,
    aggregate: str = "majority",
    judge: str | None = None,
    params: Mapping[str, Any] | None = None,
    timeout: float = 30.0,
    trace: Trace | None = None,
    receipts: bool = False,
) -> Result:
    """Ask k providers of one capability (or each of several capabilities) in parallel.

    ``aggregate`` is ``"majority"`` (the most common normalised answer; ties go
    to the earliest), ``"first"`` (the first valid answer; the others are
    cancelled), ``"all"`` (every answer, by member), or ``"judge"`` (the
    ``judge`` capability gets ``{"input": ..., "answers": [...]}`` and its
    answer is the result). Members still running at the deadline are cut off;
    failed members are left out; the rest still count. The trace says which
    members took part. With ``receipts`` every member (and the judge) asks for a signed
    receipt: ``receipt_tree(result.trace, input, result.output)`` is the tree of receipts.
    """
    root = trace or logged(peer, Trace("ensemble", detail={"aggregate": aggregate}))
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
    answered_by: dict[int, str | None] = {}
    first_done = trio.Event()

    finished = 0

    async def member(i: int, cap: str, target: str | None) -> None:
        nonlocal finished
        node = root.child("member", cap, member=i)
        try:
            answers[i] = await call_step(
                peer, node, cap, input, params, member_deadline, target, receipt=receipts
            )
            answered_by[i] = node.peer
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
        output, count = majority_vote(answers)
        root.detail["vote"] = f"{count}/{len(took_part)}"
        if len(took_part) >= 3 and 2 * count > len(took_part):  # a strict majority: the rest lost
            for i in took_part:
                if not vote_agrees(answers[i], output):
                    _report(peer, answered_by.get(i), "disagreed")
    elif aggregate == "first":
        output = answers[took_part[0]] if len(took_part) == 1 else answers[min(took_part)]
    elif aggregate == "all":
        output = [answers[i] for i in took_part]
    elif aggregate == "judge":
        if not judge:
            raise BadRequestError("aggregate='judge' needs a judge capability")
        node = root.child("judge", judge)
        output = await call_step(
            peer, node, judge, {"input": input, "answers": [answers[i] for i in took_part]}, {}, deadline,
            receipt=receipts,
        )  # fmt: skip
    else:
        raise BadRequestError(f"unknown aggregate {aggregate!r} (majority, first, all, judge)")
    root.finish("ok")
    return Result(output, root)


# -- router ------------------------------------------------------------------------


def label_of(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("label", "route", "capability", "class"):
            if key in value:
                return str(value[key])
    return as_text(value).strip().split()[0] if as_text(value).strip() else ""


async def route(
    peer: Mesh,
    router: str,
    input: Any,
    routes: Mapping[str, str | Step | Mapping[str, Any]],
    *,
    default: str | Step | Mapping[str, Any] | None = None,
    timeout: float | None = None,
    trace: Trace | None = None,
    receipts: bool = False,
) -> Result:
    """Ask the ``router`` capability for a label, then send ``input`` to ``routes[label]``
    (with ``receipts``, both calls ask for signed receipts)."""
    root = trace or logged(peer, Trace("router"))
    deadline = deadline_of(timeout)
    label = label_of(
        await call_step(peer, root.child("classify"), router, input, {}, deadline, receipt=receipts)
    )
    root.detail["label"] = label
    chosen = routes.get(label, default)
    if chosen is None:
        root.finish("error", f"no route for label {label!r}")
        raise BadRequestError(
            f"router {router!r} chose {label!r}, which has no route and there is no default"
        )
    step = as_step(chosen)
    output = await call_step(
        peer, root.child("specialist"), step.capability, input, step.params, deadline, step.target,
        receipt=receipts,
    )  # fmt: skip
    root.finish("ok")
    return Result(output, root)


# -- draft and verify --------------------------------------------------------------


def verdict_of(verdict: Any) -> tuple[bool, Any]:
    """A verifier's answer as (accepted, feedback): ``{"ok": bool, "feedback": ...}``, or text
    starting with "ok"."""
    if isinstance(verdict, dict):
        return bool(verdict.get("ok")), verdict.get("feedback", "")
    return as_text(verdict).lower().startswith("ok"), as_text(verdict)


async def draft_verify(
    peer: Mesh,
    drafter: str,
    verifier: str,
    input: Any,
    *,
    rounds: int = 3,
    params: Mapping[str, Any] | None = None,
    timeout: float | None = None,
    trace: Trace | None = None,
    receipts: bool = False,
) -> Result:
    """The drafter answers; the verifier checks ``{"question", "answer"}``.

    The verifier answers ``{"ok": bool, "feedback": str}``. On rejection the
    drafter is asked again with params ``feedback`` and ``previous`` (and
    ``attempt``), up to ``rounds`` drafts; when the mesh chooses the drafter's
    provider, providers whose drafts were rejected are avoided. If no draft is
    accepted the result is the last draft, and the trace's status is
    ``"error"`` with the verdict. With ``receipts`` every draft and verdict asks for a
    signed receipt.
    """
    root = trace or logged(peer, Trace("draft-verify"))
    deadline = deadline_of(timeout)
    extra: dict[str, Any] = dict(params or {})
    draft: Any = None
    rejected: set[str] = set()
    for attempt in range(1, rounds + 1):
        node = root.child("draft", round=attempt)
        try:
            draft = await call_step(
                peer, node, drafter, input, extra, deadline, avoid=rejected, receipt=receipts
            )
        except (OverloadedError, UnavailableError):
            if not rejected:
                raise
            # Every other provider is unavailable: ask a rejected one again, with the feedback.
            node.attempts.append({"note": "no other provider; asking a rejected one again"})
            node.status = "running"
            draft = await call_step(peer, node, drafter, input, extra, deadline, receipt=receipts)
        verdict = await call_step(
            peer,
            root.child("verify", round=attempt),
            verifier,
            {"question": input, "answer": draft},
            {},
            deadline,
            receipt=receipts,
        )
        ok, feedback = verdict_of(verdict)
        root.children[-1].detail["verdict"] = "accept" if ok else "reject"
        if not ok and node.peer:
            rejected.add(node.peer)
            _report(peer, node.peer, "rejected")
        if ok:
            root.detail["round"] = attempt
            root.finish("ok")
            return Result(draft, root)
        extra = {**dict(params or {}), "feedback": feedback, "previous": draft, "attempt": attempt + 1}
    root.detail["round"] = rounds
    root.finish("error", f"not accepted after {rounds} rounds")
    return Result(draft, root)

"""Workflows: the collaboration patterns composed in a TOML file (``specs/workflow.md``).

:func:`load_workflow` parses and checks a file's ``[workflow]`` table;
:func:`run_workflow` runs it. Nodes nest: a pipeline step, a route or an
ensemble may itself be a pattern.
"""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio

from ...errors import BadRequestError, DeadlineExceededError
from ..client import remaining
from .patterns import Mesh, as_step, call_step, draft_verify, ensemble, label_of, pipeline
from .trace import Result, Trace, logged

__all__ = ["load_workflow", "run_node", "run_workflow", "stream_text"]

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


async def run_node(
    peer: Mesh, node: Mapping[str, Any], input: Any, trace: Trace, deadline: float, receipts: bool = False
) -> Any:
    """Run one workflow node (see ``specs/workflow.md``) and return its output (with
    ``receipts``, every call asks for a signed receipt: ``receipt_tree`` of the trace)."""
    kinds = [k for k in _PATTERNS if k in node]
    if len(kinds) != 1:
        raise BadRequestError(
            f"a workflow node needs exactly one of {', '.join(_PATTERNS)}; got {sorted(node)}"
        )
    kind = kinds[0]
    spec = node[kind]
    timeout = remaining(deadline)
    if kind == "call":
        spec = {"capability": spec} if isinstance(spec, str) else spec
        _check_keys(spec, "call")
        params = dict(spec.get("params", {}))
        return await call_step(
            peer,
            trace.child("call"),
            _need_str(spec, "capability"),
            input,
            params,
            deadline,
            spec.get("target"),
            receipt=receipts,
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
            result = await pipeline(peer, steps, input, timeout=timeout, trace=node_trace, receipts=receipts)
            return result.output
        for s in steps:
            value = await run_node(peer, _as_node(s), value, node_trace, deadline, receipts)
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
            receipts=receipts,
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
                as_step(candidate)
        node_trace = trace.child("router")
        label = label_of(
            await call_step(
                peer,
                node_trace.child("classify"),
                _need_str(spec, "capability"),
                input,
                {},
                deadline,
                receipt=receipts,
            )
        )
        node_trace.detail["label"] = label
        chosen = routes.get(label, default)
        if chosen is None:
            node_trace.finish("error", f"no route for label {label!r}")
            raise BadRequestError(f"router chose {label!r}, which has no route and there is no default")
        if isinstance(chosen, Mapping) and any(p in chosen for p in _PATTERNS):
            output = await run_node(peer, chosen, input, node_trace, deadline, receipts)  # a nested pattern
        else:
            step = as_step(chosen)
            output = await call_step(
                peer,
                node_trace.child("specialist"),
                step.capability,
                input,
                step.params,
                deadline,
                step.target,
                receipt=receipts,
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
        receipts=receipts,
    )
    return result.output


def _need_str(spec: Mapping[str, Any], key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"workflow: {key!r} must be a capability name")
    return value


def load_workflow(text: str) -> dict[str, Any]:
    """Parse a workflow file (TOML) and check its shape."""
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
    peer: Mesh,
    workflow: Mapping[str, Any],
    input: Any = None,
    *,
    timeout: float | None = None,
    receipts: bool = False,
) -> Result:
    """Run a parsed workflow (``[workflow]`` table) on ``input`` (or the file's ``input``); with
    ``receipts``, ``receipt_tree(result.trace, input, result.output)`` is its tree of receipts."""
    if input is None:
        input = workflow.get("input")
    if input is None:
        raise BadRequestError("no input: give one, or set input = ... in the workflow")
    timeout = timeout if timeout is not None else float(workflow.get("timeout", 60.0))
    root = logged(peer, Trace("workflow", detail={"name": workflow.get("name", "")}))
    body = {k: v for k, v in workflow.items() if k in _PATTERNS}
    try:
        output = await run_node(peer, body, input, root, trio.current_time() + timeout, receipts)
    except BaseException as exc:
        root.finish("timeout" if isinstance(exc, DeadlineExceededError) else "error", exc)
        raise
    root.finish("ok")
    return Result(output, root)


async def stream_text(stream: AsyncIterator[Any]) -> str:
    """Join a stream's text chunks (a convenience for examples)."""
    return "".join([c async for c in stream if isinstance(c, str)])

"""Trees of receipts: the signed proof of every collaboration pattern (``specs/inference.md``,
"Trees of receipts").

A pipeline's receipts form a line (:func:`~.trace.receipt_chain`); an ensemble fans out and
votes, a router classifies then calls a specialist, draft-and-verify alternates two
capabilities, and a streamed pipeline step is called once per piece of its input. Their
receipts form a tree, written by :func:`receipt_tree` from a collaboration's
:class:`~.trace.Trace` and checked offline by :func:`verify_receipt_tree`.

The verifier evaluates the tree from the first input: each signed step's receipt must hold
against its chunks and provider, and bind the input digest the pattern's rule says it was
fed (the same input for every branch of a fan-out; the judge and the verifier the branch
and draft outputs; each piece of a streamed step a piece cut from the upstream chunks).
Local decisions (the majority vote, the router's label, the verdicts) are recomputed from
the signed outputs, and the collaboration's output, when the tree gives it, must be what
the tree computes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...proto.receipt import (
    Receipt,
    ReceiptError,
    from_json_value,
    receipt_file,
    to_json_value,
    value_digest,
    verify_receipt_file,
)
from ..context import join_chunks
from .patterns import Grouper, join_pieces, label_of, majority_vote, verdict_of
from .trace import Trace

__all__ = [
    "AGGREGATES",
    "MAX_TREE_DEPTH",
    "MAX_TREE_STEPS",
    "PATTERN_KINDS",
    "RECEIPT_TREE_FORMAT",
    "receipt_tree",
    "verify_receipt_tree",
]

#: The ``format`` value of a tree of receipts.
RECEIPT_TREE_FORMAT = "modelnet-receipt-tree/1"
#: Signed steps a tree may hold (each costs a signature check); more is ``malformed``.
MAX_TREE_STEPS = 1024
#: Nesting of pattern nodes (a pipeline of ensembles of ...); deeper is ``malformed``.
MAX_TREE_DEPTH = 16
#: How an ensemble's output follows from its members' (``judge``: a judge step).
AGGREGATES = ("majority", "first", "all", "judge")


# -- writing a tree from a trace ---------------------------------------------------------------


def _leaf(node: Trace) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "call", "role": node.kind}
    if node.receipt is not None:
        out.update(receipt_file(node.receipt.data, chunks=node.output or []))
    else:  # answered without a receipt: the verifier refuses it (missing_receipt)
        out["capability"] = node.capability
        out["chunks"] = [to_json_value(c) for c in node.output or []]
    out["provider"] = node.peer
    return out


def _ok(nodes: list[Trace], kind: str) -> list[Trace]:
    return [c for c in nodes if c.kind == kind and c.status == "ok"]


def _index(key: str) -> Callable[[Trace], int]:
    return lambda node: int(node.detail.get(key, 0))


#: Trace kinds that are patterns (the rest are calls); a workflow's root holds one node.
PATTERN_KINDS = frozenset({"pipeline", "ensemble", "router", "draft-verify", "workflow"})


def _node(node: Trace) -> dict[str, Any]:
    return _pattern(node) if node.kind in PATTERN_KINDS else _leaf(node)


def _pattern(node: Trace) -> dict[str, Any]:
    kids = node.children
    if node.kind == "workflow":  # run_workflow's root: its one node, on the workflow's input
        if len(kids) != 1:
            raise ValueError("a workflow trace has one node")
        return _node(kids[0])
    if node.kind == "pipeline":
        steps: list[dict[str, Any]] = []
        for i, child in enumerate(kids):
            if child.kind == "stream":
                continue
            if i + 1 < len(kids) and kids[i + 1].kind == "stream":
                down = kids[i + 1]
                pieces = sorted(_ok(down.children, "call"), key=_index("piece"))
                steps.append(
                    {
                        "kind": "stream",
                        "group": down.detail.get("group", "sentence"),
                        "source": _leaf(child),
                        "pieces": [_leaf(p) for p in pieces],
                    }
                )
            else:
                steps.append(_node(child))
        return {"kind": "pipeline", "steps": steps}
    if node.kind == "ensemble":
        out: dict[str, Any] = {
            "kind": "ensemble",
            "aggregate": node.detail.get("aggregate", "majority"),
            "capability": node.capability,
            "members": [_leaf(m) for m in sorted(_ok(kids, "member"), key=_index("member"))],
        }
        judges = _ok(kids, "judge")
        if judges:
            out["judge"] = _leaf(judges[0])
        return out
    if node.kind == "router":
        out = {"kind": "router", "label": node.detail.get("label")}
        classify = _ok(kids, "classify")
        if classify:
            out["classify"] = _leaf(classify[0])
        chosen = [c for c in kids if c.kind != "classify" and c.status == "ok"]
        if chosen:  # a specialist call, or a nested pattern (workflows)
            out["specialist"] = _node(chosen[0])
        return out
    if node.kind == "draft-verify":
        drafts, verdicts = _ok(kids, "draft"), _ok(kids, "verify")
        rounds = [{"draft": _leaf(d), "verify": _leaf(v)} for d, v in zip(drafts, verdicts, strict=False)]
        return {"kind": "draft-verify", "rounds": rounds}
    raise ValueError(f"no receipt tree for a {node.kind!r} trace")


def receipt_tree(trace: Trace, input: Any, output: Any = None, *, with_output: bool = True) -> dict[str, Any]:
    """The JSON form of a collaboration's tree of receipts (``pipeline``, ``ensemble``,
    ``route``, ``draft_verify`` or ``run_workflow`` called with ``receipts=True``, nested
    patterns included): the first input, the output
    (``result.output``; left out with ``with_output=False``) and, per pattern, its signed steps
    with their chunks and providers. Steps that failed, were cut off or skipped are left out."""
    tree: dict[str, Any] = {
        "format": RECEIPT_TREE_FORMAT,
        "input": to_json_value(input),
        "root": _node(trace),
    }
    if with_output:
        tree["output"] = to_json_value(output)
    return tree


# -- checking a tree ---------------------------------------------------------------------------


class _Check:
    def __init__(self) -> None:
        self.receipts: list[Receipt] = []

    def leaf(self, node: Any, input: Any, where: str) -> tuple[Receipt, Any]:
        if not isinstance(node, dict) or node.get("kind") != "call":
            raise ReceiptError("malformed", f"{where} is not a signed step")
        if "receipt" not in node:
            raise ReceiptError("missing_receipt", f"{where} answered without a receipt")
        if len(self.receipts) >= MAX_TREE_STEPS:
            raise ReceiptError("malformed", f"more than {MAX_TREE_STEPS} signed steps")
        receipt = verify_receipt_file(node)
        if receipt.input_digest != value_digest(input):
            raise ReceiptError("broken_chain", f"{where}'s input is not what the pattern fed it")
        self.receipts.append(receipt)
        chunks = node.get("chunks")
        if not isinstance(chunks, list):
            raise ReceiptError("malformed", f"{where} has no chunks")
        return receipt, join_chunks([from_json_value(c) for c in chunks])

    def node(self, node: Any, input: Any, where: str, depth: int = 0) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise ReceiptError("malformed", f"patterns nested deeper than {MAX_TREE_DEPTH}")
        kind = node.get("kind") if isinstance(node, dict) else None
        if kind == "call":
            return self.leaf(node, input, where)[1]
        if kind == "pipeline":
            steps = _list(node, "steps", where)
            value = input
            for i, step in enumerate(steps):
                value = self.node(step, value, f"{where}.steps[{i}]", depth + 1)
            return value
        if kind == "stream":
            return self._stream(node, input, where)
        if kind == "ensemble":
            return self._ensemble(node, input, where)
        if kind == "router":
            _, out = self.leaf(node.get("classify"), input, f"{where}.classify")
            if label_of(out) != node.get("label"):
                raise ReceiptError("broken_chain", f"{where}: the router's answer is not the label")
            return self.node(node.get("specialist"), input, f"{where}.specialist", depth + 1)
        if kind == "draft-verify":
            rounds = _list(node, "rounds", where)
            draft: Any = None
            for r, pair in enumerate(rounds):
                if not isinstance(pair, dict):
                    raise ReceiptError("malformed", f"{where}.rounds[{r}] is not a round")
                _, draft = self.leaf(pair.get("draft"), input, f"{where}.rounds[{r}].draft")
                question = {"question": input, "answer": draft}
                _, verdict = self.leaf(pair.get("verify"), question, f"{where}.rounds[{r}].verify")
                if verdict_of(verdict)[0] and r + 1 < len(rounds):
                    raise ReceiptError(
                        "broken_chain", f"{where}: round {r + 1} was accepted, yet more followed"
                    )
            return draft
        raise ReceiptError("malformed", f"{where} has an unknown kind {kind!r}")

    def _stream(self, node: dict[str, Any], input: Any, where: str) -> Any:
        source = node.get("source")
        self.leaf(source, input, f"{where}.source")
        grouper = Grouper(str(node.get("group", "sentence")))
        pieces: list[str] = []
        for chunk in source["chunks"]:  # type: ignore[index]
            pieces.extend(grouper.feed(from_json_value(chunk)))
        pieces.extend(grouper.finish())
        calls = _list(node, "pieces", where, empty=not pieces)
        if len(calls) != len(pieces):
            raise ReceiptError(
                "broken_chain", f"{where}: {len(pieces)} pieces were cut, {len(calls)} are signed"
            )
        outs = [
            self.leaf(c, p, f"{where}.pieces[{i}]")[1]
            for i, (c, p) in enumerate(zip(calls, pieces, strict=True))
        ]
        return join_pieces(outs)

    def _ensemble(self, node: dict[str, Any], input: Any, where: str) -> Any:
        aggregate = node.get("aggregate")
        if aggregate not in AGGREGATES:
            raise ReceiptError("malformed", f"{where}: unknown aggregate {aggregate!r}")
        members = _list(node, "members", where)
        answers: dict[int, Any] = {}
        signers: set[str] = set()
        capability = node.get("capability")
        for i, member in enumerate(members):
            receipt, answers[i] = self.leaf(member, input, f"{where}.members[{i}]")
            if isinstance(capability, str):  # k providers of one capability: k distinct signers
                if receipt.capability != capability:
                    raise ReceiptError(
                        "broken_chain", f"{where}.members[{i}] answered {receipt.capability!r}"
                    )
                if receipt.provider in signers:
                    raise ReceiptError("broken_chain", f"{where}: two members signed by {receipt.provider}")
                signers.add(receipt.provider)
        if aggregate == "majority":
            return majority_vote(answers)[0]
        if aggregate == "first":
            return answers[0]
        if aggregate == "all":
            return [answers[i] for i in sorted(answers)]
        question = {"input": input, "answers": [answers[i] for i in sorted(answers)]}
        return self.leaf(node.get("judge"), question, f"{where}.judge")[1]


def _list(node: dict[str, Any], key: str, where: str, *, empty: bool = False) -> list[Any]:
    value = node.get(key)
    if not isinstance(value, list) or (not value and not empty):
        raise ReceiptError("malformed", f"{where}.{key} must be a non-empty list")
    return value


def verify_receipt_tree(tree: Any) -> list[Receipt]:
    """Check a tree of receipts (:func:`receipt_tree`) end to end, offline: every signed step
    against its chunks and provider, every link (each step's input digest against what its
    pattern fed it), the recomputed local decisions, and the output if the tree gives one.
    Returns the receipts, depth first. Raises :class:`ReceiptError`: ``broken_chain`` for a
    link, a decision or an output that does not follow, ``missing_receipt`` for a step that
    answered without one, and the receipt reasons of ``verify_receipt``."""
    if not isinstance(tree, dict) or tree.get("format") != RECEIPT_TREE_FORMAT:
        raise ReceiptError("malformed", f"not a {RECEIPT_TREE_FORMAT} file")
    check = _Check()
    output = check.node(tree.get("root"), from_json_value(tree.get("input")), "root")
    if "output" in tree and value_digest(from_json_value(tree["output"])) != value_digest(output):
        raise ReceiptError("broken_chain", "the collaboration's output is not what its steps give")
    return check.receipts

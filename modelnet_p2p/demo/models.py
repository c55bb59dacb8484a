"""Small deterministic example models, used by ``modelnet mesh up``, ``modelnet demo`` and the tests.

These are **examples, not AI models**: a few lines of plain Python each, so
that a local mesh shows discovery, streaming and collaboration without
downloading weights. Each handler carries its :class:`Capability` as the
attribute ``capability``, which ``modelnet serve module:attr`` reads.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from ..errors import BadRequestError
from ..proto.capability import Capability
from ..services.inference.handlers import InferenceRequest

__all__ = ["ALL", "arithmetic", "classify_topic", "echo", "summarize", "translate", "verify_arithmetic"]


def _with(cap: Capability) -> Callable[[Any], Any]:
    def attach(fn: Any) -> Any:
        fn.capability = cap
        return fn

    return attach


@_with(
    Capability(
        name="echo",
        task="text-generation",
        version="1.0",
        description="Streams the prompt back word by word (an example that stands in for a generator).",
        tags=("example", "streaming"),
        idempotent=True,
    )
)
async def echo(request: InferenceRequest) -> AsyncIterator[str]:
    delay = float(request.params.get("delay", 0.01))
    words = str(request.input).split()
    for word in words:
        if delay:
            await trio.sleep(delay)
        yield word + " "
    request.usage["tokens"] = len(words)


_TOPICS = {
    "math": ("plus", "minus", "times", "divided", "sum", "+", "-", "*", "/", "calculate", "compute"),
    "translation": ("translate", "french", "spanish", "german", "in french", "in spanish"),
    "summary": ("summarize", "summarise", "summary", "tl;dr", "shorten"),
}


@_with(
    Capability(
        name="topic-classifier",
        task="classification",
        version="1.0",
        description="Keyword-based topic classifier: math, translation, summary or general.",
        tags=("example", "router"),
        idempotent=True,
    )
)
def classify_topic(request: InferenceRequest) -> dict[str, Any]:
    text = str(request.input).lower()
    scores = {topic: sum(text.count(k) for k in keys) for topic, keys in _TOPICS.items()}
    best = max(scores, key=lambda t: scores[t])
    label = best if scores[best] > 0 else "general"
    return {"label": label, "scores": scores}


_OPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_WORDS = {"plus": "+", "minus": "-", "times": "*", "divided by": "/", "mod": "%"}


def _evaluate(expr: str) -> float | int:
    text = expr.lower()
    for word, sym in _WORDS.items():
        text = text.replace(word, sym)
    match = re.search(r"[-+*/%().\d\s]+", text)
    candidates = [m.strip() for m in re.findall(r"[-+*/%().\d\s]{3,}", text) if re.search(r"\d", m)]
    source = max(candidates, key=len) if candidates else (match.group(0).strip() if match else "")
    if not source:
        raise BadRequestError(f"no arithmetic expression in {expr!r}")
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise BadRequestError(f"cannot parse arithmetic {source!r}") from None

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = ev(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise BadRequestError("exponent too large")
            return _OPS[type(node.op)](left, right)
        raise BadRequestError(f"unsupported arithmetic in {source!r}")

    try:
        result = ev(tree)
    except ZeroDivisionError:
        raise BadRequestError("division by zero") from None
    if isinstance(result, float) and result.is_integer():
        return int(result)
    return result  # type: ignore[no-any-return]


@_with(
    Capability(
        name="arithmetic",
        task="tool",
        version="1.0",
        description="Evaluates arithmetic in the prompt (+ - * / % **, or words like 'plus').",
        tags=("example", "math", "tool"),
        idempotent=True,
    )
)
def arithmetic(request: InferenceRequest) -> str:
    value = _evaluate(str(request.input))
    if request.params.get("wrong"):  # lets tests and demos show a faulty model
        value = value + 1
    return str(value)


_DICTIONARY = {
    "fr": {"hello": "bonjour", "world": "monde", "cat": "chat", "dog": "chien", "the": "le",
           "is": "est", "good": "bon", "morning": "matin", "thank": "merci", "you": "vous",
           "model": "modèle", "network": "réseau", "peer": "pair"},
    "es": {"hello": "hola", "world": "mundo", "cat": "gato", "dog": "perro", "the": "el",
           "is": "es", "good": "bueno", "morning": "mañana", "thank": "gracias", "you": "tú",
           "model": "modelo", "network": "red", "peer": "par"},
}


@_with(
    Capability(
        name="translate",
        task="translation",
        version="1.0",
        description="Word-by-word dictionary translator, English to French or Spanish (param 'to').",
        tags=("example", "translation", "fr", "es"),
        idempotent=True,
    )
)
async def translate(request: InferenceRequest) -> AsyncIterator[str]:
    lang = str(request.params.get("to", "fr"))
    table = _DICTIONARY.get(lang)
    if table is None:
        raise BadRequestError(f"unsupported target language {lang!r} (use fr or es)")
    for word in re.findall(r"[A-Za-z']+", str(request.input)):
        yield table.get(word.lower(), word) + " "


@_with(
    Capability(
        name="summarize",
        task="summarization",
        version="1.0",
        description="Keeps the first N sentences (param 'sentences', default 1).",
        tags=("example", "summary"),
        idempotent=True,
    )
)
async def summarize(request: InferenceRequest) -> AsyncIterator[str]:
    n = int(request.params.get("sentences", 1))
    sentences = re.split(r"(?<=[.!?])\s+", str(request.input).strip())
    for sentence in sentences[: max(1, n)]:
        yield sentence + " "


@_with(
    Capability(
        name="verify-arithmetic",
        task="classification",
        version="1.0",
        description="Checks a claimed arithmetic answer: input {'question': ..., 'answer': ...}.",
        tags=("example", "verifier", "math"),
        idempotent=True,
    )
)
def verify_arithmetic(request: InferenceRequest) -> dict[str, Any]:
    data = request.input
    if not isinstance(data, dict) or "question" not in data or "answer" not in data:
        raise BadRequestError("input must be a map with 'question' and 'answer'")
    expected = _evaluate(str(data["question"]))
    try:
        claimed = float(str(data["answer"]).strip())
    except ValueError:
        return {"ok": False, "feedback": f"answer {data['answer']!r} is not a number"}
    ok = abs(claimed - float(expected)) < 1e-9
    return {"ok": ok, "feedback": "correct" if ok else f"wrong: expected {expected}"}


#: Every example model, by capability name.
ALL: dict[str, Any] = {
    fn.capability.name: fn
    for fn in (echo, classify_topic, arithmetic, translate, summarize, verify_arithmetic)
}

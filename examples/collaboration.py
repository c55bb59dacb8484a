"""Collaborative reasoning on a mesh of small models, all in this process on 127.0.0.1.

Run: python examples/collaboration.py

Four peers serve the example models of ``modelnet_p2p.demo_models`` (plain
Python stand-ins for AI models); a fifth, the client, knows only the first
peer's address and finds every model through the DHT. The script shows:

1. a handler that calls other models itself, through ``request.mesh``;
2. the four patterns of ``modelnet_p2p.collab``: a pipeline (with a streamed
   step), an ensemble with a faulty member, a router, and draft-and-verify;
3. the same patterns composed in a workflow (the format of
   ``modelnet run workflow.toml``, see specs/workflow.md).

Each result comes with a trace tree: which capability each step asked, which
peer answered, how long it took, and what happened.
"""

from __future__ import annotations

from typing import Any

import trio

from modelnet_p2p import Capability, InferenceRequest, Peer
from modelnet_p2p.collab import (
    Result,
    Step,
    draft_verify,
    ensemble,
    load_workflow,
    pipeline,
    route,
    run_workflow,
)
from modelnet_p2p.demo_models import ALL, arithmetic
from modelnet_p2p.testing import open_peers


def faulty_arithmetic(request: InferenceRequest) -> str:
    """The arithmetic tool, off by one: a broken model for the ensemble to outvote."""
    return str(int(float(arithmetic(request))) + 1)


def careless_solver(request: InferenceRequest) -> str:
    """Off by one on a first attempt; right once a verifier's feedback is in the params."""
    value = int(float(arithmetic(request)))
    return str(value if request.params.get("feedback") else value + 1)


async def word_problem(request: InferenceRequest) -> str:
    """A model that consults others: the classifier, then the arithmetic tool, then a verifier.

    Calls through ``request.mesh`` carry this request's deadline and trace, so a
    loop between handlers is refused instead of hanging, and cancelling this
    request cancels them too.
    """
    topic = await request.mesh.call(capability="topic-classifier", input=request.input)
    if topic["label"] != "math":
        return f"not a math question ({topic['label']})"
    answer = await request.mesh.call(capability="arithmetic", input=request.input)
    verdict = await request.mesh.call(
        capability="verify-arithmetic", input={"question": request.input, "answer": answer}
    )
    return f"{answer} (checked: {verdict['feedback']})"


#: What each model peer serves; "arithmetic*" is the faulty one.
LAYOUT = [
    ["echo", "topic-classifier", "arithmetic", "careless-solver"],
    ["translate", "summarize", "arithmetic", "careless-solver"],
    ["verify-arithmetic", "arithmetic*"],
    ["echo", "arithmetic", "word-problem"],
]


def serve(peer: Peer, name: str) -> None:
    if name == "arithmetic*":
        peer.serve(arithmetic.capability, faulty_arithmetic)
    elif name == "careless-solver":
        peer.serve(Capability(name="careless-solver", task="tool", idempotent=True), careless_solver)
    elif name == "word-problem":
        peer.serve(Capability(name="word-problem", task="chat"), word_problem)
    else:
        peer.serve(ALL[name].capability, ALL[name])


def show(title: str, result: Result, names: dict[str, str]) -> None:
    print(f"\n== {title}")
    print(f"   answer: {result.output!r}")
    tree = result.trace.render()
    for peer_id, name in names.items():
        tree = tree.replace(f"@{peer_id[-8:]}", f"@{name}")
    for line in tree.splitlines():
        print("   " + line)


WORKFLOW = """
[workflow]
name = "answer-then-translate"
input = "translate hello world in french"
timeout = 20

[workflow.pipeline]
steps = [
  { router = { capability = "topic-classifier", routes = { math = "arithmetic" }, default = "echo" } },
  { capability = "translate", params = { to = "es" } },
]
"""


async def main() -> None:
    async with open_peers(len(LAYOUT) + 1) as (client, *models):
        names = {p.peer_id: f"peer{i}" for i, p in enumerate(models)}
        for peer, served in zip(models, LAYOUT, strict=True):
            for name in served:
                serve(peer, name)
        async with trio.open_nursery() as nursery:  # publish every card now
            for peer in models:
                nursery.start_soon(peer.announce)
        for peer, served in zip(models, LAYOUT, strict=True):
            print(f"{names[peer.peer_id]} ({peer.peer_id[-8:]}) serves {', '.join(served)}")

        # 1. a handler that calls other models through request.mesh
        question = "what is 12 times 7 plus 3"
        answer = await client.call(capability="word-problem", input=question, timeout=20)
        print("\n== request.mesh: a handler that consults other models")
        print(f"   word-problem({question!r}) -> {answer.value!r}, answered by {names[answer.peer]}")

        # 2. the four patterns
        text = "Hello world. The peer is good. The network is good too."
        piped = await pipeline(
            client,
            [Step("summarize", {"sentences": 2}), Step("translate", {"to": "fr"}, stream=True)],
            text,
            timeout=20,
        )
        show("pipeline: summarize -> translate (streamed sentence by sentence)", piped, names)

        voted = await ensemble(client, "arithmetic", question, k=3, aggregate="majority", timeout=10)
        show("ensemble: three arithmetic providers (one faulty), majority vote", voted, names)

        routes: dict[str, Any] = {"math": "arithmetic", "translation": Step("translate", {"to": "es"})}
        for q in (question, "translate good morning in spanish", "the peer is a model"):
            routed = await route(client, "topic-classifier", q, routes, default="echo", timeout=20)
            show(f"router: {q!r}", routed, names)

        checked = await draft_verify(client, "careless-solver", "verify-arithmetic", question, timeout=20)
        show("draft and verify: a careless solver, corrected by the verifier's feedback", checked, names)

        # 3. patterns composed in a workflow, as `modelnet run` runs it
        composed = await run_workflow(client, load_workflow(WORKFLOW))
        show("workflow: a router, then a translator", composed, names)


if __name__ == "__main__":
    trio.run(main)

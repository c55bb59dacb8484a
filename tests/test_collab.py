"""Collaborative reasoning over real peers on loopback: pipelines, ensembles, routers,
draft-and-verify, nested calls from handlers, deadlines, and workflow files (specs/workflow.md).

Requests are routed by the mesh (no target) unless a test says otherwise: providers announce their
cards after ``serve`` and the client finds them through discovery.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from cli_util import modelnet, one_line_error

from modelnet_p2p import (
    BadRequestError,
    Capability,
    DeadlineExceededError,
    Peer,
    UnavailableError,
)
from modelnet_p2p.cli import mesh_assignment
from modelnet_p2p.demo.models import ALL, _evaluate, verify_arithmetic
from modelnet_p2p.mesh.collab import (
    Step,
    Trace,
    draft_verify,
    ensemble,
    load_workflow,
    pipeline,
    route,
    run_workflow,
)
from modelnet_p2p.testing import open_peers

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "examples" / "workflows"


def serve_demo(peer: Peer, *names: str) -> None:
    for name in names:
        peer.serve(ALL[name].capability, ALL[name])


async def announce(*peers: Peer) -> None:
    """Publish the providers' cards now (all at once), so discovery finds them."""
    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(p.announce)


@asynccontextmanager
async def failing_providers() -> AsyncIterator[Peer]:
    """A client, and two announced providers of ``down`` whose every answer is UnavailableError."""

    async def failing(request: Any) -> None:
        raise UnavailableError("down")

    async with open_peers(3) as (client, p1, p2):
        for p in (p1, p2):
            p.serve("down", failing)
        await announce(p1, p2)
        yield client


# -- pipeline --------------------------------------------------------------------------


async def test_three_step_pipeline_across_three_peers():
    async def upper(request):
        return str(request.input).upper()

    async def reverse(request):
        return str(request.input)[::-1]

    async def exclaim(request):
        for part in (str(request.input), "!"):
            yield part

    async with open_peers(4) as (client, p1, p2, p3):
        p1.serve("upper", upper)
        p2.serve("reverse", reverse)
        p3.serve("exclaim", exclaim)
        await announce(p1, p2, p3)
        with trio.fail_after(30):
            result = await pipeline(client, ["upper", Step("reverse"), {"capability": "exclaim"}], "abc")
        assert result.output == "CBA!"
        trace = result.trace
        assert trace.kind == "pipeline" and trace.status == "ok"
        assert [c.capability for c in trace.children] == ["upper", "reverse", "exclaim"]
        assert [c.status for c in trace.children] == ["ok", "ok", "ok"]
        assert trace.peers() == [p1.peer_id, p2.peer_id, p3.peer_id]
        assert [c.chunks for c in trace.children] == [1, 1, 2]
        assert all(len(c.attempts) == 1 and c.attempts[0]["status"] == "ok" for c in trace.children)
        as_json = json.loads(json.dumps(trace.to_json()))
        assert [c["peer"] for c in as_json["children"]] == [p1.peer_id, p2.peer_id, p3.peer_id]


SENTENCES = ["One.", "Two!", "Three?"]


async def test_streamed_step_starts_before_the_previous_step_finishes():
    """Step 1 does not emit its second sentence until step 2 has started on the first one."""
    events: dict[str, float] = {}
    starts: list[tuple[float, str]] = []
    first_piece = trio.Event()

    async def narrate(request):
        for i, sentence in enumerate(SENTENCES):
            yield sentence + " "
            if i == 0:
                # Without streaming hand-over this would wait forever (and fail the test).
                with trio.fail_after(20):
                    await first_piece.wait()
            await trio.sleep(0.05)
        events["narrate_done"] = trio.current_time()

    async def tag(request):
        starts.append((trio.current_time(), request.input))
        first_piece.set()
        return f"[{request.input}]"

    async with open_peers(3) as (client, p1, p2):
        p1.serve("narrate", narrate)
        p2.serve("tag", tag)
        await announce(p1, p2)
        with trio.fail_after(40):
            result = await pipeline(client, ["narrate", Step("tag", stream=True, group="sentence")], "go")
    assert result.output == "[One.] [Two!] [Three?]"
    assert sorted(piece for _, piece in starts) == sorted(SENTENCES)
    assert min(t for t, _ in starts) < events["narrate_done"]
    up, down = result.trace.children
    assert (up.kind, up.capability, up.peer, up.status, up.chunks) == ("call", "narrate", p1.peer_id, "ok", 3)
    assert (down.kind, down.capability, down.status) == ("stream", "tag", "ok")
    assert down.detail["group"] == "sentence"
    assert sorted(c.detail["piece"] for c in down.children) == [0, 1, 2]
    assert {c.peer for c in down.children} == {p2.peer_id}


# -- ensemble --------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate", ["majority", "first", "all", "judge"])
async def test_ensemble_with_a_failing_and_a_slow_member(aggregate):
    """Five providers: two say 42 (one with stray white space), one 41, one fails, one is too slow.

    A fresh mesh for each aggregate: one ensemble cannot disturb the next.
    """
    waiting: Counter[int] = Counter()  # requests each provider held without answering
    cut: Counter[int] = Counter()  # ... and then saw cancelled
    judged: list[Any] = []

    async def wait_forever(i: int) -> None:
        waiting[i] += 1
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            cut[i] += 1
            raise

    def member(i: int):
        async def handler(request):
            if i == 3:
                raise UnavailableError("no GPU left")
            if i == 4:
                await wait_forever(i)
            if aggregate == "first":
                # Provider 0 answers once the requests of 1, 2 and 4 are running, and those
                # never answer: the winner is certain.
                if i == 0:
                    with trio.fail_after(20):
                        while not all(waiting[j] for j in (1, 2, 4)):
                            await trio.sleep(0.01)
                else:
                    await wait_forever(i)
            return ["42", " 42\n", "41"][i]

        return handler

    async def judge(request):
        judged.append(request.input)
        best, _ = Counter(request.input["answers"]).most_common(1)[0]
        return f"judged {best}"

    async with open_peers(6) as (client, *providers):
        for i, p in enumerate(providers):
            p.serve(Capability(name="solve", task="tool"), member(i))
        providers[0].serve("judge", judge)
        await announce(*providers)
        by_peer = {p.peer_id: i for i, p in enumerate(providers)}
        with trio.fail_after(30):
            result = await ensemble(
                client,
                "solve",
                "6 times 7",
                k=5,
                aggregate=aggregate,
                judge="judge" if aggregate == "judge" else None,
                timeout=20 if aggregate == "first" else 3,
            )
        # every request still running when it was cut off saw trio.Cancelled on its provider
        with trio.fail_after(10):
            while waiting != cut:
                await trio.sleep(0.02)
        assert cut[4] == 1
    trace = result.trace
    assert trace.status == "ok" and trace.capability == "solve"
    status = {by_peer[c.peer]: c.status for c in trace.children if c.kind == "member" and c.peer}
    assert len(status) == 5
    if aggregate == "first":
        assert result.output == "42"
        assert trace.detail["members"] == "1/5"
        assert status[3] in ("error", "skipped")  # it may not have failed before the winner answered
        assert {i: status[i] for i in (0, 1, 2, 4)} == {0: "ok", 1: "skipped", 2: "skipped", 4: "skipped"}
        assert cut[1] == cut[2] == 1
        return
    assert trace.detail["members"] == "3/5"
    assert {i: status[i] for i in range(4)} == {0: "ok", 1: "ok", 2: "ok", 3: "error"}
    assert status[4] == "timeout"  # cut off at the ensemble's deadline
    failed = next(c for c in trace.children if c.status == "error")
    assert "no GPU left" in (failed.error or "")
    assert "members=3/5" in trace.render()
    if aggregate == "majority":
        assert result.output == "42"
        assert trace.detail["vote"] == "2/3"  # answers compare normalised
        assert "vote=2/3" in trace.render()
    elif aggregate == "all":
        assert sorted(result.output) == ["41", "42", "42"]
    else:
        assert result.output == "judged 42"
        assert judged == [{"input": "6 times 7", "answers": judged[0]["answers"]}]
        assert sorted(judged[0]["answers"]) == ["41", "42", "42"]  # text answers arrive stripped
        judge_node = trace.children[-1]
        assert (judge_node.kind, judge_node.capability, judge_node.peer, judge_node.status) == (
            "judge",
            "judge",
            providers[0].peer_id,
            "ok",
        )


async def test_ensemble_where_no_member_answers_is_unavailable():
    async with failing_providers() as client:
        trace = Trace("ensemble")
        with trio.fail_after(30), pytest.raises(UnavailableError, match="no ensemble member answered"):
            await ensemble(client, "down", "x", k=3, timeout=5, trace=trace)
        assert trace.status == "error" and trace.detail["members"] == "0/2"


async def test_requests_cancelled_mid_write_leave_the_connection_usable():
    async def slow(request):
        await trio.sleep(60)

    async def quick(request):
        return "ok"

    async with open_peers(2) as (client, server):
        server.serve("slow", slow)
        server.serve("quick", quick)
        big = "x" * 200_000  # a request frame that takes several writes
        for i in range(100):
            with trio.move_on_after(0.0002 * (i % 20)):
                await client.call(server.addrs[0], "slow", big)
            with trio.fail_after(10):
                assert (await client.call(server.addrs[0], "quick", None, timeout=5)).value == "ok"


async def test_first_of_an_ensemble_where_every_member_fails_returns_at_once():
    async with failing_providers() as client:
        with trio.fail_after(4), pytest.raises(UnavailableError, match="no ensemble member answered"):
            await ensemble(client, "down", "x", k=2, aggregate="first", timeout=8)


# -- router ----------------------------------------------------------------------------


async def test_router_sends_arithmetic_to_the_tool_and_other_text_elsewhere():
    async with open_peers(4) as (client, p1, p2, p3):
        serve_demo(p1, "topic-classifier")
        serve_demo(p2, "arithmetic")
        serve_demo(p3, "translate", "echo")
        await announce(p1, p2, p3)
        routes = {"math": "arithmetic", "translation": Step("translate", {"to": "fr"})}
        cases = [
            ("what is 12 times 7 plus 3", "math", "87", p2),
            ("translate hello world in french", "translation", "translate bonjour monde in french", p3),
            ("the cat is good", "general", "the cat is good", p3),  # no route: the default
        ]
        for question, label, answer, specialist in cases:
            with trio.fail_after(30):
                result = await route(client, "topic-classifier", question, routes, default="echo")
            assert result.output == answer
            assert result.trace.detail["label"] == label
            classify, chosen = result.trace.children
            assert (classify.kind, classify.capability, classify.peer) == (
                "classify",
                "topic-classifier",
                p1.peer_id,
            )
            assert (chosen.kind, chosen.peer, chosen.status) == ("specialist", specialist.peer_id, "ok")
        trace = Trace("router")
        with trio.fail_after(30), pytest.raises(BadRequestError, match="no route"):
            await route(client, "topic-classifier", "the cat is good", routes, trace=trace)
        assert trace.status == "error" and trace.detail["label"] == "general"


# -- draft and verify ------------------------------------------------------------------


def careless_solver(asked: list[dict[str, Any]]):
    """Wrong (off by one) unless given the verifier's feedback."""

    async def solve(request):
        asked.append(dict(request.params))
        value = _evaluate(str(request.input))
        return str(value if request.params.get("feedback") else value + 1)

    return solve


async def test_draft_and_verify_converges_after_one_rejection():
    asked: list[dict[str, Any]] = []
    async with open_peers(4) as (client, d1, d2, checker):
        for d in (d1, d2):
            d.serve(Capability(name="solver", task="tool"), careless_solver(asked))
        checker.serve(verify_arithmetic.capability, verify_arithmetic)
        await announce(d1, d2, checker)
        with trio.fail_after(30):
            result = await draft_verify(client, "solver", "verify-arithmetic", "12 times 7 plus 3", rounds=3)
    assert result.output == "87"
    trace = result.trace
    assert trace.status == "ok" and trace.detail["round"] == 2
    assert [(c.kind, c.detail.get("round")) for c in trace.children] == [
        ("draft", 1),
        ("verify", 1),
        ("draft", 2),
        ("verify", 2),
    ]
    assert [c.detail.get("verdict") for c in trace.children if c.kind == "verify"] == ["reject", "accept"]
    assert {trace.children[1].peer, trace.children[3].peer} == {checker.peer_id}
    # the provider whose draft was rejected is avoided for the next draft
    assert trace.children[0].peer != trace.children[2].peer
    assert asked[0] == {}
    assert asked[1] == {"feedback": "wrong: expected 87", "previous": "88", "attempt": 2}


async def test_draft_and_verify_gives_up_after_the_last_round():
    async with open_peers(3) as (client, d1, checker):
        d1.serve(Capability(name="stubborn", task="tool"), lambda request: "13")
        checker.serve(verify_arithmetic.capability, verify_arithmetic)
        await announce(d1, checker)
        with trio.fail_after(30):
            result = await draft_verify(client, "stubborn", "verify-arithmetic", "6 times 7", rounds=1)
    assert result.output == "13"
    assert result.trace.status == "error" and "not accepted after 1 rounds" in (result.trace.error or "")
    assert result.trace.children[-1].detail["verdict"] == "reject"


async def test_draft_and_verify_with_a_single_drafter_provider():
    asked: list[dict[str, Any]] = []
    async with open_peers(3) as (client, d1, checker):
        d1.serve(Capability(name="solver", task="tool"), careless_solver(asked))
        checker.serve(verify_arithmetic.capability, verify_arithmetic)
        await announce(d1, checker)
        with trio.fail_after(30):
            result = await draft_verify(client, "solver", "verify-arithmetic", "12 times 7 plus 3", rounds=3)
    assert result.output == "87" and result.trace.detail["round"] == 2
    drafts = [c for c in result.trace.children if c.kind == "draft"]
    assert [d.peer for d in drafts] == [d1.peer_id, d1.peer_id]  # no other provider: asked again
    assert asked[1]["feedback"] == "wrong: expected 87"


# -- handlers that call the mesh -------------------------------------------------------


async def test_routed_loop_between_two_handlers_is_stopped():
    async with open_peers(3) as (client, b, c):

        async def ping(request):
            return await request.mesh.call(capability="pong", input=request.input)

        async def pong(request):
            return await request.mesh.call(capability="ping", input=request.input)

        b.serve("ping", ping)
        c.serve("pong", pong)
        await announce(b, c)
        with trio.fail_after(30), pytest.raises(BadRequestError, match="loop detected"):
            await client.call(capability="ping", input="x", timeout=20)


async def test_routed_chain_is_stopped_by_the_hop_limit():
    hops: list[int] = []
    async with open_peers(3, max_hops=3) as (client, b, c):
        peers = [b, c]

        def make(i: int):
            async def step(request):
                hops.append(request.trace.hops)
                return await request.mesh.call(capability=f"step{i + 1}", input=request.input)

            return step

        for i in range(8):
            peers[i % 2].serve(f"step{i}", make(i))
        await announce(b, c)
        with trio.fail_after(30), pytest.raises(BadRequestError, match="hop limit exceeded"):
            await client.call(capability="step0", input="x", timeout=20)
    assert hops == [0, 1, 2, 3]


async def test_deadline_in_the_middle_of_a_pipeline_cancels_remote_work():
    seen: dict[str, str] = {}
    final_called = trio.Event()

    async def prep(request):
        return f"prepared {request.input}"

    async def relay(request):
        try:
            return await request.mesh.call(capability="deep", input=request.input)
        except BaseException as exc:
            seen["relay"] = type(exc).__name__
            raise

    async def deep(request):
        seen["deep_started"] = "yes"
        try:
            await trio.sleep(60)
        except trio.Cancelled:
            seen["deep"] = "Cancelled"
            raise
        return "too late"

    async def final(request):
        final_called.set()
        return "never"

    async with open_peers(5) as (client, p1, p2, p3, p4):
        p1.serve("prep", prep)
        p2.serve("relay", relay)
        p3.serve("deep", deep)
        p4.serve("final", final)
        await announce(p1, p2, p3, p4)
        trace = Trace("pipeline")
        with trio.fail_after(30), pytest.raises(DeadlineExceededError):
            await pipeline(client, ["prep", "relay", "final"], "x", timeout=2.0, trace=trace)
        with trio.fail_after(5):
            while "deep" not in seen or "relay" not in seen:
                await trio.sleep(0.02)
    assert seen["deep"] == "Cancelled"  # two hops downstream, on another peer
    assert seen["relay"] in ("Cancelled", "DeadlineExceededError")
    assert not final_called.is_set()
    assert trace.status == "timeout"
    assert [c.status for c in trace.children] == ["ok", "timeout"]
    assert trace.children[0].peer == p1.peer_id


async def test_deadline_in_a_streamed_pipeline_is_a_deadline_error():
    async def slow_story(request):
        yield "Once. "
        await trio.sleep(60)
        yield "Never."

    async with open_peers(3) as (client, p1, p2):
        p1.serve("story", slow_story)
        serve_demo(p2, "echo")
        await announce(p1, p2)
        trace = Trace("pipeline")
        with trio.fail_after(30), pytest.raises(DeadlineExceededError):
            await pipeline(client, ["story", Step("echo", stream=True)], "x", timeout=2.0, trace=trace)
        assert trace.status == "timeout"


async def test_run_workflow_in_process():
    """A workflow mixing patterns: a pipeline whose first step is a router, then a translator."""
    text = """
[workflow]
name = "mixed"
input = "translate hello world in french"
[workflow.pipeline]
steps = [
  { router = { capability = "topic-classifier", routes = { translation = "echo" }, default = "echo" } },
  { capability = "translate", params = { to = "es" } },
]
"""
    async with open_peers(3) as (client, p1, p2):
        serve_demo(p1, "topic-classifier", "echo")
        serve_demo(p2, "translate")
        await announce(p1, p2)
        with trio.fail_after(30):
            result = await run_workflow(client, load_workflow(text))
    assert result.output == "translate hola mundo in french"
    tree = result.trace.to_json()
    assert tree["kind"] == "workflow" and tree["detail"]["name"] == "mixed" and tree["status"] == "ok"
    (pipe,) = tree["children"]
    assert [c["kind"] for c in pipe["children"]] == ["router", "call"]
    assert pipe["children"][0]["detail"]["label"] == "translation"
    assert pipe["children"][1]["peer"] == p2.peer_id


# -- workflow files --------------------------------------------------------------------


def test_load_workflow_accepts_the_examples():
    files = sorted(WORKFLOWS.glob("*.toml"))
    assert len(files) >= 3
    for path in files:
        workflow = load_workflow(path.read_text())
        assert workflow["name"] == path.stem
        assert workflow["input"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[workflow\n", "not valid TOML"),
        ('name = "x"\n', r"needs a \[workflow\] table"),
        ('workflow = "echo"\n', r"needs a \[workflow\] table"),
        ('[workflow]\ncall = "echo"\n[other]\nx = 1\n', "unknown top-level table"),
        ('[workflow]\ncall = "echo"\ntimout = 3\n', r"unknown key\(s\) timout in workflow"),
        ('[workflow]\nname = "nothing to do"\n', "exactly one of"),
        ('[workflow]\ncall = "echo"\n[workflow.router]\ncapability = "c"\n', "exactly one of"),
    ],
)
def test_load_workflow_rejects(text, message):
    with pytest.raises(BadRequestError, match=message):
        load_workflow(text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[workflow.call]\ncapability = "echo"\nparms = {}\n', r"unknown key\(s\) parms in call"),
        ('[workflow.ensemble]\ncapability = "echo"\nagregate = "all"\n', r"agregate in ensemble"),
        ('[workflow.pipeline]\nsteps = [{ capability = "echo", strem = true }]\n', r"strem in step"),
        ("[workflow.pipeline]\nsteps = []\n", "non-empty list of steps"),
        ("[workflow.pipeline]\nsteps = [3]\n", "must be a name or a table"),
        ('[workflow.router]\nroutes = { a = "echo" }\n', "'capability' must be a capability name"),
        ('[workflow.draft_verify]\ndrafter = "a"\n', "'verifier' must be a capability name"),
        ("[workflow.ensemble]\nk = 3\n", "needs capability or capabilities"),
    ],
)
async def test_nested_workflow_errors_need_no_network(body, message):
    workflow = load_workflow('[workflow]\ninput = "x"\n' + body)
    with pytest.raises(BadRequestError, match=message):
        await run_workflow(None, workflow)  # type: ignore[arg-type]  # fails before using a peer


async def test_workflow_without_input_is_refused():
    with pytest.raises(BadRequestError, match="no input"):
        await run_workflow(None, load_workflow('[workflow]\ncall = "echo"\n'))  # type: ignore[arg-type]


async def test_unknown_key_in_a_router_route_is_a_bad_request():
    text = (
        '[workflow]\ninput = "x"\n[workflow.router]\ncapability = "c"\n'
        'routes = { math = { capability = "arithmetic", parms = {} } }\n'
    )
    with pytest.raises(BadRequestError, match="parms"):
        await run_workflow(None, load_workflow(text))  # type: ignore[arg-type]


async def test_draft_verify_nested_in_a_router():
    text = """
[workflow]
input = "what is 12 times 7 plus 3"
[workflow.router]
capability = "topic-classifier"
default = "echo"
routes = { math = { draft_verify = { drafter = "solver", verifier = "verify-arithmetic" } } }
"""
    async with open_peers(3) as (client, p1, p2):
        serve_demo(p1, "topic-classifier", "echo")
        p1.serve(Capability(name="solver", task="tool"), careless_solver([]))
        serve_demo(p2, "verify-arithmetic")
        await announce(p1, p2)
        with trio.fail_after(30):
            result = await run_workflow(client, load_workflow(text))
            general = await run_workflow(client, load_workflow(text), "the cat is good")
    assert result.output == "87"
    (router,) = result.trace.children
    assert (router.kind, router.detail["label"]) == ("router", "math")
    classify, checked = router.children
    assert (classify.kind, checked.kind, checked.detail["round"]) == ("classify", "draft-verify", 2)
    assert [c.detail.get("verdict") for c in checked.children if c.kind == "verify"] == ["reject", "accept"]
    assert general.output == "the cat is good"
    assert [c.kind for c in general.trace.children[0].children] == ["classify", "specialist"]


async def test_step_names_that_contain_a_pattern_name():
    async def recall(request):
        return f"recalled {request.input}"

    text = """
[workflow]
input = "x"
[workflow.pipeline]
steps = ["recall", { router = { capability = "topic-classifier", routes = {}, default = "echo" } }]
"""
    async with open_peers(2) as (client, p1):
        p1.serve("recall", recall)
        serve_demo(p1, "topic-classifier", "echo")
        await announce(p1)
        with trio.fail_after(30):
            result = await run_workflow(client, load_workflow(text))
    assert result.output == "recalled x"


async def test_streamed_step_after_a_nested_pattern():
    text = """
[workflow]
input = "hello world. the cat is good."
[workflow.pipeline]
steps = [
  { router = { capability = "topic-classifier", routes = {}, default = "echo" } },
  { capability = "translate", params = { to = "fr" }, stream = true },
]
"""
    async with open_peers(2) as (client, p1):
        serve_demo(p1, "topic-classifier", "echo", "translate")
        await announce(p1)
        with trio.fail_after(30):
            result = await run_workflow(client, load_workflow(text))
    assert result.output == "bonjour monde le chat est bon"


# -- the command line and the examples, as a user runs them ----------------------------


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node["children"]:
        out.extend(_walk(child))
    return out


async def test_modelnet_run_example_workflows_against_a_local_mesh(tmp_path):
    """`modelnet run` as a subprocess, against peers laid out as `modelnet mesh up -n 5` lays them out.

    The providers run in this process (cheaper than six more processes); the
    client, `modelnet run`, knows only the bootstrap address.
    """
    layout = mesh_assignment(5)
    async with open_peers(len(layout) + 1) as (boot, *providers):
        for peer, names in zip(providers, layout, strict=True):
            serve_demo(peer, *names)
        await announce(*providers)
        serving = {
            n: p.peer_id for p, names in zip(providers, layout, strict=True) for n in names if n != "echo"
        }
        assert set(serving) == set(ALL) - {"echo"}
        boot_addr = boot.addrs[0]
        typo = tmp_path / "typo.toml"
        typo.write_text('[workflow]\ninput = "x"\ncall = "echo"\ntimout = 5\n')
        missing = tmp_path / "missing.toml"
        missing.write_text('[workflow]\ninput = "x"\ntimeout = 10\ncall = "no-such-model"\n')
        runs = {
            "routed": (WORKFLOWS / "route-then-answer.toml", "--json"),
            "piped": (WORKFLOWS / "summarize-translate.toml", "--json"),
            "plain": (WORKFLOWS / "checked-math.toml", "--input", "2 ** 10 - 24"),
            "typo": (typo,),
            "missing": (missing,),
        }
        done: dict[str, subprocess.CompletedProcess[str]] = {}

        async def run(name: str) -> None:
            path, *flags = runs[name]
            args = ("run", str(path), *[str(f) for f in flags], "--bootstrap", boot_addr)
            done[name] = await trio.to_thread.run_sync(lambda: modelnet(*args, cwd=tmp_path, timeout=60))

        async with trio.open_nursery() as nursery:  # independent clients, run side by side
            for name in runs:
                nursery.start_soon(run, name)

    for name in ("routed", "piped", "plain"):
        assert done[name].returncode == 0, done[name].stderr

    routed = json.loads(done["routed"].stdout)
    assert routed["output"] == "87"
    tree = routed["trace"]
    assert (tree["kind"], tree["status"], tree["detail"]["name"]) == ("workflow", "ok", "route-then-answer")
    (router,) = tree["children"]
    assert router["kind"] == "router" and router["detail"]["label"] == "math"
    classify, specialist = router["children"]
    assert classify["peer"] == serving["topic-classifier"]
    assert (specialist["capability"], specialist["peer"]) == ("arithmetic", serving["arithmetic"])
    for node in _walk(tree):
        assert set(node) == {
            "kind", "capability", "peer", "status", "duration_ms", "chunks", "tokens",
            "error", "attempts", "detail", "children",
        }  # fmt: skip

    piped = json.loads(done["piped"].stdout)
    assert piped["output"] == "bonjour monde le chat est bon"
    (pipe,) = piped["trace"]["children"]
    summary, streamed = pipe["children"]
    assert (summary["capability"], summary["peer"]) == ("summarize", serving["summarize"])
    assert (streamed["kind"], streamed["capability"], streamed["chunks"]) == ("stream", "translate", 2)
    assert {c["peer"] for c in streamed["children"]} == {serving["translate"]}

    # the text form, with another input: the answer on stdout, the tree on stderr
    plain = done["plain"]
    assert plain.stdout.strip() == "1000"
    rows = [ln.strip() for ln in plain.stderr.splitlines()]
    assert [r.split()[1] for r in rows] == [
        "workflow",
        "router",
        "classify",
        "draft-verify",
        "draft",
        "verify",
    ]
    assert "label=math" in rows[1] and "round=1" in rows[3]
    assert "verify-arithmetic" in rows[5] and "verdict=accept" in rows[5]
    assert all(r.startswith("✓") for r in rows)

    # a typo fails loudly, in one line, before anything runs
    assert done["typo"].returncode == 1
    assert "unknown key(s) timout in workflow" in one_line_error(done["typo"])

    # a capability nobody serves: one line, exit 1
    assert done["missing"].returncode == 1
    assert "no provider" in one_line_error(done["missing"])


def test_collaboration_example_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "collaboration.py")],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    for heading in ("request.mesh", "pipeline", "ensemble", "router", "draft and verify"):
        assert heading in out.stdout
    assert "workflow" in out.stdout

"""Trees of receipts for every collaboration pattern (mesh/collab/receipts.py, specs/inference.md
"Trees of receipts"): ensembles, routers, draft-and-verify and streamed pipeline steps ask for
receipts with ``receipts=True``, the trace's JSON shows them, and ``verify_receipt_tree`` checks
the tree end to end; tampered, missing, swapped and spliced branch receipts are rejected. Live
peers on 127.0.0.1, and the vectors of specs/vectors/receipt_tree.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import trio
from vector_util import KeySigner

from modelnet_p2p import Capability, Peer
from modelnet_p2p.demo.models import verify_arithmetic
from modelnet_p2p.mesh.collab import (
    Step,
    draft_verify,
    ensemble,
    pipeline,
    receipt_tree,
    route,
    run_workflow,
    verify_receipt_tree,
)
from modelnet_p2p.mesh.collab.receipts import RECEIPT_TREE_FORMAT
from modelnet_p2p.proto.receipt import ChunkChain, Receipt, ReceiptError, receipt_file, seal_receipt
from modelnet_p2p.testing import open_peers

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "receipt_tree.json"


async def announce(*peers: Peer) -> None:
    async with trio.open_nursery() as nursery:
        for p in peers:
            nursery.start_soon(p.announce)


def as_file(tree: dict[str, Any]) -> dict[str, Any]:
    """What a tree becomes written to a file and read back."""
    out: dict[str, Any] = json.loads(json.dumps(tree))
    return out


def rejected(tree: dict[str, Any]) -> str:
    with pytest.raises(ReceiptError) as exc:
        verify_receipt_tree(tree)
    return exc.value.reason


def receipts_in_trace_json(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node["receipt"]] if "receipt" in node else []
    for c in node["children"]:
        out.extend(receipts_in_trace_json(c))
    return out


# -- ensemble: fan out and vote ----------------------------------------------------------------


async def test_ensemble_majority_tree_verified_and_branches_checked() -> None:
    answers = ["42", " 42\n", "41"]

    def member(i: int):  # type: ignore[no-untyped-def]
        async def solve(request):  # type: ignore[no-untyped-def]
            return answers[i]

        return solve

    async def judge(request):  # type: ignore[no-untyped-def]
        return "judged " + sorted(request.input["answers"])[-1]

    async with open_peers(4) as (client, *providers):
        for i, p in enumerate(providers):
            p.serve(Capability(name="solve", task="tool"), member(i))
        providers[0].serve("judge", judge)
        await announce(*providers)
        with trio.fail_after(40):
            result = await ensemble(client, "solve", "6 times 7", k=3, timeout=15, receipts=True)
            judged = await ensemble(
                client, "solve", "6 times 7", k=3, aggregate="judge", judge="judge", timeout=15, receipts=True
            )
            other = await client.call(providers[1].addrs[0], "solve", "6 times 8", timeout=20, receipt=True)
            plain = await ensemble(client, "solve", "6 times 7", k=3, timeout=15)
        assert result.output == "42" and result.trace.detail["members"] == "3/3"
        # the trace's JSON shows each branch's receipt
        shown = receipts_in_trace_json(result.trace.to_json())
        assert len(shown) == 3 and all(r["ok"] for r in shown)
        assert {r["provider"] for r in shown} == {p.peer_id for p in providers}
        assert receipts_in_trace_json(plain.trace.to_json()) == []  # not asked: none

        tree = as_file(receipt_tree(result.trace, "6 times 7", result.output))
        receipts = verify_receipt_tree(tree)
        assert {r.provider for r in receipts} == {p.peer_id for p in providers}
        assert len({r.input_digest for r in receipts}) == 1  # every branch bound the same input
        assert all(r.caller == client.peer_id for r in receipts)

        jtree = as_file(receipt_tree(judged.trace, "6 times 7", judged.output))
        jreceipts = verify_receipt_tree(jtree)
        assert judged.output == "judged 42" and len(jreceipts) == 4
        assert jreceipts[-1].capability == "judge"

        members = tree["root"]["members"]
        by = {m["provider"]: i for i, m in enumerate(members)}
        dissenter = next(i for i, m in enumerate(members) if m["chunks"] == ["41"])
        # a tampered branch: its chunk changed without re-signing
        tampered = copy.deepcopy(tree)
        tampered["root"]["members"][dissenter]["chunks"] = ["42"]
        assert rejected(tampered) == "bad_output"
        # a branch that lost its receipt
        missing = copy.deepcopy(tree)
        del missing["root"]["members"][0]["receipt"]
        assert rejected(missing) == "missing_receipt"
        # a branch dropped whole: the vote no longer gives the claimed output
        dropped = copy.deepcopy(tree)
        agree = [i for i in range(3) if i != dissenter]
        dropped["root"]["members"] = [members[dissenter], members[agree[0]]]
        assert rejected(dropped) == "broken_chain"  # tie: the earliest (41) wins, not 42
        # a branch whose provider is swapped for another member's, without re-signing
        swapped = copy.deepcopy(tree)
        swapped["root"]["members"][0]["provider"] = members[1]["provider"]
        assert rejected(swapped) == "wrong_peer"
        # one provider's receipt standing for two branches
        doubled = copy.deepcopy(tree)
        doubled["root"]["members"][agree[1]] = copy.deepcopy(members[agree[0]])
        assert rejected(doubled) == "broken_chain"
        # a branch replaced by the same provider's receipt for another input
        assert other.receipt_check is not None
        spliced = copy.deepcopy(tree)
        spliced["root"]["members"][by[providers[1].peer_id]] = {
            "kind": "call",
            "role": "member",
            **receipt_file(other.receipt_check.data, chunks=other.chunks),
            "provider": providers[1].peer_id,
        }
        assert rejected(spliced) == "broken_chain"
        # a claimed output the vote does not give
        assert rejected({**tree, "output": "41"}) == "broken_chain"
        # the judge's input must be the branch outputs
        jbad = copy.deepcopy(jtree)
        jbad["root"]["members"] = jbad["root"]["members"][:2]
        assert rejected(jbad) == "broken_chain"


# -- router, draft-and-verify, streamed step ---------------------------------------------------


async def test_router_draft_verify_and_streamed_pipeline_trees() -> None:
    async def classify(request):  # type: ignore[no-untyped-def]
        return {"label": "math" if any(ch.isdigit() for ch in str(request.input)) else "other"}

    async def calc(request):  # type: ignore[no-untyped-def]
        return "87"

    async def careless(request):  # type: ignore[no-untyped-def]
        return "87" if request.params.get("feedback") else "88"

    async def narrate(request):  # type: ignore[no-untyped-def]
        for part in ("One. Tw", "o! Three", "?"):
            yield part

    async def tag(request):  # type: ignore[no-untyped-def]
        return f"[{request.input}]"

    async with open_peers(5) as (client, p1, p2, p3, p4):
        p1.serve("classify", classify)
        p2.serve("calc", calc)
        p2.serve(Capability(name="solver", task="tool"), careless)
        p3.serve(verify_arithmetic.capability, verify_arithmetic)
        p4.serve("narrate", narrate)
        p4.serve("tag", tag)
        await announce(p1, p2, p3, p4)
        with trio.fail_after(60):
            routed = await route(client, "classify", "12 times 7 plus 3", {"math": "calc"}, receipts=True)
            drafted = await draft_verify(
                client, "solver", "verify-arithmetic", "12 times 7 plus 3", rounds=3, receipts=True
            )
            streamed = await pipeline(
                client, ["narrate", Step("tag", stream=True), "calc"], "go", timeout=30, receipts=True
            )

    # router
    assert routed.output == "87"
    rtree = as_file(receipt_tree(routed.trace, "12 times 7 plus 3", routed.output))
    assert [r.capability for r in verify_receipt_tree(rtree)] == ["classify", "calc"]
    assert len(receipts_in_trace_json(routed.trace.to_json())) == 2
    relabelled = copy.deepcopy(rtree)
    relabelled["root"]["label"] = "other"
    assert rejected(relabelled) == "broken_chain"
    no_classify = copy.deepcopy(rtree)
    del no_classify["root"]["classify"]["receipt"]
    assert rejected(no_classify) == "missing_receipt"

    # draft and verify: rejected once, then accepted
    assert drafted.output == "87" and drafted.trace.detail["round"] == 2
    dtree = as_file(receipt_tree(drafted.trace, "12 times 7 plus 3", drafted.output))
    assert [r.capability for r in verify_receipt_tree(dtree)] == ["solver", "verify-arithmetic"] * 2
    cut = copy.deepcopy(dtree)
    cut["root"]["rounds"] = cut["root"]["rounds"][:1]  # the rejected draft claimed as the answer
    assert rejected(cut) == "broken_chain"
    swapped = copy.deepcopy(dtree)  # round 2's verdict spliced into round 1: it judged another draft
    swapped["root"]["rounds"][0]["verify"] = dtree["root"]["rounds"][1]["verify"]
    assert rejected(swapped) == "broken_chain"
    forged = copy.deepcopy(dtree)
    forged["root"]["rounds"][0]["verify"]["chunks"] = [{"ok": True, "feedback": ""}]
    assert rejected(forged) in ("bad_output", "wrong_count")

    # a streamed step: one receipt per piece, each bound to the piece cut from the upstream chunks
    assert streamed.output == "87"
    stree = as_file(receipt_tree(streamed.trace, "go", streamed.output))
    caps = [r.capability for r in verify_receipt_tree(stree)]
    assert caps == ["narrate", "tag", "tag", "tag", "calc"]
    step = stree["root"]["steps"][0]
    assert step["kind"] == "stream" and len(step["pieces"]) == 3
    reordered = copy.deepcopy(stree)
    pieces = reordered["root"]["steps"][0]["pieces"]
    pieces[0], pieces[1] = pieces[1], pieces[0]
    assert rejected(reordered) == "broken_chain"
    lost = copy.deepcopy(stree)
    lost["root"]["steps"][0]["pieces"].pop()
    assert rejected(lost) == "broken_chain"


# -- workflows: patterns nested ------------------------------------------------------------------


async def test_workflow_with_nested_patterns_tree() -> None:
    solve_twice = {"ensemble": {"capability": "solve", "k": 2, "timeout": 15}}
    workflow = {
        "input": "12 times 7 plus 3",
        "pipeline": {
            "steps": [
                {"router": {"capability": "classify", "default": "calc", "routes": {"math": solve_twice}}},
                "wrap",
            ]
        },
    }

    async def classify(request):  # type: ignore[no-untyped-def]
        return {"label": "math"}

    async def solve(request):  # type: ignore[no-untyped-def]
        yield "8"
        yield "7"

    async def wrap(request):  # type: ignore[no-untyped-def]
        return f"[{request.input}]"

    async with open_peers(4) as (client, p1, p2, p3):
        p1.serve("classify", classify)
        p1.serve("wrap", wrap)
        for p in (p2, p3):
            p.serve(Capability(name="solve", task="tool"), solve)
        await announce(p1, p2, p3)
        with trio.fail_after(60):
            result = await run_workflow(client, workflow, receipts=True)
    assert result.output == "[87]"
    tree = as_file(receipt_tree(result.trace, "12 times 7 plus 3", result.output))
    receipts = verify_receipt_tree(tree)
    assert [r.capability for r in receipts] == ["classify", "solve", "solve", "wrap"]
    assert {r.provider for r in receipts[1:3]} == {p2.peer_id, p3.peer_id}
    nested = tree["root"]["steps"][0]["specialist"]
    assert nested["kind"] == "ensemble" and len(nested["members"]) == 2
    tampered = copy.deepcopy(tree)
    tampered["root"]["steps"][0]["specialist"]["members"][1]["chunks"] = ["8", "8"]
    assert rejected(tampered) == "bad_output"
    unsigned = copy.deepcopy(tree)
    del unsigned["root"]["steps"][1]["receipt"]
    assert rejected(unsigned) == "missing_receipt"


# -- the command line: modelnet run --receipts, modelnet verify ----------------------------------


def test_modelnet_run_receipts_and_verify(tmp_path: Path) -> None:
    from cli_util import background, modelnet, read_event

    workflow = Path(__file__).resolve().parent.parent / "examples" / "workflows" / "checked-math.toml"
    path = tmp_path / "tree.json"
    with background("serve", "modelnet_p2p.demo_models:ALL", "--json", cwd=tmp_path) as server:
        ready = read_event(server)
        out = modelnet("run", str(workflow), "--bootstrap", ready["addrs"][0], "--receipts", str(path))
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "87" and "tree of receipts checked and written" in out.stderr
        server.terminate()
        server.wait(20)
    tree = json.loads(path.read_text())
    assert tree["format"] == RECEIPT_TREE_FORMAT and tree["root"]["kind"] == "router"
    ok = modelnet("verify", str(path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: ") and "'topic-classifier' answered by " + ready["peer_id"] in ok.stdout
    rounds = tree["root"]["specialist"]["rounds"]
    rounds[-1]["draft"]["chunks"] = ["88"]
    path.write_text(json.dumps(tree))
    bad = modelnet("verify", str(path))
    assert bad.returncode == 1 and "bad_output" in bad.stderr


# -- vectors -----------------------------------------------------------------------------------


SIGNERS = {n: KeySigner(f"modelnet receipt tree vector: {n}") for n in ("a", "b", "c", "caller")}


def signed_step(
    role: str, signer: str, capability: str, input: Any, chunks: list[Any], n: int
) -> dict[str, Any]:
    chain = ChunkChain(input)
    for c in chunks:
        chain.add(c)
    key = SIGNERS[signer]
    receipt = Receipt(
        request_id=bytes([n]) * 16,
        capability=capability,
        input_digest=chain.input_digest,
        output_digest=chain.head,
        chunks=chain.count,
        provider=key.peer_id,
        started_ms=1_796_000_000_000 + 10 * n,
        ended_ms=1_796_000_000_005 + 10 * n,
        caller=SIGNERS["caller"].peer_id,
    )
    data = seal_receipt(receipt, key)
    return {"kind": "call", "role": role, **receipt_file(data, chunks=chunks), "provider": key.peer_id}


def tree_of(root: dict[str, Any], input: Any, output: Any) -> dict[str, Any]:
    return {"format": RECEIPT_TREE_FORMAT, "input": input, "root": root, "output": output}


def build_vectors() -> dict[str, Any]:
    """The content of specs/vectors/receipt_tree.json (Ed25519 signatures are deterministic)."""
    q = "6 times 7"
    members = [
        signed_step("member", "a", "solve", q, ["42"], 1),
        signed_step("member", "b", "solve", q, [" 42", "\n"], 2),
        signed_step("member", "c", "solve", q, ["41"], 3),
    ]
    vote = {"kind": "ensemble", "aggregate": "majority", "capability": "solve", "members": members}
    judge = signed_step("judge", "a", "judge", {"input": q, "answers": ["42", "42", "41"]}, ["42"], 4)
    judged = {**vote, "aggregate": "judge", "judge": judge}
    router = {
        "kind": "router",
        "label": "math",
        "classify": signed_step("classify", "a", "classify", q, [{"label": "math"}], 5),
        "specialist": signed_step("specialist", "b", "calc", q, ["42"], 6),
    }
    rounds = [
        {
            "draft": signed_step("draft", "a", "solver", q, ["43"], 7),
            "verify": signed_step(
                "verify", "c", "check", {"question": q, "answer": "43"}, [{"ok": False, "feedback": "no"}], 8
            ),
        },
        {
            "draft": signed_step("draft", "b", "solver", q, ["42"], 9),
            "verify": signed_step(
                "verify", "c", "check", {"question": q, "answer": "42"}, [{"ok": True}], 10
            ),
        },
    ]
    draft = {"kind": "draft-verify", "rounds": rounds}
    stream = {
        "kind": "stream",
        "group": "sentence",
        "source": signed_step("call", "a", "narrate", "go", ["One. Tw", "o! Three", "?"], 11),
        "pieces": [
            signed_step("call", "b", "tag", piece, [f"[{piece}]"], 12 + i)
            for i, piece in enumerate(["One.", "Two!", "Three?"])
        ],
    }
    piped = {
        "kind": "pipeline",
        "steps": [stream, signed_step("call", "c", "count", "[One.] [Two!] [Three?]", ["3"], 15)],
    }

    nested = {
        "kind": "pipeline",
        "steps": [
            {"kind": "router", "label": "math", "classify": router["classify"], "specialist": vote},
            signed_step("call", "c", "wrap", "42", ["[42]"], 16),
        ],
    }

    def bad(name: str, reason: str, tree: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "reason": reason, "tree": tree}

    tampered = copy.deepcopy(vote)
    tampered["members"][2]["chunks"] = ["42"]
    missing = copy.deepcopy(vote)
    del missing["members"][0]["receipt"]
    swapped = copy.deepcopy(vote)
    swapped["members"][0]["provider"] = SIGNERS["b"].peer_id
    doubled = copy.deepcopy(vote)
    doubled["members"][1] = copy.deepcopy(members[0])
    other_input = copy.deepcopy(vote)
    other_input["members"][1] = signed_step("member", "b", "solve", "6 times 8", ["48"], 2)
    short_judge = {**copy.deepcopy(judged), "members": copy.deepcopy(members[:2])}
    relabelled = {**copy.deepcopy(router), "label": "chat"}
    early = {"kind": "draft-verify", "rounds": [copy.deepcopy(rounds[1]), copy.deepcopy(rounds[0])]}
    lost_piece = copy.deepcopy(piped)
    lost_piece["steps"][0]["pieces"].pop()
    return {
        "format": "modelnet-receipt-tree-vectors/1",
        "description": (
            "Trees of receipts (specs/inference.md, Trees of receipts). Keys are Ed25519 seeds = "
            "SHA-256 of the labels. 'valid': the tree verifies and yields receipts of 'capabilities' "
            "in this order. 'invalid': a verifier must reject the tree with 'reason'."
        ),
        "keys": {n: {"seed_label": k.label, "peer_id": k.peer_id} for n, k in SIGNERS.items()},
        "valid": [
            {"name": "ensemble_majority", "tree": tree_of(vote, q, "42"), "capabilities": ["solve"] * 3},
            {
                "name": "ensemble_judge",
                "tree": tree_of(judged, q, "42"),
                "capabilities": ["solve"] * 3 + ["judge"],
            },
            {"name": "router", "tree": tree_of(router, q, "42"), "capabilities": ["classify", "calc"]},
            {
                "name": "draft_verify",
                "tree": tree_of(draft, q, "42"),
                "capabilities": ["solver", "check"] * 2,
            },
            {
                "name": "nested_router_to_an_ensemble_then_a_call",
                "tree": tree_of(nested, q, "[42]"),
                "capabilities": ["classify", "solve", "solve", "solve", "wrap"],
            },
            {
                "name": "pipeline_with_a_streamed_step",
                "tree": tree_of(piped, "go", "3"),
                "capabilities": ["narrate", "tag", "tag", "tag", "count"],
            },
        ],
        "invalid": [
            bad("tampered_branch", "bad_output", tree_of(tampered, q, "42")),
            bad("missing_branch_receipt", "missing_receipt", tree_of(missing, q, "42")),
            bad("swapped_branch_provider", "wrong_peer", tree_of(swapped, q, "42")),
            bad("one_provider_two_branches", "broken_chain", tree_of(doubled, q, "42")),
            bad("branch_of_another_input", "broken_chain", tree_of(other_input, q, "42")),
            bad("vote_output_not_the_majority", "broken_chain", tree_of(vote, q, "41")),
            bad("judge_of_other_branches", "broken_chain", tree_of(short_judge, q, "42")),
            bad("router_label_not_its_answer", "broken_chain", tree_of(relabelled, q, "42")),
            bad("accepted_draft_not_last", "broken_chain", tree_of(early, q, "43")),
            bad("streamed_piece_missing", "broken_chain", tree_of(lost_piece, "go", "3")),
        ],
    }


def test_vectors_file_is_current() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(build_vectors()))


def test_vectors() -> None:
    vec = json.loads(VECTORS.read_text())
    assert vec["format"] == "modelnet-receipt-tree-vectors/1"
    for case in vec["valid"]:
        got = verify_receipt_tree(case["tree"])
        assert [r.capability for r in got] == case["capabilities"], case["name"]
    for case in vec["invalid"]:
        assert rejected(case["tree"]) == case["reason"], case["name"]


if __name__ == "__main__":  # regenerate the vectors: python tests/test_collab_receipts.py
    VECTORS.write_text(json.dumps(build_vectors(), indent=1) + "\n")

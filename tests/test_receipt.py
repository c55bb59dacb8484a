"""Signed receipts (proto/receipt.py, specs/inference.md "Signed receipts"): sealing, verification,
rejection of tampered, reordered and foreign receipts, the JSON file form and the vectors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vector_util import KeySigner

from modelnet_p2p.proto.envelope import encode_envelope, open_envelope
from modelnet_p2p.proto.packing import canonical_packb
from modelnet_p2p.proto.receipt import (
    RECEIPT_FORMAT,
    ChunkChain,
    Receipt,
    ReceiptError,
    chain_digest,
    open_receipt,
    receipt_file,
    seal_receipt,
    value_digest,
    verify_receipt,
    verify_receipt_file,
)

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "receipt.json"


PROVIDER = KeySigner("modelnet receipt vector: provider")
CALLER = KeySigner("modelnet receipt vector: caller")
MALLORY = KeySigner("modelnet receipt vector: mallory")

INPUT: Any = {"prompt": "hello", "n": 3}
CHUNKS: list[Any] = ["Hel", "lo", " world", b"\x00\x01", 1.5, None, {"k": [1, 2]}]


def make(
    chunks: list[Any] = CHUNKS, input: Any = INPUT, signer: KeySigner = PROVIDER, **kw: Any
) -> tuple[Receipt, bytes]:
    chain = ChunkChain(input)
    for c in chunks:
        chain.add(c)
    fields: dict[str, Any] = dict(
        request_id=bytes(range(16)),
        capability="echo",
        input_digest=chain.input_digest,
        output_digest=chain.head,
        chunks=chain.count,
        provider=signer.peer_id,
        started_ms=1_764_590_400_000,
        ended_ms=1_764_590_400_250,
        finish_reason="stop",
        usage={"tokens": 7},
        caller=CALLER.peer_id,
        trace_id=b"\x07" * 16,
    )
    fields.update(kw)
    receipt = Receipt(**fields)
    return receipt, seal_receipt(receipt, signer)


def test_verified_offline_with_chunks_and_input() -> None:
    receipt, data = make()
    got = verify_receipt(
        data,
        provider=PROVIDER.peer_id,
        request_id=bytes(range(16)),
        capability="echo",
        chunks=CHUNKS,
        input=INPUT,
    )
    assert got == receipt
    assert open_receipt(data) == receipt


def test_chain_is_the_specified_hash_chain() -> None:
    h = hashlib.sha256(b"\x81\xa1a\x01").digest()  # packb({"a": 1})
    assert value_digest({"a": 1}) == h
    c = [value_digest(x) for x in ("x", "y")]
    want = hashlib.sha256(hashlib.sha256(h + c[0]).digest() + c[1]).digest()
    assert chain_digest(h, c) == want
    chain = ChunkChain({"a": 1})
    chain.add("x")
    chain.add("y")
    assert (chain.head, chain.count) == (want, 2)


def test_tampered_chunk_rejected() -> None:
    _, data = make()
    tampered = list(CHUNKS)
    tampered[2] = " World"
    with pytest.raises(ReceiptError) as exc:
        verify_receipt(data, provider=PROVIDER.peer_id, chunks=tampered)
    assert exc.value.reason == "bad_output"


def test_reordered_chunks_rejected() -> None:
    _, data = make()
    reordered = [CHUNKS[1], CHUNKS[0], *CHUNKS[2:]]
    with pytest.raises(ReceiptError) as exc:
        verify_receipt(data, provider=PROVIDER.peer_id, chunks=reordered)
    assert exc.value.reason == "bad_output"


def test_missing_or_extra_chunk_rejected() -> None:
    _, data = make()
    for chunks in (CHUNKS[:-1], [*CHUNKS, "more"]):
        with pytest.raises(ReceiptError) as exc:
            verify_receipt(data, chunks=chunks)
        assert exc.value.reason == "wrong_count"


def test_receipt_from_another_peer_rejected() -> None:
    # Mallory signs a receipt for the same answer with her own key: valid, but not the provider's.
    _, data = make(signer=MALLORY)
    assert open_receipt(data).provider == MALLORY.peer_id
    with pytest.raises(ReceiptError) as exc:
        verify_receipt(data, provider=PROVIDER.peer_id, chunks=CHUNKS)
    assert exc.value.reason == "wrong_peer"


def test_provider_field_swapped_without_resigning_rejected() -> None:
    receipt, data = make(signer=MALLORY)
    _body, sig = open_envelope(RECEIPT_FORMAT, data)
    forged_body = canonical_packb(
        Receipt(**{**_fields(receipt), "provider": PROVIDER.peer_id}).to_body(), allow_float=True
    )
    forged = encode_envelope(RECEIPT_FORMAT, forged_body, sig)
    with pytest.raises(ReceiptError) as exc:
        verify_receipt(forged, provider=PROVIDER.peer_id, chunks=CHUNKS)
    assert exc.value.reason == "bad_signature"


def _fields(r: Receipt) -> dict[str, Any]:
    return {name: getattr(r, name) for name in Receipt.__dataclass_fields__}


def test_wrong_input_request_and_capability_rejected() -> None:
    _, data = make()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"input": {"prompt": "hello", "n": 4}}, "bad_input"),
        ({"request_id": b"\x01" * 16}, "wrong_request"),
        ({"capability": "other"}, "wrong_request"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ReceiptError) as exc:
            verify_receipt(data, **kwargs)
        assert exc.value.reason == reason


def test_signer_must_be_the_named_provider() -> None:
    receipt, _ = make()
    with pytest.raises(ValueError):
        seal_receipt(receipt, MALLORY)


def test_usage_is_kept_only_if_receipt_safe() -> None:
    _receipt, data = make(usage={"tokens": 3, "weird": None, "f": 0.5, 7: "x", "inf": float("inf")})
    assert open_receipt(data).usage == {"tokens": 3, "f": 0.5}


def test_file_form_with_chunks_and_with_digests_only() -> None:
    receipt, data = make()
    for digests_only in (False, True):
        obj = json.loads(
            json.dumps(receipt_file(data, input=INPUT, chunks=CHUNKS, digests_only=digests_only))
        )
        assert ("chunks" in obj) is not digests_only
        assert verify_receipt_file(obj, provider=PROVIDER.peer_id) == receipt
        key = "chunk_digests" if digests_only else "chunks"
        obj[key] = [obj[key][1], obj[key][0], *obj[key][2:]]
        with pytest.raises(ReceiptError):
            verify_receipt_file(obj)


def test_malformed_receipts_are_typed_errors() -> None:
    _, data = make()
    for bad in (b"", b"\x80", data[:-1], data + b"\x00", bytes([data[0]]) + b"\x00" * (len(data) - 1)):
        with pytest.raises(ReceiptError) as exc:
            open_receipt(bad)
        assert exc.value.reason in {"malformed", "bad_signature"}
    with pytest.raises(ReceiptError):
        verify_receipt_file({"format": "nope"})


@settings(max_examples=60, deadline=None)
@given(
    chunks=st.lists(st.text(max_size=8) | st.binary(max_size=8) | st.integers(-1000, 1000), max_size=12),
    data=st.data(),
)
def test_any_change_to_the_answer_is_caught(chunks: list[Any], data: st.DataObject) -> None:
    _, sealed = make(chunks=chunks)
    verify_receipt(sealed, chunks=chunks, input=INPUT)
    if chunks:
        i = data.draw(st.integers(0, len(chunks) - 1))
        changed = list(chunks)
        changed[i] = [changed[i]]  # any other value
        with pytest.raises(ReceiptError):
            verify_receipt(sealed, chunks=changed)
    if len(chunks) >= 2 and len(set(map(value_digest, chunks))) == len(chunks):
        i, j = data.draw(
            st.sampled_from([(a, b) for a in range(len(chunks)) for b in range(a + 1, len(chunks))])
        )
        swapped = list(chunks)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        with pytest.raises(ReceiptError):
            verify_receipt(sealed, chunks=swapped)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_verify(blob: bytes) -> None:
    with pytest.raises(ReceiptError):
        open_receipt(blob)


@settings(max_examples=40, deadline=None)
@given(flip=st.integers(0, 10_000))
def test_any_flipped_bit_is_rejected(flip: int) -> None:
    _, data = make()
    i = flip % (len(data) * 8)
    bad = bytearray(data)
    bad[i // 8] ^= 1 << (i % 8)
    with pytest.raises(ReceiptError):
        verify_receipt(bytes(bad), provider=PROVIDER.peer_id, chunks=CHUNKS, input=INPUT)


@settings(max_examples=40, deadline=None)
@given(prefix=st.integers(0, len(CHUNKS)))
def test_prefix_heads_agree(prefix: int) -> None:
    a, b = ChunkChain(INPUT), ChunkChain(INPUT)
    for c in CHUNKS[:prefix]:
        a.add(c)
    for c in CHUNKS:
        if b.count == prefix:
            break
        b.add(c)
    assert a.head == b.head


# -- vectors --------------------------------------------------------------------------------


def build_vectors() -> dict[str, Any]:
    """The content of specs/vectors/receipt.json (Ed25519 signatures are deterministic)."""
    receipt, data = make()
    tampered = list(CHUNKS)
    tampered[2] = " World"
    _, foreign = make(signer=MALLORY)
    return {
        "description": (
            "Receipt vectors (specs/inference.md, Receipts). Keys are Ed25519 seeds = SHA-256 of the "
            'labels. Bytes in values are written {"$bytes": "<hex>"}. \'valid\': receipt_hex verifies '
            "against the input and chunks and decodes to body. 'invalid': a receipt file that a "
            "verifier must reject with the reason given, when it expects the provider of 'keys'."
        ),
        "keys": {
            name: {"seed_label": s.label, "peer_id": s.peer_id}
            for name, s in (("provider", PROVIDER), ("caller", CALLER), ("mallory", MALLORY))
        },
        "valid": [
            {
                "name": "seven_chunks",
                "input": receipt_file(data, input=INPUT)["input"],
                "input_digest": value_digest(INPUT).hex(),
                "chunks": receipt_file(data, chunks=CHUNKS)["chunks"],
                "chunk_digests": [value_digest(c).hex() for c in CHUNKS],
                "chain": [
                    chain_digest(value_digest(INPUT), [value_digest(c) for c in CHUNKS[:k]]).hex()
                    for k in range(len(CHUNKS) + 1)
                ],
                "body": receipt.summary(),
                "receipt_hex": data.hex(),
                "file": receipt_file(data, input=INPUT, chunks=CHUNKS),
                "file_digests_only": receipt_file(data, input=INPUT, chunks=CHUNKS, digests_only=True),
            }
        ],
        "invalid": [
            {
                "name": "tampered_chunk",
                "reason": "bad_output",
                "file": receipt_file(data, input=INPUT, chunks=tampered),
            },
            {
                "name": "reordered_chunks",
                "reason": "bad_output",
                "file": receipt_file(data, input=INPUT, chunks=[CHUNKS[1], CHUNKS[0], *CHUNKS[2:]]),
            },
            {
                "name": "missing_chunk",
                "reason": "wrong_count",
                "file": receipt_file(data, input=INPUT, chunks=CHUNKS[:-1]),
            },
            {
                "name": "other_input",
                "reason": "bad_input",
                "file": receipt_file(data, input="hello", chunks=CHUNKS),
            },
            {
                "name": "another_peer",
                "reason": "wrong_peer",
                "file": receipt_file(foreign, input=INPUT, chunks=CHUNKS),
            },
        ],
    }


def test_vectors_file_is_current() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(build_vectors()))


def test_vectors_verify_as_specified() -> None:
    vec = json.loads(VECTORS.read_text())
    provider = vec["keys"]["provider"]["peer_id"]
    for case in vec["valid"]:
        for form in ("file", "file_digests_only"):
            got = verify_receipt_file(case[form], provider=provider)
            assert got.summary() == case["body"]
        assert [value_digest(c).hex() for c in verify_receipt_file_chunks(case)] == case["chunk_digests"]
    for case in vec["invalid"]:
        with pytest.raises(ReceiptError) as exc:
            verify_receipt_file(case["file"], provider=provider)
        assert exc.value.reason == case["reason"], case["name"]


def verify_receipt_file_chunks(case: dict[str, Any]) -> list[Any]:
    from modelnet_p2p.proto.receipt import from_json_value

    return [from_json_value(c) for c in case["chunks"]]


if __name__ == "__main__":  # regenerate the vectors: python tests/test_receipt.py
    VECTORS.write_text(json.dumps(build_vectors(), indent=1) + "\n")


# -- on the wire (real peers on 127.0.0.1) ----------------------------------------------------


def _serve_words(peer: Any) -> None:
    from modelnet_p2p import Capability

    async def words(request):  # type: ignore[no-untyped-def]
        for w in str(request.input).split():
            yield w + " "
        request.usage["tokens"] = 3

    peer.serve(Capability(name="words", task="tool"), words)


async def test_signed_receipt_on_the_wire_and_offline() -> None:
    from modelnet_p2p import Peer

    async with Peer() as server, Peer() as client:
        _serve_words(server)
        target = server.addrs[0]
        resp = await client.call(target, "words", "a b c", timeout=20, receipt=True)
        assert resp.chunks == ["a ", "b ", "c "]
        receipt = resp.receipt
        assert receipt is not None
        assert (receipt.provider, receipt.caller) == (server.peer_id, client.peer_id)
        assert (receipt.capability, receipt.chunks, receipt.usage) == ("words", 3, {"tokens": 3})
        assert receipt.started_ms <= receipt.ended_ms
        # the same, offline, from the JSON file form
        assert resp.receipt_check is not None
        obj = json.loads(json.dumps(receipt_file(resp.receipt_check.data, input="a b c", chunks=resp.chunks)))
        assert verify_receipt_file(obj, provider=server.peer_id) == receipt
        # streamed: the check is in info.receipt
        async with client.infer(target, "words", "x y", timeout=20, receipt=True) as stream:
            got = [c async for c in stream]
        assert stream.info.receipt is not None
        assert stream.info.receipt.verified().chunks == len(got) == 2
        # not asked: none sent
        plain = await client.call(target, "words", "a", timeout=20)
        assert plain.receipt is None and plain.receipt_check is None


async def test_always_sign_and_a_receipt_signed_by_another_peer() -> None:
    from modelnet_p2p import Identity, Peer

    async with Peer(sign_receipts=True) as server, Peer() as client:
        _serve_words(server)
        target = server.addrs[0]
        assert (await client.call(target, "words", "a", timeout=20)).receipt is None  # not asked: ignored
        assert (await client.call(target, "words", "a", timeout=20, receipt=True)).receipt is not None
        server.inference.signer = Identity.generate()  # the provider signs with someone else's key
        resp = await client.call(target, "words", "a b", timeout=20, receipt=True)
        assert resp.chunks == ["a ", "b "]  # the answer itself is delivered
        with pytest.raises(ReceiptError) as exc:
            _ = resp.receipt
        assert exc.value.reason == "wrong_peer"


def test_modelnet_verify_cli(tmp_path: Path) -> None:
    from cli_util import modelnet

    _, data = make()
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(receipt_file(data, input=INPUT, chunks=CHUNKS)))
    bad.write_text(json.dumps(receipt_file(data, input=INPUT, chunks=[CHUNKS[1], CHUNKS[0], *CHUNKS[2:]])))
    ok = modelnet("verify", str(good), "--provider", PROVIDER.peer_id)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 'echo' answered by " + PROVIDER.peer_id)
    assert "chunks" in ok.stdout and "input" in ok.stdout
    as_json = json.loads(modelnet("verify", str(good), "--json").stdout)
    assert as_json["ok"] and as_json["receipt"]["chunks"] == len(CHUNKS)
    for path, extra, reason in (
        (bad, [], "bad_output"),
        (good, ["--provider", MALLORY.peer_id], "wrong_peer"),
    ):
        out = modelnet("verify", str(path), *extra)
        assert out.returncode == 1
        assert reason in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_rcpt_keys_on_the_wire() -> None:
    from modelnet_p2p.errors import ProtocolError
    from modelnet_p2p.proto.infer import End, Request, parse_message

    req = Request(b"\x01" * 16, "echo", "x", receipt=True)
    wire = req.to_wire()
    assert wire["rcpt"] is True and list(wire)[-1] == "rcpt"
    assert parse_message(wire) == req
    assert "rcpt" not in Request(b"\x01" * 16, "echo").to_wire()
    assert parse_message({**wire, "rcpt": None}) == Request(b"\x01" * 16, "echo", "x")  # nil: the default
    _, data = make()
    end = End(7, receipt=data)
    assert list(end.to_wire())[-1] == "rcpt"
    assert parse_message(end.to_wire()) == end
    for bad in ("text", b"\x00" * 4097, 5):
        with pytest.raises(ProtocolError):
            parse_message({**end.to_wire(), "rcpt": bad})


async def test_pipeline_chain_of_receipts_verified_end_to_end() -> None:
    import copy

    from modelnet_p2p import Capability, Peer
    from modelnet_p2p.mesh.collab.patterns import Step, pipeline
    from modelnet_p2p.mesh.collab.trace import receipt_chain, verify_receipt_chain

    async def split(request):  # type: ignore[no-untyped-def]
        for w in str(request.input).split():
            yield w + " "

    async def upper(request):  # type: ignore[no-untyped-def]
        text = str(request.input).upper()
        yield text[:1]
        yield text[1:]

    async def wrap(request):  # type: ignore[no-untyped-def]
        yield f"[{request.input}]"

    async with Peer() as a, Peer() as b, Peer() as c, Peer() as client:
        a.serve(Capability(name="split", task="tool"), split)
        b.serve(Capability(name="upper", task="tool"), upper)
        c.serve(Capability(name="wrap", task="tool"), wrap)
        steps = [
            Step("split", target=a.addrs[0]),
            Step("upper", target=b.addrs[0]),
            Step("wrap", target=c.addrs[0]),
        ]
        result = await pipeline(client, steps, "x y z", timeout=30, receipts=True)
        assert result.output == "[X Y Z]"
        chain = json.loads(json.dumps(receipt_chain(result.trace, "x y z")))
        receipts = verify_receipt_chain(chain)
        assert [r.provider for r in receipts] == [a.peer_id, b.peer_id, c.peer_id]
        assert [r.capability for r in receipts] == ["split", "upper", "wrap"]
        assert all(r.caller == client.peer_id for r in receipts)

        # a receipt of another answer of the same provider, spliced in: its input is not the chain's
        other = await client.call(b.addrs[0], "upper", "x y", timeout=20, receipt=True)
        assert other.receipt_check is not None
        spliced = copy.deepcopy(chain)
        spliced["steps"][1] = {
            **receipt_file(other.receipt_check.data, chunks=other.chunks),
            "provider": b.peer_id,
        }
        broken: list[tuple[dict[str, Any], str]] = [(spliced, "broken_chain")]
        reordered = copy.deepcopy(chain)
        reordered["steps"][1], reordered["steps"][2] = reordered["steps"][2], reordered["steps"][1]
        broken.append((reordered, "broken_chain"))
        tampered = copy.deepcopy(chain)
        tampered["steps"][0]["chunks"][1] = "q "
        broken.append((tampered, "bad_output"))
        other_input = {**copy.deepcopy(chain), "input": "x y w"}
        broken.append((other_input, "broken_chain"))
        foreign = copy.deepcopy(chain)
        foreign["steps"][2]["provider"] = a.peer_id
        broken.append((foreign, "wrong_peer"))
        for bad, reason in broken:
            with pytest.raises(ReceiptError) as exc:
                verify_receipt_chain(bad)
            assert exc.value.reason == reason


async def test_replayed_failover_checks_the_prefix_by_digest() -> None:
    from modelnet_p2p import Capability
    from modelnet_p2p.errors import UnavailableError
    from modelnet_p2p.mesh.client import ReplayMismatchError
    from modelnet_p2p.mesh.routing import Candidate
    from modelnet_p2p.testing import open_peers

    def answer(chunks: list[Any], fail_after: int | None = None) -> Any:
        async def handler(request):  # type: ignore[no-untyped-def]
            for i, c in enumerate(chunks):
                if i == fail_after:
                    raise UnavailableError("GPU fell off the bus")
                yield c

        return handler

    async with open_peers(4) as (client, bad, same, other):
        bad.serve(Capability(name="gen", idempotent=True), answer([0, 1, 2, 3, 4], fail_after=3))
        same.serve(Capability(name="gen", idempotent=True), answer([0, 1, 2, 3, 4]))
        other.serve(Capability(name="gen", idempotent=True), answer([0, "one", 2, 3, 4]))  # differs

        def bad_first(pool, router):  # type: ignore[no-untyped-def]
            return next((c for c in pool if c.peer_id == bad.peer_id), pool[0])

        mesh = client.mesh_client
        for replayer, diverges in ((same, False), (other, True)):
            among = [Candidate(p.peer_id, addrs=[p.addrs[0]], idempotent=True) for p in (bad, replayer)]
            client.router.success(bad.peer_id)  # forget the last ban
            got: list[Any] = []
            stream = mesh.stream("gen", among=among, policy=bad_first, timeout=20)
            if not diverges:
                async with stream:
                    got = [c async for c in stream]
                assert got == [0, 1, 2, 3, 4]
                assert [a["peer"] for a in stream.info.attempts] == [bad.peer_id, same.peer_id]
                continue
            with pytest.raises(ReplayMismatchError) as exc:
                async with stream:
                    async for c in stream:
                        got.append(c)
            assert got == [0, 1, 2]  # nothing of the diverging replay reaches the consumer
            assert exc.value.chunks_delivered == 3


def test_cli_ask_writes_a_receipt_that_verify_checks(tmp_path: Path) -> None:
    from cli_util import background, modelnet, read_event

    with background("serve", "modelnet_p2p.demo_models:ALL", "--json", cwd=tmp_path) as server:
        ready = read_event(server)
        path = tmp_path / "receipt.json"
        out = modelnet("ask", "echo", "one two three", "--peer", ready["addrs"][0], "--receipt", str(path))
        assert out.returncode == 0, out.stderr
        assert "receipt checked and written" in out.stderr
        obj = json.loads(path.read_text())
        assert obj["input"] == "one two three" and len(obj["chunks"]) == 3
        ok = modelnet("verify", str(path), "--provider", ready["peer_id"])
        assert ok.returncode == 0, ok.stderr
        assert "'echo' answered by " + ready["peer_id"] in ok.stdout
        obj["chunks"][0] = "ONE "
        path.write_text(json.dumps(obj))
        bad = modelnet("verify", str(path))
        assert bad.returncode == 1 and "bad_output" in bad.stderr
        server.terminate()
        server.wait(20)

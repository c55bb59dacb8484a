"""Several chunks in one frame (``chunks``, the ``bat`` extension r5-bat of
``specs/inference.md``): between real peers on 127.0.0.1, in the session state machines,
and against the vectors in ``specs/vectors/inference_batch.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol

from modelnet_p2p import Peer, ProtocolError
from modelnet_p2p.proto.framing import FrameDecoder, encode_varint, pack_frame
from modelnet_p2p.proto.infer import (
    MAX_BATCH_CHUNKS,
    MAX_BATCH_FRAME,
    PROTOCOL_ID,
    Chunk,
    ChunkBatch,
    End,
    Request,
    chunk_frame,
    parse_message,
)
from modelnet_p2p.proto.packing import packb
from modelnet_p2p.proto.receipt import ChunkChain, open_receipt
from modelnet_p2p.proto.session import (
    NEED_DATA,
    ChunkReceived,
    ClientSession,
    Finished,
    Limits,
    ServerSession,
)
from modelnet_p2p.testing import open_peers

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "inference_batch.json"
N = 300


async def tokens(request):
    for i in range(N):
        yield f"tok{i} " if i % 7 else f"é{i}".encode()  # text and bytes, mixed


def _expected() -> list[Any]:
    return [f"tok{i} " if i % 7 else f"é{i}".encode() for i in range(N)]


async def _raw_answer(a: Peer, b: Peer, *, batch: bool, receipt: bool = False) -> list[dict[str, Any]]:
    """Send one request on a raw stream and return the decoded answer frames."""
    await a.connect(b.addrs[0])
    stream = await a.host.new_stream(b.identity.peer_id, [TProtocol(PROTOCOL_ID)])
    req = Request(request_id=b"r1", capability="tokens", input="in", batch=batch, receipt=receipt)
    await stream.write(pack_frame(req.to_wire()))
    decoder = FrameDecoder()
    frames: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while not frames or frames[-1]["t"] not in ("end", "err"):
            frames += decoder.feed(await stream.read(65536))
    await stream.reset()
    return frames


def _flatten(frames: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for f in frames:
        if f["t"] == "chunk":
            assert f["seq"] == len(out)
            out.append(f["d"])
        elif f["t"] == "chunks":
            assert f["seq"] == len(out)
            out.extend(f["d"])
    assert frames[-1]["t"] == "end" and frames[-1]["n"] == len(out)
    return out


async def test_batched_answer_equals_unbatched_and_old_clients_get_single_frames():
    async with open_peers(2, sign_receipts=True) as (a, b):
        b.serve("tokens", tokens)
        old = await _raw_answer(a, b, batch=False, receipt=True)
        new = await _raw_answer(a, b, batch=True, receipt=True)
        assert {f["t"] for f in old} == {"chunk", "end"}  # a client that did not ask: single frames
        batches = [f for f in new if f["t"] == "chunks"]
        assert batches and len(new) < len(old) // 4, [f["t"] for f in new]  # fails on the old code
        assert all(2 <= len(f["d"]) <= MAX_BATCH_CHUNKS for f in batches)
        assert new[0]["t"] == "chunk" and "load" in new[0]  # the first chunk goes alone, with the load
        assert _flatten(old) == _flatten(new) == _expected()
        # The receipt's chunk digests do not depend on how the chunks were framed.
        r_old, r_new = open_receipt(old[-1]["rcpt"]), open_receipt(new[-1]["rcpt"])
        chain = ChunkChain("in")
        for d in _expected():
            chain.add(d)
        assert r_old.output_digest == r_new.output_digest == chain.head
        assert r_old.chunks == r_new.chunks == N

        # The reference client asks for batches and unpacks them into the same chunks.
        resp = await a.call(b.addrs[0], "tokens", "in", receipt=True)
        assert resp.chunks == _expected()
        receipt = resp.receipt
        assert receipt is not None and receipt.output_digest == chain.head
        async with a.infer(b.addrs[0], "tokens", "in") as stream:
            assert [x async for x in stream] == _expected()


@pytest.mark.parametrize(("max_frame_size", "asks"), [(1 << 20, True), (MAX_BATCH_FRAME - 1, False)])
async def test_the_client_asks_if_its_frame_limit_holds_a_batch(max_frame_size, asks):
    seen: list[dict[str, Any]] = []

    async def handler(stream):
        seen.extend(FrameDecoder().feed(await stream.read(65536)))
        await stream.write(pack_frame(End(0).to_wire()))
        await stream.close()

    async with open_peers(2, max_frame_size=max_frame_size) as (a, b):
        b.host.set_stream_handler(TProtocol(PROTOCOL_ID), handler)
        assert (await a.call(b.addrs[0], "x", None, timeout=5)).chunks == []
    assert seen[0]["t"] == "req" and seen[0].get("bat", False) is asks


def _misbehaving_server(b: Peer, payload: bytes) -> None:
    async def handler(stream):
        try:
            await stream.read(65536)
            await stream.write(payload)
            await stream.close()
        except Exception:
            await stream.reset()

    b.host.set_stream_handler(TProtocol(PROTOCOL_ID), handler)


def _batch(seq: int, data: Any) -> bytes:
    return pack_frame({"t": "chunks", "seq": seq, "d": data}, 1 << 22)


async def test_client_unpacks_a_batch_from_the_server():
    payload = pack_frame(Chunk(0, "a").to_wire()) + _batch(1, ["b", b"c", "d"]) + pack_frame(End(4).to_wire())
    async with open_peers(2) as (a, b):
        _misbehaving_server(b, payload)
        resp = await a.call(b.addrs[0], "x", None, timeout=5)
        assert resp.chunks == ["a", "b", b"c", "d"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (_batch(0, []), "list of 1-1024"),
        (_batch(0, "ab"), "list of 1-1024"),
        (_batch(0, ["a"] * (MAX_BATCH_CHUNKS + 1)), "list of 1-1024"),
        (_batch(0, ["a", {"x": 1}]), "only text or bytes"),
        (_batch(0, ["a", None]), "only text or bytes"),
        (_batch(0, ["a", 5]), "only text or bytes"),
        (_batch(0, ["a", b"b", True]), "only text or bytes"),
        (_batch(0, [1.5, "a"]), "only text or bytes"),
        (_batch(-1, ["a"]), "non-negative integer"),
        (pack_frame({"t": "chunks", "d": ["a"]}), "non-negative integer"),
        (_batch(1, ["a", "b"]), "sequence 1"),
        (pack_frame(Chunk(0, "a").to_wire()) + _batch(2, ["b"]), "sequence 2"),
        (_batch(0, ["a", "b"]) + pack_frame(Chunk(1, "a").to_wire()), "sequence 1"),
        (_batch(0, ["a", "b"]) + pack_frame(End(3).to_wire()), "says 3 chunks"),
        (_batch(0, ["a", "b"]), "without an end frame"),
        (_batch(0, ["a", "b"])[:-1], "truncated"),
        (encode_varint((1 << 20) + 1) + b"\x83", "exceeds the limit"),
        # 1024 chunks, each just under 1 KiB: a frame over the 1 MiB limit
        (_batch(0, ["x" * 1030] * 1024), "exceeds the limit"),
    ],
)
async def test_client_rejects_bad_batches(payload, message):
    async with open_peers(2) as (a, b):
        _misbehaving_server(b, payload)
        with pytest.raises(ProtocolError, match=message):
            async for _ in a.infer(b.addrs[0], "x", None, timeout=5):
                pass


def test_a_client_that_did_not_ask_rejects_a_batch():
    session = ClientSession(Request(request_id=b"r", capability="x"))
    session.send_request(0.0)
    session.receive_data(_batch(0, ["a", "b"]))
    with pytest.raises(ProtocolError, match="unexpected ChunkBatch"):
        session.next_event()


def _serve(window: int, items: list[Any], *, batch: bool = True, max_frame_size: int = 1 << 20) -> Any:
    s = ServerSession(0.0, Limits(max_frame_size=max_frame_size))
    req = Request(request_id=b"r", capability="x", window=window, batch=batch)
    s.receive_data(pack_frame(req.to_wire()))
    s.next_event()
    s.accept(0.0)
    for item in items:
        if not s.send_chunk(item):
            return s  # the request failed (internal)
    s.send_end()
    return s


def test_batches_keep_the_window_and_the_batch_limit():
    items = [f"t{i}" for i in range(3000)]
    s = _serve(1024, items)
    got = s.data_to_send(0.0)
    assert len(got) <= 1024 + 64  # the first chunk alone, then batches that fit the window
    client = ClientSession(Request(request_id=b"r", capability="x", window=1024, batch=True))
    client.send_request(0.0)
    out: list[Any] = []
    frames = 0
    while True:
        if got:
            client.receive_data(got)
            got = b""
            credit = client.data_to_send()
            if credit:
                s.receive_data(credit)
                s.next_event()
        event = client.next_event()
        if event is NEED_DATA:
            before = s.outstanding
            got = s.data_to_send(0.0)
            assert got, "stalled"
            assert before + len(got) <= 1024 or before < 256
            assert s.outstanding <= 1024 + 64
            frames += 1
            continue
        if isinstance(event, Finished):
            break
        assert isinstance(event, ChunkReceived)
        out.append(event.data)
    assert out == items and frames > 3

    s = _serve(1 << 20, items)
    frames_out = FrameDecoder().feed(s.data_to_send(0.0, max_bytes=1 << 20))
    sizes = [len(f["d"]) for f in frames_out if f["t"] == "chunks"]
    assert sizes == [MAX_BATCH_CHUNKS, MAX_BATCH_CHUNKS, 951]
    # Batches stay within MAX_BATCH_FRAME (64 KiB), so a client with a smaller frame limit than
    # the server's, down to 64 KiB, can read them; longer chunks go in fewer a frame.
    long = ["y" * 1000] * 300
    s = _serve(1 << 20, long)
    data = s.data_to_send(0.0, max_bytes=1 << 20)
    frames_out = FrameDecoder(MAX_BATCH_FRAME).feed(data)
    assert [f["d"] for f in frames_out if f["t"] != "end"] != []
    assert _flatten(frames_out) == long
    assert max(len(pack_frame(f, 1 << 21)) for f in frames_out) <= MAX_BATCH_FRAME + 8


def test_large_and_other_chunks_are_framed_alone_in_order():
    items: list[Any] = ["a", "b", {"k": 1}, "c", b"x" * 5000, "d", "e"]
    s = _serve(1 << 20, items, max_frame_size=4096)  # the 5000-byte chunk is too large: internal
    frames = FrameDecoder().feed(s.data_to_send(0.0))
    assert frames[-1]["t"] == "err" and frames[-1]["code"] == "internal"
    s = _serve(1 << 20, items)
    frames = FrameDecoder().feed(s.data_to_send(0.0))
    assert [f["t"] for f in frames] == ["chunk", "chunk", "chunk", "chunks", "end"]
    assert _flatten(frames) == items
    s = _serve(1 << 20, items, batch=False)
    assert {f["t"] for f in FrameDecoder().feed(s.data_to_send(0.0))} == {"chunk", "end"}


def test_chunk_frame_is_the_canonical_encoding():
    for seq in (0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1):
        for data in (["a"], ["a", b"b"], ["x"] * 15, ["x"] * 16, ["x"] * 1024):
            enc = [packb(d) for d in data]
            msg = Chunk(seq, data[0]) if len(data) == 1 else ChunkBatch(seq, tuple(data))
            assert chunk_frame(seq, enc) == pack_frame(msg.to_wire())
            assert parse_message(FrameDecoder().feed(chunk_frame(seq, enc))[0]) == msg


def _unhex(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: _unhex(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unhex(v) for v in value]
    return value


def test_vectors():
    vectors = json.loads(VECTORS.read_text())
    assert vectors["valid"] and vectors["invalid"]
    for v in vectors["valid"]:
        frame = bytes.fromhex(v["frame_hex"])
        assert pack_frame(_unhex(v["message"])) == frame, v["name"]
        assert FrameDecoder().feed(frame) == [_unhex(v["message"])], v["name"]
        parse_message(_unhex(v["message"]))
    for v in vectors["invalid"]:
        body = FrameDecoder().feed(bytes.fromhex(v["frame_hex"]))[0]
        with pytest.raises(ProtocolError, match=v["error"]):
            parse_message(body)


def test_batching_is_asked_per_request_on_a_kept_stream():
    s = ServerSession(0.0)
    types: list[set[str]] = []
    for batch in (True, False, True):
        req = Request(request_id=b"r", capability="x", keep=True, batch=batch)
        s.receive_data(pack_frame(req.to_wire()))
        s.next_event()
        s.accept(0.0)
        for i in range(10):
            assert s.send_chunk(f"t{i}")
        s.send_end()
        frames = FrameDecoder().feed(s.data_to_send(0.0))
        assert _flatten(frames) == [f"t{i}" for i in range(10)] and frames[-1].get("keep")
        types.append({f["t"] for f in frames})
    assert types == [{"chunk", "chunks", "end"}, {"chunk", "end"}, {"chunk", "chunks", "end"}]

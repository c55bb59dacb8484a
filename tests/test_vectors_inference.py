"""The static test vectors of ``specs/vectors/inference.json`` against the codec.

The vectors are checked-in data, not regenerated here: a codec change that
alters a single byte of an encoded frame fails this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from modelnet_p2p.errors import ERROR_CODES, ProtocolError
from modelnet_p2p.proto.framing import FrameDecoder, pack_frame
from modelnet_p2p.proto.infer import (
    PROTOCOL_ID,
    Cancel,
    Chunk,
    Credit,
    End,
    ErrorFrame,
    Request,
    parse_message,
)

VECTORS_PATH = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "inference.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
MAX_FRAME_SIZE: int = VECTORS["max_frame_size"]


def from_json(value: Any) -> Any:
    """JSON vector notation to Python: ``{"$bytes": "<hex>"}`` becomes bytes."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            return bytes.fromhex(value["$bytes"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def decode_frames(data: bytes) -> list[dict[str, Any]]:
    decoder = FrameDecoder(MAX_FRAME_SIZE)
    bodies = decoder.feed(data)
    decoder.close()
    return bodies


def ids(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


def test_vector_file_header():
    assert VECTORS["protocol"] == PROTOCOL_ID
    assert MAX_FRAME_SIZE == 1 << 20
    names = ids(
        VECTORS["valid"]
        + VECTORS["accepted"]
        + VECTORS["invalid"]
        + VECTORS["flow_control"]
        + VECTORS["server_sessions"]
    )
    assert len(names) == len(set(names))


def test_vectors_cover_every_message_type_and_error_code():
    kinds = {type(parse_message(from_json(v["message"]))) for v in VECTORS["valid"]}
    assert kinds == {Request, Chunk, End, ErrorFrame, Credit, Cancel}
    codes = {v["message"]["code"] for v in VECTORS["valid"] if v["message"]["t"] == "err"}
    assert ERROR_CODES <= codes
    requests = [
        parse_message(from_json(v["message"])) for v in VECTORS["valid"] if v["message"]["t"] == "req"
    ]
    assert any(r.trace.visited and r.trace.trace_id for r in requests)
    assert any(not r.capability.isascii() for r in requests)
    assert any(isinstance(r.input, dict) and r.params for r in requests)


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=ids(VECTORS["valid"]))
def test_valid_vector_encodes_exactly(vector):
    wire = from_json(vector["message"])
    expected = bytes.fromhex(vector["frame_hex"])
    # The map as given, and the map rebuilt from the parsed message, encode identically.
    assert pack_frame(wire).hex() == vector["frame_hex"]
    assert pack_frame(parse_message(wire).to_wire()) == expected


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=ids(VECTORS["valid"]))
def test_valid_vector_decodes(vector):
    wire = from_json(vector["message"])
    bodies = decode_frames(bytes.fromhex(vector["frame_hex"]))
    assert bodies == [wire]
    assert parse_message(bodies[0]).to_wire() == wire


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=ids(VECTORS["valid"]))
def test_valid_vector_decodes_byte_by_byte(vector):
    frame = bytes.fromhex(vector["frame_hex"])
    decoder = FrameDecoder(MAX_FRAME_SIZE)
    bodies = []
    for i in range(len(frame)):
        bodies += decoder.feed(frame[i : i + 1])
        if i < len(frame) - 1:
            assert bodies == []
    decoder.close()
    assert bodies == [from_json(vector["message"])]


def test_all_valid_vectors_as_one_stream():
    stream = b"".join(bytes.fromhex(v["frame_hex"]) for v in VECTORS["valid"])
    assert decode_frames(stream) == [from_json(v["message"]) for v in VECTORS["valid"]]


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=ids(VECTORS["accepted"]))
def test_accepted_vector(vector):
    frame = bytes.fromhex(vector["frame_hex"])
    (body,) = decode_frames(frame)
    msg = parse_message(body)
    assert msg.to_wire() == from_json(vector["message"])
    # Accepted frames are not what an encoder writes.
    assert pack_frame(msg.to_wire()) != frame


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=ids(VECTORS["invalid"]))
def test_invalid_vector_is_rejected(vector):
    frame = bytes.fromhex(vector["frame_hex"])
    decoder = FrameDecoder(MAX_FRAME_SIZE)
    with pytest.raises(ProtocolError) as info:
        for body in decoder.feed(frame):
            parse_message(body)
        decoder.close()  # truncated frames fail only here
    assert vector["error"] in info.value.message
    assert info.value.code == "protocol_error"


def test_oversized_prefix_rejected_without_body():
    (vector,) = [v for v in VECTORS["invalid"] if v["name"] == "oversized_length_prefix"]
    decoder = FrameDecoder(MAX_FRAME_SIZE)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(bytes.fromhex(vector["frame_hex"]))


def test_vectors_cover_nil_defaults_and_the_msgpack_limits():
    accepted = {v["name"] for v in VECTORS["accepted"]}
    assert {"req_nil_keep_and_trace_fields", "end_nil_optional_fields", "err_nil_optional_fields"} <= accepted
    assert "nesting_of_exactly_32" in accepted
    invalid = {v["name"] for v in VECTORS["invalid"]}
    assert {"nesting_deeper_than_32", "extension_type_in_body"} <= invalid


# -- flow control: which queued frames a server may send ----------------------------------------


def _chunk_data(size: int, seq: int) -> bytes:
    """Chunk data whose frame (``seq``, length prefix included) is exactly ``size`` bytes."""
    for n in range(max(0, size - 40), size + 1):
        if len(pack_frame(Chunk(seq, b"x" * n).to_wire(), 1 << 30)) == size:
            return b"x" * n
    raise AssertionError(f"no chunk frame of {size} bytes")


@pytest.mark.parametrize("vector", VECTORS["flow_control"], ids=ids(VECTORS["flow_control"]))
def test_flow_control_vector(vector):
    from modelnet_p2p.proto.session import Limits, ServerSession

    session = ServerSession(0.0, Limits(max_frame_size=1 << 30))
    session.receive_data(pack_frame(Request(b"r", "echo", window=vector["window"]).to_wire()))
    session.next_event()
    session.accept(0.0)
    seq = 0
    if vector["outstanding"]:  # one frame sent before, not acknowledged
        session.send_chunk(_chunk_data(vector["outstanding"], seq))
        assert len(session.data_to_send(0.0)) == vector["outstanding"]
        seq += 1
    for size in vector["frame_sizes"]:
        session.send_chunk(_chunk_data(size, seq))
        seq += 1
    sent = session.data_to_send(0.0, max_bytes=1 << 30)
    assert len(sent) == sum(vector["frame_sizes"][: vector["sendable"]])
    assert len(FrameDecoder(1 << 30).feed(sent)) == vector["sendable"]


# -- server sessions: the answer to what a client sends first ------------------------------------


@pytest.mark.parametrize("vector", VECTORS["server_sessions"], ids=ids(VECTORS["server_sessions"]))
def test_server_session_vector(vector):
    from modelnet_p2p.proto.session import (
        NEED_DATA,
        PAUSED,
        RequestReceived,
        ServerSession,
        ServerState,
    )

    session = ServerSession(0.0, local_peer=vector.get("local_peer", ""))
    session.receive_data(bytes.fromhex(vector["client_hex"]))
    errors = []
    while (event := session.next_event()) not in (
        NEED_DATA,
        PAUSED,
    ) or session.state is ServerState.ADMITTING:
        if isinstance(event, RequestReceived):
            session.accept(0.0)  # the reference server serves "echo"
        elif hasattr(event, "error"):
            errors.append(event.error.message)
    out = decode_frames(session.data_to_send(0.0))
    if vector["reply"] is None:
        assert out == []
    else:
        (reply,) = out
        assert {k: reply[k] for k in vector["reply"]} == vector["reply"]
        assert vector["error"] in reply["msg"]
    expected = {"close": ServerState.CLOSED, "reset": ServerState.RESET}[vector["then"]]
    assert session.state is expected


def test_vectors_cover_load_on_every_frame_that_carries_it():
    """``load`` (r4) on a chunk, an end and an err; accepted and rejected forms of it."""
    with_load = {v["message"]["t"] for v in VECTORS["valid"] if "load" in v["message"]}
    assert with_load == {"chunk", "end", "err"}
    for v in VECTORS["valid"]:
        msg = parse_message(from_json(v["message"]))
        assert (getattr(msg, "load", None) is not None) == ("load" in v["message"])
    accepted = {v["name"] for v in VECTORS["accepted"]}
    assert {
        "end_load_nil",
        "end_load_nil_and_unknown_keys",
        "chunk_load_tps_float32",
        "end_load_own_nil",
    } <= accepted
    assert any("own" in v["message"].get("load", {}) for v in VECTORS["valid"])
    invalid = [v for v in VECTORS["invalid"] if "'load" in v["error"]]
    assert {v["error"].split("'")[1] for v in invalid} >= {
        "load",
        "load.inf",
        "load.q",
        "load.own",
        "load.tps",
    }

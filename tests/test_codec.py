"""The sans-I/O codec: varints, frames, messages and error codes. No network."""

from __future__ import annotations

import itertools
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modelnet_p2p.errors import (
    ERROR_CODES,
    BadRequestError,
    CancelledError,
    DeadlineExceededError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthorizedError,
    UnavailableError,
    error_from_code,
)
from modelnet_p2p.proto.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    MAX_VARINT_LEN,
    FrameDecoder,
    decode_varint,
    encode_varint,
    pack_frame,
    unpack_body,
)
from modelnet_p2p.proto.infer import (
    MAX_CAPABILITY_LEN,
    MAX_ERROR_MESSAGE_LEN,
    MAX_HOPS,
    MAX_REQUEST_ID_LEN,
    MIN_WINDOW,
    Cancel,
    Chunk,
    Credit,
    End,
    ErrorFrame,
    Request,
    TraceContext,
    parse_message,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
#: Any value msgpack can carry and give back equal (lists, not tuples; text keys).
msgpack_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=16,
)
bodies = st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6)
uint63 = st.integers(min_value=0, max_value=2**63 - 1)
short_text = st.text(max_size=30)

trace_contexts = st.builds(
    TraceContext,
    trace_id=st.binary(max_size=32),
    span_id=st.binary(max_size=32),
    hops=st.integers(0, MAX_HOPS),
    visited=st.lists(st.text(max_size=60), max_size=MAX_HOPS).map(tuple),
)
capabilities = st.text(min_size=1, max_size=MAX_CAPABILITY_LEN).filter(
    lambda s: len(s.encode()) <= MAX_CAPABILITY_LEN
)
requests = st.builds(
    Request,
    request_id=st.binary(min_size=1, max_size=MAX_REQUEST_ID_LEN),
    capability=capabilities,
    input=msgpack_values,
    params=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4),
    timeout_ms=uint63,
    trace=trace_contexts,
    window=st.integers(MIN_WINDOW, 2**63 - 1),
)
messages = st.one_of(
    requests,
    st.builds(Chunk, seq=uint63, data=msgpack_values),
    st.builds(
        End,
        chunks=uint63,
        finish_reason=st.text(max_size=64),
        usage=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=4),
    ),
    st.builds(
        ErrorFrame,
        code=st.sampled_from(sorted(ERROR_CODES)) | st.text(max_size=64),
        message=st.text(max_size=200),
        retryable=st.booleans(),
        chunks=uint63,
    ),
    st.builds(Credit, nbytes=uint63),
    st.builds(Cancel, reason=short_text),
)


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for piece in pieces:
        out += decoder.feed(piece)
    decoder.close()
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- varints -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (16383, "ff7f"),
        (16384, "808001"),
        (DEFAULT_MAX_FRAME_SIZE, "808040"),
        (2**63 - 1, "ffffffffffffffff7f"),
    ],
)
def test_varint_known_encodings(value, encoded):
    assert encode_varint(value).hex() == encoded
    assert decode_varint(bytes.fromhex(encoded)) == (value, len(encoded) // 2)


@SETTINGS
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=4))
def test_varint_round_trip(value, tail):
    enc = encode_varint(value)
    assert len(enc) <= MAX_VARINT_LEN
    assert all(b & 0x80 for b in enc[:-1]) and not enc[-1] & 0x80
    assert decode_varint(enc + tail) == (value, len(enc))
    assert decode_varint(b"\xaa" + enc, 1) == (value, len(enc) + 1)
    for cut in range(len(enc)):
        assert decode_varint(enc[:cut]) is None


@SETTINGS
@given(st.integers(min_value=0, max_value=2**56), st.integers(min_value=1, max_value=9))
def test_varint_non_minimal_rejected(value, extra):
    enc = bytearray(encode_varint(value))
    enc[-1] |= 0x80
    padded = bytes(enc) + b"\x80" * (extra - 1) + b"\x00"
    with pytest.raises(ProtocolError, match=r"not minimally encoded|too long"):
        decode_varint(padded)


def test_varint_errors():
    with pytest.raises(ValueError):
        encode_varint(-1)
    with pytest.raises(ProtocolError, match="too long"):
        decode_varint(b"\x80" * MAX_VARINT_LEN)
    with pytest.raises(ProtocolError, match="too long"):
        decode_varint(b"\xff" * MAX_VARINT_LEN + b"\x01")
    with pytest.raises(ProtocolError, match="not minimally encoded"):
        decode_varint(b"\x80\x00")
    assert decode_varint(b"") is None
    assert decode_varint(b"\x80" * (MAX_VARINT_LEN - 1)) is None


# -- frames --------------------------------------------------------------------


@SETTINGS
@given(bodies)
def test_frame_round_trip(body):
    frame = pack_frame(body)
    length, start = decode_varint(frame)
    assert length == len(frame) - start
    assert unpack_body(frame[start:]) == body
    assert feed_all(FrameDecoder(), [frame]) == [body]


@SETTINGS
@given(msgpack_values)
def test_any_value_round_trips_as_field(value):
    assert feed_all(FrameDecoder(), [pack_frame({"v": value})]) == [{"v": value}]


@SETTINGS
@given(st.lists(bodies, max_size=8), st.data())
def test_decoder_split_at_arbitrary_points(frames, data):
    stream = b"".join(pack_frame(b) for b in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    assert feed_all(FrameDecoder(), split_at(stream, cuts)) == frames


def test_decoder_one_byte_at_a_time():
    frames = [{"t": "chunk", "seq": i, "d": "x" * i} for i in range(200)]
    stream = b"".join(pack_frame(b) for b in frames)
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    decoder.close()
    assert out == frames
    assert decoder.buffered == 0


def test_decoder_accepts_memoryview_and_bytearray():
    frame = pack_frame({"a": 1})
    decoder = FrameDecoder()
    assert decoder.feed(memoryview(frame)[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(bytearray(frame[2:])) == [{"a": 1}]


@SETTINGS
@given(st.binary(max_size=200), st.data(), st.sampled_from([16, 1024, DEFAULT_MAX_FRAME_SIZE]))
def test_garbage_raises_only_protocol_error(garbage, data, max_frame):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=6), label="cuts")
    decoder = FrameDecoder(max_frame)
    try:
        for body in feed_all(decoder, split_at(garbage, cuts)):
            parse_message(body)
    except ProtocolError:
        pass


@SETTINGS
@given(messages, st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4))
def test_corrupted_frames_raise_only_protocol_error(msg, flips):
    frame = bytearray(pack_frame(msg.to_wire()))
    for pos, byte in flips:
        frame[pos % len(frame)] = byte
    try:
        for body in feed_all(FrameDecoder(), [bytes(frame)]):
            parse_message(body)
    except ProtocolError:
        pass


@SETTINGS
@given(st.sampled_from(["req", "chunk", "end", "err", "credit", "cancel", "x"]), bodies)
def test_parse_message_of_any_map_raises_only_protocol_error(kind, body):
    body["t"] = kind
    try:
        msg = parse_message(body)
    except ProtocolError:
        return
    # Whatever parses re-encodes to something that parses to the same message.
    (again,) = feed_all(FrameDecoder(), [pack_frame(msg.to_wire())])
    assert parse_message(again) == msg


@pytest.mark.parametrize("max_frame", [1024, DEFAULT_MAX_FRAME_SIZE])
def test_oversized_frame_rejected_at_prefix(max_frame):
    decoder = FrameDecoder(max_frame)
    with pytest.raises(ProtocolError, match=f"exceeds the limit of {max_frame} bytes"):
        decoder.feed(encode_varint(max_frame + 1))  # no body byte has arrived yet
    assert decoder.buffered == 0


def test_oversized_prefix_after_good_frames_in_same_feed():
    decoder = FrameDecoder(1024)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        decoder.feed(pack_frame({"a": 1}) + encode_varint(1 << 30))


def test_frame_at_exact_limit():
    max_frame = 1024
    # fixmap(1) + fixstr "d" (2 bytes) + bin16 header (3 bytes) + data
    body = {"d": b"x" * (max_frame - 6)}
    assert len(msgpack.packb(body, use_bin_type=True)) == max_frame
    frame = pack_frame(body, max_frame)
    assert frame[:2] == encode_varint(max_frame)
    assert FrameDecoder(max_frame).feed(frame) == [body]
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        FrameDecoder(max_frame - 1).feed(frame)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        pack_frame(body, max_frame - 1)


def test_frame_announcing_limit_is_buffered_not_rejected():
    decoder = FrameDecoder(1024)
    assert decoder.feed(encode_varint(1024) + b"\x81") == []
    assert decoder.buffered == len(encode_varint(1024)) + 1


def test_pack_frame_unencodable_values():
    with pytest.raises(TypeError):
        pack_frame({"a": object()})
    with pytest.raises(OverflowError):
        pack_frame({"a": 2**64})


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x00", "malformed msgpack frame"),
        (b"\x01\xc1", "malformed msgpack frame"),
        (b"\x02\x80\xc0", "malformed msgpack frame"),
        (b"\x03\x92\x01\x02", "frame is a list, not a map"),
        (b"\x03\x81\x01\x01", "non-string key"),
        (b"\x87\x00", "not minimally encoded"),
    ],
)
def test_malformed_bodies(data, error):
    with pytest.raises(ProtocolError, match=error):
        FrameDecoder().feed(data)


def test_truncated_stream_fails_on_close():
    frame = pack_frame({"t": "credit", "b": 1})
    for cut in range(1, len(frame)):
        decoder = FrameDecoder()
        assert decoder.feed(frame[:cut]) == []
        with pytest.raises(ProtocolError, match=f"stream ended inside a frame \\({cut} bytes"):
            decoder.close()
    decoder = FrameDecoder()
    decoder.feed(frame)
    decoder.close()  # a clean end raises nothing
    decoder.close()


@pytest.mark.parametrize(
    "bad",
    [encode_varint(DEFAULT_MAX_FRAME_SIZE + 1), b"\x80\x00", b"\x01\xc1", b"\x01\x90"],
)
def test_decoder_poisoned_after_error(bad):
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as first:
        decoder.feed(bad)
    with pytest.raises(ProtocolError) as again:
        decoder.feed(pack_frame({"ok": True}))
    assert again.value is first.value
    with pytest.raises(ProtocolError) as on_close:
        decoder.close()
    assert on_close.value is first.value


def test_decoder_poisoned_after_truncation():
    decoder = FrameDecoder()
    decoder.feed(b"\x05\x81")
    with pytest.raises(ProtocolError) as first:
        decoder.close()
    with pytest.raises(ProtocolError) as again:
        decoder.feed(pack_frame({"ok": True}))
    assert again.value is first.value


def test_frames_before_an_error_are_lost_with_it():
    # A feed that contains a good frame and then a bad one raises, returning nothing.
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(pack_frame({"a": 1}) + b"\x01\xc1")


# -- messages ------------------------------------------------------------------


@SETTINGS
@given(messages)
def test_message_round_trip(msg):
    assert parse_message(msg.to_wire()) == msg
    (body,) = feed_all(FrameDecoder(), [pack_frame(msg.to_wire())])
    assert parse_message(body) == msg


def test_message_defaults():
    req = parse_message({"t": "req", "v": 1, "id": b"\x01", "cap": "echo"})
    assert req == Request(b"\x01", "echo")
    assert req.window == 1 << 20 and req.timeout_ms == 0 and req.trace == TraceContext()
    assert parse_message({"t": "end", "n": 2}) == End(2, "stop", {})
    assert parse_message({"t": "err", "code": "internal"}) == ErrorFrame("internal", "")
    assert parse_message({"t": "cancel"}) == Cancel("")
    assert parse_message({"t": "chunk", "seq": 0, "d": None}) == Chunk(0, None)


def test_unknown_fields_ignored():
    wire = Credit(7).to_wire() | {"future": [1, 2], "x": {"y": b""}}
    assert parse_message(wire) == Credit(7)
    req = Request(b"id", "cap").to_wire()
    req["tc"]["baggage"] = {"k": "v"}
    req["prio"] = 3
    assert parse_message(req) == Request(b"id", "cap")


def test_long_texts_are_cut_by_the_sender():
    long = "é" * (MAX_ERROR_MESSAGE_LEN + 10)
    assert len(ErrorFrame("internal", long).to_wire()["msg"]) == MAX_ERROR_MESSAGE_LEN
    assert len(Cancel(long).to_wire()["why"]) == MAX_ERROR_MESSAGE_LEN
    parsed = parse_message({"t": "err", "code": "internal", "msg": long})
    assert len(parsed.message) == MAX_ERROR_MESSAGE_LEN


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        ({"t": "req", "v": 2, "id": b"1", "cap": "c"}, "unsupported protocol version 2"),
        ({"t": "req", "v": 1, "id": b"", "cap": "c"}, "request id must be"),
        ({"t": "req", "v": 1, "id": b"1" * 65, "cap": "c"}, "request id must be"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "é" * 129}, "capability name must be"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "win": MIN_WINDOW - 1}, "window must be"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "ttl": 2**63}, "'ttl'"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "tc": {"hop": MAX_HOPS + 1}}, "hop count"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "tc": {"tid": "text"}}, "trace id"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "tc": {"via": "peer"}}, "'via'"),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "keep": 1}, "'keep'"),
        ({"t": "chunk", "seq": True, "d": 1}, "'seq'"),
        ({"t": "chunk", "seq": 1.0, "d": 1}, "'seq'"),
        ({"t": "end", "n": 0, "use": "x"}, "'use'"),
        ({"t": "err", "code": None}, "error code"),
        ({"t": "credit", "b": -5}, "'b'"),
        ({"t": "cancel", "why": 0}, "cancel reason"),
        ({"t": "err", "code": "internal", "rt": 0}, "'rt'"),
        ({"t": "end", "n": 0, "fin": 1}, "finish reason"),
        ({"t": None}, "unknown frame type None"),
        ({"t": "REQ"}, "unknown frame type 'REQ'"),
    ],
)
def test_invalid_messages(wire, error):
    with pytest.raises(ProtocolError, match=error) as info:
        parse_message(wire)
    assert info.value.code == "protocol_error"
    assert not info.value.retryable


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            {
                "t": "req",
                "v": 1,
                "id": b"1",
                "cap": "c",
                "in": None,
                "par": None,
                "ttl": None,
                "win": None,
                "keep": None,
                "tc": {"tid": None, "sid": None, "hop": None, "via": None},
            },
            Request(b"1", "c"),
        ),
        ({"t": "req", "v": 1, "id": b"1", "cap": "c", "tc": None}, Request(b"1", "c")),
        ({"t": "end", "n": 2, "fin": None, "use": None, "keep": None}, End(2)),
        ({"t": "err", "code": "internal", "msg": None, "rt": None, "n": None}, ErrorFrame("internal", "")),
        ({"t": "cancel", "why": None}, Cancel()),
    ],
)
def test_nil_on_an_optional_key_means_its_default(wire, expected):
    assert parse_message(wire) == expected


def test_capability_length_counts_utf8_bytes():
    ok = "日" * (MAX_CAPABILITY_LEN // 3)  # 255 bytes
    assert parse_message(Request(b"1", ok).to_wire()).capability == ok
    with pytest.raises(ProtocolError):
        parse_message(Request(b"1", ok + "é").to_wire())  # 257 bytes


# -- error codes ---------------------------------------------------------------

EXPECTED_CODES = {
    "bad_request": (BadRequestError, False),
    "not_found": (NotFoundError, False),
    "unauthorized": (UnauthorizedError, False),
    "overloaded": (OverloadedError, True),
    "deadline_exceeded": (DeadlineExceededError, False),
    "cancelled": (CancelledError, False),
    "internal": (InternalError, False),
    "unavailable": (UnavailableError, True),
    "protocol_error": (ProtocolError, False),
}


def test_error_codes_are_exactly_the_documented_set():
    assert set(EXPECTED_CODES) == ERROR_CODES


@pytest.mark.parametrize("code", sorted(EXPECTED_CODES))
def test_error_from_code(code):
    cls, retryable = EXPECTED_CODES[code]
    exc = error_from_code(code, "boom", chunks_delivered=3)
    assert type(exc) is cls
    assert isinstance(exc, ModelNetError)
    assert exc.code == code
    assert exc.message == "boom"
    assert exc.retryable is retryable
    assert exc.chunks_delivered == 3
    assert str(exc) == f"{code}: boom"
    for override in (True, False):
        assert error_from_code(code, "x", retryable=override).retryable is override


def test_error_from_unknown_code():
    exc = error_from_code("quota_exceeded", "try tomorrow", retryable=True, chunks_delivered=2)
    assert type(exc) is ProtocolError
    assert exc.code == "protocol_error"
    assert "quota_exceeded" in exc.message and "try tomorrow" in exc.message
    assert exc.chunks_delivered == 2
    assert not exc.retryable


@SETTINGS
@given(st.text(max_size=64), st.text(max_size=50))
def test_error_from_any_code_never_fails(code, message):
    assume(code not in ERROR_CODES)
    exc = error_from_code(code, message)
    assert isinstance(exc, ProtocolError)
    assert repr(code) in exc.message


def test_empty_message_defaults_to_code():
    assert error_from_code("internal", "").message == "internal"


def test_frame_bodies_obey_the_msgpack_limits():
    from modelnet_p2p.proto.framing import MAX_FRAME_CONTAINERS, MAX_FRAME_OBJECTS
    from modelnet_p2p.proto.packing import MAX_CONTAINERS, MAX_DEPTH, unpackb

    def nested(depth: int) -> dict:
        value: Any = []
        for _ in range(depth - 2):
            value = [value]
        return {"t": "chunk", "seq": 0, "d": value}

    assert FrameDecoder().feed(pack_frame(nested(MAX_DEPTH))) == [nested(MAX_DEPTH)]
    with pytest.raises(ProtocolError, match="nesting deeper than 32"):
        FrameDecoder().feed(pack_frame(nested(MAX_DEPTH + 1)))
    # Frames hold at most 8,192 maps and arrays, the body map and the list "d" included.
    many = {"t": "chunk", "seq": 0, "d": [[] for _ in range(MAX_FRAME_CONTAINERS - 2)]}
    assert len(FrameDecoder().feed(pack_frame(many))[0]["d"]) == MAX_FRAME_CONTAINERS - 2
    many["d"].append([])
    with pytest.raises(ProtocolError, match="more than 8192 maps and arrays"):
        FrameDecoder().feed(pack_frame(many))
    # And 65,536 values, scalars included: the body map, its 3 keys and 3 values, and the
    # items of "d".
    scalars = {"t": "chunk", "seq": 0, "d": [-100] * (MAX_FRAME_OBJECTS - 7)}
    assert len(FrameDecoder().feed(pack_frame(scalars))[0]["d"]) == MAX_FRAME_OBJECTS - 7
    scalars["d"].append(1)
    with pytest.raises(ProtocolError, match="more than 65536 values"):
        FrameDecoder().feed(pack_frame(scalars))
    wide = {"t": "chunk", "seq": 0, "d": [list(range(15))] * 4_095}  # few containers: 65,527 values
    assert len(FrameDecoder().feed(pack_frame(wide))[0]["d"]) == 4_095
    wide["d"].append(list(range(9)))  # 65,537
    with pytest.raises(ProtocolError, match="more than 65536 values"):
        FrameDecoder().feed(pack_frame(wide))
    # A lowered limit applies from the next frame on.
    decoder = FrameDecoder()
    decoder.max_objects = 16
    with pytest.raises(ProtocolError, match="more than 16 values"):
        decoder.feed(pack_frame({"t": "credit", "b": 1, "junk": list(range(20))}))
    assert len(unpackb(msgpack.packb([[] for _ in range(MAX_CONTAINERS - 1)]))) == MAX_CONTAINERS - 1
    with pytest.raises(ProtocolError, match="more than 65536 maps and arrays"):
        unpackb(msgpack.packb([[] for _ in range(MAX_CONTAINERS)]))
    body = msgpack.packb({"t": "chunk", "seq": 0, "d": msgpack.ExtType(1, b"z")}, use_bin_type=True)
    ext = encode_varint(len(body)) + body
    with pytest.raises(ProtocolError, match="extension type"):
        FrameDecoder().feed(ext)


def test_decoder_hands_out_one_frame_at_a_time():
    decoder = FrameDecoder()
    decoder.receive(pack_frame(Credit(1).to_wire()) + pack_frame(Credit(2).to_wire())[:3])
    assert decoder.next_frame() == Credit(1).to_wire()
    assert decoder.next_frame() is None
    assert decoder.buffered == 3
    decoder.receive(pack_frame(Credit(2).to_wire())[3:])
    assert decoder.next_frame() == Credit(2).to_wire()
    decoder.receive(b"\xff" * 11)
    with pytest.raises(ProtocolError, match="too long"):
        decoder.next_frame()
    with pytest.raises(ProtocolError):
        decoder.receive(b"")  # poisoned

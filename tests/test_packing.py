"""``modelnet_p2p.proto.packing``: the bounded msgpack decoder and the canonical encoder."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet_p2p import ProtocolError
from modelnet_p2p.proto import limits
from modelnet_p2p.proto import packing as K


def nested(depth: int) -> Any:
    """A map whose deepest container sits at ``depth`` (the root map is depth 1)."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"a": value} if depth > 1 else {}


def test_limits_are_the_shared_ones() -> None:
    assert K.MAX_DEPTH == limits.MAX_DEPTH == 32
    assert K.MAX_CONTAINERS == limits.MAX_CONTAINERS == 65_536


@pytest.mark.parametrize("depth", [1, 2, K.MAX_DEPTH])
def test_depth_up_to_the_limit_is_accepted(depth: int) -> None:
    data = K.canonical_packb(nested(depth))
    assert K.unpackb(data) == nested(depth)
    assert K.unpack_canonical(data, "x") == nested(depth)


def test_one_past_the_depth_limit_is_refused() -> None:
    data = K.canonical_packb(nested(K.MAX_DEPTH + 1))
    with pytest.raises(ProtocolError, match="nesting deeper than 32"):
        K.unpackb(data)
    with pytest.raises(ProtocolError, match="nesting deeper"):
        K.unpack_canonical(data, "x")
    assert K.unpackb(data, max_depth=K.MAX_DEPTH + 1) == nested(K.MAX_DEPTH + 1)


def test_deep_input_never_recurses() -> None:
    # 100,000 nested arrays: a bounded error, not a RecursionError.
    data = b"\x91" * 100_000 + b"\x90"
    with pytest.raises(ProtocolError):
        K.unpackb(data)


def test_container_count() -> None:
    ok = msgpack.packb([[] for _ in range(K.MAX_CONTAINERS - 1)])
    assert len(K.unpackb(ok)) == K.MAX_CONTAINERS - 1
    too_many = msgpack.packb([[] for _ in range(K.MAX_CONTAINERS)])
    with pytest.raises(ProtocolError, match="more than 65536"):
        K.unpackb(too_many)


@pytest.mark.parametrize(
    "data, reason",
    [
        (msgpack.packb({"a": msgpack.ExtType(1, b"x")}), "extension type"),
        (b"\xd6\xff\x00\x00\x00\x01", "extension type"),  # a msgpack timestamp (type -1)
        (b"\x81\xa1a\xd6\xff\x00\x00\x00\x01", "extension type"),  # ... inside a map
        (b"\x91\xd6\xff\x00\x00\x00\x01", "extension type"),  # ... inside an array
        (b"\x81\xd6\xff\x00\x00\x00\x01\x01", "extension type"),  # ... as a map key
        (b"\x81\xa1a", "not valid msgpack"),  # truncated
        (b"\x80\xc0", "not valid msgpack"),  # trailing bytes
        (b"\xa2\xff\xfe", "not valid msgpack"),  # invalid UTF-8
        (b"\xc1", "not valid msgpack"),  # the never-used byte
    ],
)
def test_decoder_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        K.unpackb(data)


def test_extension_types_only_when_asked() -> None:
    data = msgpack.packb(msgpack.ExtType(5, b"ab"))
    assert K.unpackb(data, allow_ext=True) == msgpack.ExtType(5, b"ab")


@pytest.mark.parametrize(
    "data, reason",
    [
        (msgpack.packb([1]), "not a map"),
        (msgpack.packb({"a": None}), "NoneType"),
        (msgpack.packb({"a": [None]}), "NoneType"),
        (msgpack.packb({"a": 1.5}), "float"),
        (msgpack.packb({1: 1}), "map keys must be text"),
        (msgpack.packb({b"k": 1}, use_bin_type=True), "map keys must be text"),
        (msgpack.packb({"b": 1, "a": 1}), "not canonically encoded"),  # unsorted
        (b"\x82\xa1a\x01\xa1a\x02", "not canonically encoded"),  # duplicate key
        (b"\x81\xa1a\xcc\x01", "not canonically encoded"),  # 1 as uint8
        (b"\x81\xa1a\xd9\x01x", "not canonically encoded"),  # str8 for a 1-byte text
        (b"\x81\xa1a\xdc\x00\x00", "not canonically encoded"),  # array16 for []
        (b"\x81\xa1a\xc5\x00\x01x", "not canonically encoded"),  # bin16 for 1 byte
    ],
)
def test_canonical_decoder_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        K.unpack_canonical(data, "thing")


def test_floats_are_float64_where_allowed() -> None:
    good = K.canonical_packb({"a": 1.5}, allow_float=True)
    assert good == b"\x81\xa1a\xcb" + msgpack.packb(1.5)[1:]
    assert K.unpack_canonical(good, "x", allow_float=True) == {"a": 1.5}
    float32 = msgpack.packb({"a": 1.5}, use_single_float=True)
    with pytest.raises(ProtocolError, match="not canonically encoded"):
        K.unpack_canonical(float32, "x", allow_float=True)
    with pytest.raises(ProtocolError, match="float"):
        K.canonical_packb({"a": 1.5})


def test_encoder_refuses_what_the_decoder_refuses() -> None:
    for bad in ({"a": None}, {1: 2}, {"a": 2**64}, {"a": -(2**63) - 1}, {"a": object()}):
        with pytest.raises(ProtocolError):
            K.canonical_packb(bad)
    assert K.canonical_packb({"a": 2**64 - 1, "b": -(2**63)}) == msgpack.packb(
        {"a": 2**64 - 1, "b": -(2**63)}
    )


def test_keys_sort_by_utf8_bytes() -> None:
    # U+FF21 sorts after U+00E9 in UTF-8 and in code points; "Z" < "a" < "é".
    data = K.canonical_packb({"é": 1, "a": 2, "Z": 3, "\uff21": 4})
    assert list(msgpack.unpackb(data)) == ["Z", "a", "é", "\uff21"]


leaf = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
)
canonical_leaf = (
    st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8) | st.binary(max_size=8)
)
canonical_values = st.recursive(
    canonical_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=6), canonical_values, max_size=5))
def test_canonical_round_trip(obj: dict[str, Any]) -> None:
    data = K.canonical_packb(obj)
    assert K.unpack_canonical(data, "x") == obj
    assert K.canonical_packb(K.unpack_canonical(data, "x")) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    for decode in (
        K.unpackb,
        lambda d: K.unpack_canonical(d, "x"),
        lambda d: K.unpack_canonical(d, "x", allow_float=True),
    ):
        try:
            decode(data)
        except ProtocolError:
            pass

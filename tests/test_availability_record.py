"""The availability record codec: spec vectors and property tests (``specs/availability.md``).

``python tests/test_availability_record.py`` rewrites ``specs/vectors/availability.json``
from :func:`build_vectors`; the tests check that the file and the code agree byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import any_values
from vector_util import nested_list, raw_pack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Identity, ProtocolError
from modelnet_p2p.proto.availability import (
    MAX_CAPABILITIES,
    MAX_MESSAGE_SIZE,
    MAX_TTL_MS,
    MIN_TTL_MS,
    SIGNING_DOMAIN,
    TOPIC_PREFIX,
    AvailabilityRecord,
    State,
    canonical_packb,
    encode_envelope,
    encode_record,
    message_id,
    open_envelope,
    seal,
    signing_input,
    topic_for,
)
from modelnet_p2p.proto.capability import capability_key

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "availability.json"


def key_from_label(label: str) -> tuple[bytes, Identity]:
    seed = hashlib.sha256(label.encode()).digest()
    return seed, Identity(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


SEED, KEY = key_from_label("modelnet availability vector key 1")
SEED2, KEY2 = key_from_label("modelnet availability vector key 2")
PID = str(KEY.peer_id)


def record_to_json(r: AvailabilityRecord) -> dict[str, Any]:
    return {
        "peer_id": r.peer_id,
        "seq": r.seq,
        "state": str(r.state),
        "capabilities": [list(c) for c in r.capabilities],
        "in_flight": r.in_flight,
        "queue": r.queue,
        "max_concurrency": r.max_concurrency,
        "latency_ms": r.latency_ms,
        "tokens_per_s": r.tokens_per_s,
        "ttl_ms": r.ttl_ms,
    }


def record_from_json(d: dict[str, Any]) -> AvailabilityRecord:
    return AvailabilityRecord(
        peer_id=d["peer_id"],
        seq=d["seq"],
        state=State(d["state"]),
        capabilities=tuple((n, v) for n, v in d["capabilities"]),
        in_flight=d["in_flight"],
        queue=d["queue"],
        max_concurrency=d["max_concurrency"],
        latency_ms=d["latency_ms"],
        tokens_per_s=d["tokens_per_s"],
        ttl_ms=d["ttl_ms"],
    )


def body_map(r: AvailabilityRecord) -> dict[str, Any]:
    """The record as a plain dict, for building invalid variants."""
    return msgpack.unpackb(encode_record(r), raw=False)


def signed(body: bytes, key: Identity = KEY) -> bytes:
    return encode_envelope(body, key.sign(signing_input(body)))


BASE = AvailabilityRecord(
    peer_id=PID,
    seq=1_767_225_600_000_000,
    state=State.READY,
    capabilities=(("echo", "1.0"), ("llama3-8b-chat", "2024.07")),
    in_flight=3,
    queue=1,
    max_concurrency=8,
    latency_ms=420,
    tokens_per_s=37.5,
    ttl_ms=6000,
)


#: " Embed " in fullwidth letters, with spaces: normalize() makes it "embed".
FULLWIDTH_EMBED = "  \uff25\uff4d\uff42\uff45\uff44 "


def build_vectors() -> dict[str, Any]:
    valid_records = [
        ("ready", "a ready peer serving two capabilities", BASE),
        (
            "joining_minimal",
            "a peer with no capabilities yet, all counters zero, the shortest TTL (1000 ms, inclusive)",
            AvailabilityRecord(PID, 1, State.JOINING, (), ttl_ms=MIN_TTL_MS),
        ),
        (
            "draining_unicode",
            "draining, a non-ASCII capability name, large counters, the longest TTL (300 000 ms, inclusive)",
            AvailabilityRecord(
                PID,
                2**64 - 1,
                State.DRAINING,
                (("résumé-écrit", ""), ("z", "1")),
                2**32 - 1,
                65536,
                2**32 - 1,
                2**32 - 1,
                0.1,
                MAX_TTL_MS,
            ),
        ),
        (
            "leaving",
            "the last record of a graceful shutdown",
            replace(BASE, state=State.LEAVING, seq=BASE.seq + 1),
        ),
    ]
    valid = []
    for name, description, rec in valid_records:
        body = encode_record(rec)
        sig = KEY.sign(signing_input(body))
        valid.append(
            {
                "name": name,
                "description": description,
                "record": record_to_json(rec),
                "body_hex": body.hex(),
                "signature_hex": sig.hex(),
                "envelope_hex": encode_envelope(body, sig).hex(),
            }
        )

    base = body_map(BASE)

    def variant(**changes: Any) -> bytes:
        m = dict(base)
        for k, v in changes.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        return canonical_packb(m)

    good_body = encode_record(BASE)
    tampered = bytearray(good_body)
    i = good_body.index(b"\xa3inf") + 4  # the in_flight value (a positive fixint)
    tampered[i] += 1
    unsorted = msgpack.packb(dict(reversed(list(base.items()))), use_bin_type=True)
    wide_int = good_body.replace(b"\xa3inf\x03", b"\xa3inf\xcc\x03")
    float32 = good_body.replace(
        b"\xa3tps\xcb" + msgpack.packb(37.5)[1:],
        b"\xa3tps\xca" + msgpack.packb(37.5, use_single_float=True)[1:],
    )
    big = variant(zzz="x" * MAX_MESSAGE_SIZE)

    def raw_variant(**changes: Any) -> bytes:
        m = dict(base)
        m.update(changes)
        return raw_pack(m)

    non_ed25519 = b"\x12\x20" + hashlib.sha256(b"an RSA key").digest()
    good_sig = KEY.sign(signing_input(good_body))
    invalid = [
        ("oversized", "envelope larger than 4096 bytes", signed(big), "exceeds"),
        ("not_msgpack", "truncated envelope", signed(good_body)[:-3], "not valid msgpack"),
        (
            "trailing_bytes",
            "a second value after the envelope",
            signed(good_body) + b"\xc0",
            "not valid msgpack",
        ),
        ("not_a_map", "an array instead of a map", msgpack.packb([1, 2]), "not a map"),
        (
            "extra_envelope_key",
            "an envelope key other than rec and sig",
            canonical_packb({"rec": good_body, "sig": KEY.sign(signing_input(good_body)), "x": 1}),
            "exactly the keys",
        ),
        (
            "short_signature",
            "a 63-byte signature",
            encode_envelope(good_body, KEY.sign(signing_input(good_body))[:63]),
            "64 bytes",
        ),
        ("unsorted_keys", "record keys not in canonical order", signed(unsorted), "not canonically encoded"),
        ("wide_integer", "in_flight 3 encoded as uint8", signed(wide_int), "not canonically encoded"),
        ("float32", "tokens_per_s encoded as float32", signed(float32), "not canonically encoded"),
        ("bad_version", "v = 2", signed(variant(v=2)), "unsupported record version"),
        ("missing_seq", "no seq field", signed(variant(seq=None)), "field 'seq'"),
        ("negative_in_flight", "in_flight = -1", signed(variant(inf=-1)), "field 'inf'"),
        ("unknown_state", "st = 'suspended'", signed(variant(st="suspended")), "unknown state"),
        ("integer_tps", "tps as an integer", signed(variant(tps=37)), "field 'tps'"),
        ("nan_tps", "tps = NaN", signed(variant(tps=math.nan)), "field 'tps'"),
        ("ttl_too_short", "ttl = 999 ms", signed(variant(ttl=MIN_TTL_MS - 1)), "field 'ttl'"),
        ("ttl_too_long", "ttl above 300 s", signed(variant(ttl=MAX_TTL_MS + 1)), "field 'ttl'"),
        (
            "unsorted_capabilities",
            "capabilities not sorted by name",
            signed(variant(caps=[["z", "1"], ["a", "1"]])),
            "sorted",
        ),
        (
            "duplicate_capability",
            "the same name twice",
            signed(variant(caps=[["a", "1"], ["a", "2"]])),
            "unique",
        ),
        ("empty_capability_name", "a capability named ''", signed(variant(caps=[["", "1"]])), "name"),
        (
            "too_many_capabilities",
            f"{MAX_CAPABILITIES + 1} capabilities",
            signed(variant(caps=[[f"c{i:03d}", ""] for i in range(MAX_CAPABILITIES + 1)])),
            "capabilities",
        ),
        ("nil_field", "nil as the value of an unknown field", signed(raw_variant(zz=None)), "NoneType"),
        ("nil_known_field", "nil as the value of 'q'", signed(raw_variant(q=None)), "NoneType"),
        ("nil_in_envelope", "nil as the signature", raw_pack({"rec": good_body, "sig": None}), "NoneType"),
        (
            "ext_type",
            "a msgpack extension type in the record",
            signed(raw_variant(zz=msgpack.ExtType(1, b"x"))),
            "extension type",
        ),
        (
            "timestamp",
            "a msgpack timestamp (extension type -1) in the record",
            signed(raw_variant(zz=msgpack.Timestamp(1))),
            "extension type",
        ),
        (
            "ext_in_envelope",
            "an extension type as the signature",
            raw_pack({"rec": good_body, "sig": msgpack.ExtType(1, good_sig)}),
            "extension type",
        ),
        (
            "depth_33",
            "an unknown field nesting arrays to depth 33, one past the limit",
            signed(raw_variant(zz=nested_list(32))),
            "nesting deeper than 32",
        ),
        (
            "caps_differ_only_by_case",
            "capabilities 'Echo' and 'echo': the same capability_key",
            signed(variant(caps=[["Echo", "1"], ["echo", "1"]])),
            "unique after normalize",
        ),
        (
            "blank_capability_name",
            "a capability name of white space only",
            signed(variant(caps=[["\u3000 ", "1"]])),
            "white space",
        ),
        (
            "non_ed25519_id",
            "id is a sha2-256 multihash (an RSA key's peer id)",
            signed(variant(id=non_ed25519)),
            "Ed25519",
        ),
        (
            "tampered",
            "in_flight changed after signing",
            encode_envelope(bytes(tampered), KEY.sign(signing_input(good_body))),
            "signature",
        ),
        ("signed_by_other_key", "names key 1, signed by key 2", signed(good_body, KEY2), "signature"),
        (
            "no_domain_prefix",
            "signature over the body without the domain prefix",
            encode_envelope(good_body, KEY.sign(good_body)),
            "signature",
        ),
    ]
    accepted_body = variant(zz_future="a field from a later minor revision")
    return {
        "topic_prefix": TOPIC_PREFIX,
        "topics": [
            {"capability": name, "topic": topic_for(name)}
            for name in ("llama3", "Llama3-8B-Instruct", FULLWIDTH_EMBED, "whisper/large-v3")
        ],
        "message_ids": [
            {"data_hex": data.hex(), "message_id_hex": message_id(data).hex()}
            for data in (b"", bytes.fromhex(valid[0]["envelope_hex"]))
        ],
        "description": (
            "Test vectors for availability records (specs/availability.md). Keys are Ed25519 "
            "seeds (hex); the peer id is derived as libp2p does. 'valid': body_hex is exactly "
            "encode_record(record), signature_hex is the Ed25519 signature over signing_domain "
            "+ body, envelope_hex the published bytes. 'accepted': an envelope a parser must "
            "accept, parsing to record. 'invalid': envelopes a parser must reject; error is a "
            "substring of the reference implementation's message."
        ),
        "signing_domain": SIGNING_DOMAIN.decode(),
        "max_message_size": MAX_MESSAGE_SIZE,
        "keys": [
            {"seed_hex": SEED.hex(), "peer_id": PID},
            {"seed_hex": SEED2.hex(), "peer_id": str(KEY2.peer_id)},
        ],
        "valid": valid,
        "accepted": [
            {
                "name": "unknown_field",
                "description": "a record key this version does not know is ignored (and signed)",
                "envelope_hex": signed(accepted_body).hex(),
                "record": record_to_json(BASE),
            },
            {
                "name": "depth_32",
                "description": "an unknown field nesting arrays to depth 32, the deepest allowed",
                "envelope_hex": signed(raw_variant(zz=nested_list(31))).hex(),
                "record": record_to_json(BASE),
            },
        ],
        "invalid": [
            {"name": n, "description": d, "envelope_hex": data.hex(), "error": e} for n, d, data, e in invalid
        ],
    }


# -- vectors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return json.loads(VECTORS.read_text())


def test_vector_file_matches_the_code(vectors):
    assert build_vectors() == vectors, "run: python tests/test_availability_record.py"


def test_vector_keys(vectors):
    for k in vectors["keys"]:
        ident = Identity(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(k["seed_hex"])))
        assert str(ident.peer_id) == k["peer_id"]
    assert vectors["signing_domain"].encode() == SIGNING_DOMAIN
    assert vectors["topic_prefix"] == "/modelnet/availability/2/"


def test_topic_and_message_id_vectors(vectors):
    for t in vectors["topics"]:
        assert topic_for(t["capability"]) == t["topic"]
        assert t["topic"].startswith("/modelnet/availability/2/") and t["topic"] == t["topic"].strip()
    assert topic_for("LLAMA3") == topic_for("llama3")
    for m in vectors["message_ids"]:
        assert message_id(bytes.fromhex(m["data_hex"])).hex() == m["message_id_hex"]
    with pytest.raises(ValueError):
        topic_for("   ")
    with pytest.raises(ValueError):
        topic_for("x" * 257)


def test_valid_vectors(vectors):
    for v in vectors["valid"]:
        rec = record_from_json(v["record"])
        body = bytes.fromhex(v["body_hex"])
        assert encode_record(rec) == body, v["name"]
        assert KEY.sign(SIGNING_DOMAIN + body).hex() == v["signature_hex"], v["name"]
        assert seal(rec, KEY).hex() == v["envelope_hex"], v["name"]
        parsed = open_envelope(bytes.fromhex(v["envelope_hex"]))
        assert parsed.record == rec, v["name"]
        assert parsed.body == body and parsed.signature.hex() == v["signature_hex"]


def test_accepted_vectors(vectors):
    for v in vectors["accepted"]:
        assert open_envelope(bytes.fromhex(v["envelope_hex"])).record == record_from_json(v["record"])


def test_invalid_vectors(vectors):
    assert len(vectors["invalid"]) >= 20
    for v in vectors["invalid"]:
        with pytest.raises(ProtocolError) as info:
            open_envelope(bytes.fromhex(v["envelope_hex"]))
        assert v["error"] in info.value.message, (v["name"], info.value.message)


# -- encoder-side checks -----------------------------------------------------------------


def test_seal_refuses_another_peers_record():
    with pytest.raises(ValueError):
        seal(BASE, KEY2)


def test_encoder_refuses_out_of_range_fields():
    for bad in (
        replace(BASE, seq=-1),
        replace(BASE, in_flight=2**32),
        replace(BASE, ttl_ms=10),
        replace(BASE, tokens_per_s=math.inf),
        replace(BASE, capabilities=(("a", "1"), ("a", "2"))),
        replace(BASE, capabilities=(("x" * 300, "1"),)),
    ):
        with pytest.raises(ProtocolError):
            seal(bad, KEY)


def test_seal_refuses_oversized_record():
    caps = tuple((f"{i:02d}" + "n" * 200, "v" * 60) for i in range(30))
    with pytest.raises(ProtocolError, match="exceeds"):
        seal(replace(BASE, capabilities=caps), KEY)


def test_capabilities_are_sorted_on_construction():
    r = replace(BASE, capabilities=[("b", "1"), ("a", "2")])  # type: ignore[arg-type]
    assert r.capabilities == (("a", "2"), ("b", "1"))
    assert r.serves("a") and r.serves("a", "2") and not r.serves("a", "1")
    # Names are matched by capability_key, as everywhere.
    assert r.serves("A") and r.serves(" A\u3000", "2") and not r.serves("c")


def test_names_that_normalize_alike_collide():
    from modelnet_p2p.proto.availability import capabilities_of

    assert capabilities_of([("b", "1"), "a"]) == (("a", ""), ("b", "1"))
    with pytest.raises(ValueError, match="twice"):
        capabilities_of([("Echo", "1"), ("echo", "2")])
    for caps in ((("Echo", "1"), ("echo", "1")), ((" ", "1"),)):
        with pytest.raises(ProtocolError):
            seal(replace(BASE, capabilities=caps), KEY)


def test_nil_and_extension_types_are_refused_like_in_cards():
    # One rule for both record types (the same envelope module decodes them).
    from modelnet_p2p.proto import card

    for value in (None, msgpack.ExtType(3, b""), msgpack.Timestamp(0)):
        rec = raw_pack({**body_map(BASE), "zz": value})
        crd = raw_pack(
            {**msgpack.unpackb(card.encode_card(card.CapabilityCard(PID, (), 1, 0, 1000))), "zz": value}
        )
        with pytest.raises(ProtocolError) as a:
            open_envelope(signed(rec))
        with pytest.raises(ProtocolError) as b:
            card.open_card(card.encode_envelope(crd, KEY.sign(card.signing_input(crd))))
        assert a.value.message.replace("availability record", "card") == b.value.message


def test_typical_record_size():
    # Bytes matter: every record reaches every peer every few seconds.
    assert len(seal(BASE, KEY)) < 256


# -- property tests ----------------------------------------------------------------------

names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=24).filter(
    lambda s: 0 < len(s.encode()) <= 256 and capability_key(s) != ""
)
versions = st.text(max_size=12).filter(lambda s: len(s.encode()) <= 64)
u32 = st.integers(0, 2**32 - 1)

records = st.builds(
    AvailabilityRecord,
    peer_id=st.just(PID),
    seq=st.integers(0, 2**64 - 1),
    state=st.sampled_from(list(State)),
    capabilities=st.lists(
        st.tuples(names, versions), max_size=6, unique_by=lambda c: capability_key(c[0])
    ).map(tuple),
    in_flight=u32,
    queue=u32,
    max_concurrency=u32,
    latency_ms=u32,
    tokens_per_s=st.floats(0, 1e12, allow_nan=False, allow_infinity=False),
    ttl_ms=st.integers(MIN_TTL_MS, MAX_TTL_MS),
)

PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(records)
def test_round_trip(rec):
    data = seal(rec, KEY)
    assert len(data) <= MAX_MESSAGE_SIZE
    parsed = open_envelope(data)
    assert parsed.record == rec
    assert encode_record(parsed.record) == parsed.body


FIELDS = [
    "seq",
    "state",
    "capabilities",
    "in_flight",
    "queue",
    "max_concurrency",
    "latency_ms",
    "tokens_per_s",
    "ttl_ms",
]


def mutate(rec: AvailabilityRecord, field: str, data: st.DataObject) -> AvailabilityRecord:
    current = getattr(rec, field)
    if field == "state":
        new: Any = data.draw(st.sampled_from([s for s in State if s != current]))
    elif field == "capabilities":
        new = (*current, ("zz-added-" + str(len(current)), "1"))
    elif field == "tokens_per_s":
        new = current + 1.0 if current < 1e11 else current / 2
    elif field == "ttl_ms":
        new = current + 1 if current < MAX_TTL_MS else current - 1
    elif field == "seq":
        new = current + 1 if current < 2**64 - 1 else current - 1
    else:
        new = current + 1 if current < 2**32 - 1 else current - 1
    return replace(rec, **{field: new})


@PROPS
@given(records, st.sampled_from(FIELDS), st.data())
def test_changing_any_field_breaks_the_signature(rec, field, data):
    original = seal(rec, KEY)
    sig = open_envelope(original).signature
    forged = encode_envelope(encode_record(mutate(rec, field, data)), sig)
    with pytest.raises(ProtocolError, match="signature"):
        open_envelope(forged)


@PROPS
@given(records, st.data())
def test_flipping_any_body_byte_is_rejected(rec, data):
    signed_env = open_envelope(seal(rec, KEY))
    body = bytearray(signed_env.body)
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(ProtocolError):
        open_envelope(encode_envelope(bytes(body), signed_env.signature))


@PROPS
@given(records, st.sampled_from([KEY2]))
def test_a_record_signed_by_another_key_is_rejected(rec, other):
    body = encode_record(rec)
    with pytest.raises(ProtocolError, match="signature"):
        open_envelope(encode_envelope(body, other.sign(signing_input(body))))


@PROPS
@given(st.integers(MAX_MESSAGE_SIZE + 1, 3 * MAX_MESSAGE_SIZE), st.binary(max_size=64))
def test_oversized_is_rejected_before_parsing(size, prefix):
    data = (prefix + b"\x00" * size)[:size]
    with pytest.raises(ProtocolError, match="exceeds"):
        open_envelope(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_only_raise_protocol_error(data):
    try:
        open_envelope(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_correctly_signed_nonsense_only_raises_protocol_error(data):
    body = body_map(BASE)
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from([*body, "zz"]))
        body[key] = data.draw(any_values | st.lists(st.lists(st.text(max_size=4), max_size=3), max_size=3))
    try:
        open_envelope(signed(raw_pack(body)))
    except ProtocolError:
        pass


if __name__ == "__main__":
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {VECTORS}")

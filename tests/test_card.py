"""The capability card codec (``modelnet_p2p.proto.card``) against ``specs/vectors/capability.json``,
plus property tests: round trips, one encoding per card, and rejection of
forged, tampered, expired and oversized cards. No network here.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from modelnet_p2p import Capability, CapabilityCard, ConfigError, CostHint, Identity, ProtocolError
from modelnet_p2p.proto import card as C

VECTORS_PATH = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "capability.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))


def identity_from_seed(seed_hex: str) -> Identity:
    return Identity(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


KEY = identity_from_seed(VECTORS["identity"]["seed_hex"])
OTHER = identity_from_seed(VECTORS["other_identity"]["seed_hex"])
NOW = 1_767_225_600_000


def card_from_json(data: dict[str, Any]) -> CapabilityCard:
    caps = []
    for c in data["capabilities"]:
        fields = dict(c)
        if "cost" in fields:
            fields["cost"] = CostHint(**fields["cost"])
        caps.append(Capability(**fields))
    return CapabilityCard(
        data["peer_id"], tuple(data["addrs"]), data["seq"], data["issued_at"], data["expires_at"], tuple(caps)
    )


def names(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# -- vectors -------------------------------------------------------------------------


def test_vector_file_header() -> None:
    assert VECTORS["signing_domain"].encode() == C.SIGNING_DOMAIN
    assert VECTORS["key_domain"].encode() == C.KEY_DOMAIN
    assert VECTORS["value_namespace"] == C.VALUE_NAMESPACE
    assert VECTORS["max_card_size"] == C.MAX_CARD_SIZE
    ident = VECTORS["identity"]
    assert str(KEY.peer_id) == ident["peer_id"]
    assert KEY.public_key_bytes.hex() == ident["public_key_hex"]
    assert C.value_key(ident["peer_id"]) == ident["value_key"]
    all_names = names(VECTORS["valid"] + VECTORS["accepted"] + VECTORS["invalid"])
    assert len(all_names) == len(set(all_names))


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=names(VECTORS["valid"]))
def test_valid_vectors(vector: dict[str, Any]) -> None:
    card = card_from_json(vector["card"])
    body = C.encode_card(card)
    assert body.hex() == vector["body_hex"]
    sealed = C.seal(card, KEY)
    assert sealed.envelope.hex() == vector["envelope_hex"]
    assert msgpack.unpackb(sealed.envelope)["sig"].hex() == vector["signature_hex"]
    assert KEY.sign(C.signing_input(body)).hex() == vector["signature_hex"]
    opened = C.open_card(bytes.fromhex(vector["envelope_hex"]), now_ms=card.issued_at)
    assert opened == card
    assert opened.envelope == sealed.envelope
    keys = [{"label": label, "key_hex": key.hex()} for label, key in C.card_keys(card.capabilities)]
    assert keys == vector["keys"]


@pytest.mark.parametrize("vector", VECTORS["accepted"], ids=names(VECTORS["accepted"]))
def test_accepted_vectors(vector: dict[str, Any]) -> None:
    opened = C.open_card(bytes.fromhex(vector["envelope_hex"]))
    assert opened == card_from_json(vector["card"])


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=names(VECTORS["invalid"]))
def test_invalid_vectors(vector: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as info:
        C.open_card(bytes.fromhex(vector["envelope_hex"]), now_ms=vector.get("now_ms"))
    assert vector["error"] in info.value.message


@pytest.mark.parametrize("vector", VECTORS["provider_keys"], ids=lambda v: f"{v['kind']}:{v['parts']}")
def test_provider_key_vectors(vector: dict[str, Any]) -> None:
    key = C.provider_key(vector["kind"], *vector["parts"])
    assert key.hex() == vector["key_hex"]
    assert len(key) == 34 and key[:2] == b"\x12\x20"


def test_named_key_helpers_match_the_generic_derivation() -> None:
    assert C.task_key("chat") == C.provider_key("task", "chat")
    assert C.model_key("m") == C.provider_key("model", "m")
    assert C.model_version_key("m", "1") == C.provider_key("model-version", "m", "1")
    assert C.tag_key("t") == C.provider_key("tag", "t")
    # Length prefixes keep the parts apart: ("ab", "c") and ("a", "bc") differ.
    assert C.model_version_key("ab", "c") != C.model_version_key("a", "bc")
    assert C.task_key("x") != C.tag_key("x")


# -- capability fields ----------------------------------------------------------------


def test_task_and_tasks() -> None:
    assert Capability("a").tasks == ("text-generation",)
    assert Capability("a", task="chat").tasks == ("chat",)
    both = Capability("a", tasks=("chat", "tool"))
    assert both.task == "chat" and both.tasks == ("chat", "tool")
    primary = Capability("a", task="tool", tasks=["chat", "tool"])
    assert primary.task == "tool" and primary.tasks == ("tool", "chat")
    assert Capability("a", tags=["x", "y"]).tags == ("x", "y")
    with pytest.raises(ConfigError):
        Capability("a", tags=("",))
    with pytest.raises(ConfigError):
        Capability("a", context_length=0)


def test_schemas_and_cost() -> None:
    cap = Capability("a", input_schema='{"type": "string"}', cost={"amount": 0.5})
    assert cap.input_schema == {"type": "string"}
    assert cap.cost == CostHint("0.5", "USD", "1k tokens")
    for bad in ("-1", "abc", float("nan")):
        with pytest.raises(ConfigError):
            CostHint(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Capability("a", params_schema="[1, 2]")
    with pytest.raises(ConfigError):
        Capability("a", params_schema={"x": object()})


def test_limits_are_checked_when_encoding() -> None:
    ok = Capability("a", tags=tuple(f"t{i}" for i in range(C.MAX_LIST_ITEMS)))
    C.check_capability(ok)
    for cap in (
        Capability("a", tags=tuple(f"t{i}" for i in range(C.MAX_LIST_ITEMS + 1))),
        Capability("a", description="x" * (C.MAX_DESCRIPTION_LEN + 1)),
        Capability("a", version="v" * (C.MAX_TOKEN_LEN + 1)),
        Capability("a", input_schema={"d": "x" * C.MAX_SCHEMA_LEN}),
        Capability("a", tasks=tuple(f"t{i}" for i in range(C.MAX_TASKS + 1))),
    ):
        with pytest.raises(ProtocolError):
            C.check_capability(cap)
    pid = str(KEY.peer_id)
    too_many = tuple(Capability(f"c{i}") for i in range(C.MAX_CAPABILITIES + 1))
    with pytest.raises(ProtocolError, match="at most"):
        C.seal(CapabilityCard(pid, (), 1, NOW, NOW + 60_000, too_many), KEY)
    many_keys = tuple(Capability(f"c{i}", tags=tuple(f"{i}-{j}" for j in range(8))) for i in range(8))
    with pytest.raises(ProtocolError, match="DHT keys"):
        C.seal(CapabilityCard(pid, (), 1, NOW, NOW + 60_000, many_keys), KEY)
    with pytest.raises(ValueError):
        C.seal(CapabilityCard(str(OTHER.peer_id), (), 1, NOW, NOW + 60_000, (ok,)), KEY)


def test_matching_and_agent_card() -> None:
    card = card_from_json(VECTORS["valid"][1]["card"])
    assert [c.name for c in card.matching(task="CHAT")] == ["llama3-8b-chat"]
    assert [c.name for c in card.matching(tags=["open-weights", "FAST"])] == ["llama3-8b-chat"]
    assert card.matching(model="llama3-8b-chat", version="nope") == []
    assert [c.name for c in card.matching(task="embedding", model="e5-small", version="2")] == ["e5-small"]
    agent = card.to_agent_card()
    json.dumps(agent)  # JSON-ready
    assert agent["name"].startswith("modelnet peer ")
    assert agent["url"] == f"/ip4/127.0.0.1/tcp/4001/p2p/{card.peer_id}"
    skills = {s["id"]: s for s in agent["skills"]}
    assert skills["llama3-8b-chat"]["tags"] == ["chat", "text-generation", "fast", "en", "Open-Weights"]
    assert skills["e5-small"]["outputModes"] == ["application/json"]
    single = card_from_json(VECTORS["valid"][0]["card"]).to_agent_card()
    assert single["name"] == "echo" and single["version"] == "1.0"


def test_select_prefers_valid_then_highest_seq() -> None:
    pid = str(KEY.peer_id)
    cards = [
        C.seal(CapabilityCard(pid, (), seq, NOW, NOW + 60_000, (Capability("a"),)), KEY).envelope
        for seq in (5, 9, 7)
    ]
    forged = C.encode_envelope(C.encode_card(CapabilityCard(pid, (), 99, NOW, NOW + 60_000)), b"\x00" * 64)
    assert C.select_card(cards, NOW) == 1
    assert C.select_card([forged, *cards], NOW) == 2
    assert C.select_card([b"junk", forged], NOW) == 0  # nothing valid: the first
    expired = C.seal(CapabilityCard(pid, (), 50, NOW - 10_000, NOW - 1, ()), KEY).envelope
    assert C.select_card([expired, cards[0]], NOW) == 1


def test_value_keys() -> None:
    pid = str(KEY.peer_id)
    assert C.peer_of_value_key(C.value_key(pid)) == pid
    assert len(C.value_key(pid).encode()) <= 128  # py-libp2p's GET_VALUE/PUT_VALUE key limit
    for bad in ("/pk/x", "/modelnet-card/", "modelnet-card/x"):
        with pytest.raises(ProtocolError):
            C.peer_of_value_key(bad)


# -- properties -------------------------------------------------------------------------

token = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: len(s.encode()) <= C.MAX_TOKEN_LEN
)
tokens = st.lists(token, max_size=4, unique=True).map(tuple)
capability = st.builds(
    Capability,
    name=st.text(min_size=1, max_size=20),
    task=token,
    version=st.text(max_size=10),
    description=st.text(max_size=40),
    tags=tokens,
    idempotent=st.booleans(),
    max_concurrency=st.none() | st.integers(1, 2**32 - 1),
    family=st.text(max_size=10),
    input_modalities=tokens,
    output_modalities=tokens,
    input_schema=st.none()
    | st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
    context_length=st.none() | st.integers(1, 2**32 - 1),
    languages=tokens,
    license=st.text(max_size=10),
    cost=st.none() | st.builds(CostHint, amount=st.decimals(0, 1000, places=4).map(str)),
)
addr = st.builds(
    lambda a, b, port: f"/ip4/10.{a}.{b}.1/tcp/{port}",
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 65535),
)


@st.composite
def cards(draw: st.DrawFn) -> CapabilityCard:
    caps = draw(st.lists(capability, max_size=3, unique_by=lambda c: c.name))
    assume(all(len(c.name.encode()) <= 256 for c in caps))
    assume(len(C.card_keys(caps)) <= C.MAX_PROVIDER_KEYS)
    issued = draw(st.integers(0, 2**62))
    return CapabilityCard(
        peer_id=str(KEY.peer_id),
        addrs=tuple(draw(st.lists(addr, max_size=3))),
        seq=draw(st.integers(0, C.MAX_SEQ)),
        issued_at=issued,
        expires_at=issued + draw(st.integers(C.MIN_TTL_MS, C.MAX_TTL_MS)),
        capabilities=tuple(caps),
    )


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(cards())
def test_round_trip_and_one_encoding(card: CapabilityCard) -> None:
    sealed = C.seal(card, KEY)
    opened = C.open_card(sealed.envelope, now_ms=card.issued_at)
    assert opened == card
    # One encoding per card: re-encoding what was decoded gives the same bytes.
    body = msgpack.unpackb(sealed.envelope)["card"]
    assert C.encode_card(opened) == body
    assert C.canonical_packb(msgpack.unpackb(body)) == body
    assert C.seal(opened, KEY).envelope == sealed.envelope  # Ed25519 is deterministic


@SETTINGS
@given(cards(), st.data())
def test_any_changed_byte_is_rejected(card: CapabilityCard, data: st.DataObject) -> None:
    envelope = bytearray(C.seal(card, KEY).envelope)
    i = data.draw(st.integers(0, len(envelope) - 1))
    envelope[i] ^= data.draw(st.integers(1, 255))
    try:
        opened = C.open_card(bytes(envelope))
    except ProtocolError:
        return
    pytest.fail(f"a modified envelope was accepted: {opened}")


@SETTINGS
@given(cards())
def test_forged_expired_and_oversized_are_rejected(card: CapabilityCard) -> None:
    body = C.encode_card(card)
    forged = C.encode_envelope(body, OTHER.sign(C.signing_input(body)))
    with pytest.raises(ProtocolError, match="signature"):
        C.open_card(forged)
    no_domain = C.encode_envelope(body, KEY.sign(body))
    with pytest.raises(ProtocolError, match="signature"):
        C.open_card(no_domain)
    sealed = C.seal(card, KEY).envelope
    with pytest.raises(ProtocolError, match="expired"):
        C.open_card(sealed, now_ms=card.expires_at)
    C.open_card(sealed, now_ms=card.expires_at - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        C.open_card(sealed + b"\x00" * C.MAX_CARD_SIZE)


@SETTINGS
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=6, unique=True), st.randoms())
def test_select_does_not_depend_on_order(seqs: list[int], rnd: Any) -> None:
    pid = str(KEY.peer_id)
    envelopes = [C.seal(CapabilityCard(pid, (), s, NOW, NOW + 60_000), KEY).envelope for s in seqs]
    shuffled = list(envelopes)
    rnd.shuffle(shuffled)
    best = shuffled[C.select_card(shuffled, NOW)]
    assert C.open_card(best).seq == max(seqs)


@SETTINGS
@given(st.binary(max_size=300))
def test_garbage_never_crashes_the_decoder(data: bytes) -> None:
    try:
        C.open_card(data, now_ms=NOW)
    except ProtocolError:
        pass


@SETTINGS
@given(
    st.text(string.ascii_letters + string.digits + "-_. ", min_size=1, max_size=20),
    st.sampled_from(["task", "model", "tag"]),
)
def test_keys_ignore_case_and_surrounding_space(text: str, kind: str) -> None:
    assume(C.normalize(text))
    assert C.provider_key(kind, text) == C.provider_key(kind, f"  {text.upper()}\t")

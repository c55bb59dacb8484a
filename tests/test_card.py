"""The capability card codec (``modelnet_p2p.proto.card``) against ``specs/vectors/capability.json``,
plus property tests: round trips, one encoding per card, and rejection of
forged, tampered, expired and oversized cards. No network here.

``python tests/test_card.py`` rewrites ``specs/vectors/capability.json`` from
:func:`build_vectors`; the tests check that the file and the code agree.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from vector_util import nested_list, raw_pack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Capability, CapabilityCard, ConfigError, CostHint, Identity, ProtocolError
from modelnet_p2p.proto import card as C
from modelnet_p2p.proto.capability import capability_key, normalize

VECTORS_PATH = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "capability.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
SEED_HEX = bytes(range(32)).hex()
OTHER_SEED_HEX = bytes(range(32, 64)).hex()


def identity_from_seed(seed_hex: str) -> Identity:
    return Identity(ed25519.Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


KEY = identity_from_seed(SEED_HEX)
OTHER = identity_from_seed(OTHER_SEED_HEX)
PID = str(KEY.peer_id)
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


# -- vector builder ----------------------------------------------------------------------

_OPTIONAL_ORDER = (
    "description",
    "family",
    "license",
    "tags",
    "input_modalities",
    "output_modalities",
    "languages",
    "input_schema",
    "params_schema",
    "context_length",
    "max_concurrency",
)


def card_to_json(card: CapabilityCard) -> dict[str, Any]:
    caps = []
    for cap in card.capabilities:
        out: dict[str, Any] = {"name": cap.name, "tasks": list(cap.tasks), "version": cap.version}
        for key in _OPTIONAL_ORDER:
            value = getattr(cap, key)
            if value:
                out[key] = list(value) if isinstance(value, tuple) else value
        if cap.cost is not None:
            out["cost"] = {"amount": cap.cost.amount, "currency": cap.cost.currency, "per": cap.cost.per}
        if cap.idempotent:
            out["idempotent"] = True
        if cap.access != "public":
            out["access"] = cap.access
        caps.append(out)
    return {
        "peer_id": card.peer_id,
        "addrs": list(card.addrs),
        "seq": card.seq,
        "issued_at": card.issued_at,
        "expires_at": card.expires_at,
        "capabilities": caps,
    }


def cap_map(cap: Capability) -> dict[str, Any]:
    """The wire map of one capability, as the encoder writes it."""
    card = CapabilityCard(PID, (), 1, NOW, NOW + 60_000, (cap,))
    caps: list[dict[str, Any]] = msgpack.unpackb(C.encode_card(card))["caps"]
    return caps[0]


def signed(body: bytes, key: Identity = KEY) -> bytes:
    return C.encode_envelope(body, key.sign(C.signing_input(body)))


ECHO = Capability("echo", task="text-generation", version="1.0")
MINIMAL = CapabilityCard(PID, ("/ip4/127.0.0.1/tcp/4001",), 1, NOW, NOW + 300_000, (ECHO,))
FULL = CapabilityCard(
    PID,
    (
        "/ip4/127.0.0.1/tcp/4001",
        "/ip6/::1/tcp/4001",
        "/dns4/models.example/tcp/443/wss",
        f"/ip4/198.51.100.7/tcp/4001/p2p/{OTHER.peer_id}/p2p-circuit",
    ),
    1_767_225_600_000_000,
    NOW,
    NOW + 300_000,
    (
        Capability(
            "llama3-8b-chat",
            tasks=("chat", "text-generation"),
            version="3.1-q4",
            description="Llama 3.1 8B instruct, 4-bit.",
            family="llama3",
            license="llama3.1",
            tags=("fast", "en", "Open-Weights"),
            input_modalities=("text",),
            output_modalities=("text",),
            languages=("en", "fr"),
            input_schema={"type": "string", "maxLength": 32000},
            params_schema={"type": "object", "properties": {"temperature": {"type": "number"}}},
            context_length=8192,
            max_concurrency=4,
            cost=CostHint("0.0002", "USD", "1k tokens"),
        ),
        Capability(
            "e5-small",
            tasks=("embedding",),
            version="2",
            tags=("en",),
            output_modalities=("embedding",),
            idempotent=True,
        ),
    ),
)
WITHDRAWN = CapabilityCard(
    PID, ("/ip4/127.0.0.1/tcp/4001",), NOW * 1000 + 300_000_000, NOW + 300_000, NOW + 600_000, ()
)
#: 64 provider keys exactly: 4 capabilities with one task, the model, the model+version and 13 tags.
SIXTY_FOUR_KEYS = tuple(
    Capability(f"m{i}", task=f"task-{i}", tags=tuple(f"tag-{i}-{j}" for j in range(13))) for i in range(4)
)

#: r4-access: the policies a card announces.
ACCESS_CAPS = (
    Capability("club", access="allowlist", allow=frozenset({PID})),
    Capability("paid", access="token"),
)


def build_vectors() -> dict[str, Any]:
    valid_cards = [
        ("minimal", "one capability with every optional field left out", MINIMAL),
        ("full", "two capabilities using every field; unsorted input is sorted by name", FULL),
        ("withdrawn", "no capabilities: replaces an older card to withdraw everything", WITHDRAWN),
        (
            "shortest_lifetime",
            "expires_at - issued_at = 1000 ms exactly, the shortest lifetime (inclusive)",
            CapabilityCard(PID, (), 2, NOW, NOW + C.MIN_TTL_MS, (ECHO,)),
        ),
        (
            "longest_lifetime",
            "expires_at - issued_at = 86 400 000 ms exactly, the longest lifetime (inclusive)",
            CapabilityCard(PID, (), 3, NOW, NOW + C.MAX_TTL_MS, (ECHO,)),
        ),
        (
            "sixty_four_keys",
            "a card deriving exactly 64 provider keys, the most allowed",
            CapabilityCard(PID, (), 4, NOW, NOW + 300_000, SIXTY_FOUR_KEYS),
        ),
        (
            "access",
            "access policies (r4-access): a token and an allowlist capability (the list is not announced)",
            CapabilityCard(PID, (), 5, NOW, NOW + 300_000, ACCESS_CAPS),
        ),
    ]
    valid = []
    for name, description, card in valid_cards:
        body = C.encode_card(card)
        sig = KEY.sign(C.signing_input(body))
        valid.append(
            {
                "name": name,
                "description": description,
                "card": card_to_json(card),
                "body_hex": body.hex(),
                "signature_hex": sig.hex(),
                "envelope_hex": C.encode_envelope(body, sig).hex(),
                "keys": [
                    {"label": label, "key_hex": key.hex()} for label, key in C.card_keys(card.capabilities)
                ],
            }
        )

    body = C.encode_card(MINIMAL)
    base: dict[str, Any] = msgpack.unpackb(body)
    good = signed(body)

    def variant(**changes: Any) -> dict[str, Any]:
        out = dict(base)
        out.update(changes)
        return out

    def cap_variant(**changes: Any) -> dict[str, Any]:
        cap = dict(base["caps"][0])
        cap.update(changes)
        return variant(caps=[cap])

    def cap_of(name: str) -> dict[str, Any]:
        return {"name": name, "tasks": ["text-generation"], "version": "1.0"}

    def s(obj: dict[str, Any]) -> str:
        return signed(raw_pack(obj)).hex()

    tampered = bytearray(body)
    tampered[body.index(b"\xa3seq") + 4] ^= 0x03  # seq 1 -> 2, signature unchanged
    wide = body.replace(b"\xa3seq\x01", b"\xa3seq\xcc\x01")
    unsorted_env = msgpack.packb({"sig": KEY.sign(C.signing_input(body)), "card": body}, use_bin_type=True)
    big = raw_pack(variant(zz="x" * C.MAX_CARD_SIZE))
    sixty_five = (
        *SIXTY_FOUR_KEYS[:3],
        Capability("m3", task="task-3", tags=tuple(f"t{j}" for j in range(14))),
    )
    sixty_five_body = raw_pack(variant(caps=[cap_map(c) for c in sixty_five]))
    non_ed25519 = b"\x12\x20" + hashlib.sha256(b"an RSA key").digest()
    accepted = [
        {
            "name": "unknown_field",
            "description": "an unknown top-level field is covered by the signature and ignored",
            "envelope_hex": s(variant(zz_future="kept and signed")),
            "card": card_to_json(MINIMAL),
        },
        {
            "name": "depth_32",
            "description": "an unknown field nesting arrays to depth 32 (root map: 1), the deepest allowed",
            "envelope_hex": s(variant(zz=nested_list(31))),
            "card": card_to_json(MINIMAL),
        },
        {
            "name": "last_valid_millisecond",
            "description": "checked at expires_at - 1: still valid (expires_at is exclusive)",
            "envelope_hex": good.hex(),
            "card": card_to_json(MINIMAL),
            "now_ms": MINIMAL.expires_at - 1,
        },
        {
            "name": "issued_at_skew_limit",
            "description": "issued_at = now + 60 000 ms exactly (the clock skew bound is inclusive)",
            "envelope_hex": good.hex(),
            "card": card_to_json(MINIMAL),
            "now_ms": MINIMAL.issued_at - C.MAX_CLOCK_SKEW_MS,
        },
    ]
    invalid: list[tuple[str, str, str, str] | tuple[str, str, str, str, int]] = [
        (
            "forged",
            "card of the seed key, signed by another key",
            signed(body, OTHER).hex(),
            "signature does not match",
        ),
        (
            "tampered",
            "one bit of the signed body changed after signing",
            C.encode_envelope(bytes(tampered), KEY.sign(C.signing_input(body))).hex(),
            "signature does not match",
        ),
        ("expired", "checked at its expires_at", good.hex(), "expired", MINIMAL.expires_at),
        (
            "future",
            "issued 60 001 ms after now: one past the clock skew bound",
            good.hex(),
            "issued in the future",
            MINIMAL.issued_at - C.MAX_CLOCK_SKEW_MS - 1,
        ),
        (
            "oversized",
            "envelope of 16385 bytes",
            (good + b"\x00" * (C.MAX_CARD_SIZE + 1))[: C.MAX_CARD_SIZE + 1].hex(),
            "exceeds",
        ),
        (
            "oversized_signed",
            "a correctly signed card whose envelope exceeds 16 384 bytes",
            signed(big).hex(),
            "exceeds",
        ),
        ("unsorted_envelope", "envelope keys out of order", unsorted_env.hex(), "not canonically encoded"),
        ("wide_int", "seq 1 as uint8: not the shortest form", signed(wide).hex(), "not canonically encoded"),
        ("float", "a float in the card", s(variant(zz=1.5)), "float"),
        ("nil_field", "nil as the value of an unknown field", s(variant(zz=None)), "NoneType"),
        (
            "nil_optional",
            "nil as the value of an optional capability field",
            s(cap_variant(description=None)),
            "NoneType",
        ),
        ("nil_in_envelope", "nil as the signature", raw_pack({"card": body, "sig": None}).hex(), "NoneType"),
        (
            "ext_type",
            "a msgpack extension type in the card",
            s(variant(zz=msgpack.ExtType(1, b"x"))),
            "extension type",
        ),
        (
            "timestamp",
            "a msgpack timestamp (extension type -1) in the card",
            s(variant(zz=msgpack.Timestamp(1))),
            "extension type",
        ),
        (
            "depth_33",
            "an unknown field nesting arrays to depth 33, one past the limit",
            s(variant(zz=nested_list(32))),
            "nesting deeper than 32",
        ),
        ("version_2", "unknown card version", s(variant(v=2)), "unsupported card version"),
        (
            "lifetime_too_long",
            "expires 86 400 001 ms after issue, one past the longest lifetime",
            s(variant(expires_at=NOW + C.MAX_TTL_MS + 1)),
            "lifetime",
        ),
        (
            "lifetime_too_short",
            "expires 999 ms after issue, one below the shortest lifetime",
            s(variant(expires_at=NOW + C.MIN_TTL_MS - 1)),
            "lifetime",
        ),
        ("no_tasks", "a capability without tasks", s(cap_variant(tasks=[])), "must not be empty"),
        (
            "dup_caps",
            "two capabilities with the same name",
            s(variant(caps=[cap_of("echo"), cap_of("echo")])),
            "unique",
        ),
        (
            "caps_differ_only_by_case",
            "capabilities 'Echo' and 'echo': the same capability_key",
            s(variant(caps=[cap_of("Echo"), cap_of("echo")])),
            "unique after normalize",
        ),
        (
            "blank_name",
            "a capability name of white space only",
            s(variant(caps=[cap_of("\u3000 ")])),
            "white space",
        ),
        (
            "unsorted_caps",
            "capabilities not sorted by name",
            s(variant(caps=[cap_of("b"), cap_of("a")])),
            "sorted",
        ),
        ("too_many_tags", "17 tags", s(cap_variant(tags=[f"t{i}" for i in range(17)])), "more than 16"),
        (
            "sixty_five_keys",
            "a card deriving 65 provider keys, one past the limit",
            signed(sixty_five_body).hex(),
            "DHT keys",
        ),
        (
            "empty_description",
            "an optional text field present but empty",
            s(cap_variant(description="")),
            "omit it",
        ),
        ("empty_license", "an optional text field present but empty", s(cap_variant(license="")), "omit it"),
        ("empty_tags", "an optional array present but empty", s(cap_variant(tags=[])), "omit it"),
        ("empty_languages", "an optional array present but empty", s(cap_variant(languages=[])), "omit it"),
        (
            "idempotent_false",
            "idempotent present with its default, false",
            s(cap_variant(idempotent=False)),
            "omit it",
        ),
        ("access_public", "access present with its default", s(cap_variant(access="public")), "access"),
        ("access_unknown", "an access policy that does not exist", s(cap_variant(access="paid")), "access"),
        (
            "schema_not_canonical",
            "input_schema as JSON text with spaces (canonical is compact with sorted keys)",
            s(cap_variant(input_schema='{"type": "string"}')),
            "not canonical JSON",
        ),
        (
            "schema_unsorted",
            "params_schema as JSON text with keys out of order",
            s(cap_variant(params_schema='{"type":"object","properties":{}}')),
            "not canonical JSON",
        ),
        (
            "schema_too_deep",
            "input_schema nesting 33 deep",
            s(cap_variant(input_schema='{"a":' * 33 + "1" + "}" * 33)),
            "nests deeper",
        ),
        (
            "p2p_addr",
            "an address ending with /p2p/<peer id>",
            s(variant(addrs=[C.multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{PID}").to_bytes()])),
            "must not end with /p2p/",
        ),
        ("bad_addr", "an address that is not a binary multiaddr", s(variant(addrs=[b"\x00"])), "not a valid"),
        (
            "addr_not_minimal",
            "/ip4/127.0.0.1/tcp/4001 with the protocol code 4 as a 2-byte varint",
            s(variant(addrs=[b"\x84\x00\x7f\x00\x00\x01\x06\x0f\xa1"])),
            "canonical binary form",
        ),
        (
            "non_ed25519_peer",
            "peer is a sha2-256 multihash (an RSA key's peer id)",
            s(variant(peer=non_ed25519)),
            "Ed25519",
        ),
        (
            "extra_envelope_key",
            "envelope with a third key",
            raw_pack({"card": body, "sig": KEY.sign(C.signing_input(body)), "x": 1}).hex(),
            "exactly the keys",
        ),
    ]
    for name, amount, why in [
        ("cost_spaces", " 1 ", "white space around the number"),
        ("cost_underscore", "1_0", "a digit separator"),
        ("cost_arabic_digit", "\u0661", "a non-ASCII digit"),
        ("cost_leading_zero", "01", "a leading zero"),
        ("cost_trailing_dot", "1.", "a dot without digits after it"),
        ("cost_leading_dot", ".5", "a dot without digits before it"),
        ("cost_exponent", "1e3", "an exponent"),
        ("cost_negative", "-1", "a sign"),
        ("cost_plus", "+1", "a sign"),
        ("cost_nan", "NaN", "not a number"),
        ("cost_19_digits", "1" + "0" * 18, "19 integer digits, one past 18"),
        ("cost_19_decimals", "0." + "1" * 19, "19 fraction digits, one past 18"),
    ]:
        cost = {"amount": amount, "currency": "USD", "per": "request"}
        invalid.append((name, f"cost amount {amount!r}: {why}", s(cap_variant(cost=cost)), "cost amount"))
    accepted.append(
        {
            "name": "cost_amount_limits",
            "description": "cost amount of 18 integer and 18 fraction digits, the longest allowed",
            "envelope_hex": s(
                cap_variant(cost={"amount": "9" * 18 + "." + "0" * 18, "currency": "USD", "per": "request"})
            ),
            "card": card_to_json(
                CapabilityCard(
                    PID,
                    MINIMAL.addrs,
                    1,
                    NOW,
                    NOW + 300_000,
                    (
                        Capability(
                            "echo", version="1.0", cost=CostHint("9" * 18 + "." + "0" * 18, "USD", "request")
                        ),
                    ),
                )
            ),
        }
    )
    key_cases = [
        ("task", ["chat"]),
        ("task", ["  Chat "]),
        ("task", ["\uff23\uff28\uff21\uff34"]),  # fullwidth CHAT: NFKC gives "CHAT"
        ("task", ["\u3000chat\u00a0\u2028"]),  # Unicode white space around
        ("task", ["\x1fchat"]),  # U+001F is not White_Space: kept
        ("model", ["llama3-8b-chat"]),
        ("model", ["Llama3-8B-Chat"]),
        ("model-version", ["llama3-8b-chat", "3.1-q4"]),
        ("tag", ["fast"]),
        ("tag", ["Caf\u00e9"]),
        ("tag", ["Cafe\u0301"]),
        ("tag", ["CAF\u00c9"]),  # only A-Z are lowercased: "caf\u00c9", another key
        ("tag", ["\ufb01ne"]),  # the fi ligature: NFKC gives "fine"
        ("tag", ["\u2150"]),  # unassigned in Unicode 3.2: unchanged
    ]
    normalize_cases = [
        "  Chat ",
        "\uff23\uff28\uff21\uff34",
        "\u3000chat\u00a0\u2028",
        "\x1fchat",
        "\x85x\u1680",
        "Llama3-8B",
        "Caf\u00e9",
        "Cafe\u0301",
        "CAF\u00c9",
        "\u00c9COLE",
        "\ufb01ne",
        "\u210cello",
        "W\u030a",
        "\uff37\u030a",
        "\u2150",
        "\U0001f916 bot",
        "\u0130stanbul",
        "\u03a3\u039f\u03a6\u0399\u0391",
        "\t \n",
    ]
    return {
        "spec": "specs/capability.md",
        "description": (
            "Test vectors for capability cards v1. 'identity.seed_hex' is the 32-byte Ed25519 seed that "
            "signs every card (Ed25519 signatures are deterministic). 'valid': body_hex is exactly "
            "encode_card(card), "
            "signature_hex the signature over signing_domain + body, envelope_hex the stored value, keys the "
            "provider keys in announce order; each is valid at now_ms = issued_at. 'accepted': envelopes a "
            "decoder must accept although an encoder does not produce them (checked at now_ms when given). "
            "'invalid': envelopes a decoder must reject (checked at now_ms when given, else with no time "
            "check); error is a substring of the reference implementation's message. 'provider_keys': key "
            "derivation, including normalization. 'normalize': normalize(input) = output."
        ),
        "signing_domain": C.SIGNING_DOMAIN.decode(),
        "key_domain": C.KEY_DOMAIN.decode(),
        "value_namespace": C.VALUE_NAMESPACE,
        "max_card_size": C.MAX_CARD_SIZE,
        "identity": {
            "seed_hex": SEED_HEX,
            "public_key_hex": KEY.public_key_bytes.hex(),
            "peer_id": PID,
            "value_key": C.value_key(PID),
        },
        "other_identity": {"seed_hex": OTHER_SEED_HEX, "peer_id": str(OTHER.peer_id)},
        "valid": valid,
        "accepted": accepted,
        "invalid": [
            {
                "name": v[0],
                "description": v[1],
                "envelope_hex": v[2],
                "error": v[3],
                **({"now_ms": v[4]} if len(v) > 4 else {}),
            }
            for v in invalid
        ],
        "provider_keys": [
            {"kind": kind, "parts": parts, "key_hex": C.provider_key(kind, *parts).hex()}
            for kind, parts in key_cases
        ],
        "normalize": [{"input": text, "output": normalize(text)} for text in normalize_cases],
    }


# -- vectors -------------------------------------------------------------------------


def test_vector_file_matches_the_code() -> None:
    assert build_vectors() == VECTORS, "run: python tests/test_card.py"


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
    opened = C.open_card(bytes.fromhex(vector["envelope_hex"]), now_ms=vector.get("now_ms"))
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


@pytest.mark.parametrize("vector", VECTORS["normalize"], ids=lambda v: ascii(v["input"]))
def test_normalize_vectors(vector: dict[str, str]) -> None:
    assert normalize(vector["input"]) == vector["output"]
    assert capability_key(vector["input"]) == vector["output"]


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


def test_optional_fields_are_written_only_when_set() -> None:
    bare = msgpack.unpackb(C.encode_card(MINIMAL))["caps"][0]
    assert set(bare) == {"name", "tasks", "version"}
    empty = Capability(
        "echo", version="", description="", tags=(), languages=[], license="", idempotent=False
    )
    cap_map = msgpack.unpackb(C.encode_card(CapabilityCard(PID, (), 1, NOW, NOW + 60_000, (empty,))))["caps"][
        0
    ]
    assert cap_map == {"name": "echo", "tasks": ["text-generation"], "version": ""}  # version is required


@pytest.mark.parametrize(
    "amount",
    ["0", "7", "0.5", "10.25", "0.000000000000000001", "9" * 18, "9" * 18 + "." + "9" * 18, "1.50"],
)
def test_cost_amounts_in_the_grammar(amount: str) -> None:
    assert CostHint(amount).amount == amount
    C.check_capability(Capability("a", cost=CostHint(amount)))


@pytest.mark.parametrize(
    "amount",
    [
        " 1 ",
        "1 ",
        "1_0",
        "\u0661",
        "\uff11",
        "01",
        "00",
        "1.",
        ".5",
        "1e3",
        "1E3",
        "-1",
        "+1",
        "NaN",
        "Infinity",
        "1" + "0" * 18,
        "0." + "1" * 19,
        "",
        "1,5",
        "0x10",
    ],
)
def test_cost_amounts_outside_the_grammar(amount: str) -> None:
    with pytest.raises(ConfigError, match="cost amount"):
        CostHint(amount)


def test_cost_amounts_from_numbers() -> None:
    assert CostHint(3).amount == "3"  # type: ignore[arg-type]
    assert CostHint(0.5).amount == "0.5"  # type: ignore[arg-type]
    assert CostHint(1e-7).amount == "0.0000001"  # type: ignore[arg-type]
    assert CostHint(2.0).amount == "2"  # type: ignore[arg-type]
    for bad in (-1, 1e19, float("inf"), True):
        with pytest.raises(ConfigError):
            CostHint(bad)  # type: ignore[arg-type]


def test_the_key_limit_is_checked_by_the_codec() -> None:
    ok = CapabilityCard(PID, (), 1, NOW, NOW + 60_000, SIXTY_FOUR_KEYS)
    assert len(C.card_keys(ok.capabilities)) == C.MAX_PROVIDER_KEYS
    C.parse_card(C.encode_card(ok))
    extra = Capability("zz", task="task-0")  # adds the model and model-version keys: 66
    with pytest.raises(ProtocolError, match="DHT keys"):
        C.encode_card(CapabilityCard(PID, (), 1, NOW, NOW + 60_000, (*SIXTY_FOUR_KEYS, extra)))


def test_names_that_normalize_alike_collide() -> None:
    card = CapabilityCard(PID, (), 1, NOW, NOW + 60_000, (Capability("Echo"), Capability("echo")))
    with pytest.raises(ProtocolError, match="unique after normalize"):
        C.encode_card(card)
    for blank in ("", " ", "\u3000\t"):
        with pytest.raises(ConfigError, match="white space"):
            Capability(blank)


def test_deep_json_schema_is_a_protocol_error() -> None:
    for schema in ('{"a":' + "[" * 2000 + "]" * 2000 + "}", '{"a":' * 33 + "1" + "}" * 33):
        cap = {"input_schema": schema, "name": "echo", "tasks": ["text-generation"], "version": "1.0"}
        body = msgpack.unpackb(C.encode_card(MINIMAL))
        body["caps"] = [cap]
        with pytest.raises(ProtocolError, match="input_schema"):
            C.parse_card(raw_pack(body))


def test_timestamps_and_lifetimes_at_their_bounds() -> None:
    card = C.seal(CapabilityCard(PID, (), 1, NOW, NOW + C.MIN_TTL_MS, ()), KEY)
    C.open_card(card.envelope, now_ms=NOW + C.MIN_TTL_MS - 1)
    with pytest.raises(ProtocolError, match="expired"):
        C.open_card(card.envelope, now_ms=NOW + C.MIN_TTL_MS)
    C.open_card(card.envelope, now_ms=NOW - C.MAX_CLOCK_SKEW_MS)
    with pytest.raises(ProtocolError, match="future"):
        C.open_card(card.envelope, now_ms=NOW - C.MAX_CLOCK_SKEW_MS - 1)
    C.seal(CapabilityCard(PID, (), 1, NOW, NOW + C.MAX_TTL_MS, ()), KEY)
    for ttl in (C.MIN_TTL_MS - 1, C.MAX_TTL_MS + 1):
        with pytest.raises(ProtocolError, match="lifetime"):
            C.encode_card(CapabilityCard(PID, (), 1, NOW, NOW + ttl, ()))


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


if __name__ == "__main__":
    VECTORS_PATH.write_text(
        json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    print(f"wrote {VECTORS_PATH}")

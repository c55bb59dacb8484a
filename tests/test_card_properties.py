"""Property tests of the capability card codec (``modelnet_p2p.proto.card``) and of ``normalize()``.

Round trips, one encoding per card, rejection of forged, tampered, expired,
oversized and correctly signed nonsensical cards, and the definition of
``normalize`` (``specs/capability.md``). The fixed vectors are in ``test_card.py``.
No network here.
"""

from __future__ import annotations

import string
import unicodedata
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import any_values
from test_card import FULL, KEY, NOW, OTHER, raw_pack, signed

from modelnet_p2p import Capability, CapabilityCard, CostHint, ProtocolError
from modelnet_p2p.proto import card as C
from modelnet_p2p.proto.capability import WHITE_SPACE, capability_key, normalize

token = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: len(s.encode()) <= C.MAX_TOKEN_LEN
)
tokens = st.lists(token, max_size=4, unique=True).map(tuple)
capability = st.builds(
    Capability,
    name=st.text(min_size=1, max_size=20).filter(capability_key),
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
    caps = draw(st.lists(capability, max_size=3, unique_by=lambda c: capability_key(c.name)))
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


_CAP_FIELDS = [*msgpack.unpackb(C.encode_card(FULL))["caps"][1], "idempotent", "zz"]
_CARD_FIELDS = ["v", "peer", "addrs", "seq", "issued_at", "expires_at", "caps", "zz"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_correctly_signed_nonsense_only_raises_protocol_error(data: st.DataObject) -> None:
    body: dict[str, Any] = msgpack.unpackb(C.encode_card(FULL))
    for _ in range(data.draw(st.integers(1, 3))):
        caps = body.get("caps")
        if (
            isinstance(caps, list)
            and len(caps) == 2
            and all(isinstance(c, dict) for c in caps)
            and data.draw(st.booleans())
        ):
            value = data.draw(any_values)  # drawn first, as the one-line assignment did
            caps[data.draw(st.integers(0, 1))][data.draw(st.sampled_from(_CAP_FIELDS))] = value
        else:
            body[data.draw(st.sampled_from(_CARD_FIELDS))] = data.draw(
                any_values | st.lists(st.binary(max_size=40))
            )
    try:
        C.open_card(signed(raw_pack(body)), now_ms=NOW)
    except ProtocolError:
        pass


@SETTINGS
@given(st.text(max_size=30))
def test_normalize_is_idempotent_and_follows_its_definition(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    ucd = unicodedata.ucd_3_2_0
    lower = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
    assert once == ucd.normalize("NFKC", ucd.normalize("NFKC", text).translate(lower)).strip(WHITE_SPACE)
    assert not any(c in string.ascii_uppercase for c in once)


def test_white_space_is_the_unicode_property() -> None:
    assert len(WHITE_SPACE) == 25
    # Python's isspace() also counts U+001C-U+001F (information separators); White_Space does not.
    assert {c for c in map(chr, range(0x3100)) if c.isspace()} - set(WHITE_SPACE) == {
        "\x1c",
        "\x1d",
        "\x1e",
        "\x1f",
    }
    assert set(WHITE_SPACE) <= {c for c in map(chr, range(0x3100)) if c.isspace()}

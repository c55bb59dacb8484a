"""``modelnet_p2p.proto.peerid`` (peer ids without libp2p) agrees with libp2p's ``ID``.

The codec itself imports no libp2p; these tests do, to check that both give
the same bytes and text for random keys, and that the strict parser refuses
what it must.
"""

from __future__ import annotations

import hashlib

import base58
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from modelnet_p2p import Identity, ProtocolError
from modelnet_p2p.proto import peerid as P

SEEDS = st.binary(min_size=32, max_size=32)
PROPS = settings(max_examples=200, deadline=None)


def libp2p_id(seed: bytes) -> ID:
    return ID.from_pubkey(create_new_key_pair(seed).public_key)


@PROPS
@given(SEEDS)
def test_peer_id_matches_libp2p(seed: bytes) -> None:
    pid = libp2p_id(seed)
    public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    raw = P.peer_id_from_public_key(public)
    assert raw == pid.to_bytes()
    assert P.b58encode(raw) == pid.to_base58() == str(pid)
    assert P.peer_id_text(raw) == str(pid)
    assert P.parse_peer_id(str(pid)) == raw
    assert P.ed25519_public_key(raw) == public
    extracted = pid.extract_public_key()
    assert isinstance(extracted, Libp2pEd25519PublicKey) and extracted.to_bytes() == public


@PROPS
@given(st.binary(max_size=80))
def test_base58_matches_the_reference_library(data: bytes) -> None:
    text = P.b58encode(data)
    assert text == base58.b58encode(data).decode()
    assert P.b58decode(text) == data


@PROPS
@given(SEEDS, st.binary(max_size=200))
def test_signatures_verify_like_identity(seed: bytes, data: bytes) -> None:
    ident = Identity(ed25519.Ed25519PrivateKey.from_private_bytes(seed))
    sig = ident.sign(data)
    text = str(ident.peer_id)
    assert P.verify_signature(text, data, sig)
    assert P.verify_signature(ident.peer_id.to_bytes(), data, sig)
    assert not P.verify_signature(text, data + b"x", sig)
    assert not P.verify_signature(text, data, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not P.verify_signature(text, data, sig[:63])


def test_the_ed25519_layout() -> None:
    public = bytes(range(32))
    raw = P.peer_id_from_public_key(public)
    assert raw.hex() == "002408011220" + public.hex()
    assert len(raw) == P.ED25519_PEER_ID_LEN == 38
    assert P.b58encode(raw).startswith("12D3KooW")
    with pytest.raises(ValueError):
        P.peer_id_from_public_key(public[:31])


GOOD = str(libp2p_id(bytes(32)))


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "characters"),
        (" " + GOOD, "base58btc character"),
        (GOOD + "\n", "base58btc character"),
        (GOOD.replace("K", "0", 1), "base58btc character"),
        ("O" + GOOD[1:], "base58btc character"),
        ("1" + GOOD, "Ed25519"),  # a leading zero byte: no longer an identity multihash of 36 bytes
        (GOOD[:-1], "Ed25519"),
        ("1" * 89, "characters"),
        # a sha2-256 multihash peer id (an RSA key's form): no key inside
        (base58.b58encode(b"\x12\x20" + hashlib.sha256(b"rsa key").digest()).decode(), "identity multihash"),
        # a secp256k1 key (KeyType 2) in an identity multihash
        (base58.b58encode(bytes.fromhex("002508021221") + b"\x02" * 33).decode(), "Ed25519"),
        # Ed25519 type but a 31-byte key
        (base58.b58encode(bytes.fromhex("00230801121f") + b"\x07" * 31).decode(), "Ed25519"),
    ],
)
def test_strict_parser_refuses(text: str, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        P.parse_peer_id(text)
    assert not P.verify_signature(text, b"", b"\0" * 64)


def test_libp2p_is_more_lenient_than_the_strict_parser() -> None:
    # What the strict parser refuses, libp2p takes: so codecs must not rely on it.
    assert ID.from_base58(GOOD + "\n") == ID.from_base58(GOOD)
    ID(b"\x12\x20" + bytes(32))  # any bytes make an ID


def test_wrong_types_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError):
        P.parse_peer_id(b"12D3" * 10)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        P.ed25519_public_key("text")  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        P.ed25519_public_key(b"")
    assert not P.verify_signature(42, b"", b"")  # type: ignore[arg-type]


@PROPS
@given(st.text(max_size=60))
def test_any_text_parses_or_raises_protocol_error(text: str) -> None:
    try:
        raw = P.parse_peer_id(text)
    except ProtocolError:
        return
    assert P.b58encode(raw) == text and len(raw) == 38

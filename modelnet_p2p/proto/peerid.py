"""libp2p peer ids of Ed25519 keys, without libp2p: base58btc text, binary form, signatures.

A libp2p peer id is a `multihash`_ of the peer's public key, serialized as the
protobuf message ``PublicKey { KeyType Type = 1; bytes Data = 2; }``. For an
Ed25519 key that message is 36 bytes (``08 01 12 20`` and the 32-byte key),
short enough to be embedded whole with the *identity* multihash (code
``0x00``), so an Ed25519 peer id is always these 38 bytes::

    00 24 08 01 12 20 <32-byte Ed25519 public key>

and its text form is the base58btc encoding of them (``12D3KooW...``, 52
characters). Because the key is inside the id, a signature can be checked
against a peer id alone. This is what the specs of ``specs/`` mean by a peer
id: modelnet version 1 supports Ed25519 identities only, and the parsers here
reject anything else (RSA, secp256k1 or ECDSA keys, sha2-256 multihashes,
non-minimal protobuf or varint encodings).

Text is parsed strictly: only the 58 characters of the Bitcoin base58
alphabet, no white space, no padding, and the text must be exactly what
encoding the decoded bytes gives back (base58 has one encoding per byte
string; the check also rules out an empty string).

Pure code: no I/O, no clock; the signature check uses ``cryptography``.

.. _multihash: https://github.com/multiformats/multihash
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..errors import ProtocolError
from .limits import MAX_PEER_ID_LEN, SIGNATURE_LEN

__all__ = [
    "B58_ALPHABET",
    "ED25519_PEER_ID_LEN",
    "ED25519_PEER_ID_PREFIX",
    "b58decode",
    "b58encode",
    "ed25519_public_key",
    "parse_peer_id",
    "peer_id_bytes",
    "peer_id_from_public_key",
    "peer_id_text",
    "verify_signature",
]

#: The Bitcoin base58 alphabet (base58btc): no ``0``, ``O``, ``I`` or ``l``.
B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(B58_ALPHABET)}
#: Identity multihash (``00``) of length 36 (``24``) of the protobuf
#: ``PublicKey`` with ``Type`` = Ed25519 (``08 01``) and 32 bytes of ``Data`` (``12 20``).
ED25519_PEER_ID_PREFIX = bytes.fromhex("002408011220")
#: Length of an Ed25519 peer id in bytes.
ED25519_PEER_ID_LEN = len(ED25519_PEER_ID_PREFIX) + 32
#: Longest peer id text accepted before decoding: base58 of :data:`MAX_PEER_ID_LEN`
#: bytes is at most 88 characters. Bounds the (quadratic) decoder's work.
_MAX_TEXT_LEN = 88


def b58encode(data: bytes) -> str:
    """base58btc text of ``data``: each leading zero byte is a ``1``, the rest a base-58 number."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(B58_ALPHABET[r])
    return "1" * zeros + "".join(reversed(digits))


def b58decode(text: str) -> bytes:
    """The bytes of base58btc ``text``; raises :class:`ProtocolError` for any other character."""
    n = 0
    for ch in text:
        digit = _B58_INDEX.get(ch)
        if digit is None:
            raise ProtocolError(f"{ch!r} is not a base58btc character")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


def ed25519_public_key(peer_id: bytes) -> bytes:
    """The raw 32-byte Ed25519 public key inside a binary peer id.

    Raises :class:`ProtocolError` unless ``peer_id`` is exactly an identity
    multihash of an Ed25519 ``PublicKey`` (:data:`ED25519_PEER_ID_PREFIX` and 32 bytes).
    """
    if not isinstance(peer_id, bytes | bytearray):
        raise ProtocolError("a binary peer id must be bytes")
    if not 0 < len(peer_id) <= MAX_PEER_ID_LEN:
        raise ProtocolError(f"a peer id must be 1-{MAX_PEER_ID_LEN} bytes")
    if peer_id[:1] != b"\x00":
        raise ProtocolError("peer id is not an identity multihash (only Ed25519 ids are supported)")
    if len(peer_id) != ED25519_PEER_ID_LEN or peer_id[:6] != ED25519_PEER_ID_PREFIX:
        raise ProtocolError("peer id does not embed an Ed25519 public key")
    return bytes(peer_id[6:])


def parse_peer_id(text: str) -> bytes:
    """The binary form of peer id ``text``, strictly: canonical base58btc of an Ed25519 peer id."""
    if not isinstance(text, str):
        raise ProtocolError("a peer id must be text")
    if not 0 < len(text) <= _MAX_TEXT_LEN:
        raise ProtocolError(f"a peer id must be 1-{_MAX_TEXT_LEN} characters")
    raw = b58decode(text)
    if b58encode(raw) != text:
        raise ProtocolError("peer id is not canonical base58btc")
    ed25519_public_key(raw)
    return raw


def peer_id_text(peer_id: bytes) -> str:
    """The text form of a binary peer id, after checking that it is an Ed25519 peer id."""
    ed25519_public_key(peer_id)
    return b58encode(bytes(peer_id))


def peer_id_bytes(peer_id: str | bytes) -> bytes:
    """A peer id given as text or bytes, checked, as bytes."""
    if isinstance(peer_id, str):
        return parse_peer_id(peer_id)
    ed25519_public_key(peer_id)
    return bytes(peer_id)


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """The binary peer id of a raw 32-byte Ed25519 public key (what libp2p's ``ID.from_pubkey`` gives)."""
    if not isinstance(public_key, bytes | bytearray) or len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return ED25519_PEER_ID_PREFIX + bytes(public_key)


def verify_signature(peer_id: str | bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``data`` by the key inside ``peer_id``.

    ``peer_id`` is the text or binary form. Returns ``False``, never raises,
    for a bad signature, a malformed peer id, or a peer id that does not embed
    an Ed25519 key.
    """
    try:
        key = ed25519_public_key(peer_id_bytes(peer_id))
    except ProtocolError:
        return False
    if not isinstance(signature, bytes | bytearray) or len(signature) != SIGNATURE_LEN:
        return False
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(bytes(signature), bytes(data))
    except (InvalidSignature, ValueError):
        return False
    return True

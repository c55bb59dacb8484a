"""The signed envelope shared by capability cards and availability records.

An envelope is the canonical msgpack map (see :mod:`modelnet_p2p.proto.packing`)

    ``{<body key>: bin(body), "sig": bin(64-byte Ed25519 signature)}``

with exactly these two keys. The body is itself a canonical msgpack map, and
the signature covers ``domain || body``, made with the identity key of the
peer the body names. The domain names the record type, so a signature of one
type can never be replayed as another (or as any other signature the key
makes: libp2p peer records, pubsub messages, Noise handshakes).

One :class:`EnvelopeFormat` per record type fixes the body key, the domain,
the size limit and whether the body may hold floats:

* capability cards (``specs/capability.md``): body key ``card``, domain
  ``modelnet-capability-card/1:``, 16 KiB, no floats;
* availability records (``specs/availability.md``): body key ``rec``, domain
  ``modelnet-availability-record/1:``, 4 KiB, float64 allowed.

Everything else is the same for both, which is the point of this module: no
nil, no extension types, nesting of at most
:data:`~modelnet_p2p.proto.limits.MAX_DEPTH`, and one encoding per value.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ProtocolError
from .limits import SIGNATURE_LEN
from .packing import canonical_packb, unpack_canonical
from .peerid import verify_signature

__all__ = [
    "EnvelopeFormat",
    "Signer",
    "decode_body",
    "encode_envelope",
    "open_envelope",
    "seal_body",
    "signing_input",
    "verify_body",
]


class Signer(Protocol):
    """What sealing needs of an identity (a :class:`~modelnet_p2p.Identity` fits).

    ``str(peer_id)`` must be the peer id's base58btc text.
    """

    @property
    def peer_id(self) -> object: ...

    def sign(self, data: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class EnvelopeFormat:
    """The parameters of one record type's envelope.

    Attributes:
        what: the record type in error messages (``"card"``).
        body_key: the envelope key holding the body (``"card"``, ``"rec"``).
        domain: the bytes prepended to the body before signing.
        max_size: the largest envelope accepted or produced, in bytes; a body
            is at most this large too.
        allow_float: whether the body may hold floats (encoded as float64).
    """

    what: str
    body_key: str
    domain: bytes
    max_size: int
    allow_float: bool = False


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def signing_input(fmt: EnvelopeFormat, body: bytes) -> bytes:
    """Exactly what the signature covers: ``fmt.domain`` followed by the body."""
    return fmt.domain + body


def encode_envelope(fmt: EnvelopeFormat, body: bytes, signature: bytes) -> bytes:
    """Assemble an envelope from a body and a signature (no checks: for tools and tests)."""
    return canonical_packb({fmt.body_key: body, "sig": signature})


def decode_body(fmt: EnvelopeFormat, body: bytes) -> dict[str, Any]:
    """Decode a body: a canonical msgpack map of at most ``fmt.max_size`` bytes."""
    _need(
        len(body) <= fmt.max_size,
        f"{fmt.what} body of {len(body)} bytes exceeds {fmt.max_size} bytes",
    )
    return unpack_canonical(body, fmt.what, allow_float=fmt.allow_float)


def seal_body(fmt: EnvelopeFormat, body: bytes, signer: Signer) -> bytes:
    """Sign ``body`` with ``signer`` and return the envelope, or raise if it exceeds ``fmt.max_size``."""
    data = encode_envelope(fmt, body, signer.sign(signing_input(fmt, body)))
    _need(len(data) <= fmt.max_size, f"{fmt.what} of {len(data)} bytes exceeds {fmt.max_size} bytes")
    return data


def open_envelope(fmt: EnvelopeFormat, data: bytes | bytearray) -> tuple[bytes, bytes]:
    """Split an envelope into ``(body, signature)``; the signature is not checked here.

    Raises :class:`ProtocolError` naming the first rule broken: not bytes,
    larger than ``fmt.max_size`` (checked before decoding), not a canonical
    map, keys other than exactly ``fmt.body_key`` and ``sig``, a body that is
    not ``bin``, or a signature that is not 64 bytes.
    """
    _need(isinstance(data, bytes | bytearray), f"a {fmt.what} must be bytes")
    _need(len(data) <= fmt.max_size, f"{fmt.what} of {len(data)} bytes exceeds {fmt.max_size} bytes")
    env = unpack_canonical(bytes(data), "envelope")
    _need(
        set(env) == {fmt.body_key, "sig"},
        f"envelope must have exactly the keys {fmt.body_key!r} and 'sig'",
    )
    body, sig = env[fmt.body_key], env["sig"]
    _need(isinstance(body, bytes), f"envelope field {fmt.body_key!r} must be bytes")
    _need(
        isinstance(sig, bytes) and len(sig) == SIGNATURE_LEN,
        f"envelope field 'sig' must be {SIGNATURE_LEN} bytes",
    )
    return body, sig


def verify_body(fmt: EnvelopeFormat, peer_id: bytes | str, body: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``peer_id``'s signature of ``fmt.domain || body``."""
    return verify_signature(peer_id, signing_input(fmt, body), signature)

"""What the tests that build or check the vectors of specs/vectors/ share: Ed25519 signers with
fixed keys, and msgpack written without the canonical encoder's checks."""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelnet_p2p.proto.peerid import peer_id_from_public_key, peer_id_text


class KeySigner:
    """An Ed25519 signer whose seed is the SHA-256 of a label (what the vectors use), with a
    text peer id."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.key = ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())
        pub = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id = peer_id_text(peer_id_from_public_key(pub))

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def raw_pack(obj: Any) -> bytes:
    """msgpack with keys sorted, but no checks: for vectors holding what the canonical encoder refuses."""

    def order(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: order(o[k]) for k in sorted(o, key=lambda k: k.encode())}
        if isinstance(o, list):
            return [order(v) for v in o]
        return o

    return msgpack.packb(order(obj), use_bin_type=True)


def nested_list(depth: int) -> Any:
    """Lists nested ``depth`` deep: as a value of the body map, the innermost sits at ``depth + 1``."""
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value

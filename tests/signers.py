"""Ed25519 signers with fixed keys, for the tests that build or check signed vectors."""

from __future__ import annotations

import hashlib

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

"""Wire limits shared by more than one protocol of ``specs/``.

A limit used by one record type only lives with its codec (for example
:data:`~modelnet_p2p.proto.card.MAX_CARD_SIZE`); the ones here appear in
several specs and must agree across them, so they are written once.

Pure constants: no I/O, no clock.
"""

from __future__ import annotations

__all__ = [
    "MAX_CAPABILITY_LEN",
    "MAX_CONTAINERS",
    "MAX_DEPTH",
    "MAX_PEER_ID_LEN",
    "MAX_SEQ",
    "MAX_UINT32",
    "MAX_VERSION_LEN",
    "SIGNATURE_LEN",
]

#: Longest capability name, in UTF-8 bytes: the ``cap`` of an inference request
#: (``specs/inference.md``), the ``name`` of a card's capability
#: (``specs/capability.md``) and of an availability record's ``caps`` entry
#: (``specs/availability.md``). Names are identifiers that humans type; 256
#: bytes holds any model name seen in the wild (the longest Hugging Face repo
#: ids are around 100 bytes) with room for an organisation prefix.
MAX_CAPABILITY_LEN = 256
#: Longest capability version, in UTF-8 bytes (cards and availability records).
MAX_VERSION_LEN = 64
#: Longest binary peer id, in bytes. An Ed25519 peer id is 38 bytes (identity
#: multihash of a 36-byte protobuf public key); 64 leaves room for other
#: identity multihashes without accepting arbitrary blobs.
MAX_PEER_ID_LEN = 64
#: Ed25519 signatures are 64 bytes (RFC 8032).
SIGNATURE_LEN = 64
#: Sequence numbers and millisecond timestamps are unsigned 64-bit integers.
MAX_SEQ = 2**64 - 1
#: Largest unsigned 32-bit integer (counters, latencies, lengths).
MAX_UINT32 = 2**32 - 1
#: Deepest nesting of msgpack maps and arrays in one decoded value; the root
#: counts as depth 1. See :mod:`modelnet_p2p.proto.packing` for the reasons.
MAX_DEPTH = 32
#: Most msgpack maps plus arrays in one decoded value.
MAX_CONTAINERS = 65_536

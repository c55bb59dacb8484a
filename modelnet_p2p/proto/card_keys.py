"""The DHT keys of capability cards (see ``specs/capability.md``, "DHT records").

A card is stored as a DHT value under ``/modelnet-card/<peer id>`` and
announced under one provider key per task, model, model and version, and tag
of its capabilities. Every part of a provider key is :func:`normalize`\\ d
first, so ``"  Chat "`` and ``"chat"`` are the same key.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from ..errors import ProtocolError
from .capability import Capability, normalize
from .framing import encode_varint

__all__ = [
    "KEY_DOMAIN",
    "MAX_PROVIDER_KEYS",
    "VALUE_NAMESPACE",
    "card_keys",
    "model_key",
    "model_version_key",
    "peer_of_value_key",
    "provider_key",
    "tag_key",
    "task_key",
    "value_key",
]

#: The DHT namespace of stored cards: a card lives under ``/modelnet-card/<peer id>``.
VALUE_NAMESPACE = "modelnet-card"
#: Prepended to the preimage of every provider key (see :func:`provider_key`).
KEY_DOMAIN = b"modelnet-capability-key/1"
#: Most provider keys one card may derive (tasks, model, model+version and tags
#: of all its capabilities, without duplicates). Each key costs an ADD_PROVIDER
#: to about 20 DHT servers on every announce, and servers rate-limit them.
#: Checked by the card codec on encode and on decode.
MAX_PROVIDER_KEYS = 64
#: Multihash header of a sha2-256 digest: provider keys are multihashes, as
#: libp2p DHT servers of other implementations require.
_SHA2_256_HEADER = b"\x12\x20"


def provider_key(kind: str, *parts: str) -> bytes:
    """The DHT provider key for ``kind`` and its parts.

    ``0x12 0x20 || SHA-256(KEY_DOMAIN || lp(kind) || lp(normalize(part))...)``,
    where ``lp(s)`` is the UTF-8 bytes of ``s`` preceded by their length as an
    unsigned varint. The result is a 34-byte sha2-256 multihash.
    """
    pre = bytearray(KEY_DOMAIN)
    for i, part in enumerate((kind, *parts)):
        raw = (part if i == 0 else normalize(part)).encode()
        pre += encode_varint(len(raw)) + raw
    return _SHA2_256_HEADER + hashlib.sha256(pre).digest()


def task_key(task: str) -> bytes:
    """Provider key of everyone serving ``task``."""
    return provider_key("task", task)


def model_key(name: str) -> bytes:
    """Provider key of everyone serving the capability (model) named ``name``."""
    return provider_key("model", name)


def model_version_key(name: str, version: str) -> bytes:
    """Provider key of everyone serving ``name`` at ``version``."""
    return provider_key("model-version", name, version)


def tag_key(tag: str) -> bytes:
    """Provider key of everyone serving a capability tagged ``tag``."""
    return provider_key("tag", tag)


def card_keys(capabilities: Iterable[Capability]) -> list[tuple[str, bytes]]:
    """Every ``(label, key)`` a card with ``capabilities`` is announced under, without duplicates.

    Per capability, in this order: each task, the model name, the model name
    with its version, each tag.
    """
    out: dict[bytes, str] = {}
    for cap in capabilities:
        for task in cap.tasks:
            out.setdefault(task_key(task), f"task:{normalize(task)}")
        out.setdefault(model_key(cap.name), f"model:{normalize(cap.name)}")
        out.setdefault(
            model_version_key(cap.name, cap.version),
            f"model-version:{normalize(cap.name)}@{normalize(cap.version)}",
        )
        for tag in cap.tags:
            out.setdefault(tag_key(tag), f"tag:{normalize(tag)}")
    return [(label, key) for key, label in out.items()]


def value_key(peer_id: str) -> str:
    """The DHT key a peer's card is stored under: ``/modelnet-card/<peer id>``."""
    return f"/{VALUE_NAMESPACE}/{peer_id}"


def peer_of_value_key(key: str) -> str:
    """The peer id in a card key, or raise :class:`ProtocolError`."""
    prefix = f"/{VALUE_NAMESPACE}/"
    if not (key.startswith(prefix) and len(key) > len(prefix)):
        raise ProtocolError(f"not a card key: {key[:80]!r}")
    return key[len(prefix) :]

"""Shared reputation messages (``specs/reputation.md``): one peer's scores of the providers it
has used, as it gossips them on ``/modelnet/reputation/1``. Sans-I/O: encode and decode only.

A message is a msgpack map ``{"v": 1, "s": [[peer_id, trust_milli, n], ...]}``: the subject's
binary peer id, the sharer's trust in it in thousandths (0..1000), and how many outcomes that
trust rests on (0..65535). At most :data:`MAX_ENTRIES` entries and :data:`MAX_MESSAGE_BYTES`
bytes. The sharer is the message's GossipSub origin, whose signature the gossip layer checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ProtocolError
from .limits import MAX_PEER_ID_LEN
from .packing import packb, unpackb
from .peerid import peer_id_bytes, peer_id_text

__all__ = ["MAX_ENTRIES", "MAX_EVIDENCE", "MAX_MESSAGE_BYTES", "TOPIC", "VERSION", "decode", "encode"]

#: The topic (network-qualified like protocol ids, ``specs/network.md``).
TOPIC = "/modelnet/reputation/1"
VERSION = 1
#: Subjects per message.
MAX_ENTRIES = 64
#: Largest message accepted (64 entries of a 38-byte peer id take about 3 KiB).
MAX_MESSAGE_BYTES = 8192
#: Largest evidence count.
MAX_EVIDENCE = 65535


def encode(scores: Iterable[tuple[str, float, int]]) -> bytes:
    """A message of ``(peer_id, trust, evidence)`` triples (the first :data:`MAX_ENTRIES` whose
    peer id is an Ed25519 one)."""
    entries: list[list[Any]] = []
    for pid, trust, n in scores:
        if len(entries) == MAX_ENTRIES:
            break
        try:
            raw = peer_id_bytes(pid)
        except ProtocolError:  # not an Ed25519 peer id: not shared
            continue
        milli = max(0, min(1000, round(trust * 1000)))
        entries.append([raw, milli, max(0, min(MAX_EVIDENCE, int(n)))])
    return packb({"v": VERSION, "s": entries})


def decode(data: bytes) -> list[tuple[str, float, int]]:
    """The ``(peer_id, trust, evidence)`` triples of a message, or :class:`ProtocolError`."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"reputation message over {MAX_MESSAGE_BYTES} bytes")
    body = unpackb(data, max_objects=8 + 4 * MAX_ENTRIES, what="reputation message")
    if not isinstance(body, dict) or body.get("v") != VERSION or not isinstance(body.get("s"), list):
        raise ProtocolError("reputation message: not a version 1 map with 's'")
    entries = body["s"]
    if len(entries) > MAX_ENTRIES:
        raise ProtocolError(f"reputation message: over {MAX_ENTRIES} entries")
    out = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise ProtocolError("reputation entry: not [peer_id, trust_milli, n]")
        pid, milli, n = entry
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (milli, n))
        if not (isinstance(pid, bytes) and 0 < len(pid) <= MAX_PEER_ID_LEN and ints):
            raise ProtocolError("reputation entry: bad types")
        if not (0 <= milli <= 1000 and 0 <= n <= MAX_EVIDENCE):
            raise ProtocolError("reputation entry: out of range")
        out.append((peer_id_text(pid), milli / 1000, n))
    return out

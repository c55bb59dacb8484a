"""Cards beside provider records: the ``cards`` extension field of DHT messages.

``specs/capability.md``, "Cards beside provider records". A DHT message (the libp2p
Kademlia protobuf ``Message``) may carry capability-card envelopes in field
:data:`CARDS_FIELD`, a repeated ``bytes`` field that the libp2p Kademlia schema does not
define, so implementations without the extension skip it as an unknown field:

- in an ``ADD_PROVIDER``, the provider's own card (one);
- in a ``GET_PROVIDERS`` answer, the cards the server holds of the providers it lists.

This module is pure: it appends the field to serialized messages and reads it back,
walking the protobuf wire format without a schema. Checking the cards themselves
(signature, peer id, expiry) is the caller's business: a card travels as its owner
signed it, so a relaying server can withhold one but not forge one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..errors import ProtocolError
from .card import MAX_CARD_SIZE
from .framing import decode_varint, encode_varint

__all__ = [
    "ANSWER_CARD_BYTES",
    "ANSWER_CARDS",
    "CARDS_FIELD",
    "append_cards",
    "cards_in",
    "fit_cards",
]

#: The field number of ``repeated bytes cards`` in the DHT ``Message`` (libp2p uses 1-11).
CARDS_FIELD = 100
#: Cards a server puts in one ``GET_PROVIDERS`` answer, at most, and their bytes in all.
ANSWER_CARDS = 20
ANSWER_CARD_BYTES = 64 * 1024

_TAG = encode_varint(CARDS_FIELD << 3 | 2)  # field 100, wire type 2 (length-delimited)


def append_cards(message: bytes, cards: Iterable[bytes]) -> bytes:
    """``message`` (a serialized protobuf message) with each card appended as field 100.

    Protobuf parsers read fields in any order, and keep (or skip) unknown ones, so the
    result parses to the same known fields as ``message``.
    """
    out = bytearray(message)
    for card in cards:
        out += _TAG
        out += encode_varint(len(card))
        out += card
    return bytes(out)


def fit_cards(
    cards: Iterable[bytes], *, limit: int = ANSWER_CARDS, max_bytes: int = ANSWER_CARD_BYTES
) -> list[bytes]:
    """The first cards of ``cards`` that fit: at most ``limit`` cards of at most
    :data:`~modelnet_p2p.proto.card.MAX_CARD_SIZE` bytes each, ``max_bytes`` in all (a card
    that does not fit is skipped, and later, smaller ones may still fit)."""
    chosen: list[bytes] = []
    total = 0
    for card in cards:
        if len(chosen) >= limit:
            break
        if len(card) > MAX_CARD_SIZE or total + len(card) > max_bytes:
            continue
        chosen.append(card)
        total += len(card)
    return chosen


def cards_in(message: bytes | bytearray | memoryview, *, limit: int = ANSWER_CARDS) -> Sequence[bytes]:
    """The cards (field 100) of a serialized message, in order: at most ``limit``, each at most
    :data:`~modelnet_p2p.proto.card.MAX_CARD_SIZE` bytes (longer ones are skipped).

    Only the top level is walked; other fields are skipped by their wire type. Raises
    :class:`ProtocolError` if the bytes are not a well-formed protobuf message, or if
    field 100 is not length-delimited.
    """
    buf = memoryview(message)
    pos, end = 0, len(buf)
    found: list[bytes] = []
    while pos < end:
        tag, pos = _varint(buf, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ProtocolError("protobuf field number 0")
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            start, pos = pos, pos + length
            if pos <= end and field == CARDS_FIELD and length <= MAX_CARD_SIZE and len(found) < limit:
                found.append(bytes(buf[start:pos]))
        else:
            raise ProtocolError(f"protobuf wire type {wire} (groups are not used)")
        if field == CARDS_FIELD and wire != 2:
            raise ProtocolError("the cards field (100) must be length-delimited")
        if pos > end:
            raise ProtocolError("protobuf message ends inside a field")
    return found


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    decoded = decode_varint(buf, pos)
    if decoded is None:
        raise ProtocolError("protobuf message ends inside a varint")
    return decoded

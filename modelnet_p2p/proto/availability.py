"""Signed availability records of ``/modelnet/availability/2/<capability>`` (see ``specs/availability.md``).

Sans-I/O: this module turns an :class:`AvailabilityRecord` into the bytes a
peer publishes on the gossip topic, and those bytes back into a verified
record. Nothing here touches the network or a clock.

The published bytes are an *envelope*, a canonical msgpack map
``{"rec": <record body>, "sig": <Ed25519 signature>}``. The record body is
itself a canonical msgpack map, and the signature covers
``SIGNING_DOMAIN + body``, made with the key of the peer the record names.
The gossip messages that carry records are not signed (the record's own
signature is the only one a receiver checks, once per record): the record's
signature lets a record be stored, relayed or handed to a router and still be
checked on its own, and binds the record's peer id to the key that vouches for
it. A gossip message's id is :func:`message_id` of its data.

Canonical msgpack (:mod:`~modelnet_p2p.proto.packing`) and the envelope
(:mod:`~modelnet_p2p.proto.envelope`) are the ones capability cards use, with
one difference: a record body may hold floats (``tps``), always as float64.
No nil, no extension types, nesting of at most
:data:`~modelnet_p2p.proto.limits.MAX_DEPTH`, and one encoding per record.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import ProtocolError
from . import envelope as _env
from .capability import capability_key
from .envelope import Signer
from .limits import (
    MAX_CAPABILITY_LEN,
    MAX_PEER_ID_LEN,
    MAX_SEQ,
    MAX_UINT32,
    MAX_VERSION_LEN,
    SIGNATURE_LEN,
)
from .packing import canonical_packb as _canonical_packb
from .peerid import parse_peer_id, peer_id_text

__all__ = [
    "MAX_CAPABILITIES",
    "MAX_COUNT",
    "MAX_LATENCY_MS",
    "MAX_MESSAGE_SIZE",
    "MAX_PEER_ID_LEN",
    "MAX_SEQ",
    "MAX_TOKENS_PER_S",
    "MAX_TTL_MS",
    "MAX_VERSION_LEN",
    "MIN_TTL_MS",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "SIGNATURE_LEN",
    "LEGACY_TOPIC",
    "SIGNING_DOMAIN",
    "TOPIC_PREFIX",
    "AvailabilityRecord",
    "Signer",
    "SignedRecord",
    "State",
    "canonical_packb",
    "capabilities_of",
    "encode_envelope",
    "encode_record",
    "message_id",
    "open_envelope",
    "parse_record",
    "seal",
    "signing_input",
    "topic_for",
]

#: Records of a capability are published on ``TOPIC_PREFIX + capability_key(name)``
#: (:func:`topic_for`). The number is the major version of the *topic scheme*:
#: a change that old peers cannot follow gets a new number, so that old and new
#: peers never reject each other's messages.
TOPIC_PREFIX = "/modelnet/availability/2/"
#: The single topic of version 1, on which every peer published every 2 s. Version 2
#: peers neither publish nor subscribe there; they log a peer that still does.
LEGACY_TOPIC = "/modelnet/availability/1"
#: Value of the record's ``v`` field (the record layout did not change in topic version 2).
RECORD_VERSION = 1
#: Prepended to the record body before signing. It names this record type, so
#: that a signature made here can never be replayed as one of the other
#: signatures the same identity key makes (libp2p pubsub messages sign under
#: ``libp2p-pubsub:``, Noise handshakes under ``noise-libp2p-static-key:``).
SIGNING_DOMAIN = b"modelnet-availability-record/1:"

#: Largest envelope accepted or produced, in bytes. A typical record with a
#: handful of capabilities is 150-300 bytes. Every peer re-publishes its record
#: every few seconds and every other peer receives it, so each byte here is
#: paid N times per period; 4 KiB still allows a few dozen capabilities while
#: bounding what one peer can make the mesh carry.
MAX_MESSAGE_SIZE = 4096
#: Most capabilities one record may list (the size limit usually binds first).
MAX_CAPABILITIES = 64
#: Upper bound of the request counters (``inf``, ``q``, ``max``): uint32.
MAX_COUNT = MAX_UINT32
#: Upper bound of the latency figure, in milliseconds (about 49 days: uint32).
MAX_LATENCY_MS = MAX_UINT32
#: Upper bound of the tokens-per-second figure.
MAX_TOKENS_PER_S = 1e12
#: Shortest TTL a record may announce, in milliseconds, inclusive: below one second, a
#: record would expire before GossipSub (1 s heartbeat) can deliver it reliably.
MIN_TTL_MS = 1_000
#: Longest TTL a record may announce, in milliseconds, inclusive: soft state
#: must not outlive its publisher by more than a few minutes.
MAX_TTL_MS = 300_000

#: The envelope of a record: body key ``rec``, float64 allowed, at most :data:`MAX_MESSAGE_SIZE`.
RECORD_FORMAT = _env.EnvelopeFormat(
    what="availability record",
    body_key="rec",
    domain=SIGNING_DOMAIN,
    max_size=MAX_MESSAGE_SIZE,
    allow_float=True,
)


def topic_for(capability: str, prefix: str = TOPIC_PREFIX) -> str:
    """The gossip topic of ``capability``'s records: ``prefix`` + its normalized name.

    Raises :class:`ValueError` for a name that no record may carry.
    """
    key = capability_key(capability)
    if not 0 < len(key.encode()) <= MAX_CAPABILITY_LEN:
        raise ValueError(f"capability name must be 1-{MAX_CAPABILITY_LEN} bytes of text")
    return prefix + key


def message_id(data: bytes) -> bytes:
    """The gossip message id of a message with ``data``: its SHA-256 digest (32 bytes).

    Content-addressed, so that copies of one record are one message whoever relays them,
    and a forged ``from``/``seqno`` pair cannot shadow a real record.
    """
    return hashlib.sha256(data).digest()


class State(StrEnum):
    """What a peer says about itself."""

    #: Up, but not accepting requests yet (for example still loading a model).
    JOINING = "joining"
    #: Accepting requests.
    READY = "ready"
    #: Finishing the requests it has; refusing new ones.
    DRAINING = "draining"
    #: About to go away; forget it.
    LEAVING = "leaving"


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _is_uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


@dataclass(frozen=True, slots=True)
class AvailabilityRecord:
    """One peer's availability, as published on the topics of :func:`topic_for`.

    Attributes:
        peer_id: the publishing peer, base58 text.
        seq: strictly increasing per peer, across restarts too (publishers use
            microseconds of wall-clock time, or the previous value plus one if
            that is larger).
        state: see :class:`State`.
        capabilities: ``(name, version)`` pairs served, sorted by name, names unique.
        in_flight: requests being served now.
        queue: requests waiting for a slot.
        max_concurrency: requests the peer serves at once (``0``: not stated).
        latency_ms: recent request latency, milliseconds.
        tokens_per_s: recent generation throughput.
        ttl_ms: how long receivers keep the record without a newer one, milliseconds.
    """

    peer_id: str
    seq: int
    state: State = State.READY
    capabilities: tuple[tuple[str, str], ...] = ()
    in_flight: int = 0
    queue: int = 0
    max_concurrency: int = 0
    latency_ms: int = 0
    tokens_per_s: float = 0.0
    ttl_ms: int = 6_000

    def __post_init__(self) -> None:
        # Accept plain strings and lists from callers; store the canonical forms.
        object.__setattr__(self, "state", State(self.state))
        caps = tuple((str(n), str(v)) for n, v in self.capabilities)
        object.__setattr__(self, "capabilities", tuple(sorted(caps, key=lambda c: c[0].encode())))
        object.__setattr__(self, "tokens_per_s", float(self.tokens_per_s))

    def capability_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.capabilities)

    def serves(self, name: str, version: str | None = None) -> bool:
        """Whether the record lists capability ``name`` (at ``version``, if given).

        Names are compared by :func:`~modelnet_p2p.proto.capability.capability_key`,
        as everywhere; versions exactly.
        """
        key = capability_key(name)
        return any(
            capability_key(n) == key and (version is None or v == version) for n, v in self.capabilities
        )


@dataclass(frozen=True, slots=True)
class SignedRecord:
    """A parsed envelope: the record, the exact bytes signed, and the signature."""

    record: AvailabilityRecord
    body: bytes
    signature: bytes
    peer_id_bytes: bytes
    size: int

    def verify(self) -> bool:
        """Whether :attr:`signature` is the named peer's signature over :attr:`body`."""
        return _env.verify_body(RECORD_FORMAT, self.peer_id_bytes, self.body, self.signature)


# -- canonical encoding --------------------------------------------------------


def canonical_packb(obj: Any) -> bytes:
    """Canonical msgpack as records use it, floats as float64 (see :mod:`~modelnet_p2p.proto.packing`)."""
    return _canonical_packb(obj, allow_float=True)


# -- records ---------------------------------------------------------------------


def _peer_id_bytes(peer_id: str) -> bytes:
    try:
        return parse_peer_id(peer_id)
    except ProtocolError as exc:
        raise ProtocolError(f"invalid peer id {peer_id[:80]!r}: {exc.message}") from None


def _record_map(record: AvailabilityRecord) -> dict[str, Any]:
    return {
        "caps": [[n, v] for n, v in record.capabilities],
        "id": _peer_id_bytes(record.peer_id),
        "inf": record.in_flight,
        "lat": record.latency_ms,
        "max": record.max_concurrency,
        "q": record.queue,
        "seq": record.seq,
        "st": str(record.state),
        "tps": float(record.tokens_per_s),
        "ttl": record.ttl_ms,
        "v": RECORD_VERSION,
    }


def encode_record(record: AvailabilityRecord) -> bytes:
    """The canonical record body (the bytes that get signed).

    Raises :class:`ProtocolError` if a field is out of range, so that a peer
    never publishes what its peers would reject.
    """
    body = canonical_packb(_record_map(record))
    # Round-trip through the strict parser: one set of rules for both directions.
    parse_record(body)
    return body


def _parse_caps(value: Any) -> tuple[tuple[str, str], ...]:
    _need(isinstance(value, list), "field 'caps' must be an array")
    _need(len(value) <= MAX_CAPABILITIES, f"more than {MAX_CAPABILITIES} capabilities")
    caps: list[tuple[str, str]] = []
    for item in value:
        _need(
            isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item),
            "each capability must be a [name, version] pair of text",
        )
        name, version = item
        _need(0 < len(name.encode()) <= MAX_CAPABILITY_LEN, "capability name empty or too long")
        _need(len(version.encode()) <= MAX_VERSION_LEN, "capability version too long")
        caps.append((name, version))
    names = [n.encode() for n, _ in caps]
    _need(names == sorted(names), "capabilities must be sorted by name")
    _need(len(set(names)) == len(names), "capability names must be unique")
    keys = [capability_key(n) for n, _ in caps]
    _need(all(keys), "a capability name must not be only white space")
    _need(len(set(keys)) == len(keys), "capability names must be unique after normalize()")
    return tuple(caps)


def parse_record(body: bytes) -> tuple[AvailabilityRecord, bytes]:
    """Strictly parse a record body; returns the record and the raw peer id bytes.

    Unknown keys are allowed (and covered by the signature), so a later minor
    revision can add fields; every known field must be present and in range.
    """
    obj = _env.decode_body(RECORD_FORMAT, body)
    version = obj.get("v")
    _need(_is_uint(version, MAX_COUNT), "field 'v' must be an unsigned integer")
    _need(version == RECORD_VERSION, f"unsupported record version {version}")
    pid: Any = obj.get("id")
    _need(isinstance(pid, bytes) and 0 < len(pid) <= MAX_PEER_ID_LEN, "field 'id' must be a peer id (bytes)")
    try:
        peer_id = peer_id_text(pid)
    except ProtocolError as exc:
        raise ProtocolError(f"field 'id' is not an Ed25519 peer id: {exc.message}") from None
    seq = obj.get("seq")
    _need(_is_uint(seq, MAX_SEQ), "field 'seq' must be an unsigned 64-bit integer")
    state = obj.get("st")
    _need(isinstance(state, str) and state in State._value2member_map_, f"unknown state {state!r}")
    for key in ("inf", "q", "max"):
        _need(_is_uint(obj.get(key), MAX_COUNT), f"field {key!r} must be an unsigned 32-bit integer")
    _need(_is_uint(obj.get("lat"), MAX_LATENCY_MS), "field 'lat' must be an unsigned 32-bit integer")
    tps = obj.get("tps")
    _need(
        isinstance(tps, float) and math.isfinite(tps) and 0.0 <= tps <= MAX_TOKENS_PER_S,
        "field 'tps' must be a finite non-negative float64",
    )
    ttl: Any = obj.get("ttl")
    _need(
        _is_uint(ttl, MAX_TTL_MS) and ttl >= MIN_TTL_MS,
        f"field 'ttl' must be between {MIN_TTL_MS} and {MAX_TTL_MS} ms",
    )
    record = AvailabilityRecord(
        peer_id=peer_id,
        seq=obj["seq"],
        state=State(obj["st"]),
        capabilities=_parse_caps(obj.get("caps")),
        in_flight=obj["inf"],
        queue=obj["q"],
        max_concurrency=obj["max"],
        latency_ms=obj["lat"],
        tokens_per_s=obj["tps"],
        ttl_ms=obj["ttl"],
    )
    return record, obj["id"]


# -- envelopes -----------------------------------------------------------------


def signing_input(body: bytes) -> bytes:
    """Exactly what the signature covers: :data:`SIGNING_DOMAIN` followed by the body."""
    return _env.signing_input(RECORD_FORMAT, body)


def encode_envelope(body: bytes, signature: bytes) -> bytes:
    """Assemble an envelope from a body and a signature (no checks: for tools and tests)."""
    return _env.encode_envelope(RECORD_FORMAT, body, signature)


def seal(record: AvailabilityRecord, signer: Signer) -> bytes:
    """Encode ``record``, sign it with ``signer`` and return the envelope to publish.

    Raises :class:`ValueError` if the record names another peer than the
    signer, and :class:`ProtocolError` if a field is out of range or the
    envelope would exceed :data:`MAX_MESSAGE_SIZE`.
    """
    if record.peer_id != str(signer.peer_id):
        raise ValueError("a record can only be sealed by the peer it names")
    return _env.seal_body(RECORD_FORMAT, encode_record(record), signer)


def open_envelope(data: bytes, *, verify: bool = True) -> SignedRecord:
    """Parse an envelope and (by default) check its signature.

    Raises :class:`ProtocolError` naming the first rule broken: oversized,
    malformed or non-canonical envelope or record, or a bad signature.
    """
    body, sig = _env.open_envelope(RECORD_FORMAT, data)
    record, pid = parse_record(body)
    signed = SignedRecord(record=record, body=body, signature=sig, peer_id_bytes=pid, size=len(data))
    if verify:
        _need(signed.verify(), "signature does not match the record's peer id")
    return signed


def capabilities_of(items: Iterable[Any]) -> tuple[tuple[str, str], ...]:
    """Normalize capabilities given as ``(name, version)`` pairs or objects with ``.name``/``.version``.

    Raises :class:`ValueError` for a duplicate name, compared by
    :func:`~modelnet_p2p.proto.capability.capability_key` (``Echo`` and ``echo`` collide).
    """
    out: dict[str, str] = {}
    keys: set[str] = set()
    for item in items:
        if isinstance(item, tuple | list) and len(item) == 2:
            name, version = str(item[0]), str(item[1])
        elif isinstance(item, str):
            name, version = item, ""
        else:
            name, version = str(item.name), str(getattr(item, "version", ""))
        if capability_key(name) in keys:
            raise ValueError(f"capability {name!r} listed twice")
        keys.add(capability_key(name))
        out[name] = version
    return tuple(sorted(out.items(), key=lambda c: c[0].encode()))

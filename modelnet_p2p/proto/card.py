"""Signed capability cards and their DHT keys (see ``specs/capability.md``).

Sans-I/O: this module turns a :class:`CapabilityCard` into the bytes a peer
stores in the DHT, turns those bytes back into a verified card, and derives
the DHT keys a card is announced under. Nothing here touches the network or
reads a clock: the current time is always a parameter.

The stored bytes are an *envelope*, a canonical msgpack map
``{"card": <card body>, "sig": <Ed25519 signature>}``. The card body is itself
a canonical msgpack map; the signature covers ``SIGNING_DOMAIN + body`` and is
made with the identity key of the peer the card names.

Canonical msgpack means: map keys are text, sorted by their UTF-8 bytes, with
no duplicates; integers, text, bytes and arrays in their shortest form; no
floats, no nil, no extension types. ``msgpack.packb(obj, use_bin_type=True)``
produces exactly that for maps whose keys are inserted in sorted order. A
parser re-encodes what it decoded and rejects input that differs, so each
card has exactly one encoding.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
import multiaddr
from libp2p.peer.id import ID

from ..errors import ProtocolError
from ..p2p.identity import verify_signature
from .capability import Capability, CostHint
from .framing import encode_varint
from .infer import MAX_CAPABILITY_LEN

__all__ = [
    "CARD_VERSION",
    "KEY_DOMAIN",
    "MAX_ADDRS",
    "MAX_ADDR_LEN",
    "MAX_CAPABILITIES",
    "MAX_CARD_SIZE",
    "MAX_CLOCK_SKEW_MS",
    "MAX_DESCRIPTION_LEN",
    "MAX_LIST_ITEMS",
    "MAX_PEER_ID_LEN",
    "MAX_PROVIDER_KEYS",
    "MAX_SCHEMA_LEN",
    "MAX_SEQ",
    "MAX_TASKS",
    "MAX_TOKEN_LEN",
    "MAX_TTL_MS",
    "MIN_TTL_MS",
    "SIGNATURE_LEN",
    "SIGNING_DOMAIN",
    "VALUE_NAMESPACE",
    "CapabilityCard",
    "Signer",
    "canonical_packb",
    "card_keys",
    "check_capability",
    "encode_card",
    "encode_envelope",
    "model_key",
    "model_version_key",
    "normalize",
    "open_card",
    "peer_of_value_key",
    "provider_key",
    "seal",
    "select_card",
    "signing_input",
    "tag_key",
    "task_key",
    "value_key",
]

#: Value of the card's ``v`` field. A card layout old peers cannot read gets a
#: new number (and a new signing domain); fields added later are unknown keys
#: that old peers keep and ignore.
CARD_VERSION = 1
#: Prepended to the card body before signing. It names this record type, so a
#: card signature can never be replayed as any other signature the identity key
#: makes (availability records, libp2p peer records, Noise handshakes).
SIGNING_DOMAIN = b"modelnet-capability-card/1:"
#: Ed25519 signatures are 64 bytes.
SIGNATURE_LEN = 64

#: Largest envelope accepted or produced, in bytes. A card with one capability
#: and no schemas is 200-400 bytes; 16 KiB leaves room for a few capabilities
#: with JSON schemas. Discovery fetches one card per provider, and every DHT
#: server may store thousands of cards, so the limit bounds both the answer to
#: one lookup (20 providers: 320 KiB at most) and a server's memory.
MAX_CARD_SIZE = 16 * 1024
#: Most capabilities one card may list (the size limit usually binds first).
MAX_CAPABILITIES = 16
#: Most tasks one capability may list: a model does a handful of things.
MAX_TASKS = 8
#: Most items in each of the other lists of a capability (tags, languages,
#: modalities). Each tag becomes a DHT key, see :data:`MAX_PROVIDER_KEYS`.
MAX_LIST_ITEMS = 16
#: Longest task, tag, modality, language, family, version, license or cost
#: field, in UTF-8 bytes: these are identifiers, not prose.
MAX_TOKEN_LEN = 64
#: Longest description, in UTF-8 bytes: one or two paragraphs.
MAX_DESCRIPTION_LEN = 1024
#: Longest JSON schema (input or params), in UTF-8 bytes of canonical JSON.
MAX_SCHEMA_LEN = 4096
#: Most addresses a card may carry. A peer listens on a few interfaces.
MAX_ADDRS = 16
#: Longest binary multiaddr. ``/dns/<255-byte name>/tcp/<port>`` fits.
MAX_ADDR_LEN = 300
#: Longest peer id, in bytes. An Ed25519 peer id is 38 bytes.
MAX_PEER_ID_LEN = 64
#: Sequence numbers are unsigned 64-bit integers.
MAX_SEQ = 2**64 - 1
#: Shortest lifetime (``expires_at - issued_at``) a card may have: below one
#: second a card expires before it can be stored and fetched.
MIN_TTL_MS = 1_000
#: Longest lifetime a card may have. Cards are soft state that their publisher
#: refreshes every few minutes; a day bounds how long a stolen or stale card
#: can circulate, and matches the DHT's own record lifetime.
MAX_TTL_MS = 24 * 60 * 60 * 1000
#: How far in the future ``issued_at`` may be, to tolerate clock skew.
MAX_CLOCK_SKEW_MS = 60_000
#: Most provider keys one card may derive (tasks, model, model+version and tags
#: of all its capabilities, without duplicates). Each key costs an ADD_PROVIDER
#: to about 20 DHT servers on every announce, and servers rate-limit them.
MAX_PROVIDER_KEYS = 64

#: The DHT namespace of stored cards: a card lives under ``/modelnet-card/<peer id>``.
VALUE_NAMESPACE = "modelnet-card"
#: Prepended to the preimage of every provider key (see :func:`provider_key`).
KEY_DOMAIN = b"modelnet-capability-key/1"
#: Multihash header of a sha2-256 digest: provider keys are multihashes, as
#: libp2p DHT servers of other implementations require.
_SHA2_256_HEADER = b"\x12\x20"


class Signer(Protocol):
    """What :func:`seal` needs of an identity (a :class:`~modelnet_p2p.Identity` fits)."""

    @property
    def peer_id(self) -> ID: ...

    def sign(self, data: bytes) -> bytes: ...


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _is_uint(value: object, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


# -- the card --------------------------------------------------------------------


@dataclass(frozen=True)
class CapabilityCard:
    """What a peer can do, where to reach it, and for how long this holds.

    Attributes:
        peer_id: the peer the card describes (and whose key signs it), base58 text.
        addrs: its addresses, multiaddr text without the trailing ``/p2p/<peer id>``
            (a relayed address keeps the relay's part, ``.../p2p/<relay>/p2p-circuit``).
        seq: strictly increasing per peer, across restarts too (publishers use
            microseconds of wall-clock time, or the previous value plus one if
            that is larger). The highest ``seq`` replaces every older card.
        issued_at: when the card was made, milliseconds since the Unix epoch.
        expires_at: when it stops being valid, milliseconds since the Unix epoch.
        capabilities: what the peer serves, sorted by name.
        envelope: the signed bytes, once sealed or received (else empty).
    """

    peer_id: str
    addrs: tuple[str, ...]
    seq: int
    issued_at: int
    expires_at: int
    capabilities: tuple[Capability, ...] = ()
    envelope: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        caps = tuple(sorted(self.capabilities, key=lambda c: c.name.encode()))
        object.__setattr__(self, "capabilities", caps)
        object.__setattr__(self, "addrs", tuple(str(a) for a in self.addrs))

    @property
    def dial_addrs(self) -> list[str]:
        """The addresses with ``/p2p/<peer id>`` appended, ready for :meth:`Peer.connect`."""
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]

    def expired(self, now_ms: int) -> bool:
        """Whether the card is no longer valid at ``now_ms``."""
        return now_ms >= self.expires_at

    def matching(
        self,
        *,
        task: str | None = None,
        model: str | None = None,
        version: str | None = None,
        tags: Iterable[str] = (),
    ) -> list[Capability]:
        """The capabilities that match every criterion given (compared after :func:`normalize`)."""
        want_tags = {normalize(t) for t in tags}
        out = []
        for cap in self.capabilities:
            if task is not None and normalize(task) not in {normalize(t) for t in cap.tasks}:
                continue
            if model is not None and normalize(model) != normalize(cap.name):
                continue
            if version is not None and normalize(version) != normalize(cap.version):
                continue
            if not want_tags <= {normalize(t) for t in cap.tags}:
                continue
            out.append(cap)
        return out

    def to_agent_card(self) -> dict[str, Any]:
        """Render as an A2A-style agent card (JSON-ready): name, description, skills with tags."""
        caps = self.capabilities
        if len(caps) == 1:
            name, description, version = caps[0].name, caps[0].description, caps[0].version
        else:
            name = f"modelnet peer {self.peer_id}"
            description = "Serves " + ", ".join(c.name for c in caps) if caps else "Serves nothing."
            version = str(self.seq)
        skills = []
        for cap in caps:
            skill: dict[str, Any] = {
                "id": cap.name,
                "name": cap.name,
                "description": cap.description,
                "tags": list(dict.fromkeys((*cap.tasks, *cap.tags))),
            }
            if cap.input_modalities:
                skill["inputModes"] = [_mime(m) for m in cap.input_modalities]
            if cap.output_modalities:
                skill["outputModes"] = [_mime(m) for m in cap.output_modalities]
            skills.append(skill)
        return {
            "name": name,
            "description": description,
            "url": self.dial_addrs[0] if self.addrs else "",
            "version": version,
            "capabilities": {"streaming": True},
            "defaultInputModes": ["text/plain"],
            "defaultOutputModes": ["text/plain"],
            "skills": skills,
            "x-modelnet": {
                "peerId": self.peer_id,
                "addrs": self.dial_addrs,
                "seq": self.seq,
                "issuedAt": self.issued_at,
                "expiresAt": self.expires_at,
            },
        }


_MIME = {
    "text": "text/plain",
    "json": "application/json",
    "embedding": "application/json",
    "image": "image/*",
    "audio": "audio/*",
    "video": "video/*",
    "file": "application/octet-stream",
}


def _mime(modality: str) -> str:
    return _MIME.get(modality, modality)


# -- canonical encoding --------------------------------------------------------


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        for key in obj:
            _need(isinstance(key, str), "map keys must be text")
        return {k: _canonical(obj[k]) for k in sorted(obj, key=lambda k: k.encode())}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    _need(
        isinstance(obj, str | bytes | bool | int) and not (isinstance(obj, int) and obj < -(2**63)),
        f"a {type(obj).__name__} cannot appear in a card",
    )
    return obj


def canonical_packb(obj: Any) -> bytes:
    """Canonical msgpack: sorted text keys, shortest forms, no floats or nil."""
    return msgpack.packb(_canonical(obj), use_bin_type=True)


def _unpack_canonical(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises ExtraData, ValueError, UnicodeDecodeError, ...
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
    _need(isinstance(obj, dict), f"{what} is not a map")
    try:
        again = canonical_packb(obj)
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc.message}") from None
    except Exception:
        raise ProtocolError(f"{what} holds values that cannot be re-encoded") from None
    _need(again == data, f"{what} is not canonically encoded")
    return obj


def _canonical_json(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# -- capabilities --------------------------------------------------------------------


def _cap_map(cap: Capability) -> dict[str, Any]:
    """The canonical map of one capability: required fields always, optional ones only if set."""
    out: dict[str, Any] = {"name": cap.name, "tasks": list(cap.tasks), "version": cap.version}
    if cap.description:
        out["description"] = cap.description
    if cap.family:
        out["family"] = cap.family
    if cap.tags:
        out["tags"] = list(cap.tags)
    if cap.input_modalities:
        out["input_modalities"] = list(cap.input_modalities)
    if cap.output_modalities:
        out["output_modalities"] = list(cap.output_modalities)
    if cap.input_schema is not None:
        out["input_schema"] = _canonical_json(cap.input_schema)
    if cap.params_schema is not None:
        out["params_schema"] = _canonical_json(cap.params_schema)
    if cap.context_length is not None:
        out["context_length"] = cap.context_length
    if cap.max_concurrency is not None:
        out["max_concurrency"] = cap.max_concurrency
    if cap.languages:
        out["languages"] = list(cap.languages)
    if cap.license:
        out["license"] = cap.license
    if cap.cost is not None:
        out["cost"] = {"amount": cap.cost.amount, "currency": cap.cost.currency, "per": cap.cost.per}
    if cap.idempotent:
        out["idempotent"] = True
    return out


def _text(obj: Mapping[str, Any], key: str, limit: int, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        _need(not required, f"capability field {key!r} is missing")
        return ""
    _need(isinstance(value, str), f"capability field {key!r} must be text")
    _need(len(value.encode()) <= limit, f"capability field {key!r} is longer than {limit} bytes")
    _need(not required or value != "", f"capability field {key!r} must not be empty")
    return value


def _tokens(obj: Mapping[str, Any], key: str, most: int, *, required: bool = False) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        _need(not required, f"capability field {key!r} is missing")
        return ()
    _need(isinstance(value, list), f"capability field {key!r} must be an array")
    _need(not required or len(value) > 0, f"capability field {key!r} must not be empty")
    _need(len(value) <= most, f"capability field {key!r} has more than {most} items")
    for item in value:
        _need(
            isinstance(item, str) and 0 < len(item.encode()) <= MAX_TOKEN_LEN,
            f"each item of {key!r} must be text of 1-{MAX_TOKEN_LEN} bytes",
        )
    _need(len(set(value)) == len(value), f"capability field {key!r} has duplicates")
    return tuple(value)


def _uint_field(obj: Mapping[str, Any], key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    _need(_is_uint(value, 2**32 - 1) and value >= 1, f"capability field {key!r} must be in 1..2^32-1")
    return int(value)


def _schema_field(obj: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    text = obj.get(key)
    if text is None:
        return None
    _need(isinstance(text, str), f"capability field {key!r} must be JSON text")
    _need(
        len(text.encode()) <= MAX_SCHEMA_LEN,
        f"capability field {key!r} is longer than {MAX_SCHEMA_LEN} bytes",
    )
    try:
        schema = json.loads(text)
    except ValueError:
        raise ProtocolError(f"capability field {key!r} is not valid JSON") from None
    _need(isinstance(schema, dict), f"capability field {key!r} must be a JSON object")
    return schema


_CAP_KEYS = frozenset(
    {
        "name",
        "tasks",
        "version",
        "description",
        "family",
        "tags",
        "input_modalities",
        "output_modalities",
        "input_schema",
        "params_schema",
        "context_length",
        "max_concurrency",
        "languages",
        "license",
        "cost",
        "idempotent",
    }
)


def _parse_cap(obj: Any) -> Capability:
    _need(isinstance(obj, dict), "each capability must be a map")
    name = _text(obj, "name", MAX_CAPABILITY_LEN, required=True)
    tasks = _tokens(obj, "tasks", MAX_TASKS, required=True)
    version = _text(obj, "version", MAX_TOKEN_LEN)
    _need("version" in obj, "capability field 'version' is missing")
    cost = None
    if "cost" in obj:
        raw = obj["cost"]
        _need(isinstance(raw, dict) and set(raw) == {"amount", "currency", "per"}, "bad capability cost")
        for key in ("amount", "currency", "per"):
            _text(raw, key, MAX_TOKEN_LEN, required=True)
        try:
            cost = CostHint(amount=raw["amount"], currency=raw["currency"], per=raw["per"])
        except Exception as exc:
            raise ProtocolError(f"bad capability cost: {exc}") from None
    idempotent = obj.get("idempotent", False)
    _need(isinstance(idempotent, bool), "capability field 'idempotent' must be a boolean")
    try:
        return Capability(
            name=name,
            task=tasks[0],
            tasks=tasks,
            version=version,
            description=_text(obj, "description", MAX_DESCRIPTION_LEN),
            family=_text(obj, "family", MAX_TOKEN_LEN),
            tags=_tokens(obj, "tags", MAX_LIST_ITEMS),
            input_modalities=_tokens(obj, "input_modalities", MAX_LIST_ITEMS),
            output_modalities=_tokens(obj, "output_modalities", MAX_LIST_ITEMS),
            input_schema=_schema_field(obj, "input_schema"),
            params_schema=_schema_field(obj, "params_schema"),
            context_length=_uint_field(obj, "context_length"),
            max_concurrency=_uint_field(obj, "max_concurrency"),
            languages=_tokens(obj, "languages", MAX_LIST_ITEMS),
            license=_text(obj, "license", MAX_TOKEN_LEN),
            cost=cost,
            idempotent=idempotent,
            extra={k: v for k, v in obj.items() if k not in _CAP_KEYS},
        )
    except ProtocolError:
        raise
    except Exception as exc:  # ConfigError from Capability's own checks
        raise ProtocolError(f"bad capability: {exc}") from None


def check_capability(cap: Capability) -> None:
    """Raise :class:`ProtocolError` if ``cap`` cannot appear in a card (a limit is exceeded)."""
    _parse_cap(_unpack_canonical(canonical_packb(_cap_map(cap)), "capability"))


# -- cards ---------------------------------------------------------------------


def _card_map(card: CapabilityCard) -> dict[str, Any]:
    try:
        pid = ID.from_base58(card.peer_id).to_bytes()
    except Exception:
        raise ProtocolError(f"invalid peer id {card.peer_id!r}") from None
    addrs = []
    for text in card.addrs:
        try:
            addrs.append(multiaddr.Multiaddr(text).to_bytes())
        except Exception:
            raise ProtocolError(f"invalid multiaddr {text!r}") from None
    return {
        "addrs": addrs,
        "caps": [_cap_map(c) for c in card.capabilities],
        "expires_at": card.expires_at,
        "issued_at": card.issued_at,
        "peer": pid,
        "seq": card.seq,
        "v": CARD_VERSION,
    }


def encode_card(card: CapabilityCard) -> bytes:
    """The canonical card body (the bytes that get signed).

    Raises :class:`ProtocolError` if a field is out of range, so that a peer
    never publishes what its peers would reject.
    """
    body = canonical_packb(_card_map(card))
    parse_card(body)  # one set of rules for both directions
    return body


def _parse_addr(raw: Any) -> str:
    _need(isinstance(raw, bytes) and 0 < len(raw) <= MAX_ADDR_LEN, "each address must be 1-300 bytes")
    try:
        addr = multiaddr.Multiaddr(raw)
    except Exception:
        raise ProtocolError("an address is not a valid binary multiaddr") from None
    text = str(addr)
    parts = text.split("/")
    _need(len(parts) < 3 or parts[-2] not in ("p2p", "ipfs"), "an address must not end with /p2p/<peer id>")
    return text


def parse_card(body: bytes) -> CapabilityCard:
    """Strictly parse a card body (no signature or time checks).

    Unknown keys are allowed (and covered by the signature), so a later minor
    revision can add fields; every known field must be present and in range.
    """
    _need(len(body) <= MAX_CARD_SIZE, "card body too large")
    obj = _unpack_canonical(body, "card")
    _need(obj.get("v") == CARD_VERSION, f"unsupported card version {obj.get('v')!r}")
    pid: Any = obj.get("peer")
    _need(isinstance(pid, bytes) and 0 < len(pid) <= MAX_PEER_ID_LEN, "field 'peer' must be a peer id")
    try:
        peer_id = ID(pid).to_base58()
    except Exception:
        raise ProtocolError("field 'peer' is not a peer id") from None
    seq: Any = obj.get("seq")
    _need(_is_uint(seq, MAX_SEQ), "field 'seq' must be an unsigned 64-bit integer")
    issued: Any = obj.get("issued_at")
    expires: Any = obj.get("expires_at")
    _need(_is_uint(issued, MAX_SEQ), "field 'issued_at' must be an unsigned integer (ms)")
    _need(_is_uint(expires, MAX_SEQ), "field 'expires_at' must be an unsigned integer (ms)")
    _need(
        MIN_TTL_MS <= expires - issued <= MAX_TTL_MS,
        f"card lifetime must be between {MIN_TTL_MS} and {MAX_TTL_MS} ms",
    )
    addrs: Any = obj.get("addrs")
    _need(isinstance(addrs, list) and len(addrs) <= MAX_ADDRS, f"field 'addrs' must hold at most {MAX_ADDRS}")
    caps_raw: Any = obj.get("caps")
    _need(
        isinstance(caps_raw, list) and len(caps_raw) <= MAX_CAPABILITIES,
        f"field 'caps' must be an array of at most {MAX_CAPABILITIES}",
    )
    caps = tuple(_parse_cap(c) for c in caps_raw)
    names = [c.name.encode() for c in caps]
    _need(names == sorted(names), "capabilities must be sorted by name")
    _need(len(set(names)) == len(names), "capability names must be unique")
    return CapabilityCard(
        peer_id=peer_id,
        addrs=tuple(_parse_addr(a) for a in addrs),
        seq=seq,
        issued_at=issued,
        expires_at=expires,
        capabilities=caps,
    )


# -- envelopes -----------------------------------------------------------------


def signing_input(body: bytes) -> bytes:
    """Exactly what the signature covers: :data:`SIGNING_DOMAIN` followed by the body."""
    return SIGNING_DOMAIN + body


def encode_envelope(body: bytes, signature: bytes) -> bytes:
    """Assemble an envelope from a body and a signature (no checks: for tools and tests)."""
    return canonical_packb({"card": body, "sig": signature})


def seal(card: CapabilityCard, signer: Signer) -> CapabilityCard:
    """Encode ``card``, sign it with ``signer``; returns the card with :attr:`~CapabilityCard.envelope` set.

    Raises :class:`ValueError` if the card names another peer than the signer,
    and :class:`ProtocolError` if a field is out of range, the card would derive
    more than :data:`MAX_PROVIDER_KEYS` keys, or the envelope would exceed
    :data:`MAX_CARD_SIZE`.
    """
    if card.peer_id != str(signer.peer_id):
        raise ValueError("a card can only be sealed by the peer it names")
    body = encode_card(card)
    keys = card_keys(card.capabilities)
    _need(len(keys) <= MAX_PROVIDER_KEYS, f"card derives {len(keys)} DHT keys; at most {MAX_PROVIDER_KEYS}")
    data = encode_envelope(body, signer.sign(signing_input(body)))
    _need(len(data) <= MAX_CARD_SIZE, f"card of {len(data)} bytes exceeds {MAX_CARD_SIZE} bytes")
    return CapabilityCard(
        card.peer_id, card.addrs, card.seq, card.issued_at, card.expires_at, card.capabilities, data
    )


def open_card(data: bytes, *, now_ms: int | None = None, verify: bool = True) -> CapabilityCard:
    """Parse an envelope, check its signature and, if ``now_ms`` is given, its validity period.

    Returns the card with :attr:`~CapabilityCard.envelope` set. Raises
    :class:`ProtocolError` naming the first rule broken: oversized, malformed
    or non-canonical envelope or card, a bad signature, an expired card or one
    issued in the future.
    """
    _need(isinstance(data, bytes | bytearray), "a card must be bytes")
    _need(len(data) <= MAX_CARD_SIZE, f"card of {len(data)} bytes exceeds {MAX_CARD_SIZE} bytes")
    env = _unpack_canonical(bytes(data), "envelope")
    _need(set(env) == {"card", "sig"}, "envelope must have exactly the keys 'card' and 'sig'")
    body, sig = env["card"], env["sig"]
    _need(isinstance(body, bytes), "envelope field 'card' must be bytes")
    _need(isinstance(sig, bytes) and len(sig) == SIGNATURE_LEN, "envelope field 'sig' must be 64 bytes")
    card = parse_card(body)
    if verify:
        _need(
            verify_signature(card.peer_id, signing_input(body), sig),
            "signature does not match the card's peer id",
        )
    if now_ms is not None:
        _need(not card.expired(now_ms), "card has expired")
        _need(card.issued_at <= now_ms + MAX_CLOCK_SKEW_MS, "card is issued in the future")
    return CapabilityCard(
        card.peer_id, card.addrs, card.seq, card.issued_at, card.expires_at, card.capabilities, bytes(data)
    )


def select_card(values: Sequence[bytes], now_ms: int | None = None) -> int:
    """Index of the best of several envelopes for the same key.

    A valid card beats an invalid one; among valid cards the highest ``seq``
    wins, then the latest ``expires_at``, then the larger envelope bytes (so
    that every peer picks the same one). Ties go to the lowest index. This
    total order is what makes the choice independent of the order in which a
    DHT implementation passes the candidates.
    """
    best, best_score = 0, None
    for i, value in enumerate(values):
        try:
            card = open_card(value, now_ms=now_ms)
            score: tuple[int, int, int, bytes] = (1, card.seq, card.expires_at, bytes(value))
        except ProtocolError:
            score = (0, 0, 0, b"")
        if best_score is None or score > best_score:
            best, best_score = i, score
    return best


# -- DHT keys ------------------------------------------------------------------


def normalize(text: str) -> str:
    """How names, tasks and tags are compared and hashed: trimmed, lowercased, NFC."""
    return unicodedata.normalize("NFC", text.strip().lower())


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
    _need(key.startswith(prefix) and len(key) > len(prefix), f"not a card key: {key[:80]!r}")
    return key[len(prefix) :]

"""Signed capability cards and their DHT keys (see ``specs/capability.md``).

Sans-I/O: this module turns a :class:`CapabilityCard` into the bytes a peer
stores in the DHT, turns those bytes back into a verified card, and derives
the DHT keys a card is announced under. Nothing here touches the network or
reads a clock: the current time is always a parameter.

The stored bytes are an *envelope*, a canonical msgpack map
``{"card": <card body>, "sig": <Ed25519 signature>}``. The card body is itself
a canonical msgpack map; the signature covers ``SIGNING_DOMAIN + body`` and is
made with the identity key of the peer the card names.

Canonical msgpack (:mod:`~modelnet_p2p.proto.packing`) and the envelope
(:mod:`~modelnet_p2p.proto.envelope`) are shared with availability records.
On top of them a card has exactly one encoding because an optional field is
either absent (meaning its default) or holds a non-default value: an empty
text, an empty array or ``false`` is never written, and a decoder rejects it.

The DHT keys a card is announced under live in
:mod:`~modelnet_p2p.proto.card_keys` and are re-exported here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import multiaddr

from ..errors import ProtocolError
from . import envelope as _env
from .capability import Capability, CostHint, capability_key, normalize
from .card_keys import (
    KEY_DOMAIN,
    MAX_PROVIDER_KEYS,
    VALUE_NAMESPACE,
    card_keys,
    model_key,
    model_version_key,
    peer_of_value_key,
    provider_key,
    tag_key,
    task_key,
    value_key,
)
from .envelope import Signer
from .limits import MAX_CAPABILITY_LEN, MAX_PEER_ID_LEN, MAX_SEQ, SIGNATURE_LEN
from .packing import MAX_DEPTH, check_depth, unpack_canonical
from .packing import canonical_packb as _canonical_packb
from .peerid import parse_peer_id, peer_id_text

__all__ = [
    "CARD_FORMAT",
    "CARD_VERSION",
    "KEY_DOMAIN",
    "MAX_ADDRS",
    "MAX_ADDR_LEN",
    "MAX_CAPABILITIES",
    "MAX_CARD_SIZE",
    "MAX_CLOCK_SKEW_MS",
    "MAX_DEPTH",
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
    "capability_key",
    "card_keys",
    "check_capability",
    "encode_card",
    "encode_envelope",
    "model_key",
    "model_version_key",
    "normalize",
    "open_card",
    "parse_card",
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
#: Shortest lifetime (``expires_at - issued_at``) a card may have, inclusive:
#: below one second a card expires before it can be stored and fetched.
MIN_TTL_MS = 1_000
#: Longest lifetime a card may have, inclusive. Cards are soft state that their publisher
#: refreshes every few minutes; a day bounds how long a stolen or stale card
#: can circulate, and matches the DHT's own record lifetime.
MAX_TTL_MS = 24 * 60 * 60 * 1000
#: How far in the future ``issued_at`` may be, to tolerate clock skew: a card
#: is valid at ``now`` if ``issued_at <= now + MAX_CLOCK_SKEW_MS`` and
#: ``now < expires_at`` (``expires_at`` is the first millisecond it is invalid).
MAX_CLOCK_SKEW_MS = 60_000

#: The envelope of a card: body key ``card``, no floats, at most :data:`MAX_CARD_SIZE`.
CARD_FORMAT = _env.EnvelopeFormat(what="card", body_key="card", domain=SIGNING_DOMAIN, max_size=MAX_CARD_SIZE)


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


def canonical_packb(obj: Any) -> bytes:
    """Canonical msgpack as cards use it, without floats (see :mod:`~modelnet_p2p.proto.packing`)."""
    return _canonical_packb(obj)


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
    if cap.access != "public":
        out["access"] = cap.access
    return out


def _text(
    obj: Mapping[str, Any], key: str, limit: int, *, required: bool = False, allow_empty: bool = False
) -> str:
    value = obj.get(key)
    if value is None:
        _need(not required, f"capability field {key!r} is missing")
        return ""
    _need(isinstance(value, str), f"capability field {key!r} must be text")
    _need(len(value.encode()) <= limit, f"capability field {key!r} is longer than {limit} bytes")
    _need(value != "" or allow_empty, f"capability field {key!r} must not be empty (omit it instead)")
    return str(value)


def _tokens(obj: Mapping[str, Any], key: str, most: int, *, required: bool = False) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        _need(not required, f"capability field {key!r} is missing")
        return ()
    _need(isinstance(value, list), f"capability field {key!r} must be an array")
    _need(len(value) > 0, f"capability field {key!r} must not be empty (omit it instead)")
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
    except (ValueError, RecursionError):
        raise ProtocolError(f"capability field {key!r} is not valid JSON") from None
    _need(isinstance(schema, dict), f"capability field {key!r} must be a JSON object")
    try:
        check_depth(schema)
    except ProtocolError:
        raise ProtocolError(f"capability field {key!r} nests deeper than {MAX_DEPTH}") from None
    try:
        canonical = _canonical_json(schema)
    except ValueError:  # NaN or Infinity
        raise ProtocolError(f"capability field {key!r} is not valid JSON") from None
    _need(text == canonical, f"capability field {key!r} is not canonical JSON (compact, sorted keys)")
    return cast("Mapping[str, Any]", schema)


_CAP_KEYS = frozenset(
    {
        "access",
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
    _need("version" in obj, "capability field 'version' is missing")
    version = _text(obj, "version", MAX_TOKEN_LEN, allow_empty=True)
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
    _need(obj.get("idempotent") is not False, "capability field 'idempotent' must be true (omit it instead)")
    access = obj.get("access", "public")
    _need(
        access in ("token", "allowlist") or "access" not in obj,
        "capability field 'access' must be token or allowlist (omit it for public)",
    )
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
            access=access,
            extra={k: v for k, v in obj.items() if k not in _CAP_KEYS},
        )
    except ProtocolError:
        raise
    except Exception as exc:  # ConfigError from Capability's own checks
        raise ProtocolError(f"bad capability: {exc}") from None


def check_capability(cap: Capability) -> None:
    """Raise :class:`ProtocolError` if ``cap`` cannot appear in a card (a limit is exceeded)."""
    _parse_cap(unpack_canonical(canonical_packb(_cap_map(cap)), "capability"))


# -- cards ---------------------------------------------------------------------


def _card_map(card: CapabilityCard) -> dict[str, Any]:
    try:
        pid = parse_peer_id(card.peer_id)
    except ProtocolError as exc:
        raise ProtocolError(f"invalid peer id {card.peer_id[:80]!r}: {exc.message}") from None
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
    try:  # multiaddr raises its own errors, ValueError, ... and some only when rendering
        text = str(multiaddr.Multiaddr(raw))
        again = multiaddr.Multiaddr(text).to_bytes()
    except Exception:
        raise ProtocolError("an address is not a valid binary multiaddr") from None
    _need(again == raw, "an address is not in its canonical binary form")
    parts = text.split("/")
    _need(len(parts) < 3 or parts[-2] not in ("p2p", "ipfs"), "an address must not end with /p2p/<peer id>")
    return text


def parse_card(body: bytes) -> CapabilityCard:
    """Strictly parse a card body (no signature or time checks).

    Unknown keys are allowed (and covered by the signature), so a later minor
    revision can add fields; every known field must be present and in range.
    """
    obj = _env.decode_body(CARD_FORMAT, body)
    _need(obj.get("v") == CARD_VERSION, f"unsupported card version {obj.get('v')!r}")
    pid: Any = obj.get("peer")
    _need(isinstance(pid, bytes) and 0 < len(pid) <= MAX_PEER_ID_LEN, "field 'peer' must be a peer id")
    try:
        peer_id = peer_id_text(pid)
    except ProtocolError as exc:
        raise ProtocolError(f"field 'peer' is not an Ed25519 peer id: {exc.message}") from None
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
    keys = {capability_key(c.name) for c in caps}
    _need(len(keys) == len(caps), "capability names must be unique after normalize()")
    derived = len(card_keys(caps))
    _need(derived <= MAX_PROVIDER_KEYS, f"card derives {derived} DHT keys; at most {MAX_PROVIDER_KEYS}")
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
    return _env.signing_input(CARD_FORMAT, body)


def encode_envelope(body: bytes, signature: bytes) -> bytes:
    """Assemble an envelope from a body and a signature (no checks: for tools and tests)."""
    return _env.encode_envelope(CARD_FORMAT, body, signature)


def seal(card: CapabilityCard, signer: Signer) -> CapabilityCard:
    """Encode ``card``, sign it with ``signer``; returns the card with :attr:`~CapabilityCard.envelope` set.

    Raises :class:`ValueError` if the card names another peer than the signer,
    and :class:`ProtocolError` if a field is out of range, the card would derive
    more than :data:`MAX_PROVIDER_KEYS` keys, or the envelope would exceed
    :data:`MAX_CARD_SIZE`.
    """
    if card.peer_id != str(signer.peer_id):
        raise ValueError("a card can only be sealed by the peer it names")
    data = _env.seal_body(CARD_FORMAT, encode_card(card), signer)
    return CapabilityCard(
        card.peer_id, card.addrs, card.seq, card.issued_at, card.expires_at, card.capabilities, data
    )


def open_card(data: bytes, *, now_ms: int | None = None, verify: bool = True) -> CapabilityCard:
    """Parse an envelope, check its signature and, if ``now_ms`` is given, its validity period.

    The card is valid at ``now_ms`` if ``issued_at <= now_ms + MAX_CLOCK_SKEW_MS``
    and ``now_ms < expires_at``. Returns the card with
    :attr:`~CapabilityCard.envelope` set. Raises :class:`ProtocolError` naming
    the first rule broken: oversized, malformed or non-canonical envelope or
    card, a bad signature, an expired card or one issued in the future.
    """
    body, sig = _env.open_envelope(CARD_FORMAT, data)
    card = parse_card(body)
    if verify:
        _need(
            _env.verify_body(CARD_FORMAT, card.peer_id, body, sig),
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

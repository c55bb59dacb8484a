"""Signed receipts: a provider's signed statement of what it answered (``specs/inference.md``).

A receipt (extension r5-rcpt of ``/modelnet/infer/1.0.0``) is a signed envelope
(:mod:`~modelnet_p2p.proto.envelope`, body key ``rcpt``, domain
``modelnet-receipt/1:``) over a canonical msgpack body naming the request id,
the capability, a digest of the input, a running digest of every chunk in
order, the chunk count, the finish reason, the usage counters, the provider's
times and its peer id (and, when known, the caller's).

Digests are SHA-256 of the msgpack encoding of a value as the reference encoder
writes it (:func:`~modelnet_p2p.proto.packing.packb`: ``bin`` for bytes, shortest
forms, float64, map keys in the order given)::

    h_0 = SHA-256(enc(input))
    c_i = SHA-256(enc(chunk_i))
    h_i = SHA-256(h_{i-1} || c_i)        (i = 1..n)

so ``h_k`` checks a prefix of ``k`` chunks, and a verifier that was given the
chunk digests ``c_i`` instead of the chunks checks the same chain.

Pure code: no I/O, no clock (times are passed in).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolError
from .envelope import EnvelopeFormat, Signer, decode_body, open_envelope, seal_body, verify_body
from .limits import MAX_CAPABILITY_LEN
from .packing import canonical_packb, packb
from .peerid import peer_id_bytes, peer_id_text

__all__ = [
    "DIGEST_LEN",
    "MAX_RECEIPT_SIZE",
    "RECEIPT_FILE_FORMAT",
    "MAX_USAGE_KEYS",
    "RECEIPT_DOMAIN",
    "RECEIPT_FORMAT",
    "RECEIPT_VERSION",
    "ChunkChain",
    "Receipt",
    "ReceiptCheck",
    "ReceiptError",
    "chain_digest",
    "chain_next",
    "check_receipt",
    "open_receipt",
    "from_json_value",
    "receipt_file",
    "receipt_usage",
    "seal_receipt",
    "signed_receipt",
    "to_json_value",
    "value_digest",
    "verify_receipt",
    "verify_receipt_file",
]

#: Value of the body's ``v`` field.
RECEIPT_VERSION = 1
#: Prepended to the body before signing (domain separation from every other signature).
RECEIPT_DOMAIN = b"modelnet-receipt/1:"
#: Bytes of a SHA-256 digest.
DIGEST_LEN = 32
#: Largest receipt envelope, in bytes: the fixed fields take about 300 bytes, and usage
#: counters (at most :data:`MAX_USAGE_KEYS`) the rest. A small fraction of an end frame's budget.
MAX_RECEIPT_SIZE = 4096
#: Usage counters kept in a receipt (the first ones, by key order); the rest are dropped.
MAX_USAGE_KEYS = 32
#: Longest usage key or text value kept in a receipt, in characters.
MAX_USAGE_TEXT = 64

#: Peer ids repeat (one provider, a few callers), and base58 costs tens of microseconds in
#: Python: the conversions are cached, within a bound.
_PEER_CACHE = 1024
_id_bytes = functools.lru_cache(maxsize=_PEER_CACHE)(peer_id_bytes)
_id_text = functools.lru_cache(maxsize=_PEER_CACHE)(peer_id_text)

RECEIPT_FORMAT = EnvelopeFormat(
    what="receipt", body_key="rcpt", domain=RECEIPT_DOMAIN, max_size=MAX_RECEIPT_SIZE, allow_float=True
)


class ReceiptError(ProtocolError):
    """A receipt that does not prove what it should.

    ``reason`` is one of ``malformed``, ``bad_signature``, ``wrong_peer``,
    ``wrong_request``, ``wrong_count``, ``bad_output`` (the chunks, their order or
    their digests differ from what was signed), ``bad_input``; for a chain or tree of
    receipts (``mesh/collab/trace.py``, ``mesh/collab/receipts.py``) also ``broken_chain``
    and ``missing_receipt``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def value_digest(value: Any) -> bytes:
    """SHA-256 of ``value``'s msgpack encoding (the input's ``h_0``, a chunk's ``c_i``)."""
    try:
        data = packb(value)
    except Exception as exc:  # msgpack: TypeError, OverflowError, ValueError
        raise ProtocolError(f"value cannot be encoded for a digest: {exc}") from None
    return hashlib.sha256(data).digest()


def chain_next(head: bytes, chunk_digest: bytes) -> bytes:
    """``h_i`` from ``h_{i-1}`` and ``c_i``."""
    return hashlib.sha256(head + chunk_digest).digest()


def chain_digest(input_digest: bytes, chunk_digests: Iterable[bytes]) -> bytes:
    """``h_n`` of an input digest and the chunk digests in order."""
    head = input_digest
    for c in chunk_digests:
        head = chain_next(head, c)
    return head


class ChunkChain:
    """The running digest of an answer: feed it the chunks in order.

    Both ends keep one: the provider to sign ``head``, the caller to check the
    receipt (and, on a replay, that the replayed prefix is what it already had).
    """

    __slots__ = ("count", "head", "input_digest")

    def __init__(self, input: Any = None, *, input_digest: bytes | None = None) -> None:
        self.input_digest = value_digest(input) if input_digest is None else input_digest
        self.head = self.input_digest
        self.count = 0

    def add(self, chunk: Any) -> bytes:
        """Take the next chunk; returns its digest ``c_i``."""
        c = value_digest(chunk)
        self.add_digest(c)
        return c

    def add_digest(self, chunk_digest: bytes) -> None:
        self.head = chain_next(self.head, chunk_digest)
        self.count += 1


def receipt_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The usage counters a receipt can hold: text keys with int, finite float, short text or
    bool values, at most :data:`MAX_USAGE_KEYS` of them (others are left out, not refused)."""
    out: dict[str, Any] = {}
    for key, value in usage.items():
        if len(out) >= MAX_USAGE_KEYS:
            break
        if not isinstance(key, str) or len(key) > MAX_USAGE_TEXT:
            continue
        if isinstance(value, bool) or (isinstance(value, int) and -(2**63) <= value < 2**63):
            out[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[key] = value
        elif isinstance(value, str) and len(value) <= MAX_USAGE_TEXT:
            out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Receipt:
    """The signed body of a receipt. Times are the provider's clock, in ms since the Unix epoch."""

    request_id: bytes
    capability: str
    input_digest: bytes
    output_digest: bytes
    chunks: int
    provider: str
    started_ms: int
    ended_ms: int
    finish_reason: str = "stop"
    usage: dict[str, Any] = field(default_factory=dict)
    #: The caller's peer id as the provider authenticated it (Noise), if it says.
    caller: str | None = None
    #: The trace id of the request (``req.tc.tid``), empty if none.
    trace_id: bytes = b""
    version: int = RECEIPT_VERSION

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": self.version,
            "id": self.request_id,
            "cap": self.capability,
            "in": self.input_digest,
            "out": self.output_digest,
            "n": self.chunks,
            "fin": self.finish_reason,
            "use": receipt_usage(self.usage),
            "pid": _id_bytes(self.provider),
            "t0": self.started_ms,
            "t1": self.ended_ms,
        }
        if self.caller is not None:
            body["by"] = _id_bytes(self.caller)
        if self.trace_id:
            body["tid"] = self.trace_id
        return body

    def summary(self) -> dict[str, Any]:
        """A JSON-ready view (digests and ids in hex)."""
        return {
            "version": self.version,
            "request_id": self.request_id.hex(),
            "capability": self.capability,
            "provider": self.provider,
            "caller": self.caller,
            "input_digest": self.input_digest.hex(),
            "output_digest": self.output_digest.hex(),
            "chunks": self.chunks,
            "finish_reason": self.finish_reason,
            "usage": dict(self.usage),
            "started_ms": self.started_ms,
            "ended_ms": self.ended_ms,
            "trace_id": self.trace_id.hex(),
        }


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ReceiptError("malformed", what)


def _uint(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    _need(
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63,
        f"receipt field {key!r} must be a non-negative integer",
    )
    return int(value)  # type: ignore[arg-type]


def _digest(body: dict[str, Any], key: str) -> bytes:
    value = body.get(key)
    _need(isinstance(value, bytes) and len(value) == DIGEST_LEN, f"receipt field {key!r} must be 32 bytes")
    return value  # type: ignore[return-value]


def _peer(value: Any, key: str) -> str:
    _need(isinstance(value, bytes), f"receipt field {key!r} must be a binary peer id")
    try:
        return _id_text(value)
    except ProtocolError:
        raise ReceiptError("malformed", f"receipt field {key!r} is not an Ed25519 peer id") from None


_KEYS = frozenset({"v", "id", "cap", "in", "out", "n", "fin", "use", "pid", "t0", "t1", "by", "tid"})


def _parse_body(body: dict[str, Any]) -> Receipt:
    version = _uint(body, "v")
    _need(version == RECEIPT_VERSION, f"unsupported receipt version {version}")
    _need(set(body) <= _KEYS, f"unknown receipt fields {sorted(set(body) - _KEYS)}")
    rid = body.get("id")
    _need(isinstance(rid, bytes) and 1 <= len(rid) <= 64, "receipt field 'id' must be 1-64 bytes")
    cap = body.get("cap")
    _need(
        isinstance(cap, str) and 0 < len(cap.encode()) <= MAX_CAPABILITY_LEN,
        f"receipt field 'cap' must be 1-{MAX_CAPABILITY_LEN} bytes of text",
    )
    fin = body.get("fin")
    _need(isinstance(fin, str) and len(fin) <= 64, "receipt field 'fin' must be short text")
    use = body.get("use")
    _need(isinstance(use, dict) and receipt_usage(use) == use, "receipt field 'use' is not valid usage")
    tid = body.get("tid", b"")
    _need(isinstance(tid, bytes) and len(tid) <= 32, "receipt field 'tid' must be at most 32 bytes")
    t0, t1 = _uint(body, "t0"), _uint(body, "t1")
    _need(t0 <= t1, "receipt ends before it starts")
    return Receipt(
        request_id=rid,  # type: ignore[arg-type]
        capability=cap,  # type: ignore[arg-type]
        input_digest=_digest(body, "in"),
        output_digest=_digest(body, "out"),
        chunks=_uint(body, "n"),
        provider=_peer(body.get("pid"), "pid"),
        started_ms=t0,
        ended_ms=t1,
        finish_reason=fin,  # type: ignore[arg-type]
        usage=use,  # type: ignore[arg-type]
        caller=None if "by" not in body else _peer(body["by"], "by"),
        trace_id=tid,
        version=version,
    )


def seal_receipt(receipt: Receipt, signer: Signer) -> bytes:
    """Sign ``receipt`` with ``signer`` (whose peer id must be ``receipt.provider``): the envelope."""
    if str(signer.peer_id) != receipt.provider:
        raise ValueError("a receipt is signed by the provider it names")
    body = canonical_packb(receipt.to_body(), allow_float=True)
    return seal_body(RECEIPT_FORMAT, body, signer)


def open_receipt(data: bytes | bytearray) -> Receipt:
    """Decode a receipt envelope and check its signature against the peer id it names.

    Raises :class:`ReceiptError` (``malformed`` or ``bad_signature``). This proves only
    that the named provider signed it; :func:`verify_receipt` checks it against an answer.
    """
    try:
        body, sig = open_envelope(RECEIPT_FORMAT, data)
        obj = decode_body(RECEIPT_FORMAT, body)
    except ReceiptError:
        raise
    except ProtocolError as exc:
        raise ReceiptError("malformed", exc.message) from None
    receipt = _parse_body(obj)
    if not verify_body(RECEIPT_FORMAT, obj["pid"], body, sig):
        raise ReceiptError("bad_signature", f"not signed by {receipt.provider}")
    return receipt


def signed_receipt(
    signer: Signer | None,
    chain: ChunkChain | None,
    request: Any,
    finish_reason: str,
    usage: dict[str, Any],
    caller: str,
    started_ms: int,
    ended_ms: int,
) -> dict[str, bytes]:
    """What a provider's ``end`` frame adds for a signed answer: ``{"receipt": envelope}``, or
    ``{}`` without a signer or a chain. ``request`` is the :class:`~modelnet_p2p.proto.infer.Request`
    answered, ``chain`` the answer's chunks, ``caller`` the authenticated remote peer id (text;
    left out if it is not an Ed25519 peer id)."""
    if signer is None or chain is None:
        return {}
    try:
        by: str | None = caller if _id_bytes(caller) else None
    except ProtocolError:
        by = None
    receipt = Receipt(
        request_id=request.request_id,
        capability=request.capability,
        input_digest=chain.input_digest,
        output_digest=chain.head,
        chunks=chain.count,
        provider=str(signer.peer_id),
        started_ms=started_ms,
        ended_ms=max(started_ms, ended_ms),
        finish_reason=finish_reason[:64],
        usage=receipt_usage(usage),
        caller=by,
        trace_id=request.trace.trace_id,
    )
    return {"receipt": seal_receipt(receipt, signer)}


_UNSET: Any = object()


@dataclass(frozen=True, slots=True)
class ReceiptCheck:
    """A receipt as a caller received it, and what checking it against the answer found."""

    #: The envelope, as the end frame carried it (what a receipt file holds).
    data: bytes
    receipt: Receipt | None = None
    error: ReceiptError | None = None

    def verified(self) -> Receipt:
        """The receipt, or raise the :class:`ReceiptError` that says why it does not hold."""
        if self.receipt is None:
            raise self.error or ReceiptError("malformed", "no receipt")
        return self.receipt


def check_receipt(data: bytes, **expected: Any) -> ReceiptCheck:
    """:func:`verify_receipt` as a :class:`ReceiptCheck` (a failure is kept, not raised)."""
    try:
        return ReceiptCheck(bytes(data), verify_receipt(data, **expected))
    except ReceiptError as exc:
        return ReceiptCheck(bytes(data), None, exc)


def verify_receipt(
    data: bytes | bytearray,
    *,
    provider: str | None = None,
    request_id: bytes | None = None,
    capability: str | None = None,
    chunks: Sequence[Any] | None = None,
    chunk_digests: Sequence[bytes] | None = None,
    input: Any = _UNSET,
    input_digest: bytes | None = None,
    chain: ChunkChain | None = None,
) -> Receipt:
    """Check a receipt against what the caller knows, in this order, and return its body.

    1. it decodes and is signed by the peer id it names (``malformed``, ``bad_signature``);
    2. that peer id is ``provider`` (``wrong_peer``), and the request id and capability are
       the ones given (``wrong_request``);
    3. with ``chunks`` (or their ``chunk_digests``): as many as signed (``wrong_count``) and
       the same chain of digests (``bad_output``: a changed, missing or reordered chunk);
    4. with ``input`` (or its ``input_digest``): the same input digest (``bad_input``).

    ``chain`` (a :class:`ChunkChain` fed the chunks received) stands for both the input and the
    chunks.

    What is not given is not checked. Raises :class:`ReceiptError` with the first reason.
    """
    receipt = open_receipt(data)
    if provider is not None and provider != receipt.provider:
        raise ReceiptError("wrong_peer", f"signed by {receipt.provider}, not by {provider}")
    if request_id is not None and request_id != receipt.request_id:
        raise ReceiptError("wrong_request", "the receipt is for another request id")
    if capability is not None and capability != receipt.capability:
        raise ReceiptError("wrong_request", f"the receipt is for {receipt.capability!r}, not {capability!r}")
    if chunks is not None:
        chunk_digests = [value_digest(c) for c in chunks]
    if chunk_digests is not None:
        if len(chunk_digests) != receipt.chunks:
            raise ReceiptError("wrong_count", f"{len(chunk_digests)} chunks, {receipt.chunks} signed")
        if chain_digest(receipt.input_digest, chunk_digests) != receipt.output_digest:
            raise ReceiptError("bad_output", "the chunks or their order differ from what was signed")
    if chain is not None:
        if chain.count != receipt.chunks:
            raise ReceiptError("wrong_count", f"{chain.count} chunks, {receipt.chunks} signed")
        if chain.input_digest != receipt.input_digest:
            raise ReceiptError("bad_input", "the input differs from what was signed")
        if chain.head != receipt.output_digest:
            raise ReceiptError("bad_output", "the chunks or their order differ from what was signed")
    if input is not _UNSET:
        input_digest = value_digest(input)
    if input_digest is not None and input_digest != receipt.input_digest:
        raise ReceiptError("bad_input", "the input differs from what was signed")
    return receipt


# -- the JSON file form (``modelnet verify``) --------------------------------------------------

#: The ``format`` value of a receipt file.
RECEIPT_FILE_FORMAT = "modelnet-receipt/1"


def to_json_value(value: Any) -> Any:
    """A msgpack value as JSON: bytes become ``{"$bytes": "<hex>"}``, the rest maps one to one."""
    if isinstance(value, bytes | bytearray):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    return value


def from_json_value(value: Any) -> Any:
    """The inverse of :func:`to_json_value`."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"} and isinstance(value["$bytes"], str):
            try:
                return bytes.fromhex(value["$bytes"])
            except ValueError:
                raise ReceiptError("malformed", "a $bytes value is not hex") from None
        return {k: from_json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json_value(v) for v in value]
    return value


def receipt_file(
    data: bytes, *, input: Any = _UNSET, chunks: Sequence[Any] | None = None, digests_only: bool = False
) -> dict[str, Any]:
    """The JSON form of a receipt with what it covers: the chunks themselves, or (``digests_only``)
    only their digests and the input's, so that the file shows no content."""
    out: dict[str, Any] = {"format": RECEIPT_FILE_FORMAT, "receipt": bytes(data).hex()}
    if digests_only:
        if input is not _UNSET:
            out["input_digest"] = value_digest(input).hex()
        if chunks is not None:
            out["chunk_digests"] = [value_digest(c).hex() for c in chunks]
    else:
        if input is not _UNSET:
            out["input"] = to_json_value(input)
        if chunks is not None:
            out["chunks"] = [to_json_value(c) for c in chunks]
    return out


def _hex(value: Any, what: str, length: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (length is not None and len(raw) != length):
        raise ReceiptError("malformed", f"{what} must be hex" + (f" of {length} bytes" if length else ""))
    return raw


def verify_receipt_file(obj: Any, *, provider: str | None = None) -> Receipt:
    """Check a receipt file (:func:`receipt_file`) offline: the signature, and what the file
    holds of the input and the chunks (``input`` or ``input_digest``; ``chunks`` or
    ``chunk_digests``). ``provider`` (or the file's ``provider``) is the expected peer id."""
    if not isinstance(obj, dict) or obj.get("format") != RECEIPT_FILE_FORMAT:
        raise ReceiptError("malformed", f"not a {RECEIPT_FILE_FORMAT} file")
    data = _hex(obj.get("receipt"), "'receipt'")
    kwargs: dict[str, Any] = {"provider": provider or obj.get("provider")}
    if "chunks" in obj:
        chunks = obj["chunks"]
        if not isinstance(chunks, list):
            raise ReceiptError("malformed", "'chunks' must be a list")
        kwargs["chunks"] = [from_json_value(c) for c in chunks]
    elif "chunk_digests" in obj:
        digests = obj["chunk_digests"]
        if not isinstance(digests, list):
            raise ReceiptError("malformed", "'chunk_digests' must be a list")
        kwargs["chunk_digests"] = [_hex(d, "a chunk digest", DIGEST_LEN) for d in digests]
    if "input" in obj:
        kwargs["input"] = from_json_value(obj["input"])
    elif "input_digest" in obj:
        kwargs["input_digest"] = _hex(obj["input_digest"], "'input_digest'", DIGEST_LEN)
    return verify_receipt(data, **kwargs)

"""Messages of ``/modelnet/infer/1.0.0`` (see ``specs/inference.md``).

Each message is a frozen dataclass with ``to_wire()`` (a msgpack-ready map) and
a strict parser, :func:`parse_message`, that turns a decoded map back into a
message or raises :class:`~modelnet_p2p.errors.ProtocolError`. Unknown keys are
ignored so that newer minor versions can add fields, and ``nil`` on an optional
key means its default, exactly like an absent key.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ERROR_CODES, ProtocolError
from .availability import MAX_COUNT, MAX_LATENCY_MS, MAX_TOKENS_PER_S
from .framing import encode_varint
from .limits import MAX_CAPABILITY_LEN
from .receipt import MAX_RECEIPT_SIZE

__all__ = [
    "FINISH_REASONS",
    "MAX_BATCH_CHUNKS",
    "MAX_BATCH_FRAME",
    "MAX_CAPABILITY_LEN",
    "MAX_ERROR_MESSAGE_LEN",
    "MAX_HOPS",
    "MAX_REQUEST_ID_LEN",
    "MIN_WINDOW",
    "PROTOCOL_ID",
    "PROTOCOL_VERSION",
    "Cancel",
    "Chunk",
    "ChunkBatch",
    "Credit",
    "End",
    "ErrorFrame",
    "Load",
    "Message",
    "Request",
    "TraceContext",
    "chunk_frame",
    "parse_message",
    "via_entry",
]

#: The libp2p protocol id. The major version changes only with incompatible changes.
PROTOCOL_ID = "/modelnet/infer/1.0.0"
#: Value of the ``v`` field of a request.
PROTOCOL_VERSION = 1
#: Longest request id, in bytes (16 random bytes are recommended).
MAX_REQUEST_ID_LEN = 64
#: Longest error message kept; longer ones are cut by the sender.
MAX_ERROR_MESSAGE_LEN = 4096
#: Longest capability token in a request (``tok``), in characters (``specs/token.md``).
MAX_TOKEN_FIELD_LEN = 8192
#: Largest ``hop`` count a request may carry (loops between handlers stop here).
MAX_HOPS = 32
#: Smallest flow-control window a client may grant, in bytes.
MIN_WINDOW = 1024
#: Finish reasons an end frame may carry. Others are passed through as text.
FINISH_REASONS = frozenset({"stop", "length", "cancelled"})
#: Most chunks one ``chunks`` frame carries (the batch extension, r5-bat).
MAX_BATCH_CHUNKS = 1024
#: Largest ``chunks`` frame a server sends, in bytes of body: a client asks for batches only
#: if its own frame limit is at least this, so a batch of small chunks never exceeds it.
MAX_BATCH_FRAME = 65_536


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ProtocolError(what)


def _uint(obj: dict[str, Any], key: str, *, optional: bool = False, default: int = 0) -> int:
    value = obj.get(key)
    if value is None and optional:
        return default
    _need(
        isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63,
        f"field {key!r} must be a non-negative integer",
    )
    return int(value)  # type: ignore[arg-type]


def _opt(obj: dict[str, Any], key: str, default: Any) -> Any:
    """An optional key's value: ``default`` when the key is absent or ``nil``."""
    value = obj.get(key)
    return default if value is None else value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = _opt(obj, key, False)
    _need(isinstance(value, bool), f"field {key!r} must be a boolean")
    return bool(value)


#: Longest entry of ``tc.via``, in characters.
MAX_VIA_ENTRY_LEN = 128


def via_entry(peer_id: str, capability: str) -> str:
    """The ``tc.via`` entry for a hop: ``<peer id>/<capability>``, cut to 128 characters."""
    return f"{peer_id}/{capability}"[:MAX_VIA_ENTRY_LEN]


@dataclass(frozen=True, slots=True)
class Load:
    """A provider's load, carried back on answers (``load`` of ``chunk``, ``end`` and ``err``).

    The figures mean what the availability record's ``inf``, ``q``, ``max``, ``lat`` and
    ``tps`` mean (``specs/availability.md``), within the same bounds; ``in_flight`` of an
    ``end`` or ``err`` frame leaves out the request it ends (the load a new request would
    find). ``own`` is how many of ``in_flight`` are the receiving caller's own requests,
    so that a caller that counts its own can count them once (``None``: not stated).
    """

    in_flight: int = 0
    queue: int = 0
    #: Requests the provider serves at once (``0``: not stated).
    max_concurrency: int = 0
    latency_ms: int = 0
    tokens_per_s: float = 0.0
    own: int | None = None

    @classmethod
    def clamped(
        cls,
        in_flight: float = 0,
        queue: float = 0,
        max_concurrency: float = 0,
        latency_ms: float = 0,
        tokens_per_s: float = 0.0,
        own: float | None = None,
    ) -> Load:
        """The figures rounded and clamped into the ranges the wire allows (bad values become 0;
        ``own`` at most ``in_flight``)."""

        def count(value: float, limit: int) -> int:
            return min(round(value), limit) if math.isfinite(value) and value > 0 else 0

        tps = float(tokens_per_s)
        inf = count(in_flight, MAX_COUNT)
        return cls(
            in_flight=inf,
            queue=count(queue, MAX_COUNT),
            max_concurrency=count(max_concurrency, MAX_COUNT),
            latency_ms=count(latency_ms, MAX_LATENCY_MS),
            tokens_per_s=min(tps, MAX_TOKENS_PER_S) if math.isfinite(tps) and tps > 0 else 0.0,
            own=None if own is None else count(own, inf),
        )

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"inf": self.in_flight, "q": self.queue, "max": self.max_concurrency}
        if self.own is not None:
            out["own"] = self.own
        if self.latency_ms:
            out["lat"] = self.latency_ms
        if self.tokens_per_s:
            out["tps"] = float(self.tokens_per_s)
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> Load | None:
        """The ``load`` value of a frame: ``None`` when absent or ``nil``."""
        if obj is None:
            return None
        _need(isinstance(obj, dict), "field 'load' must be a map")

        def count(key: str, limit: int) -> int:
            value = _opt(obj, key, 0)
            _need(
                isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit,
                f"field 'load.{key}' must be an unsigned 32-bit integer",
            )
            return int(value)

        tps = _opt(obj, "tps", 0.0)
        _need(
            isinstance(tps, float) and math.isfinite(tps) and 0.0 <= tps <= MAX_TOKENS_PER_S,
            f"field 'load.tps' must be a float from 0 to {MAX_TOKENS_PER_S:g}",
        )
        inf = count("inf", MAX_COUNT)
        own = None if obj.get("own") is None else count("own", MAX_COUNT)
        _need(own is None or own <= inf, "field 'load.own' must not exceed 'load.inf'")
        return cls(
            inf, count("q", MAX_COUNT), count("max", MAX_COUNT), count("lat", MAX_LATENCY_MS), tps, own
        )


def _with_load(out: dict[str, Any], load: Load | None) -> dict[str, Any]:
    if load is not None:
        out["load"] = load.to_wire()
    return out


@dataclass(frozen=True, slots=True)
class TraceContext:
    """Who asked, through whom: carried by every request so that hops can be traced and loops stopped.

    ``trace_id`` names the whole collaborative request; ``span_id`` names the
    caller's step; ``hops`` counts how many peers the request has crossed and
    ``visited`` lists their peer ids (base58 text) in order.
    """

    trace_id: bytes = b""
    span_id: bytes = b""
    hops: int = 0
    visited: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "tid": self.trace_id,
            "sid": self.span_id,
            "hop": self.hops,
            "via": list(self.visited),
        }

    @classmethod
    def from_wire(cls, obj: Any) -> TraceContext:
        if obj is None:
            return cls()
        _need(isinstance(obj, dict), "field 'tc' must be a map")
        tid = _opt(obj, "tid", b"")
        sid = _opt(obj, "sid", b"")
        _need(isinstance(tid, bytes) and len(tid) <= 32, "trace id must be at most 32 bytes")
        _need(isinstance(sid, bytes) and len(sid) <= 32, "span id must be at most 32 bytes")
        hops = _uint(obj, "hop", optional=True)
        _need(hops <= MAX_HOPS, f"hop count {hops} exceeds {MAX_HOPS}")
        via = _opt(obj, "via", [])
        _need(
            isinstance(via, list)
            and len(via) <= MAX_HOPS
            and all(isinstance(v, str) and len(v) <= MAX_VIA_ENTRY_LEN for v in via),
            "field 'via' must be a list of at most 32 peer ids",
        )
        return cls(tid, sid, hops, tuple(via))


@dataclass(frozen=True, slots=True)
class Request:
    """The first frame on a stream, client to server."""

    request_id: bytes
    capability: str
    input: Any = None
    params: dict[str, Any] = field(default_factory=dict)
    #: Milliseconds the client will wait, counted from when it sent the frame. 0 = no deadline.
    timeout_ms: int = 0
    trace: TraceContext = field(default_factory=TraceContext)
    #: Initial flow-control credit in bytes of frames the server may send unacknowledged.
    window: int = 1 << 20
    version: int = PROTOCOL_VERSION
    #: The client offers to send further requests on this stream after the end frame.
    keep: bool = False
    #: A capability token (``specs/token.md``; the ``tok`` extension of ``specs/inference.md``).
    token: str | None = None
    #: Ask the provider for a signed receipt (the ``rcpt`` extension of ``specs/inference.md``).
    receipt: bool = False
    #: Accept ``chunks`` frames, several chunks in one (the ``bat`` extension, r5-bat).
    batch: bool = False

    def to_wire(self) -> dict[str, Any]:
        out = {
            "t": "req",
            "v": self.version,
            "id": self.request_id,
            "cap": self.capability,
            "in": self.input,
            "par": self.params,
            "ttl": self.timeout_ms,
            "tc": self.trace.to_wire(),
            "win": self.window,
        }
        if self.keep:
            out["keep"] = True
        if self.token is not None:
            out["tok"] = self.token
        if self.receipt:
            out["rcpt"] = True
        if self.batch:
            out["bat"] = True
        return out


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of the answer, server to client. ``seq`` counts from 0 with no gaps."""

    seq: int
    data: Any
    #: The provider's load (the reference server sends it on the first chunk only).
    load: Load | None = None

    def to_wire(self) -> dict[str, Any]:
        return _with_load({"t": "chunk", "seq": self.seq, "d": self.data}, self.load)


@dataclass(frozen=True, slots=True)
class ChunkBatch:
    """Chunks ``seq``, ``seq + 1``, ... in one frame, server to client, sent only to a client
    that asked (``req.bat``). Each is text or bytes; there are 1 to :data:`MAX_BATCH_CHUNKS`."""

    seq: int
    data: tuple[str | bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"t": "chunks", "seq": self.seq, "d": list(self.data)}


_CHUNK_HEAD = b"\x83\xa1t\xa5chunk\xa3seq"
_BATCH_HEAD = b"\x83\xa1t\xa6chunks\xa3seq"
#: Bytes of a ``chunks`` frame besides its chunks' encodings, at most (prefix, keys, ``seq``).
BATCH_OVERHEAD = 40


def _uint_enc(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    for tag, size in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
        if n < 1 << (8 * size):
            return bytes((tag,)) + n.to_bytes(size, "big")
    raise ValueError(f"seq {n} out of range")


def chunk_frame(seq: int, encoded: list[bytes]) -> bytes:
    """The frame of the chunks ``seq``, ``seq + 1``, ... whose data are ``encoded`` (each the
    msgpack of one value): a ``chunk`` frame for one, else a ``chunks`` frame; byte for byte
    what the canonical encoder gives for :class:`Chunk` or :class:`ChunkBatch`."""
    if len(encoded) == 1:
        body = b"".join((_CHUNK_HEAD, _uint_enc(seq), b"\xa1d", encoded[0]))
    else:
        n = len(encoded)
        head = bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
        body = b"".join((_BATCH_HEAD, _uint_enc(seq), b"\xa1d", head, *encoded))
    return encode_varint(len(body)) + body


@dataclass(frozen=True, slots=True)
class End:
    """The successful last frame: how many chunks were sent, why it stopped, usage counters."""

    chunks: int
    finish_reason: str = "stop"
    usage: dict[str, Any] = field(default_factory=dict)
    #: The server keeps the stream open for another request (only if the request asked).
    keep: bool = False
    #: The provider's load once this request is done.
    load: Load | None = None
    #: The provider's signed receipt (``proto/receipt.py``), if it signs this answer.
    receipt: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": "end", "n": self.chunks, "fin": self.finish_reason, "use": self.usage}
        if self.keep:
            out["keep"] = True
        out = _with_load(out, self.load)
        if self.receipt is not None:
            out["rcpt"] = self.receipt
        return out


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    """The failed last frame. ``code`` is one of :data:`~modelnet_p2p.errors.ERROR_CODES`."""

    code: str
    message: str
    retryable: bool = False
    #: Chunks sent before the error.
    chunks: int = 0
    #: The provider's load (say, at capacity, on ``overloaded``).
    load: Load | None = None

    def to_wire(self) -> dict[str, Any]:
        out = {
            "t": "err",
            "code": self.code,
            "msg": self.message[:MAX_ERROR_MESSAGE_LEN],
            "rt": self.retryable,
            "n": self.chunks,
        }
        return _with_load(out, self.load)


@dataclass(frozen=True, slots=True)
class Credit:
    """Client to server: the client consumed ``nbytes`` more bytes of frames."""

    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": "credit", "b": self.nbytes}


@dataclass(frozen=True, slots=True)
class Cancel:
    """Client to server: stop working on this request. (Resetting the stream has the same effect.)"""

    reason: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {"t": "cancel", "why": self.reason[:MAX_ERROR_MESSAGE_LEN]}


Message = Request | Chunk | ChunkBatch | End | ErrorFrame | Credit | Cancel


def _parse_request(obj: dict[str, Any]) -> Request:
    version = _uint(obj, "v")
    _need(version == PROTOCOL_VERSION, f"unsupported protocol version {version}")
    rid = obj.get("id")
    _need(
        isinstance(rid, bytes) and 1 <= len(rid) <= MAX_REQUEST_ID_LEN,
        f"request id must be 1-{MAX_REQUEST_ID_LEN} bytes",
    )
    cap = obj.get("cap")
    _need(
        isinstance(cap, str) and 0 < len(cap.encode()) <= MAX_CAPABILITY_LEN,
        f"capability name must be 1-{MAX_CAPABILITY_LEN} bytes of text",
    )
    params = _opt(obj, "par", {})
    _need(isinstance(params, dict), "field 'par' must be a map")
    timeout_ms = _uint(obj, "ttl", optional=True)
    window = _uint(obj, "win", optional=True, default=1 << 20)
    _need(window >= MIN_WINDOW, f"window must be at least {MIN_WINDOW} bytes")
    keep = _bool(obj, "keep")
    token = _opt(obj, "tok", None)
    _need(
        token is None or (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_FIELD_LEN),
        f"field 'tok' must be text of 1-{MAX_TOKEN_FIELD_LEN} characters",
    )
    return Request(
        request_id=rid,  # type: ignore[arg-type]
        capability=cap,  # type: ignore[arg-type]
        input=obj.get("in"),
        params=params,
        timeout_ms=timeout_ms,
        trace=TraceContext.from_wire(obj.get("tc")),
        window=window,
        version=version,
        keep=keep,
        token=token,
        receipt=_bool(obj, "rcpt"),
        batch=_bool(obj, "bat"),
    )


def _parse_chunk(obj: dict[str, Any]) -> Chunk:
    # The hot path of every answer (one call per chunk): the common case checked inline.
    seq = obj.get("seq")
    if type(seq) is not int or not 0 <= seq < 2**63:
        seq = _uint(obj, "seq")  # raises
    _need("d" in obj, "chunk frame has no data")
    load = obj.get("load")
    return Chunk(seq, obj["d"], None if load is None else Load.from_wire(load))


#: The types a chunk of a ``chunks`` frame may have (exactly: no subclasses come from msgpack).
_TEXT_OR_BYTES = frozenset((str, bytes))


def _parse_batch(obj: dict[str, Any]) -> ChunkBatch:
    seq = _uint(obj, "seq")
    data = obj.get("d")
    _need(
        isinstance(data, list) and 0 < len(data) <= MAX_BATCH_CHUNKS,
        f"field 'd' of a chunks frame must be a list of 1-{MAX_BATCH_CHUNKS} chunks",
    )
    assert isinstance(data, list)
    # the types of the chunks, checked in C (a Python test per chunk was most of a frame's parse)
    _need(_TEXT_OR_BYTES.issuperset(map(type, data)), "a chunks frame holds only text or bytes")
    return ChunkBatch(seq, tuple(data))


def _parse_end(obj: dict[str, Any]) -> End:
    fin = _opt(obj, "fin", "stop")
    _need(isinstance(fin, str) and len(fin) <= 64, "finish reason must be short text")
    usage = _opt(obj, "use", {})
    _need(isinstance(usage, dict), "field 'use' must be a map")
    rcpt = _opt(obj, "rcpt", None)
    _need(
        rcpt is None or (isinstance(rcpt, bytes) and len(rcpt) <= MAX_RECEIPT_SIZE),
        f"field 'rcpt' must be at most {MAX_RECEIPT_SIZE} bytes",
    )
    load = Load.from_wire(obj.get("load"))
    return End(_uint(obj, "n"), fin, usage, keep=_bool(obj, "keep"), load=load, receipt=rcpt)


def _parse_error(obj: dict[str, Any]) -> ErrorFrame:
    code = obj.get("code")
    _need(isinstance(code, str) and len(code) <= 64, "error code must be short text")
    msg = _opt(obj, "msg", "")
    _need(isinstance(msg, str), "error message must be text")
    return ErrorFrame(
        code,  # type: ignore[arg-type]
        msg[:MAX_ERROR_MESSAGE_LEN],
        _bool(obj, "rt"),
        _uint(obj, "n", optional=True),
        Load.from_wire(obj.get("load")),
    )


def _parse_credit(obj: dict[str, Any]) -> Credit:
    return Credit(_uint(obj, "b"))


def _parse_cancel(obj: dict[str, Any]) -> Cancel:
    why = _opt(obj, "why", "")
    _need(isinstance(why, str), "cancel reason must be text")
    return Cancel(why)


_PARSERS: dict[str, Callable[[dict[str, Any]], Message]] = {
    "req": _parse_request,
    "chunk": _parse_chunk,
    "chunks": _parse_batch,
    "end": _parse_end,
    "err": _parse_error,
    "credit": _parse_credit,
    "cancel": _parse_cancel,
}


def parse_message(obj: dict[str, Any]) -> Message:
    """Turn a decoded frame body into a message, or raise :class:`ProtocolError`."""
    kind = obj.get("t")
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise ProtocolError(f"unknown frame type {kind!r}")
    return parser(obj)


def is_known_error_code(code: str) -> bool:
    """Whether ``code`` is one of the codes this version defines."""
    return code in ERROR_CODES

"""The two ends of ``/modelnet/infer/1.0.0`` as state machines: bytes in, events out, no I/O.

Modelled on h11's ``Connection``: a :class:`ServerSession` or :class:`ClientSession`
holds everything one stream's protocol needs to know (frame decoding, the request
and its admission checks, chunk sequence numbers, the credit window, stream reuse,
deadlines), but never touches a stream, a task or a clock. The caller feeds it the
bytes it read (``receive_data``/``receive_eof``), asks it for events
(``next_event``), tells it what the application wants to send, writes what
``data_to_send`` hands back, and passes the time (``now``, in any monotonic unit of
seconds) wherever time matters. So every transition is testable without sockets
(``tests/test_session.py``), and the rules live in one place (``specs/inference.md``,
"Stream lifecycle" and "Flow control").

``next_event`` returns :data:`NEED_DATA` when it needs more bytes, and
:data:`PAUSED` when it will not read further until the state changes (a request
waits for admission, an error is being sent, the stream is finished). A caller
that reads only after :data:`NEED_DATA` holds at most one frame plus one read.

Misuse by the caller (sending a chunk when no request runs, say) raises
:class:`SessionStateError`; anything the remote does wrong is a
:class:`~modelnet_p2p.errors.ProtocolError` for the client, and an ``err`` frame
(:class:`ProtocolViolation`) for the server.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    InternalError,
    ModelNetError,
    ProtocolError,
)
from .capability import capability_key
from .client_session import (
    CREDIT_FRACTION,
    DEFAULT_WINDOW,
    NEED_DATA,
    PAUSED,
    BatchEvent,
    ChunkReceived,
    ChunksReceived,
    ClientEvent,
    ClientSession,
    ClientState,
    ErrorReceived,
    Finished,
    SessionStateError,
    Wait,
)
from .framing import (
    BYTES_PER_CONTROL_FRAME,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_CONTROL_FRAMES,
    FrameDecoder,
    pack_frame,
)
from .infer import (
    BATCH_OVERHEAD,
    MAX_BATCH_CHUNKS,
    MAX_BATCH_FRAME,
    MAX_HOPS,
    Cancel,
    Chunk,
    Credit,
    End,
    ErrorFrame,
    Load,
    Message,
    Request,
    chunk_frame,
    parse_message,
    via_entry,
)
from .packing import packer

__all__ = [
    "CREDIT_FRACTION",
    "DEADLINE_GRACE",
    "DEFAULT_WINDOW",
    "IDLE_STREAM_TIMEOUT",
    "MAX_WRITE_BATCH",
    "NEED_DATA",
    "PAUSED",
    "REQUEST_READ_TIMEOUT",
    "BatchEvent",
    "CancelReceived",
    "ChunkReceived",
    "ChunksReceived",
    "ClientClosed",
    "ClientEvent",
    "ClientGone",
    "ClientSession",
    "ClientState",
    "CreditReceived",
    "ErrorReceived",
    "Finished",
    "Limits",
    "ProtocolViolation",
    "RequestReceived",
    "RequestRejected",
    "ServerEvent",
    "ServerSession",
    "ServerState",
    "SessionStateError",
    "TimedOut",
    "Wait",
]

#: Largest batch of ready frames the server hands out at once (one stream write): one
#: write per chunk costs ~167 us in py-libp2p 0.8.1, a joined write ~13 us per chunk.
MAX_WRITE_BATCH = 256 * 1024
#: Seconds a server waits for the first request frame of a stream.
REQUEST_READ_TIMEOUT = 10.0
#: Seconds a server keeps a kept stream idle before closing it (longer than the
#: reference client's 20 s pool idle time, so normally the client closes first).
IDLE_STREAM_TIMEOUT = 60.0
#: Seconds past its deadline a request may spend blocked on credit before the server
#: sends ``deadline_exceeded`` regardless of the window.
DEADLINE_GRACE = 1.0


@dataclass
class Limits:
    """A server's limits (``specs/inference.md``, "Limits"). Exceeding a concurrency limit answers
    ``overloaded``; the session enforces the frame size, the hop limit and the timeouts, and the
    service the concurrency limits."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_concurrency: int = 128
    max_concurrency_per_peer: int = 64
    #: Upper bound on a request's run time, whatever deadline the client sent (seconds).
    max_request_time: float = 600.0
    #: Requests that crossed more peers than this are refused (loops between handlers); at most 32.
    max_hops: int = 8
    request_read_timeout: float = REQUEST_READ_TIMEOUT
    idle_stream_timeout: float = IDLE_STREAM_TIMEOUT
    deadline_grace: float = DEADLINE_GRACE

    def __post_init__(self) -> None:
        if self.max_frame_size < 1024:
            raise ConfigError("max_frame_size must be at least 1024 bytes")
        if self.max_concurrency < 1 or self.max_concurrency_per_peer < 1:
            raise ConfigError("concurrency limits must be at least 1")
        if not 0 <= self.max_hops <= MAX_HOPS:
            raise ConfigError(f"max_hops must be between 0 and {MAX_HOPS}")
        if not self.max_request_time > 0:
            raise ConfigError("max_request_time must be positive")


def _frame_name(msg: Message) -> str:
    return type(msg).__name__


# -- server --------------------------------------------------------------------


class ServerState(enum.Enum):
    #: A new stream: waiting for its first request.
    AWAIT_REQUEST = "await_request"
    #: A request arrived and passed the session's checks; call ``accept`` or ``reject``.
    ADMITTING = "admitting"
    #: The handler runs: ``send_chunk``, then ``send_end`` or ``send_error``.
    RUNNING = "running"
    #: The final frame is queued; ``data_to_send`` hands it out when the window allows.
    FINISHING = "finishing"
    #: A kept stream between requests.
    IDLE = "idle"
    #: Done: close the stream (after writing what ``data_to_send`` returned).
    CLOSED = "closed"
    #: Done: reset the stream and send nothing more.
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A request passed the frame, hop-limit and loop checks: admit it (``accept``) or ``reject`` it."""

    request: Request


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request broke the hop limit or came back in a loop; its ``err`` is queued."""

    request: Request
    error: ModelNetError


@dataclass(frozen=True, slots=True)
class CreditReceived:
    nbytes: int


@dataclass(frozen=True, slots=True)
class CancelReceived:
    """The client cancelled the running request: stop the handler and reset the stream."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientGone:
    """The client ended its side before a request was complete: stop any handler and reset."""


@dataclass(frozen=True, slots=True)
class ClientClosed:
    """The client closed a kept stream between requests: close it too."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The client broke the protocol; an ``err`` (``protocol_error``) is queued, then close."""

    error: ProtocolError


@dataclass(frozen=True, slots=True)
class TimedOut:
    """Returned by ``on_timeout``: what ran out and what the session did about it."""

    reason: str


ServerEvent = (
    RequestReceived
    | RequestRejected
    | CreditReceived
    | CancelReceived
    | ClientGone
    | ClientClosed
    | ProtocolViolation
)

# What sits in the server's output queue: (frame bytes, kind, is final, sent regardless of window);
# kind 0: not a chunk, 1: a chunk frame, _RAW: a chunk's data alone (packed, to be framed with
# its neighbours into one ``chunks`` frame when it goes out).
_Out = tuple[bytes, int, bool, bool]
_RAW = 2


def _plain_usage(usage: dict[str, Any] | None) -> dict[str, Any]:
    return {str(k): v for k, v in (usage or {}).items() if isinstance(v, int | float | str | bool)}


class ServerSession:
    """The server end of one inference stream (one request at a time, several with ``keep``).

    ``now`` is the time the stream was accepted. ``local_peer`` (base58 text) is used for
    the loop check against ``tc.via``. ``load``, if given, returns the provider's load, an
    accepted request counted in ``in_flight`` (and ``own``) until it is done; the session
    writes it into the first chunk, ``end`` and ``err`` of every request (the last two
    without the request they end).
    """

    def __init__(
        self,
        now: float,
        limits: Limits | None = None,
        *,
        local_peer: str = "",
        load: Callable[[], Load | None] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.local_peer = local_peer
        self._load_of = load
        self._accepted = False
        self.state = ServerState.AWAIT_REQUEST
        #: The current (or last) request.
        self.request: Request | None = None
        #: The server's deadline for the running request (``now`` units), or ``inf``.
        self.deadline = math.inf
        self._decoder = FrameDecoder(self.limits.max_frame_size)
        self._eof = False
        self._reading = True
        self._since = now
        self._out: deque[_Out] = deque()
        self._out_bytes = 0  # of the chunks in _out
        # One encoder for the session's chunks (a Packer made per call costs 0.3 us a chunk).
        self._pack = packer()
        self._max_frame = self.limits.max_frame_size
        self._window = 0
        self._sent = self._controls = 0
        self._acked = 0
        self._queued_chunks = 0
        self._written_chunks = 0
        self._keep = self._batch = False
        #: How the current (or last) request ended: ``None`` after ``end``, else the code of its
        #: ``err``, ``"cancelled"`` if the client left, ``"unavailable"`` if the stream broke.
        self.final_code: str | None = None
        #: Requests accepted on this stream so far.
        self.requests_served = 0

    # -- input -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the stream. Call only after :data:`NEED_DATA`."""
        if self._eof:
            raise SessionStateError("data after end of stream")
        if self._reading:
            self._decoder.receive(data)

    def receive_eof(self) -> None:
        """The client closed its write side (or, on yamux in py-libp2p 0.8.1, reset the stream)."""
        self._eof = True

    def connection_lost(self) -> None:
        """A read or write failed: the stream is broken. Nothing more can be sent."""
        if self.state in (ServerState.ADMITTING, ServerState.RUNNING, ServerState.FINISHING):
            self.final_code = "unavailable"
        self._clear_out()
        self.state = ServerState.RESET
        self._reading = False

    def next_event(self) -> ServerEvent | Wait:
        """The next thing the client did, :data:`NEED_DATA` or :data:`PAUSED`."""
        while True:
            if not self._reading or self.state in (
                ServerState.ADMITTING,
                ServerState.CLOSED,
                ServerState.RESET,
            ):
                return PAUSED
            self._decoder.expect_control(self.state in (ServerState.RUNNING, ServerState.FINISHING))
            try:
                body = self._decoder.next_frame()
            except ProtocolError as exc:
                return self._violation(exc)
            if body is None:
                # An end of stream before the final frame means the client is gone (it must
                # not close its side earlier); between requests, that it closed the stream.
                return self._gone() if self._eof else NEED_DATA
            try:
                msg = parse_message(body)
            except ProtocolError as exc:
                return self._violation(exc)
            if isinstance(msg, Credit | Cancel) and self.state is not ServerState.AWAIT_REQUEST:
                self._controls += 1
                if self._controls > MAX_CONTROL_FRAMES + self._sent // BYTES_PER_CONTROL_FRAME:
                    return self._violation(ProtocolError("more control frames than the answer justifies"))
                if self.state is ServerState.IDLE:
                    # Leftovers of the request that just ended (the client sends credit as it
                    # reads, and may send it after the end frame left): ignored.
                    continue
            return self._on_message(msg)

    def _gone(self) -> ServerEvent:
        self._reading = False
        self._clear_out()
        if self.state is ServerState.IDLE and not self._decoder.buffered:
            self.state = ServerState.CLOSED
            return ClientClosed()
        if self.state in (ServerState.RUNNING, ServerState.FINISHING):
            self.final_code = "cancelled"
        self.state = ServerState.RESET
        return ClientGone()

    def _violation(self, exc: ProtocolError) -> ProtocolViolation:
        self.abort(exc)
        return ProtocolViolation(exc)

    def _on_message(self, msg: Message) -> ServerEvent:
        state = self.state
        if state in (ServerState.AWAIT_REQUEST, ServerState.IDLE):
            if isinstance(msg, Request):
                return self._on_request(msg)
            return self._violation(ProtocolError(f"expected a request frame, got {_frame_name(msg)}"))
        # RUNNING or FINISHING
        if isinstance(msg, Credit):
            self._acked = min(self._sent, self._acked + msg.nbytes)
            return CreditReceived(msg.nbytes)
        if isinstance(msg, Cancel):
            self._reading = False
            self._clear_out()
            self.state = ServerState.RESET
            self.final_code = "cancelled"
            return CancelReceived(msg.reason)
        return self._violation(ProtocolError(f"unexpected {_frame_name(msg)} frame from client"))

    def _on_request(self, req: Request) -> ServerEvent:
        self.request = req
        self._window = req.window
        self._sent = self._acked = self._queued_chunks = self._written_chunks = self._controls = 0
        self._accepted, self._batch = False, req.batch
        self.final_code = None
        self.deadline = math.inf
        error = self._check_path(req)
        if error is not None:
            self.state = ServerState.RUNNING
            self._finish(ErrorFrame(error.code, error.message, error.retryable, 0), keep=False)
            return RequestRejected(req, error)
        self.state = ServerState.ADMITTING
        return RequestReceived(req)

    def _check_path(self, req: Request) -> ModelNetError | None:
        """The hop limit, then the loop check (before the capability is even looked up)."""
        max_hops = self.limits.max_hops
        if req.trace.hops > max_hops:
            return BadRequestError(
                f"hop limit exceeded: the request crossed {req.trace.hops} peers "
                f"(limit {max_hops}); is there a loop between handlers?"
            )
        mine = via_entry(self.local_peer, req.capability)
        my_cap = capability_key(mine[len(self.local_peer) + 1 :])
        for entry in req.trace.visited:
            peer, _, cap = entry.partition("/")
            if peer == self.local_peer and capability_key(cap) == my_cap:
                return BadRequestError(
                    f"loop detected: {req.capability!r} on this peer is already on the request's path"
                )
        return None

    # -- admission -----------------------------------------------------------------

    def accept(self, now: float) -> float:
        """Run the admitted request from ``now``; returns its deadline.

        The deadline is ``now + min(ttl, max_request_time)``, or ``now + max_request_time``
        for a request without one.
        """
        if self.state is not ServerState.ADMITTING or self.request is None:
            raise SessionStateError(f"accept in state {self.state.name}")
        max_time = self.limits.max_request_time
        ttl = self.request.timeout_ms / 1000.0
        self.deadline = now + (min(ttl, max_time) if ttl else max_time)
        self.state = ServerState.RUNNING
        self._accepted = True
        self.requests_served += 1
        return self.deadline

    def reject(self, error: ModelNetError) -> None:
        """Refuse the admitted request with ``error`` (``not_found``, ``overloaded``, ...), then close."""
        if self.state is not ServerState.ADMITTING:
            raise SessionStateError(f"reject in state {self.state.name}")
        self.state = ServerState.RUNNING
        self._finish(ErrorFrame(error.code, error.message, error.retryable, 0), keep=False)

    # -- output ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """A handler's output is still wanted."""
        return self.state is ServerState.RUNNING

    @property
    def queued_frames(self) -> int:
        """Frames waiting for ``data_to_send`` (for the handler's backpressure)."""
        return len(self._out)

    @property
    def queued_bytes(self) -> int:
        """Bytes of the chunks waiting for ``data_to_send`` (their frames, or their data alone
        when they go out in a batch)."""
        return self._out_bytes

    @property
    def chunks_written(self) -> int:
        """Chunks of the current request handed out by ``data_to_send``."""
        return self._written_chunks

    @property
    def outstanding(self) -> int:
        """Bytes handed out and not yet acknowledged by credit."""
        return self._sent - self._acked

    def _load(self, final: bool = True) -> Load | None:
        """The load to report; a final frame's does not count its request (``specs/inference.md``)."""
        load = self._load_of() if self._load_of is not None else None
        if load is not None and final and self._accepted and load.in_flight:
            own = None if load.own is None else max(0, load.own - 1)
            load = replace(load, in_flight=load.in_flight - 1, own=own)
        return load

    def _need_running(self, what: str) -> None:
        if self.state is not ServerState.RUNNING:
            raise SessionStateError(f"{what} in state {self.state.name}")

    def offer_chunk(self, data: Any, max_queued: int, max_small: int, max_bytes: int) -> bool:
        """Queue ``data`` if it may go at once (``False``: nothing done; use :meth:`send_chunk`).

        It may when the request runs and accepts batches, its first chunk is out, ``data`` is
        text or bytes, and fewer than ``max_queued`` frames wait, or fewer than ``max_small``
        whose bytes with these stay within ``max_bytes``: the caller's backpressure rule, in
        one call (the hot path of a fast handler, per chunk)."""
        if self.state is not ServerState.RUNNING or not self._written_chunks or not self._batch:
            return False
        kind = type(data)
        if kind is str:
            bound = 4 * len(data) + 5  # UTF-8, and the largest msgpack header
        elif kind is bytes:
            bound = len(data) + 5
        else:
            return False
        queued = len(self._out)
        if queued >= max_queued and (queued >= max_small or self._out_bytes + bound > max_bytes):
            return False
        enc = self._pack(data)
        if len(enc) + BATCH_OVERHEAD > self._max_frame:
            return False  # send_chunk says why
        self._out.append((enc, _RAW, False, False))
        self._out_bytes += len(enc)
        self._queued_chunks += 1
        return True

    def send_chunk(self, data: Any) -> bool:
        """Queue one chunk. Returns ``False`` if it could not be encoded: then the request
        fails with ``internal`` (queued as its final frame) and the handler should stop."""
        self._need_running("send_chunk")
        if self._queued_chunks and self._batch and type(data) in (str, bytes) and self._send_raw(data):
            return True  # (the first chunk goes alone, with the load)
        chunk = Chunk(self._queued_chunks, data)
        try:
            if chunk.seq == 0 and (load := self._load(final=False)) is not None:
                try:  # the first chunk carries the load, unless that makes it too large
                    frame = pack_frame(replace(chunk, load=load).to_wire(), self.limits.max_frame_size)
                except ProtocolError:
                    frame = pack_frame(chunk.to_wire(), self.limits.max_frame_size)
            else:
                frame = pack_frame(chunk.to_wire(), self.limits.max_frame_size)
        except ProtocolError as exc:
            self.send_error(InternalError(f"handler produced a chunk too large to send: {exc.message}"))
            return False
        except Exception as exc:  # msgpack: TypeError, OverflowError, ValueError, ...
            self.send_error(InternalError(f"handler produced a chunk that cannot be encoded: {exc}"))
            return False
        self._out.append((frame, 1, False, False))
        self._out_bytes += len(frame)
        self._queued_chunks += 1
        return True

    def _send_raw(self, data: str | bytes) -> bool:
        """Queue a text or bytes chunk of a request that accepts batches, packed alone."""
        enc = self._pack(data)
        if len(enc) + BATCH_OVERHEAD > self.limits.max_frame_size:
            return False
        self._out.append((enc, _RAW, False, False))
        self._out_bytes += len(enc)
        self._queued_chunks += 1
        return True

    def _clear_out(self) -> None:
        self._out.clear()
        self._out_bytes = 0

    def send_end(self, finish_reason: str = "stop", usage: dict[str, Any] | None = None, **kw: bytes) -> None:
        """Queue the ``end`` frame (``receipt=``: a sealed receipt); the stream is kept if asked."""
        self._need_running("send_end")
        assert self.request is not None
        keep, use = self.request.keep, _plain_usage(usage)
        end = End(self._queued_chunks, finish_reason[:64], use, keep=keep, load=self._load(), **kw)
        try:
            frame = pack_frame(end.to_wire(), self.limits.max_frame_size)
        except Exception as exc:
            self.send_error(InternalError(f"usage cannot be encoded: {exc}"))
            return
        self.final_code = None
        self._keep = keep
        self._out.append((frame, 0, True, False))
        self.state = ServerState.FINISHING

    def send_error(self, error: ModelNetError) -> None:
        """Queue an ``err`` frame after the chunks already queued (they are all delivered first)."""
        self._need_running("send_error")
        self._finish(ErrorFrame(error.code, error.message, error.retryable, self._queued_chunks), keep=False)

    def _finish(self, frame: ErrorFrame, *, keep: bool, exempt: bool = False) -> None:
        frame = replace(frame, load=self._load())
        self.final_code = frame.code
        self._keep = keep
        self._out.append((pack_frame(frame.to_wire(), self.limits.max_frame_size), 0, True, exempt))
        self.state = ServerState.FINISHING

    def abort(self, error: ModelNetError) -> None:
        """End the request now with ``error``: chunks not yet handed out are dropped, the ``err``
        frame counts the chunks handed out and is sent regardless of the window, nothing more is
        read, and the stream is closed after it."""
        if self.state in (ServerState.CLOSED, ServerState.RESET):
            return
        self._clear_out()
        self._reading = False
        n = self._written_chunks if self.state in (ServerState.RUNNING, ServerState.FINISHING) else 0
        self.state = ServerState.RUNNING
        self._finish(ErrorFrame(error.code, error.message, error.retryable, n), keep=False, exempt=True)

    def _room(self, nbytes: int) -> bool:
        # A frame may go if it fits in the window, or if less than a quarter of the
        # window is unacknowledged: the client only returns credit in quarter-window
        # steps, so below that it may have read everything and be waiting for this frame.
        outstanding = self._sent - self._acked
        return outstanding + nbytes <= self._window or outstanding < self._window // CREDIT_FRACTION

    def data_to_send(self, now: float, max_bytes: int = MAX_WRITE_BATCH) -> bytes:
        """The queued frames the window allows, joined (at least one if any fits; at most
        ``max_bytes`` unless a single frame is larger). The window is checked per frame. The
        caller must write all of it; ``now`` starts the idle timer if the final frame is
        among them."""
        out: list[bytes] = []
        size = 0
        while self._out:
            frame, kind, is_final, exempt = self._out[0]
            if kind == _RAW:
                frame, n = self._batch_frame(max_bytes - size, alone=not out)
                if not n:
                    break
                out.append(frame)
                size += len(frame)
                self._sent += len(frame)
                self._written_chunks += n
                continue
            if out and size + len(frame) > max_bytes:
                break
            if not exempt and not self._room(len(frame)):
                break
            self._out.popleft()
            out.append(frame)
            size += len(frame)
            self._sent += len(frame)
            if kind:
                self._written_chunks += 1
                self._out_bytes -= len(frame)
            if is_final:
                self._final_out(now)
                break
        return b"".join(out)

    def _batch_frame(self, budget: int, *, alone: bool) -> tuple[bytes, int]:
        """Take the packed chunks at the head of the queue that fit one frame of ``budget`` bytes
        (any size if ``alone``, within the frame limit) and the window, at most
        :data:`MAX_BATCH_CHUNKS` and :data:`MAX_BATCH_FRAME`: their frame and how many (0: none)."""
        items: list[bytes] = []
        bound = BATCH_OVERHEAD  # an upper bound of the frame's size
        limit = min(budget, self.limits.max_frame_size, MAX_BATCH_FRAME)
        fits = self._window - (self._sent - self._acked)  # what a batch of several may take
        for enc, kind, _, _ in self._out:
            size = bound + len(enc)
            if kind != _RAW or size > limit or len(items) == MAX_BATCH_CHUNKS:
                break
            if size > fits and (items or not self._room(size)):
                break  # a batch fits the window: it never lets out more than single frames would
            items.append(enc)
            bound = size
        if not items:  # the exact size of one chunk frame may fit where the bound did not
            frame = chunk_frame(self._written_chunks, [self._out[0][0]])
            if (len(frame) > budget and not alone) or not self._room(len(frame)):
                return b"", 0
            items.append(self._out[0][0])
        popleft = self._out.popleft
        for _ in items:
            popleft()
        self._out_bytes -= sum(map(len, items))
        return chunk_frame(self._written_chunks, items), len(items)

    def _final_out(self, now: float) -> None:
        self._clear_out()
        if self._keep and self._reading:
            self.state = ServerState.IDLE
            self._since = now
        else:
            self.state = ServerState.CLOSED
            self._reading = False

    # -- time --------------------------------------------------------------------

    def timeout_at(self) -> float:
        """When :meth:`on_timeout` has something to do, in ``now`` units (``inf`` if never)."""
        if self.state is ServerState.AWAIT_REQUEST:
            return self._since + self.limits.request_read_timeout
        if self.state is ServerState.IDLE:
            return self._since + self.limits.idle_stream_timeout
        if self.state in (ServerState.RUNNING, ServerState.FINISHING) and self._reading:
            return self.deadline + self.limits.deadline_grace
        return math.inf

    def on_timeout(self, now: float) -> TimedOut | None:
        """Apply whatever timed out by ``now``: no request in time (reset), an idle kept stream
        (close), or a request still unfinished past its deadline plus grace (``deadline_exceeded``
        regardless of the window, then close)."""
        if now < self.timeout_at():
            return None
        if self.state is ServerState.AWAIT_REQUEST:
            self.state = ServerState.RESET
            self._reading = False
            return TimedOut(f"no request frame within {self.limits.request_read_timeout:g} s")
        if self.state is ServerState.IDLE:
            self.state = ServerState.CLOSED
            self._reading = False
            return TimedOut(f"kept stream idle for {self.limits.idle_stream_timeout:g} s")
        self.abort(DeadlineExceededError("deadline exceeded on the provider"))
        return TimedOut("deadline exceeded")

"""The client end of ``/modelnet/infer/1.0.0`` as a state machine: bytes in, events out, no I/O.

The counterpart of :class:`~modelnet_p2p.proto.session.ServerSession` (see that module for
the model both follow), with what both ends share: :class:`Wait`, :class:`SessionStateError`
and the window constants. :mod:`modelnet_p2p.proto.session` re-exports all of it.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import (
    BadRequestError,
    DeadlineExceededError,
    ModelNetError,
    ProtocolError,
    UnavailableError,
    error_from_code,
)
from .framing import DEFAULT_MAX_FRAME_SIZE, MAX_ANSWER_SIZE, FrameDecoder, pack_frame
from .infer import Cancel, Chunk, ChunkBatch, Credit, End, ErrorFrame, Load, Message, Request, parse_message

__all__ = [
    "CREDIT_FRACTION",
    "DEFAULT_WINDOW",
    "NEED_DATA",
    "PAUSED",
    "BatchEvent",
    "ChunkReceived",
    "ChunksReceived",
    "ClientEvent",
    "ClientSession",
    "ClientState",
    "ErrorReceived",
    "Finished",
    "SessionStateError",
    "Wait",
]

#: Default flow-control window a client grants, in bytes: well under the ~4 MiB
#: py-libp2p 0.8.1's yamux lets pile up unread before it resets a stream.
DEFAULT_WINDOW = 1 << 20
#: The client returns credit once this fraction (1/4) of the window was read, and the
#: server may send any frame while less than this fraction is unacknowledged.
CREDIT_FRACTION = 4


class Wait(enum.Enum):
    """What ``next_event`` returns when it has no event."""

    #: Feed more bytes (``receive_data``) or the end of stream (``receive_eof``).
    NEED_DATA = "need data"
    #: Nothing more is read until the state changes.
    PAUSED = "paused"


NEED_DATA = Wait.NEED_DATA
PAUSED = Wait.PAUSED


class SessionStateError(RuntimeError):
    """The local code used a session wrongly (a bug here, not the remote's fault)."""




class ClientState(enum.Enum):
    #: Created; ``send_request`` gives the request frame.
    SEND_REQUEST = "send_request"
    #: Reading the answer.
    RECEIVING = "receiving"
    #: The answer ended with ``end``.
    DONE = "done"
    #: The request failed or was abandoned: reset the stream.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ChunkReceived:
    seq: int
    data: Any
    #: The provider's load, if the chunk carried it.
    load: Load | None = None


@dataclass(frozen=True, slots=True)
class ChunksReceived:
    """Chunks in order, from :meth:`ClientSession.next_batch`: every chunk the bytes received so
    far hold, from one frame or several (``seq`` is the first one's)."""

    seq: int
    data: list[Any]
    #: The provider's load, if one of the chunk frames carried it (the latest).
    load: Load | None = None


@dataclass(frozen=True, slots=True)
class Finished:
    """The ``end`` frame: the answer is complete."""

    end: End


@dataclass(frozen=True, slots=True)
class ErrorReceived:
    """The ``err`` frame, as the exception for its code (``chunks_delivered`` set)."""

    error: ModelNetError
    #: The provider's load, if the frame carried it.
    load: Load | None = None


ClientEvent = ChunkReceived | Finished | ErrorReceived
BatchEvent = ChunksReceived | Finished | ErrorReceived


class ClientSession:
    """The client end of one request on a stream.

    ``request.timeout_ms`` is ignored: :meth:`send_request` sends the time left before
    ``deadline`` in its place (``request`` itself is kept as given).
    ``reused`` says the stream was kept from an earlier request, so that an end of stream
    before any byte of the answer can be told apart (:attr:`closed_before_answer`). An
    answer may be at most ``max_answer_size`` bytes."""

    def __init__(
        self,
        request: Request,
        *,
        deadline: float = math.inf,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        reused: bool = False,
        max_answer_size: int = MAX_ANSWER_SIZE,
    ) -> None:
        self.request = request
        self.deadline = deadline
        self.max_frame_size, self.max_answer_size = max_frame_size, max_answer_size
        self.reused = reused
        self.state = ClientState.SEND_REQUEST
        self._decoder = FrameDecoder(max_frame_size)
        self._eof = False
        self._unacked = 0
        #: Chunks received in order so far.
        self.chunks = 0
        self._pending: deque[str | bytes] = deque()  # the rest of a ``chunks`` frame
        #: A frame after chunks that :meth:`next_batch` parsed but has not acted on yet.
        self._held: Message | None = None
        self._held_error: ProtocolError | None = None
        #: Bytes read from the stream so far.
        self.bytes_received = 0
        self._reusable = False
        #: The stream ended cleanly before any byte of the answer, on a reused stream: a server
        #: that closed its idle stream never read the request (``specs/inference.md``, "Stream reuse").
        self.closed_before_answer = False

    def send_request(self, now: float) -> bytes:
        """The request frame. Raises :class:`DeadlineExceededError` if ``now`` is past the
        deadline, :class:`BadRequestError` if the request cannot be encoded or is too large."""
        if self.state is not ClientState.SEND_REQUEST:
            raise SessionStateError(f"send_request in state {self.state.name}")
        self.state = ClientState.FAILED
        if now >= self.deadline:
            raise DeadlineExceededError("deadline exceeded before the request was sent")
        ttl = 0 if math.isinf(self.deadline) else max(1, int((self.deadline - now) * 1000))
        try:
            body = self.request.to_wire()
            body["ttl"] = ttl  # in its place among the keys: the bytes of a request with timeout_ms=ttl
            frame = pack_frame(body, self.max_frame_size)
        except ProtocolError as exc:
            raise BadRequestError(f"request too large: {exc.message}") from None
        except Exception as exc:
            raise BadRequestError(f"request cannot be encoded: {exc}") from None
        self.state = ClientState.RECEIVING
        return frame

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the stream. Call only after :data:`NEED_DATA`."""
        if self.state is not ClientState.RECEIVING or self._eof:
            raise SessionStateError(f"receive_data in state {self.state.name}")
        self._unacked += len(data)
        self.bytes_received += len(data)
        self._decoder.receive(data)

    def receive_eof(self) -> None:
        self._eof = True

    def data_to_send(self) -> bytes:
        """A ``credit`` frame once a quarter of the window was read (send it before handing
        out the chunks: those bytes are off the stream), else ``b""``."""
        if self.state is ClientState.RECEIVING and self._unacked >= self.request.window // CREDIT_FRACTION:
            frame = pack_frame(Credit(self._unacked).to_wire(), self.max_frame_size)
            self._unacked = 0
            return frame
        return b""

    def _fail(self, message: str, *, retryable: bool = False) -> ProtocolError:
        self.state = ClientState.FAILED
        return ProtocolError(message, chunks_delivered=self.chunks, retryable=retryable)

    def next_event(self) -> ClientEvent | Wait:
        """The next part of the answer, or :data:`NEED_DATA`. Raises :class:`ProtocolError` for any
        breach by the server, a truncated answer included (then the state is ``FAILED``)."""
        if self.state is not ClientState.RECEIVING:
            return PAUSED
        if self._pending:
            self.chunks += 1
            return ChunkReceived(self.chunks - 1, self._pending.popleft())
        msg = self._next_message()
        if isinstance(msg, Wait):
            return msg
        if isinstance(msg, Chunk):
            if msg.seq != self.chunks:
                raise self._fail(f"chunk sequence {msg.seq} where {self.chunks} was expected")
            self.chunks += 1
            return ChunkReceived(msg.seq, msg.data, msg.load)
        if isinstance(msg, ChunkBatch) and self.request.batch:
            if msg.seq != self.chunks:
                raise self._fail(f"chunk sequence {msg.seq} where {self.chunks} was expected")
            self._pending.extend(msg.data[1:])
            self.chunks += 1
            return ChunkReceived(msg.seq, msg.data[0])
        return self._final(msg)

    def next_batch(self) -> BatchEvent | Wait:
        """Like :meth:`next_event`, but every chunk the bytes received so far hold comes as one
        :class:`ChunksReceived` (the chunks of every ``chunk`` and ``chunks`` frame buffered, in
        order; never an empty list): one event a read, not one a chunk. The frame after them
        (``end``, ``err``), or the breach of the protocol, is the next call's. Use one of the
        two methods per session."""
        if self._held_error is not None:
            error, self._held_error = self._held_error, None
            raise error
        if self.state is not ClientState.RECEIVING:
            return PAUSED
        seq = self.chunks
        items: list[Any] = []
        load: Load | None = None
        if self._pending:
            items.extend(self._pending)
            self._pending.clear()
            self.chunks += len(items)
        try:
            while True:
                msg = self._next_message()
                kind = type(msg)
                if kind is Chunk:
                    assert isinstance(msg, Chunk)
                    if msg.seq != self.chunks:
                        raise self._fail(f"chunk sequence {msg.seq} where {self.chunks} was expected")
                    items.append(msg.data)
                    self.chunks += 1
                    if msg.load is not None:
                        load = msg.load
                    continue
                if kind is ChunkBatch and self.request.batch:
                    assert isinstance(msg, ChunkBatch)
                    if msg.seq != self.chunks:
                        raise self._fail(f"chunk sequence {msg.seq} where {self.chunks} was expected")
                    items.extend(msg.data)
                    self.chunks += len(msg.data)
                    continue
                if items:
                    if not isinstance(msg, Wait):
                        self._held = msg  # acted on at the next call, after these chunks
                    return ChunksReceived(seq, items, load)
                if isinstance(msg, Wait):
                    return msg
                return self._final(msg)
        except ProtocolError as exc:
            if not items:
                raise
            self._held_error = exc  # the chunks before the breach are delivered first
            return ChunksReceived(seq, items, load)

    def _next_message(self) -> Message | Wait:
        """The next frame, parsed, or :data:`NEED_DATA`; raises at a truncated answer."""
        if self._held is not None:
            msg, self._held = self._held, None
            return msg
        if self.bytes_received > self.max_answer_size:  # a provider that never stops
            raise self._fail(f"answer larger than {self.max_answer_size} bytes")
        try:
            body = self._decoder.next_frame()
        except ProtocolError as exc:
            raise self._fail(exc.message) from None
        if body is None:
            if not self._eof:
                return NEED_DATA
            if self._decoder.buffered:
                raise self._fail(
                    f"answer truncated after {self.chunks} chunks: stream ended inside a frame "
                    f"({self._decoder.buffered} bytes left over)",
                    retryable=True,
                )
            self.closed_before_answer = self.reused and self.bytes_received == 0
            # Usually the provider died: another one may well succeed, so this is retryable.
            raise self._fail(f"stream ended after {self.chunks} chunks without an end frame", retryable=True)
        try:
            return parse_message(body)
        except ProtocolError as exc:
            raise self._fail(exc.message) from None

    def _final(self, msg: Message) -> Finished | ErrorReceived:
        """Act on a frame that is not a chunk: the end of the answer, an error, or a breach."""
        if isinstance(msg, End):
            if msg.chunks != self.chunks:
                raise self._fail(f"end frame says {msg.chunks} chunks but {self.chunks} arrived")
            self.state = ClientState.DONE
            self._reusable = msg.keep and self.request.keep and not self._decoder.buffered and not self._eof
            return Finished(msg)
        if isinstance(msg, ErrorFrame):
            self.state = ClientState.FAILED
            error = error_from_code(
                msg.code, msg.message, retryable=msg.retryable, chunks_delivered=self.chunks
            )
            return ErrorReceived(error, msg.load)
        raise self._fail(f"unexpected {_frame_name(msg)} frame from server")

    @property
    def reusable(self) -> bool:
        """The request ended cleanly and both sides agreed to keep the stream."""
        return self.state is ClientState.DONE and self._reusable

    def deadline_exceeded(self) -> DeadlineExceededError:
        """The client's own deadline passed: the request fails (reset the stream)."""
        self.state = ClientState.FAILED
        return DeadlineExceededError(
            f"deadline exceeded after {self.chunks} chunks", chunks_delivered=self.chunks
        )

    def connection_lost(self, detail: str = "") -> UnavailableError:
        """A read or write failed: the request fails as ``unavailable`` (retryable)."""
        self.state = ClientState.FAILED
        what = f"stream to provider failed after {self.chunks} chunks"
        return UnavailableError(f"{what}: {detail}" if detail else what, chunks_delivered=self.chunks)

    def cancel(self, reason: str = "client stopped") -> bytes:
        """Abandon the request: the ``cancel`` frame to send before resetting the stream
        (``b""`` if the request already ended)."""
        if self.state is not ClientState.RECEIVING:
            if self.state is ClientState.SEND_REQUEST:
                self.state = ClientState.FAILED
            return b""
        self.state = ClientState.FAILED
        return pack_frame(Cancel(reason).to_wire(), self.max_frame_size)


def _frame_name(msg: Message) -> str:
    return type(msg).__name__

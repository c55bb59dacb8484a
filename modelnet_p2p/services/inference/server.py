"""``/modelnet/infer/1.0.0``: streamed inference requests between peers.

Server side: :class:`InferenceServer` accepts streams, runs the capability's
handler, and writes its chunks under the client's flow-control credit, joining
every frame that is ready into one stream write. Client side:
:func:`run_request` sends a request on an open stream and yields chunks,
checking sequence numbers and the end frame so that a truncated answer is
always an error. The wire format is in ``specs/inference.md``.

Flow control: a yamux stream in py-libp2p 0.8.1 lets about 4 MiB pile up
unread, then resets the stream. So the server never has more than ``window``
bytes of frames unacknowledged; the client returns credit as it reads.
A slow consumer therefore slows the handler down instead of losing the stream.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamEOF, StreamReset

from ...errors import (
    BadRequestError,
    DeadlineExceededError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
    error_from_code,
    exception_leaves,
)
from ...proto.capability import Capability
from ...proto.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, pack_frame
from ...proto.infer import (
    Cancel,
    Chunk,
    Credit,
    End,
    ErrorFrame,
    Request,
    TraceContext,
    parse_message,
)
from .handlers import Handler, InferenceRequest, handler_kind, run_handler

__all__ = [
    "via_entry",
    "DEFAULT_WINDOW",
    "READ_SIZE",
    "REQUEST_READ_TIMEOUT",
    "InferenceServer",
    "Limits",
    "ResponseInfo",
    "run_request",
]

log = logging.getLogger(__name__)

#: Default flow-control window the client grants, in bytes. Well under the
#: ~4 MiB that yamux in py-libp2p 0.8.1 tolerates unread before resetting.
DEFAULT_WINDOW = 1 << 20
#: Bytes asked of the stream per read.
READ_SIZE = 1 << 16
#: How long a server waits for the request frame after a stream opens.
REQUEST_READ_TIMEOUT = 10.0
#: How long a server keeps an idle stream open for a next request (``keep``).
#: Longer than the client's pool idle time, so that normally the client closes.
IDLE_STREAM_TIMEOUT = 60.0
#: Largest batch of frames the server joins into one write.
MAX_WRITE_BATCH = 256 * 1024
#: The client returns credit once this fraction (1/4) of the window is read.
CREDIT_FRACTION = 4
#: Chunks a handler may run ahead of the writer.
HANDLER_BUFFER = 64
#: How long past its deadline a request may take to report the deadline before
#: the server resets the stream instead.
DEADLINE_GRACE = 1.0


@dataclass
class Limits:
    """Server-side limits. Exceeding a concurrency limit answers ``overloaded``."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_concurrency: int = 128
    max_concurrency_per_peer: int = 64
    #: Upper bound on a request's run time, whatever deadline the client sent (seconds).
    max_request_time: float = 600.0
    #: Requests that crossed more peers than this are refused (loops between handlers).
    max_hops: int = 8


@dataclass
class _Served:
    capability: Capability
    handler: Handler
    kind: str
    in_flight: int = 0


class _Credit:
    """The server's view of the client's flow-control window."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.sent = 0
        self.acked = 0
        self._changed = trio.Event()

    def outstanding(self) -> int:
        return self.sent - self.acked

    def grant(self, nbytes: int) -> None:
        self.acked = min(self.sent, self.acked + nbytes)
        self._changed.set()
        self._changed = trio.Event()

    def has_room(self, nbytes: int) -> bool:
        # A frame may go if it fits in the window, or if less than a quarter of
        # the window is unacknowledged: the client only returns credit in
        # quarter-window steps, so below that it may already have read
        # everything and be waiting for this very frame.
        outstanding = self.outstanding()
        return outstanding + nbytes <= self.window or outstanding < self.window // CREDIT_FRACTION

    async def wait_room(self, nbytes: int) -> None:
        while not self.has_room(nbytes):
            await self._changed.wait()


class InferenceServer:
    """Serves registered capabilities on incoming inference streams.

    Each accepted stream is handled in ``nursery`` (the peer's), so no request
    outlives the peer.
    """

    def __init__(self, local_peer: str, limits: Limits) -> None:
        self.local_peer = local_peer
        self.limits = limits
        self._served: dict[str, _Served] = {}
        self._in_flight = 0
        self._per_peer: dict[str, int] = {}
        self._nursery: trio.Nursery | None = None
        #: While draining, new requests are refused with ``unavailable`` (retryable)
        #: and requests already running finish.
        self.draining = False
        #: Builds the ``request.mesh`` context for handlers (set by the Peer).
        self.mesh_factory: Callable[[InferenceRequest], Any] | None = None
        self.on_request_done: Callable[[str, str, float, int, str | None], None] | None = None

    # -- registry ------------------------------------------------------------

    def add(self, capability: Capability, handler: Handler) -> None:
        kind = handler_kind(handler)
        self._served[capability.name] = _Served(capability, handler, kind)

    def remove(self, name: str) -> None:
        self._served.pop(name, None)

    def capabilities(self) -> list[Capability]:
        return [s.capability for s in self._served.values()]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self) -> None:
        """Return once no request is running."""
        while self._in_flight:
            await trio.sleep(0.05)

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- stream handling -----------------------------------------------------

    async def handle_stream(self, stream: INetStream) -> None:
        """The libp2p stream handler: hand the stream to the peer's nursery and return."""
        if self._nursery is None:
            await _reset(stream)
            return
        self._nursery.start_soon(self._serve_stream, stream)

    async def _serve_stream(self, stream: INetStream) -> None:
        # This must never raise: an exception escaping a handler stops the host.
        try:
            await self._serve(stream)
        except Exception:
            log.exception("inference stream failed")
            await _reset(stream)

    async def _serve(self, stream: INetStream) -> None:
        """Serve one stream: one request, or several in turn if the client keeps it open."""
        remote = str(stream.muxed_conn.peer_id)
        max_frame = self.limits.max_frame_size
        # One reader for the stream's whole life feeds its frames through a
        # channel. Cancelling a read in py-libp2p's yamux can lose bytes already
        # taken from its buffer, so reads are never cancelled mid-stream.
        inbox_send, inbox = trio.open_memory_channel[Any](32)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_frames, stream, FrameDecoder(max_frame), inbox_send)
            timeout = REQUEST_READ_TIMEOUT
            while True:
                try:
                    msg = await _next_request(inbox, timeout)
                except ProtocolError as exc:
                    log.info("bad request stream from %s: %s", remote, exc.message)
                    await _send_error_and_close(stream, exc, 0, max_frame)
                    break
                except _ClientGone:
                    await _close_quietly(stream)
                    break
                except trio.TooSlowError:
                    if timeout == REQUEST_READ_TIMEOUT:
                        log.info("no request frame from %s within %.0f s", remote, timeout)
                        await _reset(stream)
                    else:
                        await _close_quietly(stream)  # an idle kept stream
                    break
                if not await self._admit_and_run(stream, msg, remote, inbox):
                    break
                timeout = IDLE_STREAM_TIMEOUT
            nursery.cancel_scope.cancel()

    async def _admit_and_run(
        self, stream: INetStream, msg: Request, remote: str, inbox: trio.MemoryReceiveChannel[Any]
    ) -> bool:
        """Admit and serve one request. Returns True if the stream stays open for another."""
        served = self._served.get(msg.capability)
        error: ModelNetError | None = None
        if served is None:
            error = NotFoundError(f"capability {msg.capability!r} is not served by this peer")
        elif msg.trace.hops > self.limits.max_hops:
            error = BadRequestError(
                f"hop limit exceeded: the request crossed {msg.trace.hops} peers "
                f"(limit {self.limits.max_hops}); is there a loop between handlers?"
            )
        elif via_entry(self.local_peer, msg.capability) in msg.trace.visited:
            error = BadRequestError(
                f"loop detected: {msg.capability!r} on this peer is already on the request's path"
            )
        elif self.draining:
            error = UnavailableError("peer is draining; try another provider")
        elif self._in_flight >= self.limits.max_concurrency:
            error = OverloadedError("peer is at its concurrency limit")
        elif self._per_peer.get(remote, 0) >= self.limits.max_concurrency_per_peer:
            error = OverloadedError("too many concurrent requests from your peer")
        elif (
            served.capability.max_concurrency is not None
            and served.in_flight >= served.capability.max_concurrency
        ):
            error = OverloadedError(f"capability {msg.capability!r} is at its concurrency limit")
        if error is not None:
            await _send_error_and_close(stream, error, 0, self.limits.max_frame_size)
            return False
        assert served is not None

        self._in_flight += 1
        self._per_peer[remote] = self._per_peer.get(remote, 0) + 1
        served.in_flight += 1
        started = time.monotonic()
        outcome: str | None = "internal"
        chunks = 0
        keep = False
        try:
            chunks, outcome, keep = await self._run(stream, msg, served, remote, inbox)
        finally:
            self._in_flight -= 1
            served.in_flight -= 1
            left = self._per_peer[remote] - 1
            if left:
                self._per_peer[remote] = left
            else:
                del self._per_peer[remote]
            if self.on_request_done is not None:
                self.on_request_done(
                    served.capability.name, remote, time.monotonic() - started, chunks, outcome
                )
        return keep

    async def _run(
        self,
        stream: INetStream,
        req: Request,
        served: _Served,
        remote: str,
        inbox: trio.MemoryReceiveChannel[Any],
    ) -> tuple[int, str | None, bool]:
        """Run the handler and stream its answer.

        Returns (chunks sent, error code or None, whether the stream stays open).
        """
        max_time = self.limits.max_request_time
        timeout = min(req.timeout_ms / 1000.0, max_time) if req.timeout_ms else max_time
        deadline = trio.current_time() + timeout
        request = InferenceRequest(
            request_id=req.request_id,
            capability=served.capability,
            input=req.input,
            params=req.params,
            deadline=deadline,
            remote_peer=remote,
            cancel_scope=trio.CancelScope(deadline=deadline),
            trace=req.trace,
            _wall_deadline=time.monotonic() + timeout,
        )
        if self.mesh_factory is not None:
            request.mesh = self.mesh_factory(request)
        credit = _Credit(req.window)
        send, recv = trio.open_memory_channel[Any](HANDLER_BUFFER)
        state = _ServeState(keep_requested=req.keep)
        max_frame = self.limits.max_frame_size

        async def emit(item: Any) -> None:
            # Queue without yielding to the scheduler when there is room, so a
            # fast handler's chunks pile up and the writer sends them in one
            # write; a handler that awaits between chunks still has each one
            # written at once (the writer runs while the handler waits).
            try:
                send.send_nowait(item)
            except trio.WouldBlock:
                await send.send(item)

        async def produce() -> None:
            async with send:
                try:
                    with request.cancel_scope:
                        await run_handler(served.handler, served.kind, request, emit)
                except Exception as exc:
                    state.handler_error = exc
                    if not isinstance(exc, ModelNetError):
                        log.warning(
                            "handler for %r raised %s: %s",
                            served.capability.name,
                            type(exc).__name__,
                            exc,
                        )
                if request.cancel_scope.cancelled_caught and not state.client_gone:
                    state.handler_error = DeadlineExceededError(
                        f"deadline of {timeout:.3f} s exceeded on the provider"
                    )

        def encode(item: Any) -> tuple[bytes, bool]:
            """One outgoing frame for a handler item; ``True`` if it is the last frame."""
            if item is _END:
                return self._final_frame(state, request, max_frame), True
            try:
                frame = pack_frame(Chunk(state.chunks, item).to_wire(), max_frame)
            except ProtocolError as exc:
                state.handler_error = InternalError(
                    f"handler produced a chunk too large to send: {exc.message}"
                )
                return self._final_frame(state, request, max_frame), True
            except Exception as exc:
                state.handler_error = InternalError(f"handler produced a chunk that cannot be encoded: {exc}")
                return self._final_frame(state, request, max_frame), True
            state.chunks += 1
            return frame, False

        async def write() -> None:
            # Coalescing writer: every frame that is ready when the writer gets
            # its turn goes out in one stream write, but the first one never
            # waits for company. Measured in py-libp2p 0.8.1: one write per
            # chunk costs ~167 us, a joined write ~13 us per chunk.
            frames: list[bytes] = []
            queued = 0
            done = False
            async with recv:
                while True:
                    if not frames and not done:
                        try:
                            item = await recv.receive()
                        except trio.EndOfChannel:
                            item = _END
                        frame, done = encode(item)
                        frames.append(frame)
                        queued += len(frame)
                    while not done and queued < MAX_WRITE_BATCH:
                        try:
                            item = recv.receive_nowait()
                        except trio.WouldBlock:
                            break
                        except trio.EndOfChannel:
                            item = _END
                        frame, done = encode(item)
                        frames.append(frame)
                        queued += len(frame)
                    if not frames:
                        break
                    # Send as many frames as the client's window has room for.
                    await credit.wait_room(len(frames[0]))
                    take, nbytes = 1, len(frames[0])
                    while take < len(frames) and credit.has_room(nbytes + len(frames[take])):
                        nbytes += len(frames[take])
                        take += 1
                    payload = b"".join(frames[:take]) if take > 1 else frames[0]
                    del frames[:take]
                    queued -= nbytes
                    credit.sent += nbytes
                    await write_whole(stream, payload)
                    if done and not frames:
                        break
            if not state.keep:
                await stream.close()

        async def control() -> None:
            # Credits and cancels from the client, via the stream's reader.
            while True:
                item = await inbox.receive()
                if item is _GONE:
                    raise _ClientGone()
                if isinstance(item, ProtocolError):
                    raise item
                msg = parse_message(item)
                if isinstance(msg, Credit):
                    credit.grant(msg.nbytes)
                elif isinstance(msg, Cancel):
                    raise _ClientGone()
                else:
                    raise ProtocolError(f"unexpected {type(msg).__name__} frame from client")

        outcome: BaseException | None = None
        with trio.move_on_at(deadline + DEADLINE_GRACE) as overall:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(produce)
                    nursery.start_soon(control)
                    await write()
                    # The reader never finishes by itself; stop it once the answer is out.
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                _, rest = group.split(trio.Cancelled)
                if rest is None:
                    raise  # the peer is stopping: let cancellation propagate
                outcome = _most_telling(rest)
            except Exception as exc:
                outcome = exc
        if overall.cancelled_caught:
            # The writer was stuck (no credit from the client) past the deadline.
            request._cancelled.set()
            await _send_error_and_close(
                stream,
                DeadlineExceededError("deadline exceeded on the provider"),
                state.chunks,
                max_frame,
            )
            return state.chunks, "deadline_exceeded", False
        if outcome is None:
            err = state.handler_error
            if err is None:
                return state.chunks, None, state.keep
            return state.chunks, err.code if isinstance(err, ModelNetError) else "internal", False
        request._cancelled.set()
        if isinstance(outcome, _ClientGone):
            state.client_gone = True
            await _reset(stream)
            return state.chunks, "cancelled", False
        if isinstance(outcome, ProtocolError):
            await _send_error_and_close(stream, outcome, state.chunks, max_frame)
            return state.chunks, outcome.code, False
        if not isinstance(outcome, _NETWORK_ERRORS):
            log.error("inference stream from %s failed: %r", remote, outcome)
        await _reset(stream)
        return state.chunks, "unavailable", False

    @staticmethod
    def _final_frame(state: _ServeState, request: InferenceRequest, max_frame: int) -> bytes:
        err = state.handler_error
        if err is None:
            state.keep = state.keep_requested
            end = End(state.chunks, request.finish_reason, _plain_usage(request.usage), keep=state.keep)
            return pack_frame(end.to_wire(), max_frame)
        if isinstance(err, ModelNetError):
            frame = ErrorFrame(err.code, err.message, err.retryable, state.chunks)
        else:
            frame = ErrorFrame("internal", f"handler raised {type(err).__name__}: {err}", False, state.chunks)
        return pack_frame(frame.to_wire(), max_frame)


_GONE = object()

#: Longest a single stream write may take before the stream is given up.
WRITE_TIMEOUT = 30.0


async def write_whole(stream: INetStream, data: bytes, timeout: float = WRITE_TIMEOUT) -> None:
    """Write ``data`` without letting a cancellation cut it in half.

    py-libp2p 0.8.1's Noise transport is not cancel-safe: a write cancelled
    part-way leaves a partial Noise message on the connection, and every
    stream on it breaks. So writes are shielded from the caller's
    cancellation; a write that cannot finish within ``timeout`` (the peer
    stopped reading for that long) resets the stream instead.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout) as scope:
            await stream.write(data)
        if scope.cancelled_caught:
            await _reset(stream)
            raise UnavailableError(f"stream write blocked for {timeout:.0f} s")


async def _read_frames(stream: INetStream, decoder: FrameDecoder, out: trio.MemorySendChannel[Any]) -> None:
    """Read a stream until it ends, sending each frame body (a dict) to ``out``.

    Ends with ``_GONE`` (EOF, reset or a broken connection) or a
    :class:`ProtocolError` object (malformed or oversized frame).
    """
    async with out:
        try:
            while True:
                data = await stream.read(READ_SIZE)
                for body in decoder.feed(data):
                    await out.send(body)
        except ProtocolError as exc:
            await out.send(exc)
        except (StreamEOF, StreamReset, BaseLibp2pError, OSError, trio.BrokenResourceError):
            await out.send(_GONE)


async def _next_request(inbox: trio.MemoryReceiveChannel[Any], timeout: float) -> Request:
    """The next request on a stream. Credits and cancels left over from the previous one are skipped.

    Raises ``trio.TooSlowError`` after ``timeout``, :class:`_ClientGone` if the
    stream ended, :class:`ProtocolError` for anything else.
    """
    with trio.fail_after(timeout):
        while True:
            item = await inbox.receive()
            if item is _GONE:
                raise _ClientGone()
            if isinstance(item, ProtocolError):
                raise item
            msg = parse_message(item)
            if isinstance(msg, Request):
                return msg
            if not isinstance(msg, (Credit, Cancel)):
                raise ProtocolError(f"expected a request frame, got {type(msg).__name__}")


async def _close_quietly(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        try:
            await stream.close()
        except Exception:
            await _reset(stream)


def via_entry(peer_id: str, capability: str) -> str:
    """The ``tc.via`` entry for a hop: ``<peer id>/<capability>``, at most 128 characters."""
    return f"{peer_id}/{capability}"[:128]


class _ClientGone(Exception):
    pass


_NETWORK_ERRORS = (
    StreamReset,
    StreamEOF,
    BaseLibp2pError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _most_telling(group: BaseExceptionGroup[Any]) -> BaseException:
    """Pick the exception that explains a failed serving nursery best.

    The client leaving explains everything else (the writer's reset, say);
    then a protocol breach; then whatever came first.
    """
    leaves = exception_leaves(group)
    for kind in (_ClientGone, ProtocolError):
        for exc in leaves:
            if isinstance(exc, kind):
                return exc
    for exc in leaves:
        if not isinstance(exc, trio.Cancelled):
            return exc
    return leaves[0]


_END = object()


@dataclass
class _ServeState:
    chunks: int = 0
    handler_error: BaseException | None = None
    keep_requested: bool = False
    keep: bool = False
    client_gone: bool = False


def _plain_usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v for k, v in usage.items() if isinstance(v, (int, float, str, bool))}


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True):
        with trio.move_on_after(2):
            try:
                await stream.reset()
            except Exception:
                pass


async def _send_error_and_close(stream: INetStream, exc: ModelNetError, chunks: int, max_frame: int) -> None:
    frame = pack_frame(ErrorFrame(exc.code, exc.message, exc.retryable, chunks).to_wire(), max_frame)
    with trio.CancelScope(shield=True):
        with trio.move_on_after(2):
            try:
                await stream.write(frame)
                await stream.close()
                return
            except Exception:
                pass
        await _reset(stream)


# -- client side -------------------------------------------------------------


@dataclass
class ResponseInfo:
    """What the client learns about a request besides its chunks."""

    peer: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    first_chunk_at: float | None = None
    ended: float | None = None
    #: Bytes read from the provider so far.
    received: int = 0
    #: With routing: each provider tried, ``{"peer", "status", "chunks", "ms", "error"}``.
    attempts: list[dict[str, Any]] = field(default_factory=list)


def new_request_id() -> bytes:
    return os.urandom(16)


async def run_request(
    stream: INetStream,
    *,
    capability: str,
    input: Any,
    params: dict[str, Any],
    deadline: float,
    trace: TraceContext,
    info: ResponseInfo,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    window: int = DEFAULT_WINDOW,
    request_id: bytes | None = None,
    release: Callable[[INetStream], None] | None = None,
) -> AsyncIterator[Any]:
    """Send a request on ``stream`` and yield the answer's chunks.

    Raises the :class:`ModelNetError` subclass of an error frame, a
    :class:`ProtocolError` for any breach of the protocol (including a stream
    that ends without an end frame, or an end frame whose count disagrees),
    :class:`DeadlineExceededError` at ``deadline`` (trio time), and
    :class:`UnavailableError` if the stream breaks. The stream is always closed
    (after a complete answer) or reset (otherwise), even if the consumer stops
    iterating early, which cancels the remote handler.

    With ``release``, the client offers to keep the stream for another request;
    if the server agrees (``end.keep``), the stream is handed to ``release``
    instead of being closed.
    """
    timeout_ms = 0 if math.isinf(deadline) else max(1, int((deadline - trio.current_time()) * 1000))
    req = Request(
        request_id=request_id or new_request_id(),
        capability=capability,
        input=input,
        params=params,
        timeout_ms=timeout_ms,
        trace=trace,
        window=window,
        keep=release is not None,
    )
    try:
        frame = pack_frame(req.to_wire(), max_frame_size)
    except ProtocolError as exc:
        await _reset(stream)
        raise BadRequestError(f"request too large: {exc.message}") from None
    except Exception as exc:
        await _reset(stream)
        raise BadRequestError(f"request cannot be encoded: {exc}") from None

    decoder = FrameDecoder(max_frame_size)
    expected = 0
    unacked = 0
    complete = False
    kept = False
    info.started = time.monotonic()
    try:
        if trio.current_time() >= deadline:
            raise DeadlineExceededError("deadline exceeded before the request was sent")
        await write_whole(stream, frame)
        while True:
            data = b""
            with trio.move_on_at(deadline) as scope:
                try:
                    data = await stream.read(READ_SIZE)
                except StreamEOF:
                    try:
                        decoder.close()
                    except ProtocolError as exc:
                        raise ProtocolError(
                            f"answer truncated after {expected} chunks: {exc.message}",
                            chunks_delivered=expected,
                            retryable=True,
                        ) from None
                    # Usually the provider died (its connection closed): another
                    # provider may well succeed, so this one is retryable.
                    raise ProtocolError(
                        f"stream ended after {expected} chunks without an end frame",
                        chunks_delivered=expected,
                        retryable=True,
                    ) from None
            if scope.cancelled_caught:
                raise DeadlineExceededError(
                    f"deadline exceeded after {expected} chunks", chunks_delivered=expected
                )
            unacked += len(data)
            info.received += len(data)
            try:
                bodies = decoder.feed(data)
            except ProtocolError as exc:
                exc.chunks_delivered = expected
                raise
            if unacked >= window // CREDIT_FRACTION:
                # Return credit before handing chunks out: the bytes are off the stream.
                await write_whole(stream, pack_frame(Credit(unacked).to_wire(), max_frame_size))
                unacked = 0
            for body in bodies:
                msg = parse_message(body)
                if isinstance(msg, Chunk):
                    if msg.seq != expected:
                        raise ProtocolError(
                            f"chunk sequence {msg.seq} where {expected} was expected",
                            chunks_delivered=expected,
                        )
                    expected += 1
                    info.chunks = expected
                    if info.first_chunk_at is None:
                        info.first_chunk_at = time.monotonic()
                    yield msg.data
                elif isinstance(msg, End):
                    if msg.chunks != expected:
                        raise ProtocolError(
                            f"end frame says {msg.chunks} chunks but {expected} arrived",
                            chunks_delivered=expected,
                        )
                    info.finish_reason = msg.finish_reason
                    info.usage = msg.usage
                    info.ended = time.monotonic()
                    complete = True
                    kept = msg.keep and release is not None and not decoder.buffered
                    return
                elif isinstance(msg, ErrorFrame):
                    raise error_from_code(
                        msg.code, msg.message, retryable=msg.retryable, chunks_delivered=expected
                    )
                else:
                    raise ProtocolError(
                        f"unexpected {type(msg).__name__} frame from server",
                        chunks_delivered=expected,
                    )
    except StreamReset:
        raise UnavailableError(
            f"provider reset the stream after {expected} chunks", chunks_delivered=expected
        ) from None
    except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise UnavailableError(
            f"stream to provider failed after {expected} chunks: {exc}", chunks_delivered=expected
        ) from None
    finally:
        if kept:
            assert release is not None
            release(stream)
        elif complete:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await stream.close()
                except Exception:
                    await _reset(stream)
        else:
            # Say why before resetting: py-libp2p's yamux shows a reset to the
            # remote reader as a plain end of stream.
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                try:
                    await stream.write(pack_frame(Cancel("client stopped").to_wire(), max_frame_size))
                except Exception:
                    pass
            await _reset(stream)

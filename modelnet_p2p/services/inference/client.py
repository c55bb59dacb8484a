"""The client side of ``/modelnet/infer/1.0.0``: send a request on a stream, yield its chunks.

The protocol (sequence numbers, the end frame's count, credit, whether a stream may
be kept) is :class:`~modelnet_p2p.proto.session.ClientSession`; :func:`run_request_batches`
drives it with trio, and :func:`request_batches_on_peer` adds the idle-stream pool: it takes a
kept stream if there is one, and resends on a new stream only when the server
provably never read the request.

Both yield the answer in *batches*: lists of the chunks one read of the stream brought
(one ``chunks`` frame holds up to 1,024), so that the layers above pay per read, not per
chunk. :func:`run_request` and :func:`request_on_peer` give the same chunks one at a time.

A provider that stops sending mid-stream is caught by the *stall timeout*: once the first
chunk has arrived, a read that waits ``stall_timeout`` seconds for the next one (counted
from the later of the last chunk and the consumer's last pull, so a slow consumer is not
taken for a stalled provider) ends the request with :class:`StalledError`, a retryable
:class:`UnavailableError` the mesh client fails over on and bans for.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ...errors import ModelNetError, UnavailableError
from ...p2p.stream import (
    STREAM_ERRORS,
    Stream,
    StreamEOF,
    StreamReset,
    close_quietly,
    remote_peer,
    reset_by_remote,
    reset_quietly,
    write_whole,
)
from ...proto.framing import DEFAULT_MAX_FRAME_SIZE
from ...proto.infer import MAX_BATCH_FRAME, Load, Request, TraceContext
from ...proto.receipt import ChunkChain, ReceiptCheck, check_receipt
from ...proto.session import (
    DEFAULT_WINDOW,
    NEED_DATA,
    ChunksReceived,
    ClientSession,
    ClientState,
    ErrorReceived,
    Finished,
)
from ..access import current_token

__all__ = [
    "DEFAULT_WINDOW",
    "READ_SIZE",
    "ResponseInfo",
    "StaleStreamError",
    "StalledError",
    "StreamSource",
    "new_request_id",
    "request_batches_on_peer",
    "request_on_peer",
    "run_request",
    "run_request_batches",
]

log = logging.getLogger(__name__)

#: Bytes asked of the stream per read (256 KiB: a 64 KiB read per bulk chunk cost the client
#: about 30 % more CPU per chunk; the stream holds at most its window anyway).
READ_SIZE = 1 << 18
#: How long a ``cancel`` frame may take to write before the stream is reset anyway.
CANCEL_TIMEOUT = 0.5


@dataclass
class ResponseInfo:
    """What the client learns about a request besides its chunks.

    Times are :func:`trio.current_time` values.
    """

    peer: str = ""
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    first_chunk_at: float | None = None
    ended: float | None = None
    #: Bytes read from the provider so far.
    received: int = 0
    #: The provider's load, as its latest frame that carried one said (``specs/inference.md``).
    load: Load | None = None
    #: When :attr:`load` arrived.
    load_at: float | None = None
    #: With routing: each provider tried, ``{"peer", "status", "chunks", "ms", "error"}``.
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: The provider's receipt, checked against the chunks received (when the request asked for one).
    receipt: ReceiptCheck | None = None


class StaleStreamError(UnavailableError):
    """A kept stream ended cleanly before any byte of the answer: the server had closed it
    while idle and never read the request, so it may be sent again on a new stream."""


class StalledError(UnavailableError):
    """The provider sent nothing for ``stall_timeout`` seconds after its first chunk, or no
    chunk within ``first_chunk_timeout`` seconds."""


def new_request_id() -> bytes:
    return os.urandom(16)


async def one_by_one(batches: AsyncIterator[list[Any]]) -> AsyncIterator[Any]:
    """The chunks of ``batches``, one at a time (closing ``batches`` when done or abandoned)."""
    try:
        async for batch in batches:
            for chunk in batch:
                yield chunk
    finally:
        await batches.aclose()  # type: ignore[attr-defined]


def run_request(stream: Stream, **kwargs: Any) -> AsyncIterator[Any]:
    """:func:`run_request_batches`, one chunk at a time (the same arguments)."""
    return one_by_one(run_request_batches(stream, **kwargs))


async def run_request_batches(
    stream: Stream,
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
    release: Callable[[Stream], None] | None = None,
    reused: bool = False,
    stall_timeout: float | None = None,
    receipt: bool = False,
    first_chunk_by: float | None = None,
) -> AsyncIterator[list[Any]]:
    """Send a request on ``stream`` and yield the answer's chunks in batches: each a non-empty
    list of the chunks one read of the stream brought, in order (with ``receipt``, ask for a
    signed receipt and check it into ``info.receipt``: ``specs/inference.md``, "Signed receipts").

    Raises the :class:`ModelNetError` subclass of an error frame, a
    :class:`ProtocolError` for any breach of the protocol (including a stream
    that ends without an end frame, or an end frame whose count disagrees),
    :class:`DeadlineExceededError` at ``deadline`` (trio time), and
    :class:`UnavailableError` if the stream breaks; :class:`StalledError` if, after the first
    chunk, nothing arrives for ``stall_timeout`` seconds (``None``: no stall timeout), or if
    no chunk has arrived by ``first_chunk_by`` (trio time; ``None``: no such bound; routing
    sets it, so that a provider silent from the start is failed over, not waited for);
    :class:`StaleStreamError` if ``reused`` and the stream ended before any byte of the
    answer. The stream is always
    closed (after a complete answer) or reset (otherwise), even if the consumer stops
    iterating early, which cancels the remote handler.

    With ``release``, the client offers to keep the stream for another request;
    if the request ends cleanly and the server agrees (``end.keep``), the stream is
    handed to ``release`` instead of being closed. A stream that saw an error, a
    reset or an end of stream is never handed back.
    """
    request = Request(
        request_id=request_id or new_request_id(),
        capability=capability,
        input=input,
        params=params,
        trace=trace,
        window=window,
        keep=release is not None,
        token=current_token(),  # services/access.py: using_token()
        receipt=receipt,
        # Several chunks a frame (r5-bat; a server that does not know it ignores it), if this
        # side reads frames of MAX_BATCH_FRAME bytes.
        batch=max_frame_size >= MAX_BATCH_FRAME,
    )
    session = ClientSession(request, deadline=deadline, max_frame_size=max_frame_size, reused=reused)
    try:
        frame = session.send_request(trio.current_time())
    except ModelNetError:
        await reset_quietly(stream)
        raise
    info.started = trio.current_time()
    chain = ChunkChain(input) if receipt else None
    #: When the stall clock last restarted (a chunk arrived, or the consumer pulled again).
    progress_at = info.started
    pulled = False  # chunks were handed out since the last read
    try:
        await write_whole(stream, frame)
        while True:
            event = session.next_batch()
            if event is NEED_DATA:
                if pulled:  # the consumer has just pulled again: one clock read per read
                    progress_at, pulled = trio.current_time(), False
                data = b""
                stall_at = math.inf
                if stall_timeout is not None and session.chunks:
                    stall_at = progress_at + stall_timeout
                elif first_chunk_by is not None and not session.chunks:
                    stall_at = first_chunk_by
                with trio.move_on_at(min(deadline, stall_at)) as scope:
                    try:
                        data = await stream.read(READ_SIZE)
                    except StreamEOF:
                        if reset_by_remote(stream):  # py-libp2p's yamux reads a reset as EOF
                            raise StreamReset() from None
                        session.receive_eof()
                        continue
                if scope.cancelled_caught:
                    if stall_at < deadline and not session.chunks:
                        raise StalledError("provider sent no chunk in time", chunks_delivered=0)
                    if stall_at < deadline:
                        raise StalledError(
                            f"provider sent nothing for {stall_timeout:g} s after {session.chunks} chunks",
                            chunks_delivered=session.chunks,
                        )
                    raise session.deadline_exceeded()
                session.receive_data(data)
                info.received += len(data)
                credit = session.data_to_send()
                if credit:
                    # Before handing chunks out: these bytes are already off the stream.
                    await write_whole(stream, credit)
            elif type(event) is ChunksReceived:
                if event.load is not None:
                    info.load, info.load_at = event.load, trio.current_time()
                info.chunks = session.chunks
                if chain is not None:
                    for chunk in event.data:
                        chain.add(chunk)
                if info.first_chunk_at is None:
                    info.first_chunk_at = trio.current_time()
                yield event.data
                pulled = True
            elif isinstance(event, Finished):
                if event.end.load is not None:
                    info.load, info.load_at = event.end.load, trio.current_time()
                info.finish_reason = event.end.finish_reason
                info.usage = event.end.usage
                info.ended = trio.current_time()
                if chain is not None and event.end.receipt is not None:
                    info.receipt = check_receipt(
                        event.end.receipt, provider=remote_peer(stream) or info.peer or None,
                        request_id=request.request_id, capability=capability, chain=chain,
                    )  # fmt: skip
                return
            elif isinstance(event, ErrorReceived):
                if event.load is not None:
                    info.load, info.load_at = event.load, trio.current_time()
                raise event.error
            else:  # PAUSED: the session ended without an event; cannot happen while receiving
                raise session.connection_lost("the answer ended unexpectedly")
    except ModelNetError as exc:
        if session.closed_before_answer:
            raise StaleStreamError(
                "the kept stream was closed by the provider before it read the request"
            ) from exc
        raise
    except StreamReset:
        raise UnavailableError(
            f"provider reset the stream after {session.chunks} chunks", chunks_delivered=session.chunks
        ) from None
    except STREAM_ERRORS as exc:
        raise session.connection_lost(str(exc)) from None
    finally:
        if session.reusable and release is not None:
            release(stream)
        elif session.state is ClientState.DONE:
            await close_quietly(stream)
        else:
            # Say why before resetting: py-libp2p's yamux shows a reset to the remote
            # reader as a plain end of stream.
            cancel = session.cancel()
            if cancel:
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_TIMEOUT):
                    try:
                        await stream.write(cancel)
                    except Exception:
                        pass
            await reset_quietly(stream)


class StreamSource:
    """Where :func:`request_on_peer` gets streams: a pool of kept ones and a way to open new ones."""

    def __init__(
        self,
        acquire: Callable[[str], Stream | None],
        release_to: Callable[[str], Callable[[Stream], None]],
        open_stream: Callable[[], Awaitable[Stream]],
    ) -> None:
        self.acquire = acquire
        self.release_to = release_to
        self.open_stream = open_stream


def request_on_peer(source: StreamSource, peer: str, **kwargs: Any) -> AsyncIterator[Any]:
    """:func:`request_batches_on_peer`, one chunk at a time (the same arguments)."""
    return one_by_one(request_batches_on_peer(source, peer, **kwargs))


async def request_batches_on_peer(
    source: StreamSource,
    peer: str,
    *,
    capability: str,
    input: Any,
    params: dict[str, Any],
    deadline: float,
    trace: TraceContext,
    info: ResponseInfo,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    window: int = DEFAULT_WINDOW,
    stall_timeout: float | None = None,
    receipt: bool = False,
    first_chunk_timeout: float | None = None,
) -> AsyncIterator[list[Any]]:
    """:func:`run_request_batches` on a kept stream to ``peer`` if the pool has one, else on a new one.

    A kept stream the server had already closed is detected (:class:`StaleStreamError`: a
    clean end of stream before any byte of the answer) and the request is sent once more on a
    new stream. Any other failure, a reset included, is raised: the server may have started
    the request, and running a non-idempotent request twice is worse than failing it.

    ``first_chunk_timeout`` bounds the time from this call to the first chunk, opening the
    stream (and dialling) included: :class:`StalledError` after it.
    """
    first_by = None if first_chunk_timeout is None else trio.current_time() + first_chunk_timeout
    kept = source.acquire(peer)
    for stream in (kept, None) if kept is not None else (None,):
        reused = stream is not None
        if stream is None:
            with trio.move_on_at(math.inf if first_by is None else first_by) as opening:
                stream = await source.open_stream()
            if opening.cancelled_caught:
                raise StalledError(f"could not open a stream to {peer} in time", chunks_delivered=0)
        agen = run_request_batches(
            stream,
            capability=capability,
            input=input,
            params=params,
            deadline=deadline,
            trace=trace,
            info=info,
            max_frame_size=max_frame_size,
            window=window,
            release=source.release_to(peer),
            reused=reused,
            stall_timeout=stall_timeout,
            receipt=receipt,
            first_chunk_by=first_by,
        )
        try:
            async for batch in agen:
                yield batch
            return
        except StaleStreamError:
            if not reused:
                raise
            log.debug("kept stream to %s was closed by the provider; resending on a new one", peer)
        finally:
            await agen.aclose()  # type: ignore[attr-defined]

"""Streamed answers: mesh chunks as server-sent events, and the response that writes them.

:class:`EventStream` turns the chunks of one mesh request into OpenAI's event
stream (the opening event, one event per chunk, the finish, the usage if asked,
``data: [DONE]``); a mesh error after the stream started becomes a last
``data: {"error": ...}`` event, which the ``openai`` client raises. It stops the
mesh request when the client goes away.

The hot path is per batch of chunks, as the mesh stream hands them over (one read
holds many): their text events rendered in one join from a template made once per
answer (:meth:`Frames.text_events`, the same bytes as encoding each whole chunk
object), appended to an :class:`Outbox` as one part without yielding to the
scheduler. The HTTP writer takes everything the outbox holds in one write, and the
first event never waits for company.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

import trio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ModelNetError
from ._hypercorn import JOIN_BODY
from .calls import Outcome
from .errors import from_mesh_error
from .translate import DONE, finish_reason, sse_event, text_of, usage

__all__ = [
    "SSE_BUFFER",
    "SSE_BUFFER_BYTES",
    "EventStream",
    "Frames",
    "Outbox",
    "close_source",
    "head_events",
    "produce_events",
]

#: Parts (the events of one batch of chunks each) produced ahead of the HTTP writer...
SSE_BUFFER = 64
#: ... and bytes: the producer waits once the outbox holds this many (one batch may go over).
SSE_BUFFER_BYTES = 256 * 1024
#: Seconds allowed for stopping the mesh request once the answer ends.
CLOSE_TIMEOUT = 2.0


class Frames(Protocol):
    """The OpenAI chunk objects of one kind of streamed answer (see :mod:`.translate`)."""

    def opening(self) -> dict[str, Any] | None: ...

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]: ...

    def text_event(self, text: str) -> bytes: ...

    def text_events(self, texts: Sequence[str]) -> bytes: ...

    def usage_frame(self, counts: dict[str, int]) -> dict[str, Any] | None: ...


class Outbox:
    """Events between the producer and the HTTP writer: at most ``limit`` parts (each the
    events of one batch of chunks) and about ``max_bytes`` bytes.

    :meth:`put` appends without yielding; :meth:`take` hands the writer everything held, as
    one ``bytes``. A producer that finds the outbox full waits in :meth:`wait_room`.
    """

    def __init__(self, limit: int = SSE_BUFFER, max_bytes: int = SSE_BUFFER_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.parts: list[bytes] = []
        self.size = 0
        self.closed = False
        self._ready = trio.Event()
        self._room = trio.Event()

    @property
    def full(self) -> bool:
        return len(self.parts) >= self.limit or self.size >= self.max_bytes

    def put(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)
        self._ready.set()

    def close(self) -> None:
        """No more events: :meth:`take` returns ``None`` once the rest is taken."""
        self.closed = True
        self._ready.set()

    async def wait_room(self) -> None:
        """Return once the outbox is not :attr:`full`."""
        while self.full:
            self._room = trio.Event()
            await self._room.wait()

    async def wait_taken(self) -> None:
        """Return once the writer has taken everything put so far."""
        while self.parts:
            self._room = trio.Event()
            await self._room.wait()

    async def take(self) -> bytes | None:
        """Every event held, joined (waits for one); ``None`` once closed and empty."""
        while not self.parts:
            if self.closed:
                return None
            self._ready = trio.Event()
            await self._ready.wait()
        parts, self.parts, self.size = self.parts, [], 0
        self._room.set()
        return parts[0] if len(parts) == 1 else b"".join(parts)


def _texts(batch: Sequence[Any]) -> list[str]:
    return [c if isinstance(c, str) else text_of(c) for c in batch]


def head_events(frames: Frames, first: Sequence[Any]) -> bytes:
    """The opening event (if the kind has one) and the events of the chunks ``first``."""
    opening = frames.opening()
    head = b"" if opening is None else sse_event(opening)
    return head + frames.text_events(_texts(first)) if first else head


async def produce_events(
    batches: AsyncGenerator[list[Any], None],
    outcome: Outcome,
    first: Sequence[Any],
    frames: Frames,
    out: Outbox,
    *,
    head_sent: bool = False,
) -> None:
    """Put the events of a streamed answer into ``out``: the opening and ``first`` (chunks
    already received; unless ``head_sent``: the caller wrote :func:`head_events` itself), then
    the rest, from ``batches`` (lists of chunks); close ``batches`` (which stops the mesh
    request) and ``out``."""
    text_events, put = frames.text_events, out.put
    try:
        if not head_sent:
            put(head_events(frames, first))
            # Let the writer send the first token now, before the rest of the chunks that came
            # with it are decoded (one more HTTP write per answer, the first token sooner).
            await out.wait_taken()
        async for batch in batches:
            put(text_events(_texts(batch)))  # one part per batch: the events of every chunk in it
            if out.full:
                await out.wait_room()
        put(sse_event(frames.delta(None, finish_reason(outcome.finish_reason))))
        counts = frames.usage_frame(usage(outcome.usage, outcome.chunks))
        if counts is not None:
            put(sse_event(counts))
        put(DONE)
    except ModelNetError as exc:
        outcome.error = from_mesh_error(exc)
        put(sse_event(outcome.error.body()))
    finally:
        out.close()
        await close_source(batches)


async def close_source(batches: AsyncGenerator[list[Any], None]) -> None:
    """Close ``batches`` (which stops its mesh request), shielded, within :data:`CLOSE_TIMEOUT`;
    an answer read to its end has nothing left to stop, and takes no cancel scope."""
    if getattr(batches, "ag_frame", True) is None:  # a finished (or closed) async generator
        return
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
        await batches.aclose()


_NO_BODY: tuple[bytes, ...] = ()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that stops its source when the client goes away.

    The events are produced from ``chunks`` (batches: lists of chunks) in one task
    (:func:`produce_events`) and written in another, while a third watches for the client's
    disconnect; either way the source is closed (which cancels the mesh request) before
    ``on_done`` is called.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[list[Any], None],
        outcome: Outcome,
        first: Sequence[Any],
        frames: Frames,
        headers: Mapping[str, str],
    ) -> None:
        # The body is written by __call__, not from the starlette body iterator.
        super().__init__(_NO_BODY, media_type="text/event-stream", headers=dict(headers))
        self.chunks = chunks
        self.first = first
        self.frames = frames
        self.outcome = outcome
        self.on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Outbox()
        try:
            # The headers wait for the first events and go out in one write with them (._hypercorn).
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send({**start, JOIN_BODY: True})
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            nursery.cancel_scope.cancel()
                            return

                # The first token goes out from here, before the tasks that produce the rest
                # start (two task switches sooner); the headers go with it.
                await send({"type": "http.response.body", "body": head_events(self.frames, self.first),
                            "more_body": True})  # fmt: skip
                nursery.start_soon(watch)
                produce = partial(produce_events, head_sent=True)
                nursery.start_soon(produce, self.chunks, self.outcome, (), self.frames, out)
                more = True
                while more:
                    body = await out.take()
                    more = body is not None and not (out.closed and not out.parts)
                    await send({"type": "http.response.body", "body": body or b"", "more_body": more})
                nursery.cancel_scope.cancel()
        finally:
            await close_source(self.chunks)
            if self.on_done is not None:
                self.on_done()

"""Streamed answers: mesh chunks as server-sent events, and the response that writes them.

:class:`EventStream` turns the chunks of one mesh request into OpenAI's event
stream (the opening event, one event per chunk, the finish, the usage if asked,
``data: [DONE]``); a mesh error after the stream started becomes a last
``data: {"error": ...}`` event, which the ``openai`` client raises. It stops the
mesh request when the client goes away.

The hot path, per chunk: one text event rendered from a template made once per
answer (:meth:`Frames.text_event`, the same bytes as encoding the whole chunk
object), appended to an :class:`Outbox` without yielding to the scheduler. The
HTTP writer takes everything the outbox holds in one write: a burst of chunks
from the mesh (one stream read holds many) costs one HTTP write, and the first
event never waits for company.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any, Protocol

import trio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import ModelNetError
from .calls import Outcome
from .errors import from_mesh_error
from .translate import DONE, finish_reason, sse_event, text_of, usage

__all__ = ["SSE_BUFFER", "EventStream", "Frames", "Outbox"]

#: Server-sent events produced ahead of the HTTP writer.
SSE_BUFFER = 64
#: Seconds allowed for stopping the mesh request once the answer ends.
CLOSE_TIMEOUT = 2.0


class Frames(Protocol):
    """The OpenAI chunk objects of one kind of streamed answer (see :mod:`.translate`)."""

    def opening(self) -> dict[str, Any] | None: ...

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]: ...

    def text_event(self, text: str) -> bytes: ...

    def usage_frame(self, counts: dict[str, int]) -> dict[str, Any] | None: ...


class Outbox:
    """Events between the producer and the HTTP writer, at most ``limit`` of them.

    :meth:`put` appends without yielding; :meth:`take` hands the writer everything held, as
    one ``bytes``. A producer that finds the outbox full waits in :meth:`wait_room`.
    """

    def __init__(self, limit: int = SSE_BUFFER) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.closed = False
        self._ready = trio.Event()
        self._room = trio.Event()

    @property
    def full(self) -> bool:
        return len(self.parts) >= self.limit

    def put(self, data: bytes) -> None:
        self.parts.append(data)
        self._ready.set()

    def close(self) -> None:
        """No more events: :meth:`take` returns ``None`` once the rest is taken."""
        self.closed = True
        self._ready.set()

    async def wait_room(self) -> None:
        """Return once the outbox is not :attr:`full`."""
        await self._wait_below(self.limit)

    async def wait_taken(self) -> None:
        """Return once the writer has taken everything put so far."""
        await self._wait_below(1)

    async def _wait_below(self, n: int) -> None:
        while len(self.parts) >= n:
            self._room = trio.Event()
            await self._room.wait()

    async def take(self) -> bytes | None:
        """Every event held, joined (waits for one); ``None`` once closed and empty."""
        while not self.parts:
            if self.closed:
                return None
            self._ready = trio.Event()
            await self._ready.wait()
        parts, self.parts = self.parts, []
        self._room.set()
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def produce_events(
    chunks: AsyncGenerator[Any, None], outcome: Outcome, first: Sequence[Any], frames: Frames, out: Outbox
) -> None:
    """Put the events of a streamed answer into ``out``: ``first`` (chunks already received),
    then the rest of ``chunks``; close ``chunks`` (which stops the mesh request) and ``out``."""
    text_event, put = frames.text_event, out.put
    try:
        opening = frames.opening()
        if opening is not None:
            put(sse_event(opening))
        for chunk in first:
            put(text_event(chunk if isinstance(chunk, str) else text_of(chunk)))
        # Let the writer send the first token now, before the rest of the chunks that came
        # with it are decoded (one more HTTP write per answer, the first token sooner).
        await out.wait_taken()
        async for chunk in chunks:
            put(text_event(chunk if isinstance(chunk, str) else text_of(chunk)))
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
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await chunks.aclose()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that stops its source when the client goes away.

    The events are produced from ``chunks`` in one task (:func:`produce_events`) and
    written in another, while a third watches for the client's disconnect; either way
    the source is closed (which cancels the mesh request) before ``on_done`` is called.
    """

    def __init__(
        self,
        chunks: AsyncGenerator[Any, None],
        outcome: Outcome,
        first: Sequence[Any],
        frames: Frames,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=dict(headers))
        self.chunks = chunks
        self.first = first
        self.frames = frames
        self.outcome = outcome
        self.on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        out = Outbox()
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            nursery.cancel_scope.cancel()
                            return

                nursery.start_soon(watch)
                nursery.start_soon(produce_events, self.chunks, self.outcome, self.first, self.frames, out)
                more = True
                while more:
                    body = await out.take()
                    more = body is not None and not (out.closed and not out.parts)
                    await send({"type": "http.response.body", "body": body or b"", "more_body": more})
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.chunks.aclose()
            if self.on_done is not None:
                self.on_done()

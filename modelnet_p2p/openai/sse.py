"""Streamed answers: mesh chunks as server-sent events, and the response that writes them.

:func:`sse_body` turns the chunks of one mesh request into OpenAI's event
stream (the opening event, one event per chunk, the finish, the usage if asked,
``data: [DONE]``); a mesh error after the stream started becomes a last
``data: {"error": ...}`` event, which the ``openai`` client raises.
:class:`EventStream` writes it, joining every event that is ready into one
HTTP write, and stops the mesh request when the client goes away.
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

__all__ = ["SSE_BUFFER", "EventStream", "Frames", "sse_body"]

#: Server-sent events produced ahead of the HTTP writer.
SSE_BUFFER = 64
#: Seconds allowed for stopping the mesh request once the answer ends.
CLOSE_TIMEOUT = 2.0


class Frames(Protocol):
    """The OpenAI chunk objects of one kind of streamed answer (see :mod:`.translate`)."""

    def opening(self) -> dict[str, Any] | None: ...

    def delta(self, text: str | None, finish: str | None) -> dict[str, Any]: ...

    def usage_frame(self, counts: dict[str, int]) -> dict[str, Any] | None: ...


async def sse_body(
    chunks: AsyncGenerator[Any, None], outcome: Outcome, first: Sequence[Any], frames: Frames
) -> AsyncGenerator[bytes, None]:
    """The events of a streamed answer: ``first`` (chunks already received), then the rest of ``chunks``."""
    try:
        opening = frames.opening()
        if opening is not None:
            yield sse_event(opening)
        for chunk in first:
            yield sse_event(frames.delta(text_of(chunk), None))
        async for chunk in chunks:
            yield sse_event(frames.delta(text_of(chunk), None))
        yield sse_event(frames.delta(None, finish_reason(outcome.finish_reason)))
        counts = frames.usage_frame(usage(outcome.usage, outcome.chunks))
        if counts is not None:
            yield sse_event(counts)
        yield DONE
    except ModelNetError as exc:
        outcome.error = from_mesh_error(exc)
        yield sse_event(outcome.error.body())
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
            await chunks.aclose()


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer that stops its source when the client goes away.

    The body is pulled from ``events`` while a second task watches for the
    client's disconnect; either way the source is closed (which cancels the
    mesh request) before ``on_done`` is called.
    """

    def __init__(
        self, events: AsyncGenerator[bytes, None], headers: Mapping[str, str], outcome: Outcome
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers=dict(headers))
        self.events = events
        self.outcome = outcome
        self.on_done: Callable[[], None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The events are produced in one task and written in another, which joins
        # every event that is ready into one write: a burst of chunks from the mesh
        # costs one HTTP write, and the first event never waits for company.
        to_writer, from_producer = trio.open_memory_channel[bytes](SSE_BUFFER)
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

                async def produce() -> None:
                    async with to_writer:
                        async for data in self.events:
                            try:
                                to_writer.send_nowait(data)
                            except trio.WouldBlock:
                                await to_writer.send(data)

                nursery.start_soon(watch)
                nursery.start_soon(produce)
                async with from_producer:
                    async for data in from_producer:
                        batch = [data]
                        while True:
                            try:
                                batch.append(from_producer.receive_nowait())
                            except (trio.WouldBlock, trio.EndOfChannel):
                                break
                        body = b"".join(batch) if len(batch) > 1 else data
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self.events.aclose()
            if self.on_done is not None:
                self.on_done()

"""The gateway's batch path: the events of a batch of chunks rendered in one join, the first
events written before the producer starts, and an outbox bounded in bytes as well as parts."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet_p2p.openai.calls import Outcome
from modelnet_p2p.openai.sse import Outbox, close_source, head_events, produce_events
from modelnet_p2p.openai.translate import ChatFrames, CompletionFrames

_TEXTS = st.lists(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=20)
    | st.sampled_from(['"', "\\", "\x00", "\x00modelnet-text\x00", "\u2028", "\U0001f600", "\ud800"]),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(texts=_TEXTS, model=st.text(max_size=20))
def test_the_events_of_a_batch_are_the_events_of_its_chunks(texts: list[str], model: str):
    for frames in (ChatFrames("c-1", 7, model, True), CompletionFrames("c", 7, model, False)):
        assert frames.text_events(texts) == b"".join(frames.text_event(t) for t in texts)


def _events(data: bytes) -> list[Any]:
    out = []
    for block in data.split(b"\n\n"):
        if block.startswith(b"data: "):
            body = block[len(b"data: ") :]
            out.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return out


async def _answer(head_sent: bool) -> bytes:
    async def batches() -> AsyncGenerator[list[Any], None]:
        yield ["b", "c"]
        yield [{"k": 1}, "d"]

    frames = ChatFrames("c", 1, "m", False)
    out = Outbox()
    written: list[bytes] = [head_events(frames, ["a"])] if head_sent else []
    first = () if head_sent else ["a"]

    async def write() -> None:
        while (body := await out.take()) is not None:
            written.append(body)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await produce_events(batches(), Outcome(chunks=5), first, frames, out, head_sent=head_sent)
    return b"".join(written)


async def test_the_head_written_first_gives_the_same_answer():
    inline, queued = await _answer(True), await _answer(False)
    assert inline == queued
    events = _events(inline)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-2]]
    assert texts == ["a", "b", "c", '{"k": 1}', "d"] and events[-1] == "[DONE]"


async def test_the_outbox_is_bounded_in_bytes_too():
    out = Outbox(limit=64, max_bytes=1000)
    out.put(b"x" * 600)
    assert not out.full
    out.put(b"y" * 600)  # one part may go over; then the producer waits
    assert out.full
    assert await out.take() == b"x" * 600 + b"y" * 600
    assert not out.full and out.size == 0


async def test_closing_the_source_stops_an_unfinished_answer_even_when_cancelled(mock_clock: Any):
    mock_clock.autojump_threshold = 0
    stopped: list[float] = []

    async def batches() -> AsyncGenerator[list[Any], None]:
        try:
            yield ["a"]
            yield ["b"]
        finally:
            await trio.sleep(1)  # stopping a mesh request takes a moment
            stopped.append(trio.current_time())

    unfinished = batches()
    assert await unfinished.__anext__() == ["a"]
    with trio.CancelScope() as scope:
        scope.cancel()  # the answer's task is being cancelled (the client went away)
        await close_source(unfinished)
    assert stopped == [1.0]
    finished = batches()
    assert [b async for b in finished] == [["a"], ["b"]]
    await close_source(finished)  # read to its end: nothing left to stop
    assert stopped == [1.0, 2.0]

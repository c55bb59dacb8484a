"""The gateway's event writer without HTTP or a mesh: the outbox between producer and writer,
and the events of a streamed answer (sans network: the chunks come from a local generator)."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import trio

from modelnet_p2p.errors import UnavailableError
from modelnet_p2p.openai.calls import Outcome
from modelnet_p2p.openai.sse import Outbox, produce_events
from modelnet_p2p.openai.translate import DONE, ChatFrames


async def test_the_outbox_joins_what_is_ready_and_bounds_the_producer():
    out = Outbox(limit=3)
    out.put(b"a")
    out.put(b"b")
    assert await out.take() == b"ab"  # everything ready, in one write
    for part in (b"1", b"2", b"3"):
        out.put(part)
    assert out.full
    blocked = trio.Event()
    room = trio.Event()

    async def producer() -> None:
        blocked.set()
        await out.wait_room()
        room.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await blocked.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert not room.is_set()  # full: the producer waits for the writer
        assert await out.take() == b"123"
        await room.wait()
    out.put(b"x")
    out.close()
    assert await out.take() == b"x"  # what was put before the close still goes out
    assert await out.take() is None


async def test_the_writer_waits_for_an_event_and_wakes_on_close():
    out = Outbox()
    got: list[bytes | None] = []

    async def writer() -> None:
        got.append(await out.take())
        got.append(await out.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()
        assert got == []
        out.put(b"e")
        await trio.testing.wait_all_tasks_blocked()
        out.close()
    assert got == [b"e", None]


def _events(data: bytes) -> list[Any]:
    out = []
    for block in data.split(b"\n\n"):
        if block:
            assert block.startswith(b"data: ")
            body = block[len(b"data: ") :]
            out.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return out


async def _write_all(out: Outbox, writes: list[bytes]) -> None:
    while (body := await out.take()) is not None:
        writes.append(body)


async def test_an_answer_becomes_events_with_the_first_token_written_first():
    closed: list[bool] = []

    async def chunks() -> AsyncGenerator[Any, None]:
        try:
            for i in range(1, 200):
                yield [f"t{i}"]  # batches of one: the writes below hold at most 64 events
            yield [{"not": "text"}]
        finally:
            closed.append(True)

    outcome = Outcome(finish_reason="length", chunks=201)
    out = Outbox(limit=64)
    writes: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_all, out, writes)
        await produce_events(chunks(), outcome, ["t0"], ChatFrames("c", 1, "m", True), out)
    events = _events(b"".join(writes))
    # the opening event and the first token go out alone, before the rest is rendered
    assert len(_events(writes[0])) == 2
    assert len(writes) > 2 and all(len(_events(w)) <= 64 for w in writes)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-3]]
    assert texts == [f"t{i}" for i in range(200)] + ['{"not": "text"}']
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 201 and events[-1] == "[DONE]"
    assert closed == [True] and writes[-1].endswith(DONE)


async def test_a_mesh_error_mid_stream_is_the_last_event():
    async def chunks() -> AsyncGenerator[Any, None]:
        yield ["a"]
        raise UnavailableError("provider went away")

    outcome = Outcome()
    out = Outbox()
    writes: list[bytes] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_all, out, writes)
        await produce_events(chunks(), outcome, [], ChatFrames("c", 1, "m", False), out)
    events = _events(b"".join(writes))
    assert [e["choices"][0]["delta"].get("content") for e in events[1:-1]] == ["a"]
    assert "provider went away" in events[-1]["error"]["message"]
    assert outcome.error is not None and outcome.error.status == 503

"""Hypercorn's HTTP/1.1 writes, stock and joined (``modelnet_p2p.openai._hypercorn``).

A real hypercorn server on 127.0.0.1 and a raw TCP client; the server's socket writes are
recorded (each ``send_all`` of a server connection), so that the tests see how many writes
an answer took and what each held, not how long they took.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modelnet_p2p.openai import _hypercorn
from modelnet_p2p.openai.calls import Outcome
from modelnet_p2p.openai.sse import EventStream
from modelnet_p2p.openai.translate import ChatFrames

App = Callable[[Any, Any, Any], Awaitable[None]]
REQUEST = b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of a server connection (``send_all`` on a socket that did not dial)."""
    seen: list[bytes] = []
    stock = trio.SocketStream.send_all

    async def send_all(self: trio.SocketStream, data: Any) -> None:
        if not getattr(self, "_test_client", False):
            seen.append(bytes(data))
        await stock(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", send_all)
    return seen


@pytest.fixture
def stock_hypercorn() -> Iterator[None]:
    was = _hypercorn.installed()
    _hypercorn.uninstall()
    yield None
    if was:
        _hypercorn.install()


@pytest.fixture
def joined_hypercorn() -> Iterator[None]:
    was = _hypercorn.installed()
    assert _hypercorn.install()
    yield None
    if not was:
        _hypercorn.uninstall()


async def lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})  # startup / shutdown
        if message["type"] == "lifespan.shutdown":
            return


@asynccontextmanager
async def served(app: App) -> AsyncIterator[tuple[str, int]]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.include_server_header = False
    config.include_date_header = False  # the same bytes in every run
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        host, port = binds[0].removeprefix("http://").rsplit(":", 1)
        yield host, int(port)
        nursery.cancel_scope.cancel()


def chunked_end(got: bytes) -> bool:
    return got.endswith(b"\r\n0\r\n\r\n")


async def fetch(address: tuple[str, int], done: Callable[[bytes], bool] = chunked_end) -> bytes:
    """The answer to one request, read until ``done`` says it is whole (hypercorn keeps a
    streamed answer's connection open after it, even when asked to close)."""
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(*address)
        stream._test_client = True  # type: ignore[attr-defined]
        async with stream:
            await stream.send_all(REQUEST)
            got = b""
            while not done(got):
                data = await stream.receive_some(65536)
                assert data, f"the connection closed before the end: {got!r}"
                got += data
    return got


def streaming_app(join: bool) -> App:
    """Headers, then b"first" (more to come), then b"last" (the end)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        start: dict[str, Any] = {"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]}
        if join:
            start[_hypercorn.JOIN_BODY] = True
        await send(start)
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await send({"type": "http.response.body", "body": b"last", "more_body": False})

    return app


async def test_canary_stock_hypercorn_writes_the_headers_and_the_end_apart(
    writes: list[bytes], stock_hypercorn: None
) -> None:
    # Once this fails, hypercorn joins these writes itself: _hypercorn can go.
    async with served(streaming_app(join=True)) as address:
        answer = await fetch(address)
    assert answer.startswith(b"HTTP/1.1 200")
    assert len(writes) == 4, writes
    headers, first, last, end = writes
    assert headers.startswith(b"HTTP/1.1 200") and headers.endswith(b"\r\n\r\n")
    assert first == b"5\r\nfirst\r\n"
    assert last == b"4\r\nlast\r\n"
    assert end == b"0\r\n\r\n"


async def test_the_headers_leave_with_the_first_body_and_the_last_body_with_the_end(
    writes: list[bytes], stock_hypercorn: None
) -> None:
    async with served(streaming_app(join=True)) as address:
        stock_answer = await fetch(address)
    stock_writes = list(writes)
    writes.clear()
    assert _hypercorn.install()
    try:
        async with served(streaming_app(join=True)) as address:
            answer = await fetch(address)
    finally:
        _hypercorn.uninstall()
    assert answer == stock_answer  # the same bytes, in the same order
    assert writes == [stock_writes[0] + stock_writes[1], stock_writes[2] + stock_writes[3]]


async def test_headers_without_the_mark_are_not_held(writes: list[bytes], joined_hypercorn: None) -> None:
    seen_headers = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await seen_headers.wait()  # the body comes only once the client has the headers
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    async with served(app) as address:
        with trio.fail_after(20):
            stream = await trio.open_tcp_stream(*address)
            stream._test_client = True  # type: ignore[attr-defined]
            async with stream:
                await stream.send_all(REQUEST)
                got = bytearray()
                while b"\r\n\r\n" not in got:
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 200") and b"late" not in got
                seen_headers.set()
                while not chunked_end(bytes(got)):
                    data = await stream.receive_some(65536)
                    assert data
                    got += data
    assert got.endswith(b"4\r\nlate\r\n0\r\n\r\n")
    assert len(writes) == 2  # the headers alone; the body and the end together


async def test_a_whole_answer_is_one_write(writes: list[bytes], joined_hypercorn: None) -> None:
    async def hello(request: Request) -> Response:
        return Response(b"hello", media_type="text/plain")

    async with served(Starlette(routes=[Route("/", hello)])) as address:
        answer = await fetch(address, lambda got: got.endswith(b"hello"))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nhello")
    assert len(writes) == 1  # a content length: the headers wait for the body


async def test_an_event_streams_headers_leave_with_its_first_events(
    writes: list[bytes], joined_hypercorn: None
) -> None:
    async def rest() -> AsyncIterator[list[Any]]:
        yield [" b", " c"]

    async def chat(request: Request) -> Response:
        frames = ChatFrames("chatcmpl-x", 1, "m", False)
        return EventStream(rest(), Outcome(), [" a"], frames, {"cache-control": "no-cache"})  # type: ignore[arg-type]

    async with served(Starlette(routes=[Route("/", chat)])) as address:
        answer = await fetch(address)
    assert b"data: [DONE]" in answer
    assert writes[0].startswith(b"HTTP/1.1 200") and b'"content":" a"' in writes[0]
    assert writes[-1].endswith(b"0\r\n\r\n") and writes[-1] != b"0\r\n\r\n"


def _a_tcp_server() -> Any:
    from hypercorn.trio.tcp_server import TCPServer

    return TCPServer(None, Config(), None, None, None)  # type: ignore[arg-type]  # only built


class _Steps(trio.abc.Instrument):
    """Counts the scheduler's steps of one task."""

    def __init__(self, task: Any) -> None:
        self.task, self.steps = task, 0

    def before_task_step(self, task: Any) -> None:
        self.steps += task is self.task


async def _yields_when_free(lock: Any) -> bool:
    """Whether taking ``lock`` while nobody holds it goes through the scheduler."""
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        async with lock:
            pass
    finally:
        trio.lowlevel.remove_instrument(steps)
    return steps.steps > 0


async def test_canary_stock_hypercorn_takes_its_send_lock_via_the_scheduler(stock_hypercorn: None) -> None:
    # Once this fails, hypercorn's send lock no longer yields when free: QuickLock can go.
    server = _a_tcp_server()
    assert type(server.send_lock) is trio.Lock
    assert await _yields_when_free(server.send_lock)


async def test_the_send_lock_is_taken_at_once_when_free_and_still_excludes(joined_hypercorn: None) -> None:
    lock = _a_tcp_server().send_lock
    assert isinstance(lock, _hypercorn.QuickLock)
    assert not await _yields_when_free(lock)
    order: list[str] = []

    async def second() -> None:
        async with lock:
            order.append("second")

    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert lock.locked() and order == []  # held: the other writer waits
            order.append("first")
    assert order == ["first", "second"]
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:  # still a cancel point
            order.append("not reached")
    assert order == ["first", "second"]

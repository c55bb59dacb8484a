"""Peers for code that does not run trio: plain synchronous code and asyncio servers.

:class:`ThreadedPeer` runs a :class:`~modelnet_p2p.Peer` in its own thread, with
its own trio loop, and offers a blocking API. :class:`AsyncioPeer` wraps the
same thread with an asyncio API, so a FastAPI or vLLM server can join the mesh
without a second event loop in its own thread::

    peer = ThreadedPeer(identity="peer.key").start()
    peer.serve("upper", lambda req: req.input.upper())
    print(peer.call(addr, "upper", "hi").text)
    peer.stop()

Handlers given to :meth:`AsyncioPeer.serve` may be asyncio coroutines or async
generators: they run on the asyncio loop that called ``serve``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from .errors import ModelNetError
from .peer import Peer, Response
from .proto.capability import Capability
from .services.inference.handlers import Handler, InferenceRequest

__all__ = ["AsyncioPeer", "ThreadedPeer"]

_T = TypeVar("_T")
_DONE = object()


class ThreadedPeer:
    """A :class:`Peer` on a background thread, with a blocking API.

    Takes the same arguments as :class:`Peer`. Use it as a context manager, or
    call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, **peer_kwargs: Any) -> None:
        self._kwargs = peer_kwargs
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._peer: Peer | None = None
        self._stop: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        self._error: BaseException | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> ThreadedPeer:
        """Start the peer's thread and wait until it listens. Re-raises start-up errors."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._thread_main, name="modelnet-peer", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("peer did not start in time")
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with Peer(**self._kwargs) as peer, trio.open_nursery() as nursery:
            self._peer = peer
            self._nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()
        self._peer = None

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the peer (cancelling in-flight requests) and join its thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        thread.join(timeout)

    def __enter__(self) -> ThreadedPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- plumbing --------------------------------------------------------------

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            raise RuntimeError("peer is not running; call start()")
        return self._peer

    def _run(self, afn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """Run ``afn(*args)`` in the peer's trio loop and wait for its result."""
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def run_sync(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run the sync function ``fn(*args)`` in the peer's trio loop and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def submit(self, afn: Callable[..., Awaitable[_T]], *args: Any) -> concurrent.futures.Future[_T]:
        """Start ``afn(*args)`` as a task in the peer's nursery; return a future for its result."""
        fut: concurrent.futures.Future[_T] = concurrent.futures.Future()

        async def runner() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(await afn(*args))
            except BaseException as exc:  # delivered to the waiting thread
                fut.set_exception(exc)
                if isinstance(exc, trio.Cancelled):
                    raise

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(runner)

        if self._token is None:
            raise RuntimeError("peer is not running; call start()")
        self._token.run_sync_soon(spawn)
        return fut

    # -- API -------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.peer.peer_id

    @property
    def addrs(self) -> list[str]:
        return self.run_sync(lambda: self.peer.addrs)

    def serve(self, capability: Capability | str, handler: Handler) -> Capability:
        """Serve a capability; sync handlers run in worker threads of the peer."""
        return self.run_sync(self.peer.serve, capability, handler)

    def connect(self, addr: str) -> str:
        return self._run(self.peer.connect, addr)

    def call(
        self, target: Any = None, capability: str | None = None, input: Any = None, **kwargs: Any
    ) -> Response:
        """Blocking :meth:`Peer.call`."""

        async def go() -> Response:
            return await self.peer.call(target, capability, input, **kwargs)

        return self._run(go)

    def infer(
        self, target: Any = None, capability: str | None = None, input: Any = None, **kwargs: Any
    ) -> Iterator[Any]:
        """Blocking :meth:`Peer.infer`: a generator of chunks. Closing it early cancels the request."""
        stream = self.run_sync(lambda: self.peer.infer(target, capability, input, **kwargs))
        finished = False
        try:
            while True:
                item = self._run(_next_or_done, stream)
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished and self._token is not None:
                try:
                    self._run(stream.aclose)
                except (trio.RunFinishedError, RuntimeError):
                    pass


async def _next_or_done(stream: Any) -> Any:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return _DONE


class AsyncioPeer:
    """An asyncio face over a :class:`ThreadedPeer`.

    ::

        async with AsyncioPeer(identity="peer.key") as peer:
            peer.serve("chat", my_asyncio_async_generator)
            async for chunk in peer.infer(addr, "chat", "hi"):
                ...
    """

    def __init__(self, **peer_kwargs: Any) -> None:
        self._threaded = ThreadedPeer(**peer_kwargs)

    async def start(self) -> AsyncioPeer:
        await asyncio.to_thread(self._threaded.start)
        return self

    async def stop(self) -> None:
        await asyncio.to_thread(self._threaded.stop)

    async def __aenter__(self) -> AsyncioPeer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def peer_id(self) -> str:
        return self._threaded.peer_id

    @property
    def addrs(self) -> list[str]:
        return self._threaded.addrs

    def serve(self, capability: Capability | str, handler: Handler) -> Capability:
        """Serve a capability. Async handlers run on the calling asyncio loop."""
        loop = asyncio.get_running_loop()
        return self._threaded.serve(capability, _bridge_handler(handler, loop))

    async def connect(self, addr: str) -> str:
        return await asyncio.wrap_future(self._threaded.submit(self._threaded.peer.connect, addr))

    async def call(
        self, target: Any = None, capability: str | None = None, input: Any = None, **kwargs: Any
    ) -> Response:
        peer = self._threaded.peer

        async def go() -> Response:
            return await peer.call(target, capability, input, **kwargs)

        return await asyncio.wrap_future(self._threaded.submit(go))

    async def infer(
        self, target: Any = None, capability: str | None = None, input: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        """Stream chunks into asyncio. Leaving the loop early cancels the request."""
        peer = self._threaded.peer
        stream = self._threaded.run_sync(lambda: peer.infer(target, capability, input, **kwargs))
        finished = False
        try:
            while True:
                item = await asyncio.wrap_future(self._threaded.submit(_next_or_done, stream))
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                try:
                    await asyncio.wrap_future(self._threaded.submit(stream.aclose))
                except (ModelNetError, RuntimeError):
                    pass


async def _await_cf(fut: concurrent.futures.Future[Any]) -> Any:
    """Await a concurrent future from trio; cancelling the wait cancels the future."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    try:
        await done.wait()
    except trio.Cancelled:
        fut.cancel()
        raise
    return fut.result()


def _bridge_handler(handler: Handler, loop: asyncio.AbstractEventLoop) -> Handler:
    """Wrap an asyncio handler so that the trio-side server can run it."""
    target: Any = handler
    call = getattr(handler, "__call__", None)  # noqa: B004
    if not inspect.isfunction(handler) and not inspect.ismethod(handler) and call is not None:
        target = call
    if inspect.isasyncgenfunction(target):

        async def agen_bridge(request: InferenceRequest) -> AsyncIterator[Any]:
            agen = handler(request)
            try:
                while True:
                    fut = asyncio.run_coroutine_threadsafe(_anext_or_done(agen), loop)
                    item = await _await_cf(fut)
                    if item is _DONE:
                        return
                    yield item
            finally:
                asyncio.run_coroutine_threadsafe(agen.aclose(), loop)

        return agen_bridge
    if inspect.iscoroutinefunction(target):

        async def coro_bridge(request: InferenceRequest) -> Any:
            return await _await_cf(asyncio.run_coroutine_threadsafe(handler(request), loop))

        return coro_bridge
    return handler


async def _anext_or_done(agen: Any) -> Any:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE

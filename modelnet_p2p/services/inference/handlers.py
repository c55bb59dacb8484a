"""The handler side of inference: the request object handlers see, and the adapters that run
every kind of handler (async generator, coroutine, sync generator, plain function) the same way.
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ...proto.capability import Capability
from ...proto.infer import TraceContext

__all__ = ["Handler", "InferenceRequest", "handler_kind", "run_handler"]

#: What ``Peer.serve`` accepts: see :func:`handler_kind`.
Handler = Callable[..., Any]


@dataclass
class InferenceRequest:
    """What a handler receives for one request.

    Attributes:
        request_id: the caller's id for this request (bytes).
        capability: the :class:`Capability` being served.
        input: the request input, any msgpack value.
        params: the request parameters (a dict).
        deadline: when the caller stops waiting, in :func:`trio.current_time` units
            (``math.inf`` for none). Sync handlers should use :attr:`remaining`.
        remote_peer: the caller's peer id (base58 text), authenticated by Noise.
        cancel_scope: cancels the handler; it is cancelled when the caller
            resets the stream, when the deadline passes, or when the peer stops.
        trace: the caller's trace context (hops, visited peers).
        usage: counters the handler may fill in (e.g. ``{"tokens": 12}``); sent in the end frame.
        finish_reason: the handler may set ``"length"`` etc.; sent in the end frame.
        mesh: calls to other capabilities on the mesh from inside the handler
            (``await request.mesh.call(capability=..., input=...)``); they inherit
            this request's deadline, cancellation and trace, so loops and hop
            limits are enforced across the whole pathway.
    """

    request_id: bytes
    capability: Capability
    input: Any
    params: dict[str, Any]
    deadline: float
    remote_peer: str
    cancel_scope: trio.CancelScope
    trace: TraceContext = field(default_factory=TraceContext)
    usage: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"
    mesh: Any = None
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _trio_token: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._trio_token is None:
            try:
                self._trio_token = trio.lowlevel.current_trio_token()
            except RuntimeError:  # built outside a trio run (tests, tools)
                pass

    @property
    def remaining(self) -> float:
        """Seconds left before the deadline (``math.inf`` if none). Safe from any thread.

        Measured on the trio clock of the serving peer (so a test's ``MockClock`` applies);
        from a worker thread that costs one round trip to the trio loop.
        """
        if math.isinf(self.deadline):
            return math.inf
        try:
            now = trio.current_time()
        except RuntimeError:  # not in the trio thread: ask it
            if self._trio_token is None:
                return 0.0
            try:
                now = trio.from_thread.run_sync(trio.current_time, trio_token=self._trio_token)
            except (trio.RunFinishedError, RuntimeError):
                return 0.0
        return max(0.0, self.deadline - now)

    @property
    def cancelled(self) -> bool:
        """True once the request was cancelled. Sync handlers should poll it between steps."""
        return self._cancelled.is_set()

    def mark_cancelled(self) -> None:
        """Make :attr:`cancelled` true: the request ended (done, cancelled, failed or timed out),
        so a handler running in a worker thread stops at its next check. Safe from any thread."""
        self._cancelled.set()

    def cancel(self) -> None:
        """Cancel the request: cancel the handler's :attr:`cancel_scope` and mark it cancelled.
        Call from the trio thread."""
        self._cancelled.set()
        self.cancel_scope.cancel()


def handler_kind(handler: Handler) -> str:
    """Classify a handler: ``"asyncgen"``, ``"async"``, ``"syncgen"`` or ``"sync"``.

    Callable objects are classified by their ``__call__``.
    """
    target: Any = handler
    if not inspect.isfunction(handler) and not inspect.ismethod(handler):
        call = getattr(handler, "__call__", None)  # noqa: B004
        if call is not None and (inspect.isfunction(call) or inspect.ismethod(call)):
            target = call
    if inspect.isasyncgenfunction(target):
        return "asyncgen"
    if inspect.iscoroutinefunction(target):
        return "async"
    if inspect.isgeneratorfunction(target):
        return "syncgen"
    if callable(handler):
        return "sync"
    raise TypeError(f"handler {handler!r} is not callable")


class _Stop:
    """Sentinel the worker thread sends when a sync generator is exhausted."""


async def _drive_sync_generator(
    handler: Handler, request: InferenceRequest, emit: Callable[[Any], Any]
) -> None:
    """Run a sync generator in a worker thread and ``emit`` its items in the trio loop.

    The worker hands items over through a zero-buffer channel, so it never runs
    ahead of the consumer, and it stops at its next item once the request is
    cancelled.
    """
    send, recv = trio.open_memory_channel[Any](0)
    token = trio.lowlevel.current_trio_token()

    def work() -> None:
        try:
            for item in handler(request):
                if request.cancelled:
                    return
                trio.from_thread.run(send.send, item, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return
        except BaseException as exc:  # handed to the trio side, which raises it
            try:
                trio.from_thread.run(send.send, _Failure(exc), trio_token=token)
            except Exception:
                return
            return
        try:
            trio.from_thread.run(send.send, _Stop(), trio_token=token)
        except Exception:
            return

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_in_thread, work)
            async with recv:
                while True:
                    item = await recv.receive()
                    if isinstance(item, _Stop):
                        break
                    if isinstance(item, _Failure):
                        raise item.exc
                    await emit(item)
    finally:
        request.mark_cancelled()


@dataclass
class _Failure:
    exc: BaseException


async def _run_in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)  # type: ignore[call-arg]


async def run_handler(
    handler: Handler,
    kind: str,
    request: InferenceRequest,
    emit: Callable[[Any], Any],
    offer: Callable[[Any], bool] | None = None,
) -> None:
    """Run ``handler`` for ``request`` and pass each chunk to ``await emit(chunk)``.

    A coroutine or plain function gives exactly one chunk (its return value);
    generators give one chunk per item. Exceptions propagate to the caller. With ``offer``,
    an async generator's chunks go to ``offer(chunk)`` first, and to ``emit`` only when it
    says ``False`` (a chunk it could not take without waiting): no coroutine per chunk.
    """
    try:
        if kind == "asyncgen":
            agen = handler(request)
            try:
                if offer is None:
                    async for item in agen:
                        await emit(item)
                else:
                    async for item in agen:
                        if not offer(item):
                            await emit(item)
            finally:
                await agen.aclose()
        elif kind == "async":
            await emit(await handler(request))
        elif kind == "syncgen":
            await _drive_sync_generator(handler, request, emit)
        else:
            result = await trio.to_thread.run_sync(handler, request, abandon_on_cancel=True)  # type: ignore[call-arg]
            await emit(result)
    finally:
        request.mark_cancelled()

"""Fewer writes from hypercorn's HTTP/1.1 server (a workaround of hypercorn 0.18).

Hypercorn writes every piece of an HTTP/1.1 answer to the socket as soon as the ASGI app
hands it over, each with a write of its own:

- the status line and headers at ``http.response.start``, apart from the first body part;
- the last body part, then (in the same ``send`` of the app) the chunked encoding's end,
  ``0\\r\\n\\r\\n``, apart from it.

Each write is a system call and a wake-up of the client, and each takes hypercorn's send
lock and trio's checkpoint after the send: two trips through the scheduler, during which
the gateway's other tasks run (the mesh stream's reader, for one) before the first token
goes out. In profiles of the gateway under ``bench_gateway`` the socket's ``send`` took a
quarter to a third of its busy time: four writes per streamed answer to the client, one to
the mesh.

:func:`install` makes two changes, to the HTTP/1.1 protocol only (HTTP/2 and WebSockets are
left alone):

- whatever one ``send`` of the app produces goes out in one write (the last body part and
  the end of the answer together);
- an ``http.response.start`` message that carries :data:`JOIN_BODY` (true), or a
  ``content-length`` header (a whole answer, whose body starlette sends at once), keeps its
  headers until the app's next ``send`` (its first body part), and both go out in one
  write. Only an app that sends the body at once should ask for it (the gateway's
  :class:`~modelnet_p2p.openai.sse.EventStream` does): the client sees no headers before it.
  Any other answer's headers go out at once, as hypercorn writes them.

- a connection's send lock (a ``trio.Lock``, which yields to the scheduler even when free)
  is taken without that trip when it is free: the write's send is its schedule point. The
  first events then leave in the step that made them, not after the mesh stream's reader has
  had its turn.

The bytes on the wire are the same as hypercorn's, in the same order; only the number of
writes changes. Hypercorn writes other things itself (a ``100 Continue``, an error answer
to a malformed request, a connection's close) with no app ``send`` under way: those are
untouched, and anything held is written before any other event of the protocol.
``tests/test_openai_hypercorn.py`` holds a canary that fails once hypercorn writes the
headers with the first body itself (then this module can go).
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from ..p2p.locks import QuickLock

__all__ = ["JOIN_BODY", "QuickLock", "install", "installed", "uninstall"]

log = logging.getLogger(__name__)

#: Key of an ASGI ``http.response.start`` message: its headers go out with the first body part.
JOIN_BODY = "modelnet_p2p.join_body"

#: Attribute of an ``H11Protocol``: the bytes held for one write (absent: nothing held).
_HELD = "_modelnet_p2p_held"

_stock: dict[str, Any] = {}


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_stock)


def install() -> bool:
    """Join hypercorn's HTTP/1.1 writes as the module docstring says (idempotent).

    Returns ``False`` (and changes nothing) if hypercorn is not the version this was written
    for (the methods it wraps are missing).
    """
    if _stock:
        return True
    try:
        from hypercorn.events import RawData
        from hypercorn.protocol.events import Body, EndBody, InformationalResponse, Response
        from hypercorn.protocol.h11 import H11Protocol
        from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
    except ImportError as exc:  # pragma: no cover - another hypercorn
        log.info("hypercorn's writes are not joined: %s", exc)
        return False
    stock_stream_send = getattr(H11Protocol, "stream_send", None)
    stock_app_send = getattr(HTTPStream, "app_send", None)
    if stock_stream_send is None or stock_app_send is None:  # pragma: no cover
        log.info("hypercorn's writes are not joined: H11Protocol or HTTPStream changed")
        return False
    joined = (Response, InformationalResponse, Body, EndBody)
    from hypercorn.trio import tcp_server

    server_class: Any = getattr(tcp_server, "TCPServer", None)
    stock_init = getattr(server_class, "__init__", None)

    async def flush(proto: Any) -> None:
        held = proto.__dict__.pop(_HELD, None)
        if held:
            await proto.send(RawData(data=b"".join(held)))

    async def capture(proto: Any, event: Any) -> bytes:
        # The stock code of these events serializes one h11 event and calls self.send once
        # with its RawData; collect it instead (collect never yields, so no other task sees
        # the swap).
        out: list[bytes] = []
        real = proto.send

        async def collect(raw: Any) -> None:
            out.append(raw.data)

        proto.send = collect
        try:
            await stock_stream_send(proto, event)
        finally:
            proto.send = real
        return b"".join(out)

    async def stream_send(self: Any, event: Any) -> None:
        held = self.__dict__.get(_HELD)
        if held is None:
            await stock_stream_send(self, event)
        elif isinstance(event, joined):
            held.append(await capture(self, event))
        else:  # e.g. the stream's close: what is held goes first
            await flush(self)
            await stock_stream_send(self, event)

    async def app_send(self: Any, message: Any) -> None:
        proto = getattr(self.send, "__self__", None)
        if message is None or not isinstance(proto, H11Protocol):
            await stock_app_send(self, message)
            return
        proto.__dict__.setdefault(_HELD, [])
        hold = False
        try:
            await stock_app_send(self, message)
            hold = (
                message.get("type") == "http.response.start"
                and self.state is ASGIHTTPState.RESPONSE
                and (bool(message.get(JOIN_BODY)) or _has_length(message))
            )
        finally:
            if not hold:
                await flush(proto)

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        assert stock_init is not None
        stock_init(self, *args, **kwargs)
        if isinstance(getattr(self, "send_lock", None), trio.Lock):
            self.send_lock = QuickLock()

    _stock.update(stream_send=stock_stream_send, app_send=stock_app_send, classes=(H11Protocol, HTTPStream))
    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]
    HTTPStream.app_send = app_send  # type: ignore[method-assign]
    if stock_init is not None:
        _stock.update(init=stock_init, server=server_class)
        server_class.__init__ = init
    return True


def _has_length(message: Any) -> bool:
    """Whether an ``http.response.start`` message gives a content length (a whole answer)."""
    return any(bytes(name).lower() == b"content-length" for name, _ in message.get("headers", ()))


def uninstall() -> None:
    """Undo :func:`install` (for tests: connections opened meanwhile keep nothing held)."""
    if not _stock:
        return
    h11_protocol, http_stream = _stock["classes"]
    h11_protocol.stream_send = _stock["stream_send"]
    http_stream.app_send = _stock["app_send"]
    if "server" in _stock:
        _stock["server"].__init__ = _stock["init"]
    _stock.clear()

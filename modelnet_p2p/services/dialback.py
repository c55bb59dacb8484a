"""Dial-back: is a peer dialable from outside? Ask a bootstrap node to try (``specs/dialback.md``).

A peer cannot tell by itself whether others can open a TCP connection to it (a NAT or a
firewall in front of it is invisible from inside). A bootstrap node can: it sees the IP the
peer's connection comes from, and tries to connect back to it on the ports the peer listens
on. ``modelnet doctor`` asks each bootstrap node that offers the protocol
(``/modelnet/dialback/1.0.0``, inside the network's protocol ids).

The server dials only the IP the request came from (never an address the request names),
at most :data:`MAX_PORTS` ports, opens a bare TCP connection and closes it at once (no byte
is sent), so it cannot be used to make it connect to third parties or to carry traffic. It
answers at most one request per peer per :data:`REQUEST_INTERVAL` seconds and runs at most
:data:`MAX_CONCURRENT` dial-backs at once; a relayed request is refused (its IP is the
relay's).
"""

from __future__ import annotations

import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

import trio

from ..errors import ProtocolError
from ..p2p.probe import stream_remote_ip
from ..p2p.stream import Stream, close_quietly, remote_peer, reset_quietly
from ..proto.framing import pack_frame
from .messages import read_message

__all__ = [
    "DIAL_TIMEOUT",
    "MAX_CONCURRENT",
    "MAX_PORTS",
    "PROTOCOL_ID",
    "REQUEST_INTERVAL",
    "DialbackAnswer",
    "DialbackServer",
    "ask_dialback",
]

log = logging.getLogger(__name__)

#: The protocol id on the ``local`` network (others insert their name, ``specs/network.md``).
PROTOCOL_ID = "/modelnet/dialback/1.0.0"
#: Ports one request may ask to be dialed on.
MAX_PORTS = 4
#: Seconds one dial-back connection attempt may take.
DIAL_TIMEOUT = 3.0
#: Dial-backs a server runs at once (over all requesters); more requests are answered "busy".
MAX_CONCURRENT = 8
#: Seconds between two requests a server answers for the same peer.
REQUEST_INTERVAL = 10.0
#: Peers whose last request a server remembers (the oldest is forgotten first).
MAX_REMEMBERED = 4096
#: Largest request or answer, in bytes.
MAX_MESSAGE = 1024
#: Seconds a server waits for the request once the stream is open.
READ_TIMEOUT = 5.0

Result = Literal["ok", "refused", "timeout", "error"]


class DialbackAnswer(dict[str, Any]):
    """The answer: ``{"ip": the IP dialed, "results": {"<port>": "ok"|"refused"|"timeout"|"error"}}``,
    or ``{"error": "busy"|"relayed"|"too-soon"|"bad-request"}``."""


async def _read_frame(stream: Stream, timeout: float) -> dict[str, Any]:
    return await read_message(
        stream, max_size=MAX_MESSAGE, max_objects=64, timeout=timeout, read_size=MAX_MESSAGE
    )


async def tcp_dial(ip: str, port: int, timeout: float = DIAL_TIMEOUT) -> Result:
    """Open a TCP connection to ``ip:port`` and close it at once; how it went."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with trio.socket.socket(family, socket.SOCK_STREAM) as sock, trio.move_on_after(timeout):
        try:
            await sock.connect((ip, port))
        except ConnectionRefusedError:
            return "refused"
        except OSError:
            return "error"
        return "ok"
    return "timeout"


class DialbackServer:
    """The server side: answers dial-back requests (a stream handler for :data:`PROTOCOL_ID`).

    Args:
        dial: ``dial(ip, port)`` tries a connection (tests may watch it); :func:`tcp_dial`.
        clock: seconds, for the per-peer interval (trio's clock).
    """

    def __init__(
        self,
        dial: Callable[[str, int], Awaitable[Result]] = tcp_dial,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._dial = dial
        self._clock = clock
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT)
        self._last: OrderedDict[str, float] = OrderedDict()
        #: Requests answered with results, and refused.
        self.answered = 0
        self.refused = 0

    def _too_soon(self, peer: str) -> bool:
        now = self._clock()
        last = self._last.get(peer)
        if last is not None and now - last < REQUEST_INTERVAL:
            return True
        self._last.pop(peer, None)
        self._last[peer] = now
        while len(self._last) > MAX_REMEMBERED:
            self._last.popitem(last=False)
        return False

    async def answer(self, stream: Stream) -> DialbackAnswer:
        """What to answer the request on ``stream`` (read from it here)."""
        try:
            request = await _read_frame(stream, READ_TIMEOUT)
        except (ProtocolError, trio.TooSlowError):
            return DialbackAnswer(error="bad-request")
        ports = request.get("ports")
        if (
            not isinstance(ports, list)
            or not 1 <= len(ports) <= MAX_PORTS
            or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in ports)
        ):
            return DialbackAnswer(error="bad-request")
        ip = stream_remote_ip(stream)
        if ip is None:
            return DialbackAnswer(error="relayed")
        if self._too_soon(remote_peer(stream)):
            return DialbackAnswer(error="too-soon")
        if self._limiter.available_tokens < 1:
            return DialbackAnswer(error="busy")
        results: dict[str, Result] = {}
        async with self._limiter:
            for port in dict.fromkeys(ports):
                results[str(port)] = await self._dial(ip, port)
        return DialbackAnswer(ip=ip, results=results)

    async def handle_stream(self, stream: Stream) -> None:
        try:
            answer = await self.answer(stream)
            if "error" in answer:
                self.refused += 1
            else:
                self.answered += 1
            await close_quietly(stream, data=pack_frame(dict(answer), MAX_MESSAGE))
        except Exception as exc:  # never take the host down
            log.debug("dial-back request failed: %r", exc)
            await reset_quietly(stream)


async def ask_dialback(
    open_stream: Callable[[], Awaitable[Stream]], ports: Sequence[int], *, timeout: float = 10.0
) -> DialbackAnswer:
    """Ask the peer behind ``open_stream()`` to dial us back on ``ports``; its answer.

    Raises :class:`ProtocolError` for a malformed answer, :class:`trio.TooSlowError` past
    ``timeout`` seconds.
    """
    with trio.fail_after(timeout):
        stream = await open_stream()
        try:
            await stream.write(pack_frame({"ports": list(ports)[:MAX_PORTS]}, MAX_MESSAGE))
            answer = await _read_frame(stream, timeout)
        finally:
            await close_quietly(stream)
    if "error" in answer and isinstance(answer["error"], str):
        return DialbackAnswer(error=answer["error"])
    results = answer.get("results")
    ip = answer.get("ip")
    if not isinstance(results, dict) or not isinstance(ip, str):
        raise ProtocolError("malformed dial-back answer")
    clean: dict[str, str] = {}
    for port, result in results.items():
        if isinstance(port, str) and port.isdigit() and result in ("ok", "refused", "timeout", "error"):
            clean[port] = result
    return DialbackAnswer(ip=ip, results=clean)

"""Outbound streams that propose their one protocol without waiting (multistream-select).

Upstream: py-libp2p 0.8.1's ``BasicHost.new_stream`` negotiates in two round trips before
the caller may write anything: it writes ``/multistream/1.0.0`` and waits for the echo, then
writes the protocol and waits for that echo. A DHT request is one message and one answer,
so each costs three round trips, each with a wake-up of both processes: on a busy machine
(issue 11) the negotiation is most of a request's time.

The multistream-select spec allows a dialer that proposes a single protocol to send the
header, the protocol and its first message at once, and to read both echoes before the
answer (go-libp2p and js-libp2p do this for single-protocol streams). Servers read the
header and the protocol one line at a time, answer each, and hand the rest of the stream,
already buffered, to the protocol's handler; py-libp2p's server does so too.

:func:`open_optimistic` opens the stream and writes the two lines; the stream it returns
checks both echoes at its first read, or at :meth:`OptimisticStream.confirm`. A server that
answers ``na`` (it does not speak the protocol) or anything else makes that read raise
:class:`ProtocolRefused`; whatever was written after the proposal is then lost, as for any
refused stream. The canary in ``tests/test_compat_multistream.py`` fails once upstream's
client stops waiting for the header's echo.

A refusal comes with a reset: py-libp2p's server answers ``na`` and reads the next proposal,
which is our request (no line of multistream-select), and resets the stream. A reset stream's
reads raise and its unread data is dropped (upstream's yamux and go-yamux alike; see
:mod:`.yamux`), so when the reset arrives before the first read, as it often does on a busy
machine, the ``na`` is lost and the refusal looked like a stream that opened and broke (a
slow peer, not one to drop). The stream therefore asks yamux to keep the first
:data:`ANSWER_KEPT` bytes a reset drops until it is confirmed, and reads its answer from them:
``na`` before the reset is still a refusal, the protocol's echo before the reset a stream
that opened (a busy server resets streams it took), and no answer at all no verdict (the
read's own error).
"""

from __future__ import annotations

from typing import Any, cast

from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.abc import ReadWriteCloser
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils.varint import encode_delim

from ...errors import ProtocolError
from ...proto.framing import decode_varint
from ..stream import reset_quietly
from .yamux import reset_by_remote

__all__ = [
    "ANSWER_KEPT",
    "MULTISTREAM",
    "OptimisticStream",
    "ProtocolRefused",
    "open_optimistic",
    "unread_at_reset",
]

#: The multistream-select header line.
MULTISTREAM = "/multistream/1.0.0"
#: Seconds a failed proposal's reset may take.
RESET_WAIT = 1.0
#: Most bytes of an unconfirmed stream's unread data kept when the remote resets it (the two
#: echoes, or the header's echo and ``na``, take a few dozen).
ANSWER_KEPT = 1024


class ProtocolRefused(Exception):
    """The remote answered the proposal with something other than its echo (``na``: it does
    not speak the protocol)."""


class OptimisticStream:
    """A stream whose protocol was proposed without waiting; the echoes are read first.

    Everything else is the wrapped stream's (``write``, ``close``, ``reset``, ``muxed_conn``,
    ...).
    """

    def __init__(self, stream: INetStream, protocol: TProtocol) -> None:
        self._stream = stream
        self._protocol = str(protocol)
        self._confirmed = False

    @property
    def stream(self) -> INetStream:
        """The wrapped stream."""
        return self._stream

    async def confirm(self) -> None:
        """Read the two echoes (once); :class:`ProtocolRefused` if either is not the echo,
        also when the remote reset the stream right after its answer (see the module)."""
        if self._confirmed:
            return
        reader = _Recorder(self._stream)
        communicator = MultiselectCommunicator(cast(ReadWriteCloser, reader))
        answer: str | None = None
        try:
            header = await communicator.read()
            if header == MULTISTREAM:
                answer = await communicator.read()
        except Exception:
            if not reset_by_remote(self._stream):
                raise
            lines = _lines(bytes(reader.data) + unread_at_reset(self._stream))
            if not lines or lines == [MULTISTREAM] or lines[:2] == [MULTISTREAM, self._protocol]:
                raise  # no answer to the proposal, or it took the protocol: the reset stands
            header, answer = lines[0], (lines[1] if len(lines) > 1 else None)
        if header != MULTISTREAM:
            raise ProtocolRefused(f"not a multistream-select answer: {header[:64]!r}")
        if answer != self._protocol:
            raise ProtocolRefused(f"{self._protocol} refused: {(answer or '')[:64]!r}")
        self._confirmed = True
        _muxed_state(self._stream).pop("keep_on_reset", None)

    async def read(self, n: int | None = None) -> bytes:
        if not self._confirmed:
            await self.confirm()
        return await self._stream.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


async def open_optimistic(host: IHost, peer_id: ID, protocol: TProtocol) -> INetStream:
    """A new stream to ``peer_id`` (dialling if need be) with ``protocol`` proposed, not yet
    confirmed: write the first message at once; the first read checks the answer."""
    stream = await host.get_network().new_stream(peer_id)
    _muxed_state(stream)["keep_on_reset"] = ANSWER_KEPT  # LeanYamux keeps the answer a reset drops
    try:
        await stream.write(encode_delim(MULTISTREAM.encode()) + encode_delim(str(protocol).encode()))
        stream.set_protocol(protocol)
    except BaseException:
        await reset_quietly(stream, RESET_WAIT)
        raise
    return OptimisticStream(stream, protocol)  # type: ignore[return-value]


class _Recorder:
    """Reads from a stream and keeps what it read (the answer's start, should a reset follow)."""

    def __init__(self, stream: INetStream) -> None:
        self._stream = stream
        self.data = bytearray()

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self.data += data
        return data


def _muxed_state(stream: INetStream) -> dict[str, Any]:
    """The attributes of ``stream``'s muxed (yamux) stream, or a throw-away dict."""
    muxed = getattr(stream, "muxed_stream", None)
    return cast(dict[str, Any], getattr(muxed, "__dict__", {}))


def unread_at_reset(stream: INetStream) -> bytes:
    """What the remote had sent on ``stream``, unread, when it reset it (kept by
    :class:`~.yamux.LeanYamux` for a stream opened by :func:`open_optimistic`; at most
    :data:`ANSWER_KEPT` bytes)."""
    return bytes(_muxed_state(stream).get("unread_at_reset", b""))


def _lines(data: bytes) -> list[str]:
    """The whole multistream-select lines at the start of ``data`` (at most two)."""
    lines: list[str] = []
    pos = 0
    while len(lines) < 2:
        try:
            head = decode_varint(data, pos)
        except ProtocolError:
            break
        if head is None or head[1] + head[0] > len(data):
            break
        line = data[head[1] : head[1] + head[0]]
        if not line.endswith(b"\n"):
            lines.append(line.decode(errors="replace"))  # not a line: not an echo
            break
        lines.append(line[:-1].decode(errors="replace"))
        pos = head[1] + head[0]
    return lines

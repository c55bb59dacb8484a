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
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils.varint import encode_delim

from ..stream import reset_quietly

__all__ = ["MULTISTREAM", "OptimisticStream", "ProtocolRefused", "open_optimistic"]

#: The multistream-select header line.
MULTISTREAM = "/multistream/1.0.0"
#: Seconds a failed proposal's reset may take.
RESET_WAIT = 1.0


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
        """Read the two echoes (once); :class:`ProtocolRefused` if either is not the echo."""
        if self._confirmed:
            return
        communicator = MultiselectCommunicator(self._stream)
        header = await communicator.read()
        if header != MULTISTREAM:
            raise ProtocolRefused(f"not a multistream-select answer: {header[:64]!r}")
        answer = await communicator.read()
        if answer != self._protocol:
            raise ProtocolRefused(f"{self._protocol} refused: {answer[:64]!r}")
        self._confirmed = True

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
    try:
        await stream.write(encode_delim(MULTISTREAM.encode()) + encode_delim(str(protocol).encode()))
        stream.set_protocol(protocol)
    except BaseException:
        await reset_quietly(stream, RESET_WAIT)
        raise
    return OptimisticStream(stream, protocol)  # type: ignore[return-value]

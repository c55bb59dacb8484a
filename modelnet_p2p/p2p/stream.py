"""Streams as the services see them: a small interface, the errors that end one, and one way to end one.

The services above ``p2p/`` never import libp2p. They get a :class:`Stream` (anything with
``read``/``write``/``close``/``reset``; py-libp2p's ``INetStream`` is one), catch
:data:`STREAM_ERRORS`, and end streams with :func:`close_quietly`, :func:`reset_quietly` or
:func:`write_whole`.

Why the care: py-libp2p 0.8.1's Noise transport is not cancel-safe (a write cancelled
part-way leaves half a Noise message on the connection and breaks every stream on it), and
yamux holds a backlog slot per stream until the local side closes or resets it. So every
write is shielded and bounded, and every stream is ended exactly once, shielded, with a
timeout.
A stream this side has closed is not read again, so :func:`close_quietly` also discards
whatever the remote still sends on it (yamux would otherwise buffer it, up to the window,
until the remote ends its side).
"""

from __future__ import annotations

from typing import Any, Protocol

import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError, StreamReset

from ..errors import UnavailableError
from ._compat.yamux import discard_incoming, remote_ended, reset_by_remote

__all__ = [
    "CLOSE_TIMEOUT",
    "STREAM_ERRORS",
    "WRITE_TIMEOUT",
    "Stream",
    "StreamClosed",
    "StreamEOF",
    "StreamError",
    "StreamReset",
    "close_quietly",
    "discard_incoming",
    "remote_ended",
    "remote_peer",
    "reset_by_remote",
    "reset_quietly",
    "write_whole",
]

#: Longest a write may stay blocked (the peer stopped reading) before the stream is reset.
WRITE_TIMEOUT = 30.0
#: Longest a close or reset may take before it is given up (the stream is then abandoned).
CLOSE_TIMEOUT = 2.0

#: Everything a stream operation raises when the stream or its connection has ended.
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    StreamReset,
    StreamEOF,
    StreamClosed,
    BaseLibp2pError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


class Stream(Protocol):
    """The part of a libp2p stream the services use."""

    async def read(self, n: int | None = None) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


def remote_peer(stream: Any) -> str:
    """The base58 peer id of the other end of ``stream`` (``""`` if it cannot be told)."""
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return ""


async def reset_quietly(stream: Stream, timeout: float = CLOSE_TIMEOUT) -> None:
    """Reset ``stream``, shielded from cancellation, within ``timeout``; never raises."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        try:
            await stream.reset()
        except Exception:
            pass


async def close_quietly(stream: Stream, timeout: float = CLOSE_TIMEOUT, *, data: bytes = b"") -> bool:
    """Write ``data`` (if any) and close ``stream``, shielded, within ``timeout``.

    Resets the stream instead if the write or close fails or takes too long. Returns whether
    the stream was closed cleanly. Never raises. The caller is done reading ``stream``: what
    it holds unread, and whatever arrives later, is dropped.
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(timeout):
            try:
                if data:
                    await stream.write(data)
                await stream.close()
                discard_incoming(stream)
                return True
            except Exception:
                pass
        await reset_quietly(stream, timeout)
    return False


async def write_whole(stream: Stream, data: bytes, timeout: float = WRITE_TIMEOUT) -> None:
    """Write ``data`` without letting a cancellation cut it in half.

    The write is shielded from the caller's cancellation; one that cannot finish within
    ``timeout`` (the peer stopped reading for that long) resets the stream and raises
    :class:`~modelnet_p2p.errors.UnavailableError`.
    """
    # One scope, shielded and with the time limit (a shield around a move_on_after, at half the cost).
    with trio.CancelScope(shield=True, deadline=trio.current_time() + timeout) as scope:
        await stream.write(data)
    if scope.cancelled_caught:
        await reset_quietly(stream)  # (shielded itself)
        raise UnavailableError(f"stream write blocked for {timeout:.0f} s")

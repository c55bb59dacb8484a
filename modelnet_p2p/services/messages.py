"""One framed message read from a stream: the request or the answer of a one-shot protocol
(dial-back, revocation polling)."""

from __future__ import annotations

from typing import Any

import trio

from ..errors import ProtocolError
from ..p2p.stream import Stream
from ..proto.framing import FrameDecoder

__all__ = ["read_message"]


async def read_message(
    stream: Stream, *, max_size: int, max_objects: int, timeout: float, read_size: int = 65536
) -> dict[str, Any]:
    """The first frame that arrives on ``stream``, decoded within ``max_size`` bytes and
    ``max_objects`` objects (:class:`~modelnet_p2p.proto.framing.FrameDecoder`), reading at
    most ``read_size`` bytes at a time. Raises :class:`ProtocolError` if the stream ends (or
    fails) first or the frame is malformed, :class:`trio.TooSlowError` past ``timeout``."""
    decoder = FrameDecoder(max_frame_size=max_size, max_objects=max_objects)
    with trio.fail_after(timeout):
        while True:
            try:
                data = await stream.read(read_size)
            except Exception as exc:
                raise ProtocolError(f"stream ended before a message: {type(exc).__name__}") from None
            if not data:
                raise ProtocolError("stream ended before a message")
            frames = decoder.feed(data)
            if frames:
                return frames[0]

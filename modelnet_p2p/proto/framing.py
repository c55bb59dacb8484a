"""Length-prefixed msgpack frames of ``/modelnet/infer/1.0.0``.

A frame is an unsigned LEB128 varint length (the same varint libp2p uses
everywhere), followed by that many bytes holding one msgpack map. See
``specs/inference.md`` section "Framing".

This module is pure: :func:`pack_frame` turns a map into bytes and
:class:`FrameDecoder` turns bytes, fed in pieces of any size, back into maps.
Bodies are decoded by :func:`modelnet_p2p.proto.packing.unpackb`, so every frame
obeys its limits: at most :data:`~modelnet_p2p.proto.limits.MAX_DEPTH` levels of
nesting, at most :data:`~modelnet_p2p.proto.limits.MAX_CONTAINERS` maps and arrays,
at most :data:`MAX_FRAME_CONTAINERS` of them in a frame, at most
:data:`MAX_FRAME_OBJECTS` values in all, and no msgpack extension types.
A decoder's limits may be lowered between frames: a server expects only small
control frames (:data:`MAX_CONTROL_FRAME_SIZE`, :data:`MAX_CONTROL_OBJECTS`) while
a request runs.
"""

from __future__ import annotations

from typing import Any

from ..errors import ProtocolError
from .packing import packb, unpackb

__all__ = [
    "BYTES_PER_CONTROL_FRAME",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_ANSWER_SIZE",
    "MAX_CONTROL_FRAMES",
    "MAX_CONTROL_FRAME_SIZE",
    "MAX_CONTROL_OBJECTS",
    "MAX_FRAME_CONTAINERS",
    "MAX_FRAME_OBJECTS",
    "MAX_VARINT_LEN",
    "FrameDecoder",
    "decode_varint",
    "encode_varint",
    "pack_frame",
    "unpack_body",
]

#: Default largest frame body, in bytes: 1 MiB.
#:
#: Large enough for a long prompt or a big embedding batch, small enough that a
#: peer can hold one frame per stream for hundreds of streams. For comparison,
#: the libp2p Kademlia spec caps messages at 16 KiB-4 MiB depending on the
#: implementation, gRPC defaults to 4 MiB, and yamux's per-stream window (256 KiB
#: initial, about 4 MiB measured before a reset in py-libp2p 0.8.1) bounds what can
#: be in flight anyway.
DEFAULT_MAX_FRAME_SIZE = 1 << 20

#: A varint longer than this cannot describe a sane frame (10 bytes hold 2**64).
MAX_VARINT_LEN = 10

#: Most values one frame body may hold in all: the body map, every key, every container and
#: every scalar at any depth. A byte limit alone lets a 1 MiB frame decode into about 80 MiB
#: (empty arrays) or 20 MiB (short strings, small negative ints); 65,536 values cost at most
#: about 5 MiB decoded, whatever they are, and hold any message of ``specs/inference.md``
#: with room (a prompt is one string; large numeric data belongs in ``bin``).
MAX_FRAME_OBJECTS = 65_536
#: Most maps and arrays one frame body may hold (the body map included). Each costs the decoder
#: a Python call (about 0.4 us on a loaded 2-core machine) where scalars are decoded in C, so a
#: 64 KiB frame of 65,536 empty arrays took 26-38 ms loaded; 8,192 keep any frame under about 5
#: ms, and hold a chat of thousands of messages or a batch of thousands of vectors.
MAX_FRAME_CONTAINERS = 8_192
#: Largest ``credit`` or ``cancel`` frame a server reads while a request runs, in bytes: a
#: ``cancel`` reason is cut to 4,096 characters (at most 16 KiB of UTF-8); a ``credit`` is
#: about 15 bytes. Junk in a control frame costs a server its decoding, so it stays small.
MAX_CONTROL_FRAME_SIZE = 32 * 1024
#: Most values a control frame may hold (unknown keys are allowed, a few of them).
MAX_CONTROL_OBJECTS = 256
#: ``credit`` and ``cancel`` frames a client may send per request (leftovers before the next
#: one included) beyond one per :data:`BYTES_PER_CONTROL_FRAME` bytes the server sent; more is
#: a ``protocol_error``. A client credits once per quarter window (of at least 1024 bytes), so
#: junk frames that carry no progress cannot keep a server decoding
#: (:class:`~modelnet_p2p.proto.session.ServerSession` counts them).
MAX_CONTROL_FRAMES = 64
BYTES_PER_CONTROL_FRAME = 256
#: Default most bytes a client reads of one answer (frames, prefixes included) before it fails
#: the request as a ``protocol_error``: a provider that streams without end would otherwise
#: grow a collecting caller (``Peer.call``) until the deadline. Half the 64 MiB budget a peer
#: grants one remote; a local setting (``ClientSession(max_answer_size=...)``).
MAX_ANSWER_SIZE = 32 << 20


def encode_varint(value: int) -> bytes:
    """Encode a non-negative integer as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int = 0) -> tuple[int, int] | None:
    """Decode a varint at ``buf[pos:]``.

    Returns ``(value, next_pos)``, or ``None`` if the buffer ends inside the
    varint. Raises :class:`ProtocolError` for a varint longer than
    :data:`MAX_VARINT_LEN` bytes or a non-minimal encoding.
    """
    value = 0
    shift = 0
    end = len(buf)
    i = pos
    while i < end:
        if i - pos >= MAX_VARINT_LEN:
            raise ProtocolError("frame length varint too long")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            if byte == 0 and i - pos > 1:
                raise ProtocolError("frame length varint not minimally encoded")
            return value, i
        shift += 7
    if i - pos >= MAX_VARINT_LEN:
        raise ProtocolError("frame length varint too long")
    return None


def pack_frame(body: dict[str, Any], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Serialize one map as a frame.

    Raises :class:`ProtocolError` if the encoded body is larger than
    ``max_frame_size``, and :class:`TypeError` (from msgpack) for values msgpack
    cannot encode.
    """
    payload = packb(body)
    if len(payload) > max_frame_size:
        raise ProtocolError(f"frame of {len(payload)} bytes exceeds the limit of {max_frame_size} bytes")
    return encode_varint(len(payload)) + payload


def unpack_body(payload: bytes | memoryview, max_objects: int = MAX_FRAME_OBJECTS) -> dict[str, Any]:
    """Decode a frame body into a map with string keys, or raise :class:`ProtocolError`.

    The body must be one msgpack value within the limits of
    :func:`~modelnet_p2p.proto.packing.unpackb` (nesting depth, at most
    :data:`MAX_FRAME_CONTAINERS` maps and arrays and ``max_objects`` values, no extension
    types) with nothing after it.
    """
    try:
        obj = unpackb(
            payload, max_containers=MAX_FRAME_CONTAINERS, max_objects=max_objects, what="frame body"
        )
    except ProtocolError as exc:
        raise ProtocolError(f"malformed msgpack frame: {exc.message}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame is a {type(obj).__name__}, not a map")
    for key in obj:
        if not isinstance(key, str):
            raise ProtocolError("frame map has a non-string key")
    return obj


class FrameDecoder:
    """Incremental frame decoder: feed it bytes, get complete frame bodies.

    >>> dec = FrameDecoder()
    >>> data = pack_frame({"t": "chunk"})
    >>> dec.feed(data[:2]); dec.feed(data[2:])
    []
    [{'t': 'chunk'}]

    A frame whose announced length exceeds ``max_frame_size`` is rejected as
    soon as its length prefix is read, before its body is buffered, so a peer
    cannot make us buffer more than one frame's worth of bytes. After an error
    the decoder is poisoned: every later call raises the same error. The limits
    (``max_frame_size``, ``max_objects``) may be changed between frames; they apply
    from the next frame on.
    """

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, max_objects: int = MAX_FRAME_OBJECTS
    ) -> None:
        self.max_frame_size = max_frame_size
        self.max_objects = max_objects
        self._limits = (max_frame_size, max_objects)
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def expect_control(self, control: bool) -> None:
        """From the next frame on, accept only control frames (:data:`MAX_CONTROL_FRAME_SIZE`,
        :data:`MAX_CONTROL_OBJECTS`), or, with ``False``, the limits the decoder was made with."""
        size, objects = self._limits
        if control:
            size, objects = min(size, MAX_CONTROL_FRAME_SIZE), min(objects, MAX_CONTROL_OBJECTS)
        self.max_frame_size, self.max_objects = size, objects

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes without decoding them; take frames out with :meth:`next_frame`.

        The caller bounds the buffer by calling this only when :meth:`next_frame`
        returned ``None`` (then at most one frame plus one read is held).
        """
        if self._error is not None:
            raise self._error
        self._buf += data

    def next_frame(self) -> dict[str, Any] | None:
        """The next complete frame body, or ``None`` if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            head = decode_varint(self._buf, 0)
            if head is None:
                return None
            length, start = head
            if length > self.max_frame_size:
                raise ProtocolError(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame_size} bytes"
                )
            if len(self._buf) - start < length:
                return None
            # Decoded in place: a copy of a 1 MiB body (two, with a slice) per frame and
            # stream is what a peer sending large frames on many streams would cost us.
            view = memoryview(self._buf)
            try:
                part = view[start : start + length]
                try:
                    body = unpack_body(part, self.max_objects)
                finally:
                    part.release()
            finally:
                view.release()
            del self._buf[: start + length]
            return body
        except ProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise

    def feed(self, data: bytes | bytearray | memoryview) -> list[dict[str, Any]]:
        """Add bytes; return every frame body that is now complete, in order."""
        self.receive(data)
        out: list[dict[str, Any]] = []
        while (body := self.next_frame()) is not None:
            out.append(body)
        return out

    def close(self) -> None:
        """Declare end of input. Raises :class:`ProtocolError` if a frame was cut short."""
        if self._error is not None:
            raise self._error
        if self._buf:
            self._error = ProtocolError(f"stream ended inside a frame ({len(self._buf)} bytes left over)")
            raise self._error

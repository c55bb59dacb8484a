"""Workarounds of py-libp2p 0.8.1's yamux muxer.

Upstream behaviours corrected (the canaries in ``tests/test_compat_yamux.py`` fail once
upstream changes them):

- **A remote reset reads as an ordinary end of stream.** When the remote sends RST, yamux
  marks the stream ``reset_received`` and then finalizes it, removing its buffer; the next
  ``read()`` finds the buffer gone and raises ``StreamEOF`` ("Stream was removed during
  read") instead of ``StreamReset``. A protocol that must tell a clean close from a reset
  (``specs/inference.md``: a kept stream may be resent on only after a clean end of stream)
  cannot, from the exception alone. :func:`reset_by_remote` reads the flag yamux keeps (a
  public attribute of its stream), so a caller that got ``StreamEOF`` can ask whether it was
  really a reset.
- **Every connection runs two timers of its own, forever.** ``Yamux.start`` starts
  ``_measure_rtt_loop`` (a ping every 30 s from each side, whether or not the connection
  carries traffic) and ``_stale_stream_sweeper`` (a wake-up every 30 s) for each connection.
  An idle peer with 20 connections woke about 2 times a second for them, and the cost grew
  with its number of connections. :class:`LeanYamux` keeps the first RTT sample (one ping
  0.5 s after the start, as upstream) and drops both loops; :func:`run_keepalive`, one task
  per host, does their work for all the host's connections: it pings only a connection that
  has been silent (nothing received) for :data:`KEEPALIVE_INTERVAL` (its dialing side does;
  the accepting side waits twice as long), closes one whose ping
  stays unanswered for :data:`KEEPALIVE_TIMEOUT`, and sweeps stale streams only where a
  closed stream is waiting. It sleeps until the next connection falls due, and pings every
  connection due within :data:`KEEPALIVE_SLACK` of it in the same wake-up.
- **The receive window is not enforced.** ``handle_incoming`` appends every DATA frame to
  the stream's buffer and, when the remote sent more than the window allows, only logs it
  (and sets the window to 0): a remote that ignores the window grows the receiver without
  bound (+401 MB on a server, +1.8 GB on a client, measured). The yamux spec makes that a
  protocol error of the session. :class:`LeanYamux` checks every DATA frame against the
  stream's window before it is buffered: an overrun is dropped, and the connection is sent
  GO_AWAY (protocol error) and closed, as go-yamux and hashicorp/yamux do
  (:attr:`LeanYamux.window_violations` counts them). It also caps the window's auto-tuning
  at :data:`MAX_STREAM_WINDOW` per stream (upstream lets it double to 16 MiB).
- **Unread data outlives the stream.** A stream reset by the local side, or by the remote
  before its FIN, keeps its unread buffer until the stale-stream sweep reclaims it 30-90 s
  later (data no read can return: a reset stream's reads raise): streams rejected while the
  remote still sends kept +584 MB in 20 s. :class:`LeanYamux` drops that buffer when the
  stream is finalized (a stream negotiating its protocol keeps the first bytes of the
  remote's answer: :mod:`.multistream`). :func:`discard_incoming` is for a stream the local side is done
  reading (after a close): its buffer is dropped at once and whatever arrives later is
  discarded, not buffered (the window is not returned, so a remote that keeps sending stalls).
- **Bulk data moves slowly** (a stock stream: about 100-220 MB/s here, against 1.3-2 GB/s of
  raw TCP). :class:`LeanYamux` and its streams change what the profile showed:

  - a write sends one 64 KiB frame per ``_write_frame`` (a 64 KiB chunk and its framing
    become a full frame and one of a few bytes) and, once the window is shut, polls for it
    every 10 ms: :meth:`_LeanStream.write` joins every frame the window allows (up to
    :data:`MAX_WRITE_BATCH`) into one write, in frames of equal size up to
    :data:`MAX_FRAME_PAYLOAD` (256 KiB), and a window update wakes it at once;
  - nearly every read sends a window update (upstream's "release on read"), a Noise message
    each way per 64 KiB: a stream updates its window as go-yamux does, in one update once a
    good part of it was read (:data:`UPDATE_FRACTION`; go-yamux: half), and gets the whole
    :data:`MAX_STREAM_WINDOW` on its first read (upstream starts
    at 256 KiB and doubles it per update, up to 16 MiB). All streams of a connection together
    hold at most :data:`MAX_CONNECTION_WINDOW` beyond the spec's 256 KiB each;
  - the locks taken for every frame and read yield to trio's scheduler even when free:
    :class:`FastLock` does not; ``read_stream`` and ``_write_frame`` lose their per-frame
    debug formatting and one of their two copies;
  - the Noise session's reads and writes (see :mod:`.noise`): :class:`LeanYamux` installs
    its fast path, and reads DATA bodies straight from its buffer;
  - each frame is a write (a Noise message, a system call) however many streams write at
    once, and a checkpoint follows the socket's send (itself one): frames that come during a
    write go out together in the next (``_write_frame``); a send is followed by a cancel point.

  A DATA frame that overruns its window waits (at most :data:`OVERRUN_GRACE`), unread, for
  its stream's reader to open the window before it counts as a violation: the reader of a
  sender that ignores the window but is read as fast as it sends is slowed by TCP, not cut
  off. The wire stays the yamux spec's: stock peers read it (``tests/test_compat_noise.py``
  runs bulk both ways against a stock py-libp2p host).
- **The configured yamux class is ignored** (:mod:`.muxer`).
"""

from __future__ import annotations

import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetwork, ISecureConn
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.yamux.yamux import (
    DEFAULT_WINDOW_SIZE,
    FLAG_SYN,
    GO_AWAY_PROTOCOL_ERROR,
    HEADER_SIZE,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
    _yamux_data_read_timeout,
)

from .noise import FastLock, NoiseFastPath
from .noise import _Socket as SocketWriter
from .noise import install as install_noise_fast_path

__all__ = [
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_SLACK",
    "KEEPALIVE_TIMEOUT",
    "MAX_STREAM_WINDOW",
    "STALE_SWEEP_INTERVAL",
    "LeanYamux",
    "buffered_bytes",
    "discard_incoming",
    "ping",
    "remote_ended",
    "reset_by_remote",
    "run_keepalive",
    "start_keepalive",
]

log = logging.getLogger(__name__)

#: Seconds a connection may stay silent (nothing received) before it is pinged. Upstream
#: pings every connection every 30 s from both sides; go-yamux's keepalive interval is 30 s.
KEEPALIVE_INTERVAL = 30.0
#: Seconds a ping may stay unanswered before its connection is closed as dead (generous: a
#: peer whose cores are busy still answers within seconds; upstream never closes).
KEEPALIVE_TIMEOUT = 20.0
#: Fraction of the interval by which a connection may be pinged early, so that one wake-up
#: serves every connection falling due close together.
KEEPALIVE_SLACK = 0.25
#: Seconds between stale-stream sweeps while some connection holds a closed stream (as
#: upstream's per-connection sweeper; its grace before a stream is reclaimed is 60 s).
STALE_SWEEP_INTERVAL = 30.0
#: A connection's accepting side waits this many intervals of silence before it pings (the
#: dialing side pings after one), so a silent connection costs one ping an interval, not two.
RESPONDER_FACTOR = 2.0
#: Seconds upstream waits before the first RTT sample of a new connection.
FIRST_RTT_DELAY = 0.5
#: Receive window of every stream, in bytes, from its first read on (upstream starts at the
#: spec's 256 KiB and auto-tunes up to 16 MiB). At 2 MiB per round trip a stream still moves
#: 200 MB/s at 10 ms and 20 MB/s at 100 ms.
MAX_STREAM_WINDOW = 2 << 20
#: A window update goes out once this fraction (1/4) of the window was read. A sender then has
#: at least 3/4 of the window (1.5 MiB), less what is buffered unread, which covers what the
#: inference protocol's credit lets a server have unacknowledged (``specs/inference.md``: at
#: most 1.25 MiB with the default 1 MiB window and 1 MiB frames): the credit, not yamux, holds
#: a server back when its client stops reading (yamux resets a stream whose writer waited 5 s
#: for window). Updates per 512 KiB read, against upstream's one per 64 KiB read.
UPDATE_FRACTION = 4
#: Most receive window all the streams of one connection may hold together beyond the spec's
#: 256 KiB a stream, in bytes: half the 64 MiB budget a peer grants one remote. Streams over
#: it keep 256 KiB (the spec's initial window, which a receiver cannot take back).
MAX_CONNECTION_WINDOW = 32 << 20
#: Most payload bytes of one DATA frame this side sends: the spec's initial window (256 KiB),
#: which every receiver must take in one frame (the yamux spec sets no other limit; jvm-libp2p
#: takes up to 1 MiB, rust-yamux up to its window). Upstream sends 64 KiB frames, go-yamux's
#: default ``MaxMessageSize``, and splits a 64 KiB chunk plus its framing into a full frame
#: and one of a few bytes, each a pass through the receiver's frame loop. A write is split
#: into frames of equal size, so no frame is a tail of a few bytes.
MAX_FRAME_PAYLOAD = DEFAULT_WINDOW_SIZE
#: Most payload bytes one stream write hands the connection at once (frames joined into one
#: Noise write); the send window bounds it too.
MAX_WRITE_BATCH = 1 << 20
#: Seconds a writer waits for the remote to open its window before it fails, as upstream.
WINDOW_WAIT_TIMEOUT = 5.0
#: A writer waiting for window re-checks the stream's state this often (a window update
#: wakes it at once).
WINDOW_WAIT_POLL = 0.05
#: Seconds the connection waits, unread, for a stream's reader to open the window a DATA frame
#: overruns, before it is cut off: long enough for a reader that keeps up (it takes
#: milliseconds), short enough that a sender which ignores the window cannot hold the
#: connection (and its other streams) while its reader is busy elsewhere.
OVERRUN_GRACE = 1.0
#: Longest the GO_AWAY after a window overrun may take to write before the connection is
#: closed without it.
GO_AWAY_TIMEOUT = 2.0


def reset_by_remote(stream: Any) -> bool:
    """Whether the remote reset ``stream`` (a libp2p net stream), even if a read said EOF."""
    muxed = getattr(stream, "muxed_stream", None)
    return bool(getattr(muxed, "reset_received", False))


class _LeanStream(YamuxStream):
    """A yamux stream of a :class:`LeanYamux` (streams are made by upstream code as
    ``YamuxStream`` and switched to this class when their buffer is registered)."""

    #: The local side reset the stream: its unread data is dropped.
    local_reset = False
    #: The local side is done reading: data is dropped as it arrives (:func:`discard_incoming`).
    discarding = False

    @property
    def target_recv_window(self) -> int:
        return int(self.__dict__.get("target_recv_window", 0))

    @target_recv_window.setter
    def target_recv_window(self, value: int) -> None:
        # Upstream's auto-tuning doubles this up to 16 MiB and grows the window to match.
        others = sum(
            s.__dict__.get("target_recv_window", DEFAULT_WINDOW_SIZE) - DEFAULT_WINDOW_SIZE
            for s in list(self.conn.streams.values())
            if s is not self
        )
        room = DEFAULT_WINDOW_SIZE + max(0, MAX_CONNECTION_WINDOW - others)
        current = self.__dict__.get("target_recv_window", DEFAULT_WINDOW_SIZE)
        self.__dict__["target_recv_window"] = max(min(value, MAX_STREAM_WINDOW, room), min(current, value))

    @property
    def send_window(self) -> int:
        return int(self.__dict__.get("send_window", 0))

    @send_window.setter
    def send_window(self, value: int) -> None:
        # Upstream's handle_incoming adds a WINDOW_UPDATE's increment here: wake the writer.
        grew = value > self.__dict__.get("send_window", 0)
        self.__dict__["send_window"] = value
        if grew:
            opened = self.__dict__.pop("window_opened", None)
            if opened is not None:
                opened.set()

    async def write(self, data: bytes) -> None:
        """Upstream's write, but every frame the window allows (up to :data:`MAX_WRITE_BATCH`
        bytes) goes to the connection in one write, and a writer waiting for window wakes when
        it opens (upstream polls every 10 ms and sends one 64 KiB frame per write)."""
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        total = len(data)
        sent = 0
        with memoryview(data) as view:
            while sent < total:
                batch: list[bytes | memoryview] = []
                async with self._write_lock:
                    if self.send_closed:
                        raise MuxedStreamError("Stream is closed for sending")
                    async with self.window_lock:
                        if self.closed:
                            raise MuxedStreamError("Stream is closed")
                        allowed = min(self.send_window, total - sent, MAX_WRITE_BATCH)
                        if allowed > 0:
                            self.send_window -= allowed
                            batch = _data_frames(self.stream_id, view, sent, sent + allowed)
                if batch:
                    await self.conn._write_frame(b"".join(batch))
                    sent += allowed
                    continue
                await self._wait_for_window()

    async def read(self, n: int | None = -1) -> bytes:
        if not self.__dict__.get("window_granted"):
            # Grant the whole window before the first read waits (go-yamux sends it with the
            # stream's SYN or ACK), so that a sender is never held to the initial 256 KiB.
            self.__dict__["window_granted"] = True
            if not self.recv_closed and not self.closed:
                await self._auto_tune_and_send_window_update()
        conn = self.conn
        if n is not None and n > 0 and not self.closed and not self.reset_received:
            # Data already here: what upstream's read(n) returns (through read_stream), taken
            # straight from the buffer while nothing else holds the streams' lock.
            buffer = conn.stream_buffers.get(self.stream_id)
            if buffer and not conn.streams_lock.locked() and not conn.event_shutting_down.is_set():
                if conn.streams.get(self.stream_id) is self:
                    data = _take(buffer, n)
                    await self._auto_tune_and_send_window_update(bytes_read=len(data))
                    return data
        return await super().read(n)

    @property
    def _write_lock(self) -> FastLock:
        # Serializes this stream's writers (upstream: a ReadWriteLock of two trio locks).
        lock = self.__dict__.get("write_lock")
        if lock is None:
            lock = self.__dict__["write_lock"] = FastLock()
        return lock

    async def _wait_for_window(self) -> None:
        with trio.move_on_after(WINDOW_WAIT_TIMEOUT):
            while self.send_window <= 0 and not self.closed:
                opened = self.__dict__.setdefault("window_opened", trio.Event())
                with trio.move_on_after(WINDOW_WAIT_POLL):
                    await opened.wait()
            return
        raise MuxedStreamError("Timed out waiting for window update after 5 seconds.")

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        """go-yamux's window update: once the window the remote has left (plus what is
        buffered unread) is a :data:`UPDATE_FRACTION` short of the target, grow it back to
        the target in one update (go-yamux waits for half). Upstream's version sends an update
        for nearly every read (its release-on-read), one frame per 64 KiB read."""
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            delta = self.target_recv_window - (self.recv_window + buffered)
            if delta < self.target_recv_window // UPDATE_FRACTION:
                return
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        opened = self.__dict__.pop("recv_opened", None)
        if opened is not None:
            opened.set()
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    async def reset(self) -> None:
        self.local_reset = True
        await super().reset()


def _data_frames(stream_id: int, view: memoryview, start: int, end: int) -> list[bytes | memoryview]:
    """Headers and payloads of the DATA frames carrying ``view[start:end]``."""
    parts: list[bytes | memoryview] = []
    frames = -(-(end - start) // MAX_FRAME_PAYLOAD)
    step = -(-(end - start) // frames)
    for pos in range(start, end, step):
        size = min(step, end - pos)
        parts.append(struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream_id, size))
        parts.append(view[pos : pos + size])
    return parts


class _Buffer(bytearray):
    """A stream's receive buffer that refuses data beyond the stream's receive window."""

    def __init__(self, conn: LeanYamux, stream_id: int, data: bytes | bytearray = b"") -> None:
        super().__init__(data)
        self.conn = conn
        self.stream_id = stream_id

    def extend(self, data: Any) -> None:
        stream = self.conn.streams.get(self.stream_id)
        if stream is not None:
            # Upstream subtracts the bytes from the window right after this call.
            if len(data) > stream.recv_window:
                self.conn.window_overrun(stream, len(data))
                return
            if getattr(stream, "discarding", False):
                return
        super().extend(data)


class _Buffers(dict[int, bytearray]):
    """``stream_buffers`` of a :class:`LeanYamux`: every buffer registered becomes a
    :class:`_Buffer`, and its stream a :class:`_LeanStream`."""

    def __init__(self, conn: LeanYamux) -> None:
        super().__init__()
        self.conn = conn

    def __setitem__(self, stream_id: int, buf: bytearray) -> None:
        stream = self.conn.streams.get(stream_id)
        if stream is not None and type(stream) is YamuxStream:
            stream.__class__ = _LeanStream
            if not stream.window_lock.locked():
                stream.window_lock = FastLock()  # type: ignore[assignment]
            # The whole window at once (granted by the first window update), not 256 KiB
            # doubled by upstream's auto-tuning.
            stream.target_recv_window = MAX_STREAM_WINDOW
        if not isinstance(buf, _Buffer):
            buf = _Buffer(self.conn, stream_id, buf)
        super().__setitem__(stream_id, buf)


class _Batch:
    """Frames that wait for the connection's write under way, to go out in the next one."""

    __slots__ = ("done", "error", "parts", "size", "turn")

    def __init__(self, first: bytes) -> None:
        self.parts = [first]
        self.size = len(first)
        #: The write under way is done: the first writer of this batch writes it.
        self.turn = trio.Event()
        #: This batch is written (or failed with ``error``).
        self.done = trio.Event()
        self.error: Exception | None = None

    def add(self, frame: bytes) -> None:
        self.parts.append(frame)
        self.size += len(frame)


class LeanYamux(Yamux):
    """Yamux without its per-connection timer loops (:func:`run_keepalive` does their work),
    with the receive window enforced and unread data of ended streams dropped.

    :attr:`last_heard` is the :func:`trio.current_time` of the last bytes read from the
    remote (the secured connection's ``read`` is wrapped to stamp it).
    """

    def __init__(
        self,
        secured_conn: ISecureConn,
        peer_id: ID,
        is_initiator: bool | None = None,
        on_close: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__(secured_conn, peer_id, is_initiator, on_close)
        self.stream_buffers = _Buffers(self)
        self.streams_lock = FastLock()  # type: ignore[assignment]
        self._write_lock = FastLock()  # type: ignore[assignment]
        #: The Noise session's fast read/write path (None: not a Noise session).
        self.noise: NoiseFastPath | None = install_noise_fast_path(secured_conn)
        #: A write is under way; the frames of the next one, gathered meanwhile (_write_frame).
        self._writing = False
        self._queued: deque[_Batch] = deque()
        #: The Noise session writes to a trio socket, whose send is a schedule point.
        self._send_yields = self.noise is not None and isinstance(self.noise.raw, SocketWriter)
        #: The last frame header read (the last 12 bytes read outside frame bodies).
        self._last_header = b""
        #: DATA frames that overran their stream's receive window (the first closes the connection).
        self.window_violations = 0
        try:
            self.last_heard = trio.current_time()
        except RuntimeError:  # made outside trio (tests of the class itself)
            self.last_heard = 0.0
        read = secured_conn.read

        async def heard(n: int | None = None) -> bytes:
            data = await read(n)
            self.last_heard = trio.current_time()
            if self.noise is not None:  # frame headers only (bodies skip this wrapper)
                self._last_header = (self._last_header + data)[-HEADER_SIZE:]
            return data

        # One attribute on this connection's own secured session; every yamux read goes
        # through it (handle_incoming reads headers and bodies with read_exactly). Where it
        # cannot be set, the connection looks silent and is pinged every interval (as upstream).
        try:
            vars(secured_conn)["read"] = heard
        except TypeError:
            log.debug("cannot watch reads of %r; it will be pinged every interval", secured_conn)

    #: The GO_AWAY code this side's close sends (upstream always sends 0, normal; see
    #: :mod:`.goaway`).
    close_code = 0

    async def close(self, error_code: int | None = None) -> None:
        await super().close(self.close_code if error_code is None else error_code)

    async def _measure_rtt_loop(self) -> None:
        # Upstream's first sample only: the receive window's auto-tuning uses the RTT.
        await trio.sleep(FIRST_RTT_DELAY)
        if not self.event_shutting_down.is_set():
            try:
                await ping(self, KEEPALIVE_TIMEOUT)
            except Exception:
                pass

    async def _stale_stream_sweeper(self) -> None:
        return None

    async def _write_frame(self, data: bytes) -> None:
        """Upstream's (no debug line per frame), but frames that come during a write go out
        together, in order, in the next (up to :data:`MAX_WRITE_BATCH` bytes): a queued frame
        goes out even if its writer is cancelled (as upstream's begun Noise write)."""
        if not self._writing:
            self._writing = True
            await self._write_joined(data, None)
            return
        queued = self._queued
        batch = queued[-1] if queued else None
        if batch is not None and batch.size < MAX_WRITE_BATCH:  # join the batch being gathered
            batch.add(data)
            with trio.CancelScope(shield=True):
                await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            await trio.lowlevel.checkpoint_if_cancelled()
            return
        # Lead a batch: wait for the writes before it, then write every frame it gathered.
        batch = _Batch(data)
        queued.append(batch)
        with trio.CancelScope(shield=True):
            await batch.turn.wait()
        await self._write_joined(b"".join(batch.parts), batch)

    async def _write_joined(self, data: bytes, batch: _Batch | None) -> None:
        """Write ``data`` (``batch``'s frames), tell its writers, hand over to the next batch."""
        error: Exception | None = None
        try:
            with trio.CancelScope(shield=True):
                try:
                    async with self._write_lock:
                        await self.secured_conn.write(data)
                except Exception as exc:
                    error = exc
        finally:
            if batch is not None:
                batch.error = error
                batch.done.set()
            if self._queued:  # the next batch's leader writes it (it takes no more frames)
                self._queued.popleft().turn.set()
            else:
                self._writing = False
        if error is not None:
            raise error
        if self._send_yields:  # the socket's send was a schedule point: only a cancel point left
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await trio.lowlevel.checkpoint()

    async def _read_data_body(self, length: int) -> bytes:
        # Upstream's bound; the body comes straight from the Noise buffer (one copy).
        if self.noise is None:
            return await super()._read_data_body(length)
        await self._hold_back_overrun(length)
        if self.noise.buffered_plaintext >= length:  # no wait, so no timeout to set
            data = await self.noise.read_exactly(length)
            # A stream whose reader lags (a quarter of the window unread): let the readers run
            # before the next frame, as upstream does after every frame (its locks yield), so
            # that a reader keeps up with a sender that ignores the window.
            if self._lagging():
                await trio.lowlevel.checkpoint()
            return data
        with trio.fail_after(_yamux_data_read_timeout()):
            data = await self.noise.read_exactly(length)
        self.last_heard = trio.current_time()
        return data

    def _lagging(self) -> bool:
        """Whether the stream of the frame being read holds a quarter of the window unread."""
        header = self._last_header
        if len(header) != HEADER_SIZE:
            return True
        buffer = self.stream_buffers.get(int.from_bytes(header[4:8], "big"))
        return buffer is not None and len(buffer) >= MAX_STREAM_WINDOW // UPDATE_FRACTION

    async def _hold_back_overrun(self, length: int) -> None:
        """Before a DATA body that overruns its stream's window is read, wait (at most
        :data:`OVERRUN_GRACE` seconds) for the stream's reader to open the window: the
        connection is not read meanwhile, so TCP holds the sender back. A sender that ignores
        the window is then slowed to its reader's pace instead of cut off; one whose reader
        does not catch up in time is cut off without the body being read (upstream reads
        bodies of up to 16 MiB before any check)."""
        header = self._last_header
        if len(header) != HEADER_SIZE:
            return
        _, typ, _, stream_id, announced = struct.unpack(YAMUX_HEADER_FORMAT, header)
        stream = self.streams.get(stream_id)
        if typ != TYPE_DATA or announced != length or not isinstance(stream, _LeanStream):
            return
        if length <= stream.recv_window or stream.discarding or stream.local_reset:
            return
        with trio.move_on_after(OVERRUN_GRACE):
            while length > stream.recv_window and not stream.closed and not stream.recv_closed:
                opened = stream.__dict__.setdefault("recv_opened", trio.Event())
                with trio.move_on_after(WINDOW_WAIT_POLL):
                    await opened.wait()
        if length > stream.recv_window and not stream.closed and not stream.recv_closed:
            self.window_overrun(stream, length)
            # handle_incoming ends the connection on a RawConnError (its cleanup runs once).
            raise RawConnError(f"yamux: a DATA frame of {length} bytes overran stream {stream_id}'s window")

    async def read_stream(self, stream_id: int, n: int = -1) -> bytes:
        """Upstream's ``read_stream`` (the same outcomes in the same order) without its debug
        lines and with one copy of the data, not two."""
        if n is None:
            n = -1
        while True:
            async with self.streams_lock:
                stream = self.streams.get(stream_id)
                if stream is None or self.event_shutting_down.is_set():
                    raise MuxedStreamEOF("Stream closed")
                buffer = self.stream_buffers.get(stream_id)
                if buffer is None:
                    if stream.reset_received:
                        raise MuxedStreamReset("Stream was reset")
                    raise MuxedStreamEOF("Stream buffer closed")
                if buffer and (stream.recv_closed or not stream.reset_received):
                    data = _take(buffer, n)
                    if stream.closed:
                        self._finalize_stream_locked(stream, fully_closed=True)
                    return data
                if stream.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                if stream.recv_closed:
                    raise MuxedStreamEOF("Stream is closed for receiving")
                if stream.closed:
                    raise MuxedStreamReset("Stream is reset or closed")
                event = self.stream_events.get(stream_id)
            if event is None:
                raise MuxedStreamEOF("Stream was removed")
            await event.wait()
            if self.stream_events.get(stream_id) is event:
                self.stream_events[stream_id] = trio.Event()

    def window_overrun(self, stream: YamuxStream, nbytes: int) -> None:
        """A DATA frame of ``nbytes`` overran ``stream``'s window: it was dropped; go away."""
        self.window_violations += 1
        if self.window_violations > 1:
            return
        log.warning(
            "yamux: %s sent %d bytes on stream %d with a window of %d; closing the connection",
            self.peer_id,
            nbytes,
            stream.stream_id,
            stream.recv_window,
        )
        if self._nursery is not None:
            self._nursery.start_soon(self._go_away)
        else:
            self.event_shutting_down.set()

    async def _go_away(self) -> None:
        # GO_AWAY (protocol error), then close the secured connection: handle_incoming's next
        # read fails and it runs upstream's cleanup (streams woken, swarm told), once.
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR)
        with trio.move_on_after(GO_AWAY_TIMEOUT):
            try:
                await self._write_frame(header)
            except Exception:
                pass
        try:
            await self.secured_conn.close()
        except Exception as exc:
            log.debug("closing the connection to %s failed: %r", self.peer_id, exc)

    def _finalize_stream_locked(self, stream: YamuxStream, *, fully_closed: bool) -> None:
        # A reset stream's reads raise, so its unread data can never be read: drop it now
        # (upstream keeps it until a sweep 30-90 s later). Data after a remote FIN stays readable.
        if fully_closed and stream.reset_received:
            if getattr(stream, "local_reset", False) or not stream.recv_closed:
                buf = self.stream_buffers.get(stream.stream_id)
                if buf:
                    keep = stream.__dict__.pop("keep_on_reset", 0)  # see ._compat.multistream
                    if keep and not getattr(stream, "local_reset", False):
                        stream.__dict__["unread_at_reset"] = bytes(buf[:keep])
                    buf.clear()
        super()._finalize_stream_locked(stream, fully_closed=fully_closed)

    def has_closed_streams(self) -> bool:
        """Whether a stale-stream sweep could reclaim anything here."""
        return any(s.closed for s in list(self.streams.values()))

    async def sweep_stale_streams(self) -> int:
        """What upstream's per-connection sweeper does at each wake-up."""
        async with self.streams_lock:
            return self._sweep_stale_streams()


def _take(buffer: bytearray, n: int) -> bytes:
    """The first ``n`` bytes of ``buffer`` (all if ``n < 0``), removed from it, in one copy."""
    if n < 0 or n >= len(buffer):
        data = bytes(buffer)
        buffer.clear()
        return data
    with memoryview(buffer) as view:
        data = bytes(view[:n])
    del buffer[:n]
    return data


def discard_incoming(stream: Any) -> bool:
    """The local side is done reading ``stream`` (a libp2p net stream): drop what it holds
    unread and whatever arrives later; ``False`` if it is not a :class:`LeanYamux` stream."""
    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, _LeanStream):
        return False
    muxed.discarding = True
    buf = muxed.conn.stream_buffers.get(muxed.stream_id)
    if buf:
        buf.clear()
    return True


def remote_ended(stream: Any) -> bool:
    """Whether the remote closed or reset its side of ``stream`` (a libp2p net stream)."""
    muxed = getattr(stream, "muxed_stream", None)
    if muxed is None:
        return True
    return bool(muxed.recv_closed or muxed.reset_received or muxed.closed)


def buffered_bytes(conn: Any) -> int:
    """Bytes received and not yet read on all streams of a yamux connection."""
    buffers = getattr(conn, "stream_buffers", None) or {}
    return sum(len(b) for b in list(buffers.values()))


async def ping(conn: Yamux, timeout: float) -> bool:
    """Send a yamux ping on ``conn``; whether its answer came within ``timeout`` seconds.

    The answer updates the connection's RTT estimate, as upstream's own pings do.
    """
    conn._ping_id += 1
    answered = conn._ping_event = trio.Event()
    header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, conn._ping_id)
    await conn._write_frame(header)
    conn._ping_sent_time = trio.current_time()
    with trio.move_on_after(timeout):
        await answered.wait()
        return True
    return False


def _lean_conns(network: INetwork) -> list[tuple[INetConn, LeanYamux]]:
    out = []
    for conn in list(network.get_connections()):
        muxed = getattr(conn, "muxed_conn", None)
        if isinstance(muxed, LeanYamux) and not conn.is_closed:
            out.append((conn, muxed))
    return out


async def _ping_or_close(conn: INetConn, muxed: LeanYamux, timeout: float, pinging: set[int]) -> None:
    try:
        sent = trio.current_time()
        answered = await ping(muxed, timeout)
        if not answered and muxed.last_heard < sent and not conn.is_closed:
            log.debug("closing the connection to %s: no answer to a ping in %.0f s", muxed.peer_id, timeout)
            with trio.move_on_after(5):
                await conn.close()
    except Exception as exc:  # the connection went away meanwhile
        log.debug("keepalive ping to %s failed: %r", muxed.peer_id, exc)
    finally:
        pinging.discard(id(muxed))


async def run_keepalive(
    network: INetwork,
    *,
    interval: float = KEEPALIVE_INTERVAL,
    timeout: float = KEEPALIVE_TIMEOUT,
    slack: float = KEEPALIVE_SLACK,
    sweep_interval: float = STALE_SWEEP_INTERVAL,
) -> None:
    """Keep every :class:`LeanYamux` connection of ``network`` alive and swept, until cancelled.

    A new connection starts heard-from, so it falls due ``interval`` seconds later at the
    earliest: sleeping at most ``interval`` never misses one. The dialing side of a connection
    pings it after ``interval`` seconds of silence, the accepting side after twice that (a
    fallback for remotes that do not ping).
    """
    pinging: set[int] = set()
    next_sweep: float | None = None
    async with trio.open_nursery() as nursery:
        while True:
            now = trio.current_time()
            deadline = now + interval
            try:
                conns = _lean_conns(network)
                for conn, muxed in conns:
                    if id(muxed) in pinging:
                        continue
                    # The dialing side pings; the other waits twice as long, so that one
                    # ping (not one from each side) serves a silent connection.
                    due = muxed.last_heard + interval * (1 if muxed.is_initiator else RESPONDER_FACTOR)
                    if due - now <= slack * interval:
                        pinging.add(id(muxed))
                        nursery.start_soon(_ping_or_close, conn, muxed, timeout, pinging)
                    else:
                        deadline = min(deadline, due)
                if next_sweep is not None and now >= next_sweep:
                    next_sweep = None
                    for _, muxed in conns:
                        if muxed.has_closed_streams():
                            await muxed.sweep_stale_streams()
                if next_sweep is None and any(m.has_closed_streams() for _, m in conns):
                    next_sweep = now + sweep_interval
            except Exception as exc:  # never let a surprise stop the swarm's nursery
                log.debug("keepalive pass failed: %r", exc)
            if next_sweep is not None:
                deadline = min(deadline, next_sweep)
            await trio.sleep_until(max(deadline, now + 0.05))


def start_keepalive(network: INetwork, **settings: float) -> bool:
    """Run :func:`run_keepalive` in the swarm's own background nursery (it lives as long as the
    swarm runs); ``False`` if the swarm has none (then nothing pings or sweeps)."""
    nursery = getattr(network, "background_nursery", None)
    if nursery is None:
        return False

    async def keepalive() -> None:
        await run_keepalive(network, **settings)

    nursery.start_soon(keepalive)
    return True


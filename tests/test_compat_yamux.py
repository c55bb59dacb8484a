"""Canaries of ``modelnet_p2p.p2p._compat.yamux``: they fail once py-libp2p reports a remote
reset to a reader as ``StreamReset`` on its own, builds the yamux class it is given, or stops
running timer loops per connection (then the shims can go); and tests of the keepalive that
replaces those loops."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF

from modelnet_p2p.p2p._compat.yamux import reset_by_remote
from modelnet_p2p.testing import open_peers

PROBE = TProtocol("/modelnet-test/reset-probe/1")


async def _ending(how: bytes) -> tuple[type[BaseException] | None, bool]:
    async with open_peers(2) as (a, b):

        async def handler(stream):
            await stream.read(16)
            if how == b"reset":
                await stream.reset()
            else:
                await stream.close()

        b.host.set_stream_handler(PROBE, handler)
        await a.connect(b.addrs[0])
        stream = await a.host.new_stream(b.identity.peer_id, [PROBE])
        await stream.write(how)
        raised: type[BaseException] | None = None
        with trio.fail_after(5):
            try:
                await stream.read(16)
            except Exception as exc:
                raised = type(exc)
        flag = reset_by_remote(stream)
        await stream.reset()
        return raised, flag


async def test_remote_reset_still_reads_as_end_of_stream():
    raised, flag = await _ending(b"reset")
    assert raised is StreamEOF  # the upstream bug: not StreamReset
    assert flag  # the shim tells it apart


async def test_remote_close_reads_as_end_of_stream_without_the_reset_flag():
    raised, flag = await _ending(b"close")
    assert raised is StreamEOF
    assert not flag


# -- the timers of every connection (LeanYamux, run_keepalive, ClassHonouringMuxer) -----------


async def test_upstream_builds_a_plain_yamux_whatever_class_is_configured() -> None:
    """Canary: ``MuxerMultistream.new_conn`` ignores the class ``muxer_opt`` names for yamux."""
    from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID, Yamux

    class Mine(Yamux):
        pass

    built: list[type] = []
    original = MuxerMultistream._annotate_connection

    def spy(muxed_conn: Any, secured_conn: Any, protocol: Any) -> Any:
        built.append(type(muxed_conn))
        return original(muxed_conn, secured_conn, protocol)

    muxer = MuxerMultistream({TProtocol(PROTOCOL_ID): Mine})
    assert muxer.transports[TProtocol(PROTOCOL_ID)] is Mine
    # Drive new_conn over an in-memory pair: both sides negotiate yamux.
    left, right = _pipe()
    MuxerMultistream._annotate_connection = staticmethod(spy)  # type: ignore[method-assign]
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(muxer.new_conn, left, _an_id())
                nursery.start_soon(MuxerMultistream({TProtocol(PROTOCOL_ID): Mine}).new_conn, right, _an_id())
    finally:
        MuxerMultistream._annotate_connection = staticmethod(original)  # type: ignore[method-assign]
    assert built == [Yamux, Yamux]  # the upstream bug: not Mine


def test_upstream_yamux_starts_two_timer_loops_per_connection() -> None:
    """Canary: ``Yamux.start`` runs an RTT ping loop (every 30 s) and a stale-stream sweeper
    for each connection; LeanYamux overrides both by name."""
    import inspect

    from libp2p.stream_muxer.yamux import yamux

    source = inspect.getsource(yamux.Yamux.start)
    assert "self._measure_rtt_loop" in source and "self._stale_stream_sweeper" in source
    assert yamux.RTT_MEASURE_INTERVAL == 30
    loop = inspect.getsource(yamux.Yamux._measure_rtt_loop)
    assert "while not self.event_shutting_down.is_set()" in loop  # pings forever, busy or not


async def test_peers_get_lean_connections_pinged_only_by_the_dialer(monkeypatch: Any) -> None:
    from modelnet_p2p.p2p._compat import yamux as compat

    pings: list[bool] = []  # is_initiator of the side that sent a ping
    original = compat.LeanYamux._write_frame

    async def counting(self: Any, data: bytes) -> None:
        if data[1] == 2 and data[3] & 1:  # TYPE_PING with FLAG_SYN
            pings.append(self.is_initiator)
        await original(self, data)

    monkeypatch.setattr(compat.LeanYamux, "_write_frame", counting)
    async with open_peers(2, gossip=False) as (a, b):
        await a.connect(b.addrs[0])
        (conn,) = a.host.get_network().get_connections()
        (back,) = b.host.get_network().get_connections()
        assert isinstance(conn.muxed_conn, compat.LeanYamux)
        assert isinstance(back.muxed_conn, compat.LeanYamux)
        await trio.sleep(1)  # each side's one first RTT sample
        pings.clear()
        async with trio.open_nursery() as nursery:
            for host in (a.host, b.host):
                nursery.start_soon(
                    lambda h=host: compat.run_keepalive(h.get_network(), interval=0.5, slack=0.1, timeout=5)
                )
            await trio.sleep(3)
            nursery.cancel_scope.cancel()
        dialer = conn.muxed_conn if conn.muxed_conn.is_initiator else back.muxed_conn
        assert pings and all(pings), pings  # only the dialing side pinged
        assert 2 <= len(pings) <= 8  # about one per 0.5 s of silence, not one per pass
        assert dialer.rtt() > 0
        assert not conn.is_closed and not back.is_closed


async def test_a_connection_whose_pings_go_unanswered_is_closed() -> None:
    from modelnet_p2p.p2p._compat import yamux as compat

    async with open_peers(2, gossip=False) as (a, b):
        await a.connect(b.addrs[0])
        (conn,) = a.host.get_network().get_connections()
        (back,) = b.host.get_network().get_connections()
        mute: Any = back.muxed_conn
        write = mute._write_frame

        async def no_pongs(data: bytes) -> None:
            if data[1] == 2 and data[3] & 2:  # TYPE_PING with FLAG_ACK: swallowed
                return
            await write(data)

        vars(mute)["_write_frame"] = no_pongs
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: compat.run_keepalive(a.host.get_network(), interval=0.3, slack=0.1, timeout=0.5)
                )
                while not conn.is_closed:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()


async def test_keepalive_runs_in_the_swarms_background_nursery() -> None:
    """Canary of the assumption start_keepalive rests on (a public attribute of the swarm)."""
    from modelnet_p2p.p2p._compat.yamux import start_keepalive

    async with open_peers(1, gossip=False) as (a,):
        network = a.host.get_network()
        assert isinstance(getattr(network, "background_nursery", None), trio.Nursery)
        assert start_keepalive(network, interval=60.0)


def _an_id() -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    return ID.from_pubkey(create_new_key_pair().public_key)


class _Half:
    """One end of an in-memory duplex byte pipe with the ``ISecureConn`` calls multiselect uses."""

    def __init__(self, send: Any, receive: Any, initiator: bool) -> None:
        self._send, self._receive, self.is_initiator = send, receive, initiator
        self._buf = b""

    async def write(self, data: bytes) -> None:
        await self._send.send(bytes(data))

    async def read(self, n: int | None = None) -> bytes:
        if not self._buf:
            self._buf = await self._receive.receive()
        size = len(self._buf) if n is None else n
        out, self._buf = self._buf[:size], self._buf[size:]
        return out

    async def close(self) -> None:
        await self._send.aclose()


def _pipe() -> tuple[Any, Any]:
    a_send, a_receive = trio.open_memory_channel[bytes](100)
    b_send, b_receive = trio.open_memory_channel[bytes](100)
    return _Half(a_send, b_receive, True), _Half(b_send, a_receive, False)


# -- the receive window and unread data (LeanYamux, discard_incoming) -------------------------


async def _overrun(receiver_class: type, total: int) -> tuple[Any, Any, int]:
    """Open a stream from a plain Yamux to a ``receiver_class`` over an in-memory pipe and send
    ``total`` bytes on it in 64 KiB DATA frames, ignoring the receive window (nothing reads).
    Returns both connections and the receiver's largest buffer seen."""
    import struct

    from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT, Yamux

    left, right = _pipe()
    sender = Yamux(left, _an_id(), is_initiator=True)
    receiver = receiver_class(right, _an_id(), is_initiator=False)
    most = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.start)
        nursery.start_soon(receiver.start)
        await sender.event_started.wait()
        await receiver.event_started.wait()
        stream = await sender.open_stream()
        chunk = b"x" * 65536
        sent = 0
        with trio.move_on_after(10):
            while sent < total and not receiver.event_shutting_down.is_set():
                header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream.stream_id, len(chunk))
                try:
                    await sender._write_frame(header + chunk)
                except trio.ClosedResourceError:  # the receiver closed the connection
                    break
                sent += len(chunk)
                await trio.sleep(0)
                most = max(most, sum(len(b) for b in receiver.stream_buffers.values()))
            await trio.sleep(0.2)
        most = max(most, sum(len(b) for b in receiver.stream_buffers.values()))
        nursery.cancel_scope.cancel()
    return sender, receiver, most


async def test_upstream_yamux_buffers_data_past_the_receive_window() -> None:
    """Canary: upstream appends a DATA frame that overruns the window and only logs it."""
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, Yamux

    _, receiver, most = await _overrun(Yamux, 4 << 20)
    assert most > 2 * DEFAULT_WINDOW_SIZE  # the upstream bug: 4 MiB held against a 256 KiB window
    assert not receiver.event_shutting_down.is_set()


async def test_lean_yamux_enforces_the_receive_window_and_goes_away() -> None:
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE

    from modelnet_p2p.p2p._compat.yamux import LeanYamux

    sender, receiver, most = await _overrun(LeanYamux, 4 << 20)
    assert most <= DEFAULT_WINDOW_SIZE
    assert receiver.window_violations >= 1
    assert receiver.event_shutting_down.is_set()  # the connection is closed
    assert sender.event_shutting_down.is_set()  # GO_AWAY arrived (or the pipe closed)


def test_upstream_keeps_unread_data_of_reset_streams_until_a_sweep() -> None:
    """Canary: ``_finalize_stream_locked`` keeps a fully closed stream's unread buffer, to be
    swept after a 60 s grace; LeanYamux drops it when the stream was reset."""
    import inspect

    from libp2p.stream_muxer.yamux import yamux

    source = inspect.getsource(yamux.Yamux._finalize_stream_locked)
    assert "if not self.stream_buffers.get(sid):" in source and "_closed_at = trio.current_time()" in source
    assert yamux._STALE_STREAM_GRACE_SECONDS == 60.0
    assert yamux.MAX_WINDOW_SIZE == 16 * 1024 * 1024  # auto-tuning's ceiling, capped by LeanYamux


async def test_unread_data_of_a_stream_reset_locally_is_dropped_at_once() -> None:
    from modelnet_p2p.p2p._compat.yamux import MAX_STREAM_WINDOW, LeanYamux, discard_incoming

    async with open_peers(2, gossip=False) as (a, b):
        held: list[Any] = []
        got = trio.Event()

        async def handler(stream: Any) -> None:
            held.append(stream)
            got.set()
            await trio.sleep(30)

        b.host.set_stream_handler(PROBE, handler)
        await a.connect(b.addrs[0])
        for how in ("reset", "discard"):
            got = trio.Event()
            stream = await a.host.new_stream(b.identity.peer_id, [PROBE])
            await stream.write(b"y" * 200_000)  # within the window; nobody reads it
            with trio.fail_after(5):
                await got.wait()
                buffers = held[-1].muxed_conn.stream_buffers
                while len(buffers.get(held[-1].muxed_stream.stream_id, b"")) < 200_000:
                    await trio.sleep(0.01)
            conn = held[-1].muxed_conn
            assert isinstance(conn, LeanYamux)
            assert held[-1].muxed_stream.target_recv_window <= MAX_STREAM_WINDOW
            if how == "reset":
                await held[-1].reset()
            else:
                assert discard_incoming(held[-1])
                await stream.write(b"z" * 10_000)  # arrives after: discarded too
                await trio.sleep(0.2)
            # this stream's buffer (another stream of the connection may hold a few bytes unread)
            assert not conn.stream_buffers.get(held[-1].muxed_stream.stream_id), how
            await stream.reset()


# -- bulk: writes, window updates, locks (LeanYamux, _LeanStream, FastLock) -------------------


def test_upstream_writes_one_frame_at_a_time_and_polls_for_window() -> None:
    """Canary: ``YamuxStream.write`` hands the connection one 64 KiB frame per
    ``_write_frame`` and, once the window is shut, sleeps 10 ms between checks."""
    import inspect

    from libp2p.stream_muxer.yamux import yamux

    source = inspect.getsource(yamux.YamuxStream.write)
    assert "MAX_MESSAGE_SIZE - HEADER_SIZE" in source
    assert "await self.conn._write_frame(frame)" in source
    assert "await trio.sleep(0.01)" in source
    assert yamux.MAX_MESSAGE_SIZE == 64 * 1024 and yamux.DEFAULT_WINDOW_SIZE == 256 * 1024


async def _transfer_over_pipe(receiver_class: type, total: int) -> tuple[int, int, bytes]:
    """``total`` bytes from a LeanYamux to a ``receiver_class`` over an in-memory pipe, read in
    64 KiB reads; returns the WINDOW_UPDATE frames the receiver sent, the writes the sender
    made, and the bytes read."""
    from modelnet_p2p.p2p._compat.yamux import LeanYamux

    left, right = _pipe()
    sender = LeanYamux(left, _an_id(), is_initiator=True)
    receiver = receiver_class(right, _an_id(), is_initiator=False)
    updates = 0
    writes = 0
    send_frame = receiver._write_frame
    sender_frame = sender._write_frame

    async def counting_updates(data: bytes) -> None:
        nonlocal updates
        if data[1] == 1 and not data[3] & 1:  # TYPE_WINDOW_UPDATE without SYN
            updates += 1
        await send_frame(data)

    async def counting_writes(data: bytes) -> None:
        nonlocal writes
        writes += data[1] == 0
        await sender_frame(data)

    vars(receiver)["_write_frame"] = counting_updates
    vars(sender)["_write_frame"] = counting_writes
    payload = bytes(range(256)) * (total // 256)
    got = bytearray()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.start)
            nursery.start_soon(receiver.start)
            await sender.event_started.wait()
            await receiver.event_started.wait()
            stream = await sender.open_stream()
            nursery.start_soon(stream.write, payload)
            inbound = await receiver.accept_stream()
            while len(got) < total:
                got += await inbound.read(65536)
            nursery.cancel_scope.cancel()
    return updates, writes, bytes(got) if bytes(got) == payload else b""


async def test_upstream_sends_a_window_update_for_nearly_every_read() -> None:
    """Canary: upstream's receiver sends a WINDOW_UPDATE per 64 KiB read (release on read)."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    updates, _, got = await _transfer_over_pipe(Yamux, 4 << 20)
    assert got
    assert updates >= 48  # the upstream behaviour: about one per read (64 reads here)


async def test_lean_streams_update_the_window_per_quarter_window_and_join_writes() -> None:
    from modelnet_p2p.p2p._compat.yamux import MAX_STREAM_WINDOW, UPDATE_FRACTION, LeanYamux

    total = 8 << 20
    per_update = MAX_STREAM_WINDOW // UPDATE_FRACTION
    updates, writes, got = await _transfer_over_pipe(LeanYamux, total)
    assert got  # every byte, in order
    # one update on the first read (the whole window), then one per quarter window read
    assert updates <= total // per_update + 2, updates
    assert writes <= total // per_update + 4, writes  # not one per 64 KiB frame


async def test_a_connections_streams_share_a_bounded_window() -> None:
    """However many streams a connection has, their windows beyond the spec's 256 KiB each
    stay within MAX_CONNECTION_WINDOW (and each within MAX_STREAM_WINDOW)."""
    from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE

    from modelnet_p2p.p2p._compat.yamux import MAX_CONNECTION_WINDOW, MAX_STREAM_WINDOW, LeanYamux

    left, right = _pipe()
    conn = LeanYamux(left, _an_id(), is_initiator=True)
    other = LeanYamux(right, _an_id(), is_initiator=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.start)
        nursery.start_soon(other.start)
        await conn.event_started.wait()
        await other.event_started.wait()
        streams = [await conn.open_stream() for _ in range(40)]
        targets = [s.target_recv_window for s in streams]
        nursery.cancel_scope.cancel()
    assert max(targets) == MAX_STREAM_WINDOW
    assert min(targets) == DEFAULT_WINDOW_SIZE  # the streams past the budget
    assert sum(t - DEFAULT_WINDOW_SIZE for t in targets) <= MAX_CONNECTION_WINDOW


async def test_fast_lock_excludes_and_skips_the_checkpoint_when_free() -> None:
    from modelnet_p2p.p2p._compat.yamux import FastLock

    lock = FastLock()
    inside = 0
    most = 0

    async def worker() -> None:
        nonlocal inside, most
        for _ in range(20):
            async with lock:
                inside += 1
                most = max(most, inside)
                await trio.sleep(0)
                inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(worker)
    assert most == 1
    # free: taken without yielding (a cancelled scope would raise at a checkpoint)
    with trio.CancelScope() as scope:
        scope.cancel()
        async with lock:
            assert lock.locked()
    assert not lock.locked()


async def test_an_overrunning_frame_is_not_read_and_cuts_the_connection() -> None:
    """A DATA frame far beyond the window (4 MiB against 2 MiB), on a stream nobody reads:
    after the grace its body is not read (upstream reads up to 16 MiB before any check),
    the connection is closed, and the Noise buffers never held more than a few reads."""
    import struct

    from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT

    from modelnet_p2p.p2p._compat.yamux import LeanYamux

    async with open_peers(2, gossip=False) as (a, b):
        held: list[Any] = []
        got = trio.Event()

        async def handler(stream: Any) -> None:
            held.append(stream)
            got.set()
            await trio.sleep(30)

        b.host.set_stream_handler(PROBE, handler)
        await a.connect(b.addrs[0])
        stream = await a.host.new_stream(b.identity.peer_id, [PROBE])
        await stream.write(b"hello")
        with trio.fail_after(5):
            await got.wait()
        victim = held[0].muxed_conn
        assert isinstance(victim, LeanYamux) and victim.noise is not None
        size = 4 << 20
        header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream.muxed_stream.stream_id, size)
        most = 0
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:

                async def flood() -> None:
                    try:
                        await stream.muxed_conn._write_frame(header + bytes(size))
                    except Exception:
                        pass

                nursery.start_soon(flood)
                while not victim.event_shutting_down.is_set():
                    most = max(most, victim.noise.buffered)
                    await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        assert victim.window_violations >= 1
        assert most < 1 << 20, most


# -- writes of several streams at once (LeanYamux._write_frame) ----------------------------------


async def _frames_at_once(muxer_class: type, fail: bool = False) -> tuple[list[bytes], list[bytes], int]:
    """Eight DATA frames (of eight streams) handed to ``muxer_class``'s connection at once, over
    an in-memory pipe whose writes are recorded (``fail``: every write raises). Returns the
    frames, the writes and how many writers saw an error."""
    import struct

    from libp2p.stream_muxer.yamux.yamux import TYPE_DATA, YAMUX_HEADER_FORMAT

    left, _ = _pipe()
    conn = muxer_class(left, _an_id(), is_initiator=True)
    writes: list[bytes] = []
    errors = 0
    stock_write = left.write

    async def recorded(data: bytes) -> None:
        writes.append(bytes(data))
        if fail:
            await trio.sleep(0)  # as a socket's send: a schedule point, then the error
            raise RuntimeError("the connection broke")
        await stock_write(data)

    left.write = recorded
    frames = [struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, 2 * i + 1, 4) + b"%04d" % i for i in range(8)]

    async def write(frame: bytes) -> None:
        nonlocal errors
        try:
            await conn._write_frame(frame)
        except RuntimeError:
            errors += 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for frame in frames:
                nursery.start_soon(write, frame)
    return frames, writes, errors


def _split(writes: list[bytes]) -> list[bytes]:
    data = b"".join(writes)
    return [data[i : i + 16] for i in range(0, len(data), 16)]


async def test_upstream_writes_each_frame_of_streams_writing_at_once_by_itself() -> None:
    """Canary: upstream's connection makes one write per frame, however many are waiting."""
    from libp2p.stream_muxer.yamux.yamux import Yamux

    frames, writes, _ = await _frames_at_once(Yamux)
    assert sorted(writes) == sorted(frames)  # eight writes of one frame each


async def test_frames_that_come_during_a_write_go_out_together_in_the_next() -> None:
    from modelnet_p2p.p2p._compat.yamux import LeanYamux

    frames, writes, _ = await _frames_at_once(LeanYamux)
    assert sorted(_split(writes)) == sorted(frames)  # the same frames, each whole, none lost
    assert len(writes) == 2, writes  # the first alone, the seven that came meanwhile together
    assert len(writes[1]) == 7 * 16


async def test_a_failed_joined_write_fails_every_writer_in_it() -> None:
    from modelnet_p2p.p2p._compat.yamux import LeanYamux

    _, writes, errors = await _frames_at_once(LeanYamux, fail=True)
    assert errors == 8  # nobody is told a frame went out when it did not
    assert len(writes) == 2

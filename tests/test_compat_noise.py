"""Canaries of ``modelnet_p2p.p2p._compat.noise``: they fail once py-libp2p's Noise transport
sends a 64 KiB yamux frame as one message or stops copying reads through a ``BytesIO`` (then
the fast path can go); and tests of the fast path itself, on its own and against stock
py-libp2p hosts."""

from __future__ import annotations

import hashlib
import inspect
import logging
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession
from noise.connection import Keypair, NoiseConnection

from modelnet_p2p.p2p._compat.noise import MAX_PLAINTEXT, NoiseFastPath, install


class _Raw:
    """A raw connection: records every write; reads come from ``incoming`` in the sizes given."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.incoming: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    async def read(self, n: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self.incoming:
            return b""
        data = self.incoming.pop(0)
        if n is not None and len(data) > n:
            self.incoming.insert(0, data[n:])
            data = data[:n]
        return data

    async def close(self) -> None:
        pass


def _noise_pair() -> tuple[NoiseConnection, NoiseConnection]:
    """Two Noise XX states after their handshake (libp2p's pattern, in memory)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    states = []
    for initiator in (True, False):
        state = NoiseConnection.from_name(b"Noise_XX_25519_ChaChaPoly_SHA256")
        if initiator:
            state.set_as_initiator()
        else:
            state.set_as_responder()
        key = X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        state.set_keypair_from_private_bytes(Keypair.STATIC, key)
        state.start_handshake()
        states.append(state)
    a, b = states
    b.read_message(a.write_message())
    a.read_message(b.write_message())
    b.read_message(a.write_message())
    assert a.handshake_finished and b.handshake_finished
    return a, b


def _session(state: NoiseConnection, raw: _Raw) -> SecureSession:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    keys = create_new_key_pair()
    transport = NoiseTransportReadWriter(raw, state)  # type: ignore[arg-type]
    return SecureSession(
        local_peer=ID.from_pubkey(keys.public_key),
        local_private_key=keys.private_key,
        remote_peer=ID.from_pubkey(keys.public_key),
        remote_permanent_pubkey=keys.public_key,
        is_initiator=True,
        conn=transport,
    )


def _pair() -> tuple[SecureSession, _Raw, SecureSession, _Raw]:
    a, b = _noise_pair()
    raw_a, raw_b = _Raw(), _Raw()
    return _session(a, raw_a), raw_a, _session(b, raw_b), raw_b


# -- canaries -----------------------------------------------------------------------------------


async def test_upstream_sends_a_64_kib_yamux_frame_as_two_noise_messages() -> None:
    """Canary: a yamux DATA frame of 65,536 bytes (header included) goes out as a full Noise
    message and one of 17 bytes, with a raw write each."""
    from libp2p.stream_muxer.yamux.yamux import MAX_MESSAGE_SIZE

    sender, raw, _, _ = _pair()
    await sender.write(bytes(MAX_MESSAGE_SIZE))
    assert MAX_MESSAGE_SIZE > MAX_PLAINTEXT_LENGTH == MAX_PLAINTEXT == 65_519
    assert [len(w) for w in raw.writes] == [2 + 65_535, 2 + 17 + 16]  # the upstream behaviour


def test_upstream_reads_through_a_bytesio_and_exact_reads() -> None:
    """Canary: ``SecureSession.read`` drains a ``BytesIO`` (``_drain``, which the fast path
    calls once to take over what upstream buffered) and the Noise reader reads the length
    prefix and the body with separate ``read_exactly`` calls."""
    from libp2p.io import msgio

    assert "BytesIO" in inspect.getsource(SecureSession._reset_internal_buffer)
    assert "tobytes()" in inspect.getsource(SecureSession._drain)
    assert "read_exactly" in inspect.getsource(msgio.read_length)
    assert "read_exactly" in inspect.getsource(msgio.BaseMsgReadWriter.read_msg)


def test_upstream_tcp_stream_is_a_locked_trio_socket_stream() -> None:
    """Canary of what the fast path bypasses on TCP: ``TrioTCPStream`` reads and writes under
    a lock of its own and only translates trio's errors (broken: ``ConnectionClosedError``;
    closed locally: an empty read, a silent write); ``RawConnection`` passes them on."""
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.connection.raw_connection import RawConnection

    write = inspect.getsource(TrioTCPStream.write)
    read = inspect.getsource(TrioTCPStream.read)
    assert "async with self.write_lock" in write and "await self.stream.send_all(data)" in write
    assert "async with self.read_lock" in read and "await self.stream.receive_some(n)" in read
    assert write.count("except") == 2 and read.count("except") == 2
    assert "ConnectionClosedError" in write and 'return b""' in read
    assert "await self.stream.write(data)" in inspect.getsource(RawConnection.write)
    assert "return await self.stream.read(n)" in inspect.getsource(RawConnection.read)


# -- the fast path ------------------------------------------------------------------------------


async def test_fast_writes_are_full_noise_messages_that_upstream_reads() -> None:
    sender, raw_a, receiver, raw_b = _pair()
    fast = install(sender)
    assert isinstance(fast, NoiseFastPath)
    payload = bytes(range(256)) * 1024  # 256 KiB
    await sender.write(payload)
    await sender.write(b"tail")
    assert len(raw_a.writes) == 2  # one raw write per write, however large
    sizes = []
    wire = raw_a.writes[0]
    while wire:
        n = int.from_bytes(wire[:2], "big")
        sizes.append(n)
        wire = wire[2 + n :]
    assert sizes[:-1] == [65_535] * (len(sizes) - 1)  # every message but the last is full
    raw_b.incoming = list(raw_a.writes)
    got = bytearray()
    while len(got) < len(payload) + 4:
        got += await receiver.read(len(payload) + 4 - len(got))  # upstream's reader
    assert bytes(got) == payload + b"tail"


async def test_fast_reads_take_what_upstream_writes_in_any_pieces() -> None:
    sender, raw_a, receiver, raw_b = _pair()
    messages = [bytes([i]) * size for i, size in enumerate((1, 65_519, 70_000, 12, 300_000))]
    for m in messages:
        await sender.write(m)  # upstream's writer
    wire = b"".join(raw_a.writes)
    raw_b.incoming = [wire[i : i + 7_777] for i in range(0, len(wire), 7_777)]
    fast = install(receiver)
    assert fast is not None
    expected = b"".join(messages)
    got = bytearray(await receiver.read(5))  # short reads are allowed
    got += await fast.read_exactly(100_000)
    while len(got) < len(expected):
        got += await receiver.read(65_536)
    assert bytes(got) == expected
    with pytest.raises(IncompleteReadError):
        await receiver.read(1)  # the end of the connection, as upstream's read_exactly says


async def test_a_forged_message_breaks_the_fast_reader_for_good() -> None:
    sender, raw_a, receiver, raw_b = _pair()
    await sender.write(b"hello")
    forged = bytearray(raw_a.writes[0])
    forged[5] ^= 1
    raw_b.incoming = [bytes(forged), raw_a.writes[0]]
    install(receiver)
    with pytest.raises(RawConnError):
        await receiver.read(5)
    with pytest.raises(RawConnError):
        await receiver.read(5)


class _SlowRaw(_Raw):
    """A raw connection whose writes take a checkpoint first (as a socket's send does)."""

    async def write(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.writes.append(bytes(data))


async def test_a_cancelled_write_does_not_leave_the_remote_a_nonce_behind() -> None:
    """Found by tests/test_availability.py: a pubsub task cancelled while it wrote spent a
    nonce on a message that never went out, and every later message failed to decrypt at the
    remote ("InvalidTag"), which closed the connection."""
    a, b = _noise_pair()
    raw_a, raw_b = _SlowRaw(), _Raw()
    sender, receiver = _session(a, raw_a), _session(b, raw_b)
    assert install(sender) is not None and install(receiver) is not None
    with trio.CancelScope() as scope:
        scope.cancel()
        await sender.write(b"cancelled")  # encrypted, then its send meets the cancellation
    await sender.write(b"next")
    raw_b.incoming = list(raw_a.writes)
    got = bytearray()
    while len(got) < len(b"cancellednext"):
        got += await receiver.read(64)
    assert bytes(got) == b"cancellednext"


def test_install_leaves_other_sessions_alone() -> None:
    assert install(object()) is None
    assert install(_Raw()) is None


# -- against stock py-libp2p hosts (upstream Noise and yamux on the other side) ------------------


async def _stock_host(stack: AsyncExitStack) -> Any:
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX
    from libp2p.stream_muxer.yamux.yamux import Yamux

    keys = create_new_key_pair()
    host = new_host(
        key_pair=keys,
        sec_opt={TProtocol(NOISE): NoiseTransport(keys, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
    return host


PROTO = "/modelnet-test/bulk-interop/1"
TOTAL = 6 << 20


def _pattern(total: int) -> bytes:
    block = hashlib.sha256(b"interop").digest() * 2048  # 64 KiB
    return (block * (total // len(block) + 1))[:total]


async def _drain(stream: Any, pause_every: int = 0) -> bytes:
    from libp2p.network.stream.exceptions import StreamEOF

    got = bytearray()
    reads = 0
    try:
        while True:
            got += await stream.read(65_536)
            reads += 1
            if pause_every and reads % pause_every == 0:
                await trio.sleep(0.3)  # a slow reader: the window must hold the writer back
    except StreamEOF:
        pass
    return bytes(got)


@pytest.mark.parametrize("direction", ["modelnet-writes", "stock-writes"])
async def test_bulk_both_ways_between_a_modelnet_host_and_a_stock_host(direction: str) -> None:
    """A modelnet host (LeanYamux, the Noise fast path) and a stock py-libp2p host exchange
    6 MiB each way on one stream, the reader pausing now and then: the bytes arrive intact
    and neither side's window is overrun (the stock side only logs an overrun: check it)."""
    import multiaddr
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr

    from modelnet_p2p.p2p._compat.yamux import LeanYamux
    from modelnet_p2p.testing import open_peers

    data = _pattern(TOTAL)
    results: dict[str, bytes] = {}
    done = trio.Event()
    overruns: list[str] = []

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "exceeded" in record.getMessage():
                overruns.append(record.getMessage())

    upstream_log = logging.getLogger("libp2p.stream_muxer.yamux.yamux")
    watch = Watch(logging.WARNING)
    upstream_log.addHandler(watch)

    async def handler(stream: Any) -> None:
        if direction == "modelnet-writes":
            results["stock read"] = await _drain(stream, pause_every=16)
        else:
            await stream.write(data)
        await stream.close()
        done.set()

    async with AsyncExitStack() as stack:
        stack.callback(upstream_log.removeHandler, watch)
        stock = await _stock_host(stack)
        stock.set_stream_handler(TProtocol(PROTO), handler)
        (peer,) = await stack.enter_async_context(open_peers(1, gossip=False))
        addr = f"{stock.get_addrs()[0]}/p2p/{stock.get_id()}"
        await peer.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        stream = await peer.host.new_stream(stock.get_id(), [TProtocol(PROTO)])
        assert isinstance(stream.muxed_conn, LeanYamux) and stream.muxed_conn.noise is not None
        assert type(stream.muxed_conn.noise.raw).__name__ == "_Socket"  # TCP: the socket itself
        with trio.fail_after(60):
            if direction == "modelnet-writes":
                await stream.write(data)
                await stream.close()
                await done.wait()
                assert results["stock read"] == data
            else:
                got = await _drain(stream, pause_every=16)
                await stream.close()
                assert got == data
                assert stream.muxed_conn.window_violations == 0
    assert not overruns  # the stock side logs a window overrun (and buffers it anyway)

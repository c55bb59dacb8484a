"""The private-network protector: cipher vectors, the wire format, and canaries on upstream's pnet.

The wire format is go-libp2p's ``p2p/net/pnet``: each side's first bytes are a random
24-byte nonce; everything after it is XORed with XSalsa20(swarm key, that nonce).
XSalsa20 is checked against the NaCl vectors (``tests/core3.c``, ``tests/stream.c``
of NaCl / libsodium) and, where PyNaCl is installed, against libsodium's
``crypto_secretbox`` (XSalsa20-Poly1305: its ciphertext is the message XORed with the
same keystream from byte 32 on).
"""

from __future__ import annotations

import hashlib
import inspect
import os

import pytest
import trio

from modelnet_p2p.p2p._compat.pnet import NONCE_SIZE, PnetConn, hsalsa20, xsalsa20_xor

# NaCl's core3 / stream vectors: HSalsa20 of the "shared" key with a zero input is "firstkey",
# and 4 MiB of XSalsa20 keystream under firstkey and this nonce has this SHA-256.
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
FIRSTKEY = bytes.fromhex("1b27556473e985d462cd51197a9a46c76009549eac6474f206c4ee0844f68389")
NONCE = bytes.fromhex("69696ee955b62b73cd62bda875fc73d68219e0036b7a0b37")
STREAM_SHA256 = "662b9d0e3463029156069b12f918691a98f7dfb2ca0393c96bbfc6b1fbd630a2"


def test_hsalsa20_vector() -> None:
    assert hsalsa20(SHARED, bytes(16)) == FIRSTKEY


def test_xsalsa20_stream_vector() -> None:
    stream = xsalsa20_xor(FIRSTKEY, NONCE, bytes(4 << 20))
    assert hashlib.sha256(stream).hexdigest() == STREAM_SHA256


def test_xsalsa20_matches_libsodium_secretbox() -> None:
    bindings = pytest.importorskip("nacl.bindings")
    for size in (0, 1, 63, 64, 65, 1000, 70_000):
        key, nonce, message = os.urandom(32), os.urandom(24), os.urandom(size)
        boxed = bindings.crypto_secretbox(message, nonce, key)
        assert boxed[16:] == xsalsa20_xor(key, nonce, bytes(32) + message)[32:]


class Pipe:
    """One direction-pair of an in-memory byte connection that records what was written."""

    def __init__(self, send: trio.MemorySendChannel[bytes], recv: trio.MemoryReceiveChannel[bytes]) -> None:
        self.send, self.recv = send, recv
        self.is_initiator = True
        self.written = b""
        self.pending = b""

    async def write(self, data: bytes) -> None:
        self.written += data
        await self.send.send(data)

    async def read(self, n: int | None = None) -> bytes:
        if not self.pending:
            self.pending = await self.recv.receive()
        size = len(self.pending) if n is None else n
        out, self.pending = self.pending[:size], self.pending[size:]
        return out

    async def close(self) -> None:
        await self.send.aclose()


def pipes() -> tuple[Pipe, Pipe]:
    a_send, b_recv = trio.open_memory_channel[bytes](100)
    b_send, a_recv = trio.open_memory_channel[bytes](100)
    return Pipe(a_send, a_recv), Pipe(b_send, b_recv)


async def test_wire_is_nonce_then_xsalsa20() -> None:
    key = os.urandom(32)
    raw_a, raw_b = pipes()
    a, b = PnetConn(raw_a, key), PnetConn(raw_b, key)  # type: ignore[arg-type]
    messages = [b"/multistream/1.0.0\n", os.urandom(5000), b"x"]
    for m in messages:
        await a.write(m)
    got = b""
    while len(got) < sum(map(len, messages)):
        got += await b.read(3)  # short reads, the nonce arriving with the first bytes
    assert got == b"".join(messages)
    nonce, body = raw_a.written[:NONCE_SIZE], raw_a.written[NONCE_SIZE:]
    assert len(raw_a.written) == NONCE_SIZE + len(got)
    assert body == xsalsa20_xor(key, nonce, got)
    await b.write(b"na\n")  # the other direction has its own nonce
    assert await a.read() == b"na\n"
    assert raw_b.written[:NONCE_SIZE] != nonce


async def test_nonce_split_over_reads() -> None:
    key = os.urandom(32)
    raw_a, raw_b = pipes()
    nonce = os.urandom(NONCE_SIZE)
    b = PnetConn(raw_b, key)  # type: ignore[arg-type]
    for piece in (nonce[:5], nonce[5:23], nonce[23:] + xsalsa20_xor(key, nonce, b"hello")):
        await raw_a.send.send(piece)
    assert await b.read(100) == b"hello"


async def test_wrong_key_reads_noise() -> None:
    raw_a, raw_b = pipes()
    a, b = PnetConn(raw_a, os.urandom(32)), PnetConn(raw_b, os.urandom(32))  # type: ignore[arg-type]
    await a.write(b"/multistream/1.0.0\n")
    assert await b.read(100) != b"/multistream/1.0.0\n"


# -- canaries: each fails once upstream changes what _compat.pnet works around --------------


async def test_canary_upstream_pnet_sends_an_8_byte_nonce() -> None:
    from libp2p.security.pnet.psk_conn import PskConn

    raw_a, _ = pipes()
    conn = PskConn(raw_a, os.urandom(32).hex())  # type: ignore[arg-type]
    await conn.write(b"hello")
    # go-libp2p and js-libp2p send 24 bytes of XSalsa20 nonce; upstream sends 8 (Salsa20)
    assert len(raw_a.written) == 8 + 5


def test_canary_upstream_pnet_conn_has_no_initiator_flag() -> None:
    from libp2p.security.pnet.psk_conn import PskConn

    raw_a, _ = pipes()
    assert not hasattr(PskConn(raw_a, os.urandom(32).hex()), "is_initiator")  # type: ignore[arg-type]


def test_canary_outbound_relayed_upgrade_is_not_protected() -> None:
    from libp2p.network.swarm import Swarm

    # a dialled TCP connection and every inbound upgrade are protected, an outbound upgrade
    # (what a relayed dial calls) is not: p2p/relay.py protects it itself
    assert "psk" not in inspect.getsource(Swarm.upgrade_outbound_raw_conn)
    assert "psk" in inspect.getsource(Swarm.upgrade_inbound_raw_conn)

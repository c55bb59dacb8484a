"""The libp2p private-network protector (pnet), as go-libp2p and js-libp2p speak it.

A private mesh shares one 32-byte key (a "swarm key"). Before anything else on a
connection, each side sends a random 24-byte nonce and then encrypts everything it
writes with XSalsa20 under the swarm key and its own nonce; it decrypts what it reads
with the other side's nonce. A peer without the key sends bytes that decrypt to noise,
so multistream-select and the Noise handshake never start: it cannot complete a
connection, nor learn which protocols are spoken.

What py-libp2p 0.8.1's ``libp2p.security.pnet`` gets wrong (canaries in
``tests/test_compat_pnet.py``):

- it uses Salsa20 with an **8-byte** nonce, not XSalsa20 with a 24-byte one, so it
  interoperates with no other implementation (it even speaks with itself only);
- it reads the nonce with one ``read(8)``, which may return fewer bytes;
- its connection object skips ``RawConnection.__init__`` (no ``is_initiator``, no
  addresses or connection type);
- the swarm protects dialled TCP connections and every inbound upgrade, but not an
  outbound relayed connection (``upgrade_outbound_raw_conn``), so a circuit between
  two PSK peers fails: the target decrypts, the dialer sends in clear.

:func:`install` points the swarm module at :func:`protect` (it only runs for swarms
given a ``psk``), and :func:`protect_outbound` is what the relay dialer calls.
XSalsa20 is HSalsa20 (written here: one call per connection) followed by pycryptodome's
Salsa20 with the last 8 nonce bytes, which is its definition (Bernstein, "Extending
the Salsa20 nonce", 2008).
"""

from __future__ import annotations

import os
import struct
from typing import Any

import trio
from Crypto.Cipher import Salsa20
from libp2p.abc import IRawConnection
from libp2p.connection_types import ConnectionType
from multiaddr import Multiaddr

__all__ = [
    "NONCE_SIZE",
    "NONCE_TIMEOUT",
    "PnetConn",
    "hsalsa20",
    "install",
    "protect",
    "protect_outbound",
    "xsalsa20_xor",
]

#: Bytes of the nonce each side sends first (go-libp2p ``p2p/net/pnet``).
NONCE_SIZE = 24
#: Seconds a side waits for the other's nonce: a peer that dials without the key and
#: waits for an answer to its first 20 bytes would otherwise hold the connection open.
NONCE_TIMEOUT = 10.0

_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_MASK = 0xFFFFFFFF


def _rotl(v: int, c: int) -> int:
    v &= _MASK
    return ((v << c) | (v >> (32 - c))) & _MASK


def hsalsa20(key: bytes, nonce16: bytes) -> bytes:
    """HSalsa20: the 32-byte subkey for ``key`` and the first 16 bytes of an XSalsa20 nonce."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("hsalsa20 takes a 32-byte key and a 16-byte input")
    k = struct.unpack("<8I", key)
    n = struct.unpack("<4I", nonce16)
    x = [_SIGMA[0], *k[:4], _SIGMA[1], *n, _SIGMA[2], *k[4:], _SIGMA[3]]
    for _ in range(10):
        for a, b, c, d in (
            (0, 4, 8, 12), (5, 9, 13, 1), (10, 14, 2, 6), (15, 3, 7, 11),  # columns
            (0, 1, 2, 3), (5, 6, 7, 4), (10, 11, 8, 9), (15, 12, 13, 14),  # rows
        ):  # fmt: skip
            x[b] ^= _rotl(x[a] + x[d], 7)
            x[c] ^= _rotl(x[b] + x[a], 9)
            x[d] ^= _rotl(x[c] + x[b], 13)
            x[a] ^= _rotl(x[d] + x[c], 18)
    return struct.pack("<8I", x[0], x[5], x[10], x[15], x[6], x[7], x[8], x[9])


def _cipher(key: bytes, nonce: bytes) -> Any:
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"an XSalsa20 nonce has {NONCE_SIZE} bytes")
    return Salsa20.new(key=hsalsa20(key, nonce[:16]), nonce=nonce[16:])


def xsalsa20_xor(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """``data`` XORed with the XSalsa20 keystream of ``key`` and the 24-byte ``nonce``."""
    return bytes(_cipher(key, nonce).encrypt(data))


class PnetConn(IRawConnection):
    """A raw connection wrapped in the private-network protector (XSalsa20, 24-byte nonces)."""

    def __init__(self, conn: IRawConnection, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("a swarm key has 32 bytes")
        self._conn = conn
        self._key = key
        self.is_initiator = conn.is_initiator
        self._writer: Any = None
        self._reader: Any = None
        self._read_lock = trio.Lock()

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            nonce = os.urandom(NONCE_SIZE)
            self._writer = _cipher(self._key, nonce)
            await self._conn.write(nonce + self._writer.encrypt(data))
            return
        await self._conn.write(self._writer.encrypt(data))

    async def read(self, n: int | None = None) -> bytes:
        if self._reader is None:
            async with self._read_lock:
                if self._reader is None:
                    self._reader = _cipher(self._key, await self._read_nonce())
        data = await self._conn.read(n)
        if not data:
            return b""
        return bytes(self._reader.decrypt(data))

    async def _read_nonce(self) -> bytes:
        nonce = b""
        with trio.move_on_after(NONCE_TIMEOUT):
            while len(nonce) < NONCE_SIZE:
                chunk = await self._conn.read(NONCE_SIZE - len(nonce))
                if not chunk:
                    raise ConnectionError("the connection closed before the private-network nonce")
                nonce += chunk
            return nonce
        raise ConnectionError("no private-network nonce within the timeout")

    async def close(self) -> None:
        await self._conn.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self._conn.get_remote_address()

    def get_transport_addresses(self) -> list[Multiaddr]:
        return self._conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self._conn.get_connection_type()


def protect(conn: IRawConnection, psk: str) -> PnetConn:
    """``conn`` under the protector; ``psk`` is the key in hex (the swarm's ``psk`` setting)."""
    key = bytes.fromhex(psk)
    return PnetConn(conn, key)


def protect_outbound(host: Any, conn: IRawConnection) -> IRawConnection:
    """``conn`` protected if ``host``'s swarm runs a private network (the relay dialer's gap)."""
    psk = getattr(host.get_network(), "psk", None)
    return protect(conn, psk) if psk is not None else conn


def install() -> None:
    """Make every swarm with a ``psk`` use :func:`protect` (upstream's protector is not pnet)."""
    import libp2p.network.swarm as swarm_module

    swarm_module.new_protected_conn = protect  # type: ignore[attr-defined,assignment]

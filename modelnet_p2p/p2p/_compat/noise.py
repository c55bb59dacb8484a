"""Workarounds of py-libp2p 0.8.1's Noise transport: its transport-phase reads and writes.

Upstream behaviours corrected (the canaries in ``tests/test_compat_noise.py`` fail once
upstream changes them):

- **A yamux frame of 64 KiB goes out as two Noise messages.** Yamux writes DATA frames of
  65,536 bytes (a 12-byte header and 65,524 bytes of payload); the most a Noise message
  holds is 65,519 bytes of plaintext, so ``write_msg`` splits every frame into a full message
  and one of 17 bytes, each encrypted, length-prefixed (a copy) and sent with its own
  ``send_all`` (a lock, a system call and a trio checkpoint each).
- **Every read costs several system calls and copies.** A Noise message is read as a 2-byte
  length (one ``receive_some(2)``), then its body with ``read_exactly`` (one or more
  ``receive_some`` calls into a ``bytearray``, copied to ``bytes``), decrypted (a copy),
  written into a ``BytesIO`` (a copy) and drained from it with ``tobytes`` (a copy); a read
  of ``n`` bytes spanning messages is assembled in one more ``bytearray`` and copied again.

:class:`NoiseFastPath` replaces a Noise ``SecureSession``'s ``read`` and ``write`` (instance
attributes; the session object stays upstream's): a write encrypts its data in messages of
the largest size (65,519 bytes of plaintext) and sends them all with one ``write`` to the
raw connection; a read takes up to :data:`READ_SIZE` bytes from the raw connection at once
and decrypts every complete message in them into one plaintext buffer, from which reads are
served. The bytes on the wire are the same Noise messages any peer reads: only their
boundaries move (yamux does not see them). :func:`install` applies it to a connection
(``LeanYamux`` does, for every connection it muxes).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import MAX_NOISE_MESSAGE_LEN, MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession

from ..locks import FastLock

__all__ = ["MAX_PLAINTEXT", "READ_SIZE", "FastLock", "NoiseFastPath", "install"]

log = logging.getLogger(__name__)

#: Most plaintext bytes in one Noise transport message (65,535 minus the 16-byte tag; go-libp2p's
#: ``MaxPlaintextLength``).
MAX_PLAINTEXT = MAX_PLAINTEXT_LENGTH
#: Most bytes asked of the raw connection in one read (four full Noise messages). The buffers
#: then hold at most one read, one partial message and what a reader has not yet taken.
READ_SIZE = 4 * (MAX_NOISE_MESSAGE_LEN + 2)
#: Seconds one send of encrypted messages may take before the connection is given up.
SEND_TIMEOUT = 30.0
_LEN = 2


class _Socket:
    """Upstream's TCP connection (``RawConnection`` over ``TrioTCPStream``) without its two
    locks (the fast path has one writer and one reader, and locks of its own): the same
    calls on the trio socket stream, the same errors."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream

    async def read(self, n: int) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except trio.BrokenResourceError as exc:
            raise _reset(exc) from exc
        except trio.ClosedResourceError:
            return b""

    async def close(self) -> None:
        await self.stream.aclose()

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise _reset(exc) from exc
        except trio.ClosedResourceError:
            return


def _reset(exc: BaseException) -> ConnectionClosedError:
    return ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp")


def _raw_io(raw: Any) -> Any:
    """What the fast path reads and writes: the trio socket stream itself when ``raw`` is
    upstream's TCP connection, else ``raw`` (a relayed or protected connection)."""
    tcp = getattr(raw, "stream", None)
    if type(raw) is RawConnection and type(tcp) is TrioTCPStream:
        if isinstance(tcp.stream, trio.SocketStream):
            return _Socket(tcp.stream)
    return raw


class NoiseFastPath:
    """Transport-phase ``read``/``write`` of one Noise session, with fewer copies and calls.

    ``read(n)`` returns between 1 and ``n`` bytes (``n=None``: what is buffered, or the next
    message's worth); :meth:`read_exactly` returns exactly ``n`` bytes. Both raise
    :class:`~libp2p.io.exceptions.IncompleteReadError` at the end of the connection (as
    upstream's reads do through ``read_exactly``) and
    :class:`~libp2p.network.connection.exceptions.RawConnError` once a message failed
    authentication (then every later read does too).
    """

    def __init__(self, session: SecureSession, transport: NoiseTransportReadWriter) -> None:
        self.session = session
        self.raw = _raw_io(transport.read_writer.read_write_closer)
        state = transport.noise_state.noise_protocol
        # The cipher states themselves: NoiseConnection.encrypt/decrypt only add a check that
        # the data is ``bytes`` (so a memoryview would need a copy first).
        self._encrypt = state.cipher_state_encrypt.encrypt_with_ad
        self._decrypt = state.cipher_state_decrypt.decrypt_with_ad
        # Whatever upstream's session already decrypted and buffered (the muxer negotiation).
        self._plain = bytearray(session._drain(None))
        self._cipher = bytearray()
        self._broken: RawConnError | None = None
        self._write_lock = FastLock()

    # -- reading --------------------------------------------------------------------------

    async def _fill(self, expected: int) -> None:
        """Read once from the raw connection and decrypt every complete message in it."""
        if self._broken is not None:
            raise self._broken
        data = await self.raw.read(READ_SIZE)
        if not data:
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {expected} bytes but received "
                f"{len(self._plain)} bytes",
                expected_bytes=expected,
                received_bytes=len(self._plain),
            )
        cipher = self._cipher
        cipher += data
        end = len(cipher)
        pos = 0
        view = memoryview(cipher)
        try:
            while end - pos >= _LEN:
                size = (cipher[pos] << 8) | cipher[pos + 1]
                if end - pos - _LEN < size:
                    break
                start = pos + _LEN
                try:
                    self._plain += self._decrypt(None, view[start : start + size])
                except Exception as exc:  # InvalidTag, a depleted nonce
                    self._broken = RawConnError(f"noise: message failed to decrypt ({type(exc).__name__})")
                    raise self._broken from None
                pos = start + size
        finally:
            view.release()
        if pos:
            del cipher[:pos]

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        while not self._plain:
            await self._fill(n or 1)
        plain = self._plain
        if n is None or n >= len(plain):
            out = bytes(plain)
            plain.clear()
            return out
        out = bytes(memoryview(plain)[:n])
        del plain[:n]
        return out

    async def read_exactly(self, n: int) -> bytes:
        while len(self._plain) < n:
            await self._fill(n)
        plain = self._plain
        if n == len(plain):
            out = bytes(plain)
            plain.clear()
            return out
        with memoryview(plain) as view:
            out = bytes(view[:n])
        del plain[:n]
        return out

    @property
    def buffered_plaintext(self) -> int:
        """Decrypted bytes held, not yet read."""
        return len(self._plain)

    @property
    def buffered(self) -> int:
        """Plaintext and ciphertext bytes held, not yet read."""
        return len(self._plain) + len(self._cipher)

    # -- writing --------------------------------------------------------------------------

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` in messages of at most :data:`MAX_PLAINTEXT` bytes; send them at once.

        Once a message is encrypted its nonce is spent: its send is not cancelled (a
        cancelled send would leave the remote a nonce behind, and every later message would
        fail to decrypt there). A send that takes :data:`SEND_TIMEOUT` breaks the connection.
        """
        encrypt = self._encrypt
        async with self._write_lock:  # nonces must go out in the order they were used
            if self._broken is not None:
                raise self._broken
            total = len(data)
            if total <= MAX_PLAINTEXT:
                sealed = encrypt(None, data)
                await self._send(len(sealed).to_bytes(_LEN, "big") + sealed)
                return
            parts: list[bytes] = []
            with memoryview(data) as view:
                for pos in range(0, total, MAX_PLAINTEXT):
                    sealed = encrypt(None, view[pos : pos + MAX_PLAINTEXT])
                    parts.append(len(sealed).to_bytes(_LEN, "big"))
                    parts.append(sealed)
            await self._send(b"".join(parts))

    async def _send(self, payload: bytes) -> None:
        # One scope, shielded and with the time limit (a shield around a move_on_after, at half the cost).
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as timer:
            await self.raw.write(payload)
        if timer.cancelled_caught:  # part of a message may be out: the stream is lost
            self._broken = RawConnError(f"noise: a write did not complete within {SEND_TIMEOUT} s")
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1.0):
                try:
                    await self.raw.close()
                except Exception:
                    pass
            raise self._broken


def install(secured_conn: Any) -> NoiseFastPath | None:
    """Serve ``secured_conn``'s reads and writes with a :class:`NoiseFastPath`.

    Only for upstream's Noise ``SecureSession`` after its handshake (anything else is left
    alone: ``None``). Call it before anything else reads or writes the session again.
    """
    if type(secured_conn) is not SecureSession:
        return None
    transport = getattr(secured_conn, "conn", None)
    if type(transport) is not NoiseTransportReadWriter:
        return None
    try:
        fast = NoiseFastPath(secured_conn, transport)
        attrs = vars(secured_conn)
    except (AttributeError, TypeError) as exc:
        log.debug("no Noise fast path for %r: %r", secured_conn, exc)
        return None
    attrs["read"] = fast.read
    attrs["write"] = fast.write
    return fast

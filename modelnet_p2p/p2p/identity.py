"""Peer identity: an Ed25519 key pair, kept in a PKCS#8 PEM file.

The peer id is derived from the public key exactly as libp2p does it, so the
same key file always gives the same peer id. Key files are written with mode
0600, and a file that other users can read is refused: a leaked key lets
anyone impersonate the peer and sign capability records in its name.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from ..errors import IdentityError
from ..proto.peerid import verify_signature as _verify_signature

__all__ = ["Identity", "verify_signature"]

log = logging.getLogger(__name__)


class Identity:
    """An Ed25519 identity: signs records and gives the libp2p host its key."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey, *, ephemeral: bool = False) -> None:
        self._private_key = private_key
        self.ephemeral = ephemeral
        seed = private_key.private_bytes_raw()
        self.key_pair: KeyPair = create_new_key_pair(seed)
        self.peer_id: ID = ID.from_pubkey(self.key_pair.public_key)

    @classmethod
    def generate(cls, *, ephemeral: bool = False) -> Identity:
        """A fresh random identity."""
        return cls(ed25519.Ed25519PrivateKey.generate(), ephemeral=ephemeral)

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self._private_key.public_key().public_bytes_raw()

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` with the identity key (64-byte Ed25519 signature)."""
        return self._private_key.sign(data)

    # -- files -------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], passphrase: bytes | None = None) -> None:
        """Write the key as PKCS#8 PEM with mode 0600, encrypted if a passphrase is given.

        The file is created exclusively: an existing file is never overwritten.
        """
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
        )
        pem = self._private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )
        p = Path(path)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise IdentityError(f"identity file {p} already exists; not overwriting it") from None
        except OSError as exc:
            raise IdentityError(f"cannot create identity file {p}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes | None = None) -> Identity:
        """Load a key file written by :meth:`save` (or any PKCS#8 Ed25519 PEM).

        Raises :class:`~modelnet_p2p.errors.IdentityError` if the file is missing,
        readable by group or others, malformed, encrypted without a passphrase
        given, or not an Ed25519 key.
        """
        p = Path(path)
        try:
            st = p.stat()
        except FileNotFoundError:
            raise IdentityError(f"identity file {p} does not exist") from None
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {p}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"identity file {p} is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
            )
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read identity file {p}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except TypeError:
            if passphrase:
                raise IdentityError(
                    f"identity file {p} is not encrypted, but a passphrase was given"
                ) from None
            raise IdentityError(f"identity file {p} is encrypted; a passphrase is needed") from None
        except ValueError:
            raise IdentityError(
                f"identity file {p} is not a valid PEM private key (or the passphrase is wrong)"
            ) from None
        except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
            raise IdentityError(f"identity file {p} cannot be loaded: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise IdentityError(f"identity file {p} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str], passphrase: bytes | None = None) -> Identity:
        """Load the key file, creating it with a new key first if it does not exist."""
        p = Path(path)
        if not p.exists():
            ident = cls.generate()
            if p.parent and not p.parent.exists():
                p.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
            ident.save(p, passphrase)
            log.info("created identity %s in %s", ident.peer_id, p)
            return ident
        return cls.load(p, passphrase)

    def __repr__(self) -> str:
        kind = "ephemeral " if self.ephemeral else ""
        return f"<{kind}Identity {self.peer_id}>"


def verify_signature(peer_id: ID | str | bytes, data: bytes, signature: bytes) -> bool:
    """Check that ``signature`` over ``data`` was made by the key behind ``peer_id``.

    :func:`modelnet_p2p.proto.peerid.verify_signature`, also taking a libp2p
    ``ID``. Returns ``False`` (never raises) for a bad signature, a malformed
    peer id, or a peer id that does not embed an Ed25519 key.
    """
    return _verify_signature(peer_id.to_bytes() if isinstance(peer_id, ID) else peer_id, data, signature)

"""Swarm keys: the shared secret of a private mesh, in libp2p's ``/key/swarm/psk/1.0.0/`` file format.

The file (go-libp2p ``core/pnet``, ``ipfs``'s ``swarm.key``) is three lines::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits: the 32-byte key>

The second line may also be ``/base64/`` (the key in base64) or ``/bin/`` (the 32 raw
bytes follow). This module writes ``/base16/`` only. Sans-I/O: bytes in, key out.
"""

from __future__ import annotations

import base64
import binascii
import secrets

from ..errors import ConfigError

__all__ = [
    "KEY_SIZE",
    "MAX_FILE_SIZE",
    "SWARM_KEY_HEADER",
    "format_swarm_key",
    "new_swarm_key",
    "parse_swarm_key",
]

#: The first line of a swarm key file.
SWARM_KEY_HEADER = b"/key/swarm/psk/1.0.0/"
#: Bytes in a swarm key.
KEY_SIZE = 32
#: A swarm key file is a few dozen bytes; anything much larger is not one.
MAX_FILE_SIZE = 1024


def new_swarm_key() -> bytes:
    """A fresh random 32-byte swarm key."""
    return secrets.token_bytes(KEY_SIZE)


def format_swarm_key(key: bytes) -> bytes:
    """The file contents for ``key`` (base16, newline-terminated)."""
    if len(key) != KEY_SIZE:
        raise ConfigError(f"a swarm key has {KEY_SIZE} bytes, not {len(key)}")
    return SWARM_KEY_HEADER + b"\n/base16/\n" + key.hex().encode() + b"\n"


def parse_swarm_key(data: bytes) -> bytes:
    """The 32-byte key in a swarm key file; :class:`ConfigError` if it is not one."""
    if len(data) > MAX_FILE_SIZE:
        raise ConfigError("not a swarm key file: too large")
    header, _, rest = data.partition(b"\n")
    if header.rstrip(b"\r") != SWARM_KEY_HEADER:
        raise ConfigError("not a swarm key file: the first line must be /key/swarm/psk/1.0.0/")
    encoding, _, body = rest.partition(b"\n")
    encoding = encoding.rstrip(b"\r")
    try:
        if encoding == b"/base16/":
            key = bytes.fromhex(body.strip().decode("ascii"))
        elif encoding == b"/base64/":
            key = base64.b64decode(body.strip(), validate=True)
        elif encoding == b"/bin/":
            key = body[:KEY_SIZE]
        else:
            raise ConfigError("swarm key file: the second line must be /base16/, /base64/ or /bin/")
    except (ValueError, UnicodeDecodeError, binascii.Error):
        name = encoding.decode(errors="replace")
        raise ConfigError(f"swarm key file: the key is not valid {name}") from None
    if len(key) != KEY_SIZE:
        raise ConfigError(f"swarm key file: the key has {len(key)} bytes, not {KEY_SIZE}")
    return key

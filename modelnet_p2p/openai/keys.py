"""The gateway's API keys: each HTTP bearer key mapped to a mesh token and a rate limit.

Pure: no HTTP library, no trio; the clock is passed in (or read from
:func:`time.monotonic`). :class:`~.app.Gateway` looks up the key a request
carries (:meth:`GatewayKeys.lookup`), refuses it over its rate
(:meth:`GatewayKeys.take`, HTTP 429 with ``Retry-After``, without calling the
mesh), and sends the request's mesh calls with the key's capability token
(``specs/token.md``), so that providers serving with ``--require-token`` see the
key's rights, not the gateway's.

The key file (``modelnet gateway --keys-file gateway-keys.toml``) is TOML, one
``[[key]]`` table per key::

    # mode 0600: the gateway refuses a key file that group or others can read
    [[key]]
    name = "alice"               # a label for logs and metrics (default: key-1, key-2, ...)
    key = "sk-alice-..."         # the bearer key clients send ...
    token = "En0KEwoE..."        # the mesh capability token its requests carry (optional)
    rate = 60                    # requests per minute (optional; none: no limit)
    burst = 10                   # requests at once from a full bucket (optional; default: rate)

    [[key]]
    name = "ci"
    key_sha256 = "9f86d08..."    # ... or the SHA-256 of the key, in hex, so the file holds no key

Every field but ``key`` / ``key_sha256`` is optional. A key without ``token``
sends its requests without a token (public capabilities only). Keys are kept as
SHA-256 digests and compared in constant time against every entry (no early
exit). The rate is a token bucket per key: ``burst`` requests may start at once,
then ``rate`` per minute; a request over it gets 429 with ``Retry-After`` (whole
seconds until one request is allowed again) and an OpenAI-style error body
(``code: "rate_limit_exceeded"``). The file is read once, when the gateway starts.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import stat
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["MAX_KEYS", "MAX_KEY_FILE", "GatewayKey", "GatewayKeys", "RateLimited", "digest"]

#: Most keys in one key file. Each keeps one bucket, and every lookup (a wrong key's too)
#: compares against all of them: about 40 µs at 1,000 keys (measured loaded, 2 cores).
MAX_KEYS = 1_000
#: Largest key file read, in bytes (1,000 keys with tokens of the largest size, 8,192 characters, fit).
MAX_KEY_FILE = 16 * 1024 * 1024
#: Longest bearer key accepted, in characters (OpenAI keys are under 200).
MAX_KEY_LENGTH = 4096
#: Largest ``rate`` (requests per minute) or ``burst``.
MAX_RATE = 1_000_000

_FIELDS = frozenset({"name", "key", "key_sha256", "token", "rate", "burst"})


def digest(key: str) -> bytes:
    """The SHA-256 of a bearer key (what the gateway keeps, and what ``key_sha256`` holds in hex)."""
    return hashlib.sha256(key.encode()).digest()


@dataclass
class GatewayKey:
    """One API key: its digest, label, mesh token and rate limit (see the module docstring).

    Attributes:
        name: the label in logs and metrics.
        sha256: the SHA-256 of the bearer key.
        token: the mesh capability token its requests carry, or ``None``.
        rate: requests per minute, or ``None`` for no limit.
        burst: the bucket's size (requests that may start at once).
    """

    name: str
    sha256: bytes = field(repr=False)
    token: str | None = field(default=None, repr=False)
    rate: int | None = None
    burst: int = 0
    _tokens: float = field(default=-1.0, repr=False)
    _at: float = field(default=0.0, repr=False)

    def take(self, now: float) -> float:
        """Spend one request of the bucket: ``0.0``, or the seconds until one is allowed again."""
        if self.rate is None:
            return 0.0
        per_second = self.rate / 60.0
        if self._tokens < 0:  # first use: a full bucket
            self._tokens, self._at = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * per_second)
        self._at = now
        if self._tokens < 1.0:
            return (1.0 - self._tokens) / per_second
        self._tokens -= 1.0
        return 0.0


class RateLimited(Exception):
    """A key is over its rate; ``retry_after`` is in whole seconds (at least 1)."""

    def __init__(self, key: GatewayKey, wait: float) -> None:
        self.key = key
        self.retry_after = max(1, math.ceil(wait))
        super().__init__(
            f"Rate limit reached for API key {key.name!r} on requests per min (RPM): "
            f"limit {key.rate}. Please try again in {self.retry_after}s."
        )


class GatewayKeys:
    """Every API key of a gateway (see the module docstring).

    Args:
        keys: the entries.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, keys: Iterable[GatewayKey], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = list(keys)
        self.clock = clock
        if len(self.keys) > MAX_KEYS:
            raise ConfigError(f"at most {MAX_KEYS} gateway keys, not {len(self.keys)}")
        names = [k.name for k in self.keys]
        if len(set(names)) != len(names):
            raise ConfigError("gateway key names must be unique")
        digests = [k.sha256 for k in self.keys]
        if len(set(digests)) != len(digests):
            raise ConfigError("the same bearer key is listed twice in the gateway keys")

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_entries(
        cls, entries: Iterable[Mapping[str, Any]], *, where: str = "gateway keys"
    ) -> GatewayKeys:
        """Keys from mappings with the key file's fields (``name``, ``key`` or ``key_sha256``, ...)."""
        return cls(_entry(e, i, where) for i, e in enumerate(entries, 1))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GatewayKeys:
        """Read a key file; :class:`~modelnet_p2p.errors.ConfigError` (one line) if it is missing,
        readable by group or others, too large or malformed."""
        p = Path(path)
        try:
            st = p.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read gateway key file {p}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"gateway key file {p} is accessible by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {p}"
            )
        if st.st_size > MAX_KEY_FILE:
            raise ConfigError(f"gateway key file {p} is larger than {MAX_KEY_FILE} bytes")
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read gateway key file {p}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"gateway key file {p} is not valid TOML: {exc}") from None
        extra = set(doc) - {"key"}
        if extra:
            raise ConfigError(f"gateway key file {p}: unknown top-level field(s) {', '.join(sorted(extra))}")
        entries = doc.get("key", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"gateway key file {p}: keys must be [[key]] tables")
        if not entries:
            raise ConfigError(f"gateway key file {p} lists no [[key]]")
        return cls.from_entries(entries, where=f"gateway key file {p}")

    def lookup(self, presented: str) -> GatewayKey | None:
        """The entry of the bearer key ``presented``, or ``None``.

        Its digest is compared with every entry's in constant time, without stopping at a match.
        """
        if not presented or len(presented) > MAX_KEY_LENGTH:
            return None
        wanted = digest(presented)
        found: GatewayKey | None = None
        for key in self.keys:
            if hmac.compare_digest(key.sha256, wanted):
                found = key
        return found

    def take(self, key: GatewayKey) -> None:
        """Spend one request of ``key``'s rate; raises :class:`RateLimited` when it is used up."""
        wait = key.take(self.clock())
        if wait > 0:
            raise RateLimited(key, wait)


def _entry(e: Mapping[str, Any], i: int, where: str) -> GatewayKey:
    at = f"{where}, key {i}"
    unknown = set(e) - _FIELDS
    if unknown:
        raise ConfigError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
    name = e.get("name", f"key-{i}")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{at}: name must be a non-empty string")
    at = f"{where}, key {name!r}"
    if ("key" in e) == ("key_sha256" in e):
        raise ConfigError(f"{at}: give exactly one of key and key_sha256")
    if "key" in e:
        raw = e["key"]
        if not isinstance(raw, str) or not raw or len(raw) > MAX_KEY_LENGTH or raw != raw.strip():
            raise ConfigError(f"{at}: key must be a non-empty string without surrounding spaces")
        sha = digest(raw)
    else:
        hexed = e["key_sha256"]
        try:
            sha = bytes.fromhex(hexed) if isinstance(hexed, str) else b""
        except ValueError:
            sha = b""
        if len(sha) != 32:
            raise ConfigError(f"{at}: key_sha256 must be 64 hex digits")
    token = e.get("token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError(f"{at}: token must be a non-empty string")
    rate = e.get("rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not 0 < rate <= MAX_RATE):
        raise ConfigError(f"{at}: rate must be a whole number of requests per minute, 1 to {MAX_RATE}")
    burst = e.get("burst", rate or 0)
    if "burst" in e and rate is None:
        raise ConfigError(f"{at}: burst needs a rate")
    if (
        not isinstance(burst, int)
        or isinstance(burst, bool)
        or (rate is not None and not 0 < burst <= MAX_RATE)
    ):
        raise ConfigError(f"{at}: burst must be a whole number, 1 to {MAX_RATE}")
    return GatewayKey(name=name, sha256=sha, token=token.strip() if token else None, rate=rate, burst=burst)

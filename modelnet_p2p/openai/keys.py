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
(``code: "rate_limit_exceeded"``). The file is read when the gateway starts, and
re-read when it changes (checked at most every 5 s, when a request comes): a key
removed from it is refused from then on; a key still listed keeps its bucket; a
rewrite that fails the checks keeps the keys read before.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
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
#: Seconds between two checks of the key file for changes.
RELOAD_INTERVAL = 5.0
#: Largest ``rate`` (requests per minute) or ``burst``.
MAX_RATE = 1_000_000

log = logging.getLogger(__name__)

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
    #: The bucket: requests that may start now (``-1``: not used yet, full), and when it was filled.
    level: float = field(default=-1.0, repr=False)
    level_at: float = field(default=0.0, repr=False)

    def take(self, now: float) -> float:
        """Spend one request of the bucket: ``0.0``, or the seconds until one is allowed again."""
        if self.rate is None:
            return 0.0
        per_second = self.rate / 60.0
        if self.level < 0:  # first use: a full bucket
            self.level, self.level_at = float(self.burst), now
        self.level = min(float(self.burst), self.level + max(0.0, now - self.level_at) * per_second)
        self.level_at = now
        if self.level < 1.0:
            return (1.0 - self.level) / per_second
        self.level -= 1.0
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
        path: the key file they were read from (:meth:`load` sets it): it is checked for
            changes at most every ``reload_interval`` seconds, when a key is looked up.
        reload_interval: seconds between two checks of ``path``.
    """

    def __init__(
        self,
        keys: Iterable[GatewayKey],
        *,
        clock: Callable[[], float] = time.monotonic,
        path: str | os.PathLike[str] | None = None,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        self.clock = clock
        self.path = Path(path) if path is not None else None
        self.reload_interval = reload_interval
        self._added: list[GatewayKey] = []
        self._stamp = _stamp(self.path) if self.path is not None else None
        self._next_check = clock() + reload_interval
        self.keys: list[GatewayKey] = []
        self._set(list(keys))

    def __len__(self) -> int:
        return len(self.keys)

    def _set(self, from_file: list[GatewayKey]) -> None:
        keys = from_file + self._added
        if len(keys) > MAX_KEYS:
            raise ConfigError(f"at most {MAX_KEYS} gateway keys, not {len(keys)}")
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise ConfigError("gateway key names must be unique")
        digests = [k.sha256 for k in keys]
        if len(set(digests)) != len(digests):
            raise ConfigError("the same bearer key is listed twice in the gateway keys")
        self._from_file = from_file
        self.keys = keys

    def add(self, key: GatewayKey) -> None:
        """Accept ``key`` too (kept when the key file is re-read)."""
        self._added.append(key)
        try:
            self._set(self._from_file)
        except ConfigError:
            self._added.pop()
            raise

    @classmethod
    def from_entries(
        cls, entries: Iterable[Mapping[str, Any]], *, where: str = "gateway keys"
    ) -> GatewayKeys:
        """Keys from mappings with the key file's fields (``name``, ``key`` or ``key_sha256``, ...)."""
        return cls(_entry(e, i, where) for i, e in enumerate(entries, 1))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> GatewayKeys:
        """Read a key file; :class:`~modelnet_p2p.errors.ConfigError` (one line) if it is missing,
        readable by group or others, too large or malformed. It is re-read when it changes."""
        return cls(_read(Path(path)), clock=clock, path=path, reload_interval=reload_interval)

    def reload(self, *, force: bool = False) -> None:
        """Re-read the key file if it changed (at most every ``reload_interval`` s, unless ``force``).

        A key keeps its bucket if it is still listed (by its digest). A file that cannot be
        read, is accessible by others or is malformed keeps the keys read before (logged).
        """
        if self.path is None:
            return
        now = self.clock()
        if not force and now < self._next_check:
            return
        self._next_check = now + self.reload_interval
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return
        try:
            fresh = _read(self.path)
            old = {k.sha256: k for k in self._from_file}
            for key in fresh:
                before = old.get(key.sha256)
                if before is not None and (before.rate, before.burst) == (key.rate, key.burst):
                    key.level, key.level_at = before.level, before.level_at
            self._set(fresh)
        except ConfigError as exc:
            log.warning("gateway keys not reloaded (the keys read before stay): %s", exc)
            return
        finally:
            self._stamp = stamp
        log.info("gateway keys reloaded from %s: %d keys", self.path, len(self.keys))

    def lookup(self, presented: str) -> GatewayKey | None:
        """The entry of the bearer key ``presented``, or ``None``.

        Its digest is compared with every entry's in constant time, without stopping at a match.
        """
        self.reload()
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


def _stamp(path: Path) -> tuple[int, ...] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)


def _read(p: Path) -> list[GatewayKey]:
    """The keys of the key file ``p`` (see :meth:`GatewayKeys.load`)."""
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
    where = f"gateway key file {p}"
    return [_entry(e, i, where) for i, e in enumerate(entries, 1)]


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

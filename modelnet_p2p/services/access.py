"""Who may call which capability: access policies, capability tokens, rate caveats, revocation.

Each served capability has a policy (``Capability.access``):

- ``"public"`` (the default): anyone who can reach the peer;
- ``"token"``: a valid capability token (``specs/token.md``) naming the caller's
  Noise-authenticated peer id (or any peer), issued by one of the trusted issuers;
- ``"allowlist"``: only the peer ids in ``Capability.allow``.

``AccessControl(require_token=True)`` (``modelnet serve --require-token``) treats every
public capability as ``"token"``. The inference server calls :meth:`AccessControl.check`
at admission, after the capability lookup; a refusal is an ``unauthorized`` error whose
message starts with the reason (``no_token: ...``, ``wrong_audience: ...``, see
:data:`~modelnet_p2p.proto.token.REASONS`), or an ``overloaded`` error that says
``retry after N s`` when a rate caveat of the token is used up.

The caller's side: :func:`using_token` sets the token the requests made inside it carry
(the ``tok`` key of the request, ``specs/inference.md``).

Revocation: signed revocation lists (:func:`~modelnet_p2p.proto.token.seal_revocations`),
read from files that are checked for changes at most every ``reload_interval`` seconds,
when a request needs them, and from :meth:`AccessControl.add_revocations` (for lists that
arrive another way: gossip and polling, ``services/revocation.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ..errors import ConfigError, ModelNetError, OverloadedError, ProtocolError, UnauthorizedError
from ..proto.capability import ACCESS_POLICIES, Capability
from ..proto.infer import Request
from ..proto.peerid import parse_peer_id
from ..proto.token import Grant, RevocationList, TokenError, check_input_size, open_revocations, verify_token

__all__ = [
    "ACCESS_POLICIES",
    "AccessControl",
    "current_token",
    "retry_after",
    "unauthorized_reason",
    "using_token",
]

log = logging.getLogger(__name__)

#: Most rate counters kept (one per token block with a rate caveat); the least recently
#: used is forgotten beyond this (its caller then starts afresh: it can only gain a minute).
MAX_COUNTERS = 10_000
#: Verified tokens remembered, and for how long: a request with the same token, caller and
#: capability within this time skips the signature checks and the Datalog run.
CACHE_SIZE = 1024
CACHE_TTL = 10.0
#: Seconds between two checks of the revocation files for changes.
RELOAD_INTERVAL = 5.0
DAY = 86_400

_TOKEN: ContextVar[str | None] = ContextVar("modelnet_token", default=None)


@contextlib.contextmanager
def using_token(token: str | None) -> Iterator[None]:
    """Requests sent inside this block (in this task and the tasks it starts) carry ``token``."""
    reset = _TOKEN.set(token)
    try:
        yield
    finally:
        _TOKEN.reset(reset)


def current_token() -> str | None:
    """The token requests made now carry (see :func:`using_token`)."""
    return _TOKEN.get()


def unauthorized_reason(error: ModelNetError) -> str | None:
    """The reason of an ``unauthorized`` error (``"expired"``, ...), read from its message."""
    if error.code != "unauthorized":
        return None
    head = error.message.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[a-z_]{1,32}", head) else None


def retry_after(error: ModelNetError) -> float | None:
    """The seconds an ``overloaded`` error asks to wait (``retry after N s``), if it says."""
    found = re.search(r"retry after ([0-9.]+) s", error.message)
    return float(found.group(1)) if found else None


@dataclass
class _Counter:
    tokens: float  # the minute bucket: requests that may start now
    at: float
    day: int = -1
    used_today: int = 0


class AccessControl:
    """The access checks of one serving peer (pure bookkeeping; the clock is passed in or read).

    Args:
        trusted: peer ids whose tokens are accepted (their own and delegated ones).
        require_token: serve every ``"public"`` capability as ``"token"``.
        revocation_files: signed revocation lists to read (and re-read when they change).
        clock: Unix time in seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        trusted: Iterable[str] = (),
        require_token: bool = False,
        revocation_files: Sequence[str | os.PathLike[str]] = (),
        clock: Callable[[], float] = time.time,
        reload_interval: float = RELOAD_INTERVAL,
    ) -> None:
        self.require_token = require_token
        self.clock = clock
        self.reload_interval = reload_interval
        self._files = [Path(p) for p in revocation_files]
        self._file_stamps: dict[Path, tuple[int, int]] = {}
        self._lists: dict[str, RevocationList] = {}
        self._revoked: frozenset[str] = frozenset()
        self._next_reload = -math.inf
        self._cache: OrderedDict[tuple[str, str, str], tuple[Grant, float]] = OrderedDict()
        self._counters: OrderedDict[str, _Counter] = OrderedDict()
        #: Requests refused, by reason (for logs and tests).
        self.refused: dict[str, int] = {}
        self.trusted: set[str] = set()
        for peer in trusted:
            self.trust(peer)

    # -- configuration -----------------------------------------------------------------

    def trust(self, issuer: str) -> None:
        """Accept tokens issued (at the root) by ``issuer``."""
        try:
            parse_peer_id(issuer)
        except ProtocolError as exc:
            raise ConfigError(f"--trust {issuer}: {exc.message}") from None
        self.trusted.add(issuer)
        self._cache.clear()

    @property
    def revoked(self) -> frozenset[str]:
        """Every revocation id currently revoked."""
        return self._revoked

    def revocation_seq(self, issuer: str) -> int | None:
        """The ``seq`` of the list of ``issuer`` applied here, ``None`` if none."""
        rl = self._lists.get(issuer)
        return None if rl is None else rl.seq

    def add_revocations(self, data: bytes) -> RevocationList:
        """Apply a signed revocation list of a trusted issuer: only a newer ``seq`` replaces the
        issuer's list (an older or equal one changes nothing, so a replayed list never
        un-revokes). Raises :class:`ProtocolError` for a list that is not valid or not trusted."""
        rl = open_revocations(data, self.trusted)
        old = self._lists.get(rl.issuer)
        if old is None or rl.seq > old.seq:
            self._lists[rl.issuer] = rl
            self._revoked = frozenset().union(*(x.ids for x in self._lists.values()))
            self._cache.clear()
        return rl

    def reload(self, *, force: bool = False) -> None:
        """Re-read the revocation files that changed (at most every ``reload_interval`` s)."""
        now = time.monotonic()
        if not force and now < self._next_reload:
            return
        self._next_reload = now + self.reload_interval
        for path in self._files:
            try:
                st = path.stat()
                stamp = (st.st_mtime_ns, st.st_size)
                if self._file_stamps.get(path) == stamp:
                    continue
                self.add_revocations(path.read_bytes())
                self._file_stamps[path] = stamp
            except (OSError, ProtocolError) as exc:
                # Keep the lists read before: a file being rewritten must not un-revoke anything.
                log.warning("revocation list %s not applied: %s", path, exc)

    # -- the checks ----------------------------------------------------------------------

    def policy(self, capability: Capability) -> str:
        """The policy ``capability`` is served with."""
        access = capability.access
        return "token" if access == "public" and self.require_token else access

    def check(self, request: Request, remote: str, capability: Capability) -> ModelNetError | None:
        """``None`` if ``remote`` may run ``request`` on ``capability``; else the error to answer."""
        policy = self.policy(capability)
        if policy == "public":
            return None
        if policy == "allowlist":
            if remote in capability.allow:
                return None
            return self._refuse("not_granted", f"{remote} is not on the allowlist of {capability.name!r}")
        if request.token is None:
            return self._refuse("no_token", f"capability {capability.name!r} requires a capability token")
        try:
            grant = self._grant(request.token, remote, capability.name)
            if grant.max_input is not None:
                check_input_size(grant, len(msgpack.packb(request.input, use_bin_type=True)))
        except TokenError as exc:
            return self._refuse(exc.reason, str(exc).split(": ", 1)[-1])
        return self._take_rate(grant)

    def done(self, request: Request, remote: str, capability: Capability, chunks: int) -> None:
        """Count a finished request's chunks against the tokens-per-day caveats of its token."""
        if request.token is None or self.policy(capability) != "token":
            return
        entry = self._cache.get((request.token, remote, capability.name))
        if entry is None:
            return
        day = int(self.clock() // DAY)
        for rid, caveats in entry[0].limits:
            if caveats.tokens_per_day is not None:
                counter = self._counter(rid, caveats.rate_per_minute, self.clock())
                if counter.day != day:
                    counter.day, counter.used_today = day, 0
                counter.used_today += chunks

    def _refuse(self, reason: str, detail: str) -> UnauthorizedError:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return UnauthorizedError(f"{reason}: {detail}")

    def _grant(self, token: str, remote: str, capability: str) -> Grant:
        now = self.clock()
        key = (token, remote, capability)
        entry = self._cache.get(key)
        if entry is not None and now - entry[1] < CACHE_TTL and entry[0].not_before <= now < entry[0].expires:
            self._cache.move_to_end(key)
            return entry[0]
        self.reload()
        grant = verify_token(
            token, trusted=self.trusted, remote_peer=remote, capability=capability, now=now,
            revoked=self.revoked,
        )  # fmt: skip
        self._cache[key] = (grant, now)
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return grant

    def _counter(self, rid: str, rate: int | None, now: float) -> _Counter:
        counter = self._counters.get(rid)
        if counter is None:
            counter = self._counters[rid] = _Counter(tokens=float(rate or 0), at=now)
            while len(self._counters) > MAX_COUNTERS:
                self._counters.popitem(last=False)
        self._counters.move_to_end(rid)
        return counter

    def _take_rate(self, grant: Grant) -> ModelNetError | None:
        """Spend one request of every rate caveat of the chain, or say how long to wait."""
        now = self.clock()
        day = int(now // DAY)
        counters: list[tuple[_Counter, int]] = []
        for rid, caveats in grant.limits:
            if caveats.rate_per_minute is None and caveats.tokens_per_day is None:
                continue
            counter = self._counter(rid, caveats.rate_per_minute, now)
            if caveats.tokens_per_day is not None:
                if counter.day != day:
                    counter.day, counter.used_today = day, 0
                if counter.used_today >= caveats.tokens_per_day:
                    wait = (day + 1) * DAY - now
                    return OverloadedError(
                        f"the token's {caveats.tokens_per_day} tokens per day are used up; "
                        f"retry after {math.ceil(wait)} s"
                    )
            if caveats.rate_per_minute is not None:
                rate = caveats.rate_per_minute / 60.0
                refilled = counter.tokens + (now - counter.at) * rate
                counter.tokens = min(float(caveats.rate_per_minute), refilled)
                counter.at = now
                if counter.tokens < 1.0:
                    wait = (1.0 - counter.tokens) / rate if rate > 0 else DAY
                    return OverloadedError(
                        f"the token allows {caveats.rate_per_minute} requests per minute; "
                        f"retry after {math.ceil(wait * 100) / 100:g} s"
                    )
                counters.append((counter, 1))
        for counter, n in counters:
            counter.tokens -= n
        return None


def describe(access: AccessControl | None) -> dict[str, Any]:
    """What the access control holds, for logs and ``status``."""
    if access is None:
        return {}
    return {
        "trusted": sorted(access.trusted),
        "require_token": access.require_token,
        "revoked": len(access.revoked),
        "refused": dict(access.refused),
    }

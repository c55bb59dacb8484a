"""Capability tokens: biscuits whose keys are peer identities (``specs/token.md``).

A token is a `biscuit <https://www.biscuitsec.org>`_ (v3, base64url). Its authority
block is signed by the **issuer**'s Ed25519 peer key and says who may use it for what::

    issuer("12D3KooW...");         // the issuer's peer id (its key signs this block)
    audience("12D3KooW...");       // the peer id allowed to use it, or "*" for any
    right("echo");                 // a capability granted by name ...
    right_prefix("llama");         // ... or by pattern ("llama*")
    valid(2026-12-01T10:00:00Z, 2026-12-01T11:00:00Z);  // not before, expires
    limit("rpm", 60);              // caveats: requests per minute, tokens per day,
    limit("tpd", 100000);          //   largest input in bytes
    limit("max_input", 65536);
    nonce("9f0c...");
    check if time($t), $t >= 2026-12-01T10:00:00Z, $t < 2026-12-01T11:00:00Z;

**Delegation** appends a third-party block signed by the key of the token's current
audience, naming the next audience and narrowing the rest (checks on the capability
and the time, its own valid/limit facts). Anyone may also append a first-party block
(biscuit attenuation): it can only add checks. Nothing an appended block asserts
grants anything: the verifier takes rights from the authority block only, and every
check of every block must pass, so a delegation can narrow but never widen.

:func:`verify_token` is pure: the caller passes the clock, the trusted issuers, the
authenticated remote peer and the revoked ids. It raises :class:`TokenError` whose
``reason`` is one of :data:`REASONS`, checked in the order the spec gives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from biscuit_auth import (
    Algorithm,
    AuthorizationError,
    AuthorizerBuilder,
    Biscuit,
    BiscuitBuilder,
    BlockBuilder,
    PrivateKey,
    PublicKey,
    Rule,
    UnverifiedBiscuit,
)

from ..errors import ProtocolError
from .envelope import EnvelopeFormat, Signer, decode_body, open_envelope, seal_body, verify_body
from .packing import canonical_packb
from .peerid import ed25519_public_key, parse_peer_id, peer_id_from_public_key, peer_id_text

__all__ = [
    "ANY",
    "MAX_BLOCKS",
    "MAX_TOKEN_LEN",
    "MAX_REVOKED",
    "REASONS",
    "REVOCATION_FORMAT",
    "Caveats",
    "Grant",
    "RevocationList",
    "TokenError",
    "TokenInfo",
    "check_input_size",
    "delegate_token",
    "inspect_token",
    "issue_token",
    "open_revocations",
    "peek_revocations",
    "pattern_matches",
    "seal_revocations",
    "verify_token",
]

#: The audience of a token any peer may use.
ANY = "*"
#: Longest token accepted, in characters (base64url); a delegation adds about 400.
MAX_TOKEN_LEN = 8192
#: Most blocks in a token: the authority block and 7 appended blocks.
MAX_BLOCKS = 8
#: Longest capability pattern and most patterns per block.
MAX_PATTERN_LEN = 256
MAX_PATTERNS = 64
#: Nonce bytes a token carries (hex in the token).
NONCE_SIZE = 16
#: What verification may spend in the Datalog engine (biscuit's default is 1 ms, which a
#: loaded machine can miss).
AUTHORIZER_MAX_TIME_MS = 100

#: Why a token is refused (``TokenError.reason``), in the order they are checked.
REASONS = (
    "no_token",
    "malformed",
    "untrusted_issuer",
    "bad_signature",
    "revoked",
    "broken_chain",
    "wrong_audience",
    "not_yet_valid",
    "expired",
    "not_granted",
    "input_too_large",
)

#: biscuit-python 0.4's keys take an algorithm its type stubs do not know yet.
_ED25519: Any = cast(Any, Algorithm).Ed25519
_CAVEATS = {"rpm": "rate_per_minute", "tpd": "tokens_per_day", "max_input": "max_input"}
_ISSUER = re.compile(r'^issuer\("([1-9A-HJ-NP-Za-km-z]{1,128})"\);$', re.MULTILINE)


class TokenError(Exception):
    """A token that does not authorize the request; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS
        super().__init__(f"{reason.replace('_', ' ')}{': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Caveats:
    """Limits a token (or one delegation block) puts on its use; ``None``: no limit."""

    rate_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_input: int | None = None

    def facts(self) -> list[tuple[str, int]]:
        out = []
        for short, name in _CAVEATS.items():
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"caveat {name} must be a non-negative integer")
                out.append((short, value))
        return out


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows this request, for the server's rate accounting.

    ``limits`` holds, per block that set caveats, the block's revocation id (the key its
    counters are kept under: a delegate's use counts against every block above it) and
    its caveats.
    """

    issuer: str
    audience: str
    chain: tuple[str, ...]
    not_before: float
    expires: float
    revocation_ids: tuple[str, ...]
    limits: tuple[tuple[str, Caveats], ...] = field(default_factory=tuple)

    @property
    def max_input(self) -> int | None:
        """The smallest ``max_input`` caveat of the chain (``None``: none)."""
        values = [c.max_input for _, c in self.limits if c.max_input is not None]
        return min(values) if values else None


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token's contents, read without trusting it (``modelnet token inspect``)."""

    issuer: str | None
    blocks: tuple[str, ...]
    external_keys: tuple[str | None, ...]
    revocation_ids: tuple[str, ...]
    signature_valid: bool


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether capability ``name`` matches ``pattern``: a name, or a prefix ending in ``*``."""
    if pattern.endswith("*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def _covered(pattern: str, parents: Iterable[str]) -> bool:
    """Whether every name ``pattern`` matches is matched by one of ``parents``."""
    for parent in parents:
        if parent.endswith("*"):
            if pattern.startswith(parent[:-1]):
                return True
        elif not pattern.endswith("*") and pattern == parent:
            return True
    return False


def _date(t: float) -> str:
    """Unix seconds as an RFC 3339 UTC date, Datalog's date literal (whole seconds, floored).

    Written out (civil-from-days, H. Hinnant) because proto/ reads no clock and imports no
    ``datetime``; biscuit takes the literal in the Datalog text.
    """
    secs = math.floor(t)
    days, rem = divmod(secs, 86400)
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    if not 1 <= year <= 9999:
        raise ValueError("dates must fall in the years 1-9999")
    return f"{year:04d}-{month:02d}-{day:02d}T{rem // 3600:02d}:{rem % 3600 // 60:02d}:{rem % 60:02d}Z"


def _check_patterns(patterns: Sequence[str]) -> None:
    if not 0 < len(patterns) <= MAX_PATTERNS:
        raise ValueError(f"give 1-{MAX_PATTERNS} capability names or patterns")
    for p in patterns:
        if not isinstance(p, str) or not 0 < len(p) <= MAX_PATTERN_LEN or "*" in p[:-1]:
            raise ValueError(f"bad capability pattern {p!r}: a name, or a prefix followed by '*'")


def _audience_text(audience: str | None) -> str:
    if audience is None or audience == ANY:
        return ANY
    return peer_id_text(parse_peer_id(audience))


def _common_block(
    code: list[str], params: dict[str, Any], *, audience: str, not_before: float, expires: float,
    caveats: Caveats, nonce: bytes,
) -> None:  # fmt: skip
    if expires <= not_before:
        raise ValueError("a token must expire after it becomes valid")
    if len(nonce) < 8:
        raise ValueError("a nonce has at least 8 bytes")
    nbf, exp = _date(not_before), _date(expires)
    code.append("audience({aud});")
    code.append(f"valid({nbf}, {exp});")
    code.append(f"check if time($t), $t >= {nbf}, $t < {exp};")
    code.append("nonce({nonce});")
    params.update(aud=audience, nonce=nonce.hex())
    for i, (short, value) in enumerate(caveats.facts()):
        code.append(f'limit("{short}", {{l{i}}});')
        params[f"l{i}"] = value


def issue_token(
    issuer_key: bytes,
    *,
    audience: str | None,
    capabilities: Sequence[str],
    not_before: float,
    expires: float,
    caveats: Caveats = Caveats(),
    nonce: bytes,
) -> str:
    """A new token signed by ``issuer_key`` (the issuer's 32-byte Ed25519 private key).

    ``audience`` is the peer id that may use it (``None`` or ``"*"``: any peer);
    ``capabilities`` are names or ``prefix*`` patterns; times are Unix seconds.
    """
    _check_patterns(capabilities)
    private = _private_key(issuer_key)
    issuer = peer_id_text(peer_id_from_public_key(_public_from_private(private)))
    code = ["issuer({issuer});"]
    params: dict[str, Any] = {"issuer": issuer}
    for i, p in enumerate(capabilities):
        code.append(f"right_prefix({{r{i}}});" if p.endswith("*") else f"right({{r{i}}});")
        params[f"r{i}"] = p[:-1] if p.endswith("*") else p
    _common_block(
        code, params, audience=_audience_text(audience), not_before=not_before, expires=expires,
        caveats=caveats, nonce=nonce,
    )  # fmt: skip
    return str(BiscuitBuilder("\n".join(code), params).build(private).to_base64())


def _private_key(raw: bytes) -> PrivateKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("an Ed25519 private key has 32 bytes")
    return cast(Any, PrivateKey).from_bytes(raw, _ED25519)  # type: ignore[no-any-return]


def _public_key(raw: bytes) -> PublicKey:
    return cast(Any, PublicKey).from_bytes(raw, _ED25519)  # type: ignore[no-any-return]


def _public_from_private(private: PrivateKey) -> bytes:
    from biscuit_auth import KeyPair

    return bytes(KeyPair.from_private_key(private).public_key.to_bytes())


def _parse(token: str) -> tuple[UnverifiedBiscuit, str]:
    """The unverified biscuit and the issuer it claims (``malformed`` if it is not a token)."""
    if not token:
        raise TokenError("no_token")
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        raise TokenError("malformed", f"a token is text of at most {MAX_TOKEN_LEN} characters")
    try:
        unverified = UnverifiedBiscuit.from_base64(token)
        count = unverified.block_count()
        authority = unverified.block_source(0)
    except Exception as exc:
        raise TokenError("malformed", f"not a biscuit ({type(exc).__name__})") from None
    if count > MAX_BLOCKS:
        raise TokenError("malformed", f"{count} blocks; at most {MAX_BLOCKS}")
    found = _ISSUER.findall(authority)
    if len(found) != 1:
        raise TokenError("malformed", "the authority block must name exactly one issuer")
    return unverified, found[0]


def _issuer_key(issuer: str) -> PublicKey:
    try:
        return _public_key(ed25519_public_key(parse_peer_id(issuer)))
    except (ProtocolError, ValueError):
        raise TokenError("malformed", f"issuer {issuer!r} is not an Ed25519 peer id") from None


def _verified(token: str, issuer: str) -> Biscuit:
    try:
        return Biscuit.from_base64(token, _issuer_key(issuer))
    except TokenError:
        raise
    except Exception:
        raise TokenError("bad_signature", f"not signed by issuer {issuer}") from None


def _key_peer(external_key: str) -> str:
    """The peer id of a biscuit external key (``ed25519/<hex>``)."""
    kind, _, hexkey = external_key.partition("/")
    if kind != "ed25519":
        raise TokenError("broken_chain", f"a delegation block is signed with a {kind} key")
    return peer_id_text(peer_id_from_public_key(bytes.fromhex(hexkey)))


def _authorizer(token: Biscuit, facts: str, params: dict[str, Any]) -> Any:
    builder: Any = AuthorizerBuilder(facts, params)  # its stubs lack limits() and set_limits()
    limits = builder.limits()
    limits.max_time = type(limits.max_time)(milliseconds=AUTHORIZER_MAX_TIME_MS)  # a timedelta
    builder.set_limits(limits)
    return builder.build(token)


def _query(authorizer: Any, head: str, body: str, scope: str | None) -> list[list[Any]]:
    trusting = f" trusting {scope}" if scope else ""
    return [list(f.terms) for f in authorizer.query(Rule(f"{head} <- {body}{trusting}"))]


def _timestamp(value: Any) -> float:
    return float(value.timestamp()) if hasattr(value, "timestamp") else float(value)


def verify_token(
    token: str | None,
    *,
    trusted: Collection[str],
    remote_peer: str,
    capability: str,
    now: float,
    input_size: int | None = None,
    revoked: Collection[str] = (),
) -> Grant:
    """Check ``token`` for a request of ``capability`` by ``remote_peer`` at ``now``.

    Returns the :class:`Grant` or raises :class:`TokenError`. Order: present, well-formed
    (size, blocks, one issuer), trusted issuer, signatures of every block, revocation (any
    block's id), the delegation chain (each third-party block signed by the audience
    before it), the audience, the time window (every block's), the right, every block's
    checks, the input size.
    """
    _, issuer = _parse(token or "")
    if issuer not in trusted:
        raise TokenError("untrusted_issuer", f"{issuer} is not a trusted issuer")
    biscuit = _verified(token or "", issuer)
    ids = tuple(str(r) for r in biscuit.revocation_ids)
    if any(r in revoked for r in ids):
        raise TokenError("revoked")
    when = _date(now)
    authorizer = _authorizer(biscuit, f"time({when});", {})
    # The delegation chain: authority, then each third-party block signed by the audience so far.
    scopes: list[tuple[int, str | None]] = [(0, None)]
    chain = [issuer]
    audiences = _query(authorizer, "a($x)", "audience($x)", None)
    if len(audiences) != 1:
        raise TokenError("malformed", "the authority block must name exactly one audience")
    audience = str(audiences[0][0])
    seen_keys: set[str] = set()
    for i in range(1, biscuit.block_count()):
        key = biscuit.block_external_key(i)
        if key is None:
            continue  # a first-party block: only checks, evaluated below
        signer = _key_peer(str(key))
        if key in seen_keys or signer != audience:
            raise TokenError("broken_chain", f"block {i} is signed by {signer}, not by {audience}")
        seen_keys.add(str(key))
        named = _query(authorizer, "a($x)", "audience($x)", str(key))
        if len(named) != 1:
            raise TokenError("broken_chain", f"delegation block {i} must name exactly one audience")
        audience = str(named[0][0])
        chain.append(audience)
        scopes.append((i, str(key)))
    if audience != ANY and audience != remote_peer:
        raise TokenError("wrong_audience", f"the token is for {audience}, the caller is {remote_peer}")
    not_before, expires = float("-inf"), float("inf")
    limits: list[tuple[str, Caveats]] = []
    for index, scope in scopes:
        scope_text = scope if scope is not None else "authority"
        for nbf, exp in _query(authorizer, "v($a, $b)", "valid($a, $b)", scope_text):
            not_before, expires = max(not_before, _timestamp(nbf)), min(expires, _timestamp(exp))
        values = {str(k): int(v) for k, v in _query(authorizer, "l($k, $v)", "limit($k, $v)", scope_text)}
        caveats = Caveats(**{_CAVEATS[k]: v for k, v in values.items() if k in _CAVEATS})
        if caveats != Caveats():
            limits.append((ids[index], caveats))
    if now < not_before:
        raise TokenError("not_yet_valid", f"valid from {_date(not_before)}")
    if now >= expires:
        raise TokenError("expired", f"expired at {_date(expires)}")
    policy = (
        f"time({when}); peer({{peer}}); capability({{cap}});"
        "allow if capability($c), right($c);"
        "allow if capability($c), right_prefix($p), $c.starts_with($p);"
    )
    full = _authorizer(biscuit, policy, {"peer": remote_peer, "cap": capability})
    try:
        full.authorize()
    except AuthorizationError as exc:
        raise TokenError("not_granted", _short(str(exc), capability)) from None
    except Exception as exc:  # a Datalog run-time limit
        raise TokenError("not_granted", f"authorization did not complete ({type(exc).__name__})") from None
    grant = Grant(issuer, audience, tuple(chain), not_before, expires, ids, tuple(limits))
    if input_size is not None:
        check_input_size(grant, input_size)
    return grant


def check_input_size(grant: Grant, input_size: int) -> None:
    """Raise ``input_too_large`` if ``input_size`` bytes exceed a ``max_input`` caveat of ``grant``."""
    most = grant.max_input
    if most is not None and input_size > most:
        raise TokenError("input_too_large", f"input of {input_size} bytes; the token allows {most}")


def _short(message: str, capability: str) -> str:
    if "no matching policy" in message or "policy" not in message:
        return f"the token does not grant {capability!r}"
    return f"a check of the token failed for {capability!r}"


def delegate_token(
    token: str,
    holder_key: bytes,
    *,
    audience: str | None,
    capabilities: Sequence[str] | None = None,
    not_before: float,
    expires: float,
    caveats: Caveats = Caveats(),
    nonce: bytes,
) -> str:
    """A narrower token for ``audience``, signed by ``holder_key`` (the current audience's key).

    ``capabilities`` (names or patterns) must each be covered by the token's own
    rights, as far as this can tell; ``None`` keeps them. The verifier enforces the
    narrowing whatever this function checks.
    """
    _, issuer = _parse(token)
    biscuit = _verified(token, issuer)
    private = _private_key(holder_key)  # the verifier checks that it is the current audience's
    code: list[str] = []
    params: dict[str, Any] = {}
    if capabilities is not None:
        _check_patterns(capabilities)
        source = biscuit.block_source(0)
        parents = [m for m in re.findall(r'^right\("([^"]*)"\);$', source, re.MULTILINE)]
        parents += [m + "*" for m in re.findall(r'^right_prefix\("([^"]*)"\);$', source, re.MULTILINE)]
        wider = [p for p in capabilities if not _covered(p, parents)]
        if wider:
            raise ValueError(f"the token does not grant {', '.join(wider)}: a delegation cannot widen it")
        alternatives = []
        for i, p in enumerate(capabilities):
            if p.endswith("*"):
                alternatives.append(f"capability($c), $c.starts_with({{d{i}}})")
                params[f"d{i}"] = p[:-1]
            else:
                alternatives.append(f"capability($c), $c == {{d{i}}}")
                params[f"d{i}"] = p
        code.append("check if " + " or ".join(alternatives) + ";")
    _common_block(
        code, params, audience=_audience_text(audience), not_before=not_before, expires=expires,
        caveats=caveats, nonce=nonce,
    )  # fmt: skip
    block = biscuit.third_party_request().create_block(private, BlockBuilder("\n".join(code), params))
    public = _public_key(_public_from_private(private))
    return str(biscuit.append_third_party(public, block).to_base64())


def inspect_token(token: str) -> TokenInfo:
    """A token's blocks as Datalog, its external keys and revocation ids (nothing trusted)."""
    unverified, issuer = _parse(token)
    count = unverified.block_count()
    try:
        biscuit = _verified(token, issuer)
        valid = True
        keys: tuple[str | None, ...] = tuple(
            None if biscuit.block_external_key(i) is None else str(biscuit.block_external_key(i))
            for i in range(count)
        )
    except TokenError:
        valid, keys = False, tuple(None for _ in range(count))
    return TokenInfo(
        issuer=issuer,
        blocks=tuple(unverified.block_source(i) for i in range(count)),
        external_keys=keys,
        revocation_ids=tuple(str(r) for r in unverified.revocation_ids),
        signature_valid=valid,
    )


# -- revocation lists -------------------------------------------------------------------

#: A revocation list: the canonical msgpack map ``{"iss": issuer peer id, "seq": uint,
#: "at": uint (Unix seconds), "ids": [revocation id (hex), ...]}`` in a signed envelope.
REVOCATION_FORMAT = EnvelopeFormat(
    what="revocation list", body_key="rev", domain=b"modelnet-revocation-list/1:", max_size=512 * 1024
)
#: Most ids in one list (a biscuit revocation id is 128 hex digits).
MAX_REVOKED = 3000
_REVOCATION_ID = re.compile(r"^[0-9a-f]{2,256}$")


@dataclass(frozen=True, slots=True)
class RevocationList:
    """The ids one issuer has revoked, as of ``seq`` (a newer list replaces an older one)."""

    issuer: str
    seq: int
    issued: int
    ids: frozenset[str]


def seal_revocations(signer: Signer, ids: Iterable[str], *, seq: int, issued: int) -> bytes:
    """A revocation list signed by ``signer`` (the issuer's identity)."""
    wanted = sorted(set(ids))
    if len(wanted) > MAX_REVOKED or not all(_REVOCATION_ID.match(i) for i in wanted):
        raise ValueError(f"at most {MAX_REVOKED} revocation ids, each in lower-case hex")
    body = canonical_packb({"iss": str(signer.peer_id), "seq": seq, "at": issued, "ids": wanted})
    return seal_body(REVOCATION_FORMAT, body, signer)


def peek_revocations(data: bytes) -> RevocationList:
    """The list in ``data`` if it is well formed and signed by the issuer it names (whoever
    that is: no trust decision); :class:`ProtocolError` otherwise. For peers that hold and
    pass lists on (``services/revocation.py``); a verifier applies only :func:`open_revocations`."""
    return open_revocations(data, None)


def open_revocations(data: bytes, trusted: Collection[str] | None) -> RevocationList:
    """The list in ``data``, if signed by one of ``trusted`` (``None``: by the issuer it names,
    whoever that is); :class:`ProtocolError` otherwise."""
    body, sig = open_envelope(REVOCATION_FORMAT, data)
    obj = decode_body(REVOCATION_FORMAT, body)
    issuer, seq, issued, ids = obj.get("iss"), obj.get("seq"), obj.get("at"), obj.get("ids")
    if set(obj) != {"iss", "seq", "at", "ids"} or not isinstance(issuer, str):
        raise ProtocolError("a revocation list has exactly the keys iss, seq, at, ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (seq, issued)):
        raise ProtocolError("revocation list seq and at must be unsigned integers")
    if not isinstance(ids, list) or len(ids) > MAX_REVOKED:
        raise ProtocolError(f"revocation list ids must be a list of at most {MAX_REVOKED}")
    if not all(isinstance(i, str) and _REVOCATION_ID.match(i) for i in ids):
        raise ProtocolError("revocation ids are lower-case hex")
    if trusted is not None and issuer not in trusted:
        raise ProtocolError(f"revocation list from {issuer}, who is not a trusted issuer")
    if not verify_body(REVOCATION_FORMAT, issuer, body, sig):
        raise ProtocolError("revocation list signature does not verify")
    return RevocationList(issuer, int(seq), int(issued), frozenset(ids))  # type: ignore[arg-type]

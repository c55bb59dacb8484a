"""Capability tokens (proto/token.py, specs/token.md): vectors, properties, revocation lists, CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cli_util import modelnet, one_line_error
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelnet_p2p import Identity
from modelnet_p2p.cli.token import parse_duration, parse_rate
from modelnet_p2p.errors import ProtocolError
from modelnet_p2p.proto.token import (
    REASONS,
    Caveats,
    TokenError,
    delegate_token,
    inspect_token,
    issue_token,
    open_revocations,
    pattern_matches,
    seal_revocations,
    verify_token,
)

SPECS = Path(__file__).resolve().parent.parent / "specs"
VECTORS = json.loads((SPECS / "vectors" / "token.json").read_text())


def seeded(label: str) -> tuple[bytes, Identity]:
    seed = hashlib.sha256(label.encode()).digest()
    return seed, Identity(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def key(identity: Identity) -> bytes:
    return identity.key_pair.private_key.to_bytes()[:32]


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: c["name"])
def test_vectors(case: dict[str, Any]) -> None:
    token = VECTORS["tokens"][case["token"]] if case["token"] else case.get("raw_token", "")
    expect = case["expect"]
    kwargs = dict(
        trusted=set(case["trusted"]), remote_peer=case["remote"], capability=case["capability"],
        now=case["now"], revoked=set(case["revoked"]), input_size=case["input_size"],
    )  # fmt: skip
    if not expect["ok"]:
        with pytest.raises(TokenError) as refused:
            verify_token(token, **kwargs)  # type: ignore[arg-type]
        assert refused.value.reason == expect["reason"]
        return
    grant = verify_token(token, **kwargs)  # type: ignore[arg-type]
    assert grant.audience == expect["audience"] and list(grant.chain) == expect["chain"]
    assert (grant.not_before, grant.expires) == (expect["not_before"], expect["expires"])
    limits = [
        [rid, {"rpm": c.rate_per_minute, "tpd": c.tokens_per_day, "max_input": c.max_input}]
        for rid, c in grant.limits
    ]
    assert limits == expect["limits"]


def test_vector_keys_and_spec_agree() -> None:
    for who in VECTORS["keys"].values():
        assert str(seeded(who["seed_label"])[1].peer_id) == who["peer_id"]
    spec = (SPECS / "token.md").read_text()
    assert VECTORS["tokens"]["root"] in spec.replace("\n", "")  # the spec quotes the root vector
    for case in VECTORS["cases"]:  # every case is listed in the spec's table
        assert case["name"] in spec, case["name"]
    root = inspect_token(VECTORS["tokens"]["root"])
    assert root.signature_valid and root.issuer == VECTORS["keys"]["issuer"]["peer_id"]


def test_issue_verify_delegate() -> None:
    issuer, alice, bob = Identity.generate(), Identity.generate(), Identity.generate()
    now = time.time()
    token = issue_token(
        key(issuer), audience=str(alice.peer_id), capabilities=["echo", "llm-*"], not_before=now - 5,
        expires=now + 60, caveats=Caveats(rate_per_minute=5), nonce=os.urandom(16),
    )  # fmt: skip
    args: dict[str, Any] = {"trusted": {str(issuer.peer_id)}, "now": now}
    grant = verify_token(token, remote_peer=str(alice.peer_id), capability="llm-x", **args)
    assert grant.issuer == str(issuer.peer_id) and grant.limits[0][1].rate_per_minute == 5
    child = delegate_token(
        token, key(alice), audience=str(bob.peer_id), capabilities=["llm-*"], not_before=now - 5,
        expires=now + 3600, caveats=Caveats(max_input=10), nonce=os.urandom(16),
    )  # fmt: skip
    g2 = verify_token(child, remote_peer=str(bob.peer_id), capability="llm-small", **args)
    assert g2.chain == (str(issuer.peer_id), str(bob.peer_id)) and g2.expires == grant.expires  # never longer
    assert g2.max_input == 10
    with pytest.raises(TokenError, match="input too large"):
        verify_token(child, remote_peer=str(bob.peer_id), capability="llm-small", input_size=11, **args)
    with pytest.raises(ValueError, match="cannot widen"):
        delegate_token(
            token, key(alice), audience=str(bob.peer_id), capabilities=["*"], not_before=now,
            expires=now + 10, nonce=os.urandom(16),
        )  # fmt: skip
    # the holder re-delegating is fine; a stranger signing a delegation is not
    grandchild = delegate_token(
        child, key(bob), audience=None, not_before=now - 5, expires=now + 30, nonce=os.urandom(16)
    )
    assert (
        verify_token(grandchild, remote_peer=str(alice.peer_id), capability="llm-a", **args).audience == "*"
    )
    stolen = delegate_token(
        child, key(alice), audience=None, not_before=now, expires=now + 30, nonce=os.urandom(16)
    )
    with pytest.raises(TokenError) as broken:
        verify_token(stolen, remote_peer=str(alice.peer_id), capability="llm-a", **args)
    assert broken.value.reason == "broken_chain"


_NAMES = st.sampled_from(["echo", "llm-a", "llm-b", "chat", "x"])
_PATTERNS = st.sampled_from(["echo", "llm-*", "llm-a", "*", "ch*", "x"])
_FIXED = [seeded(f"property {i}") for i in range(3)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parent=st.lists(_PATTERNS, min_size=1, max_size=3, unique=True),
    child=st.lists(_PATTERNS, min_size=1, max_size=3, unique=True),
    asked=_NAMES,
    now_offset=st.integers(-100, 5000),
)
def test_delegation_never_widens(parent: list[str], child: list[str], asked: str, now_offset: int) -> None:
    (iss_seed, iss), (a_seed, alice), (_, bob) = _FIXED
    t0 = 1_800_000_000
    token = issue_token(
        iss_seed,
        audience=str(alice.peer_id),
        capabilities=parent,
        not_before=t0,
        expires=t0 + 3600,
        nonce=b"n" * 16,
    )
    try:
        child_token = delegate_token(
            token,
            a_seed,
            audience=str(bob.peer_id),
            capabilities=child,
            not_before=t0,
            expires=t0 + 600,
            nonce=b"m" * 16,
        )
    except ValueError:
        return  # refused up front: it would widen
    now = t0 + now_offset
    try:
        verify_token(
            child_token, trusted={str(iss.peer_id)}, remote_peer=str(bob.peer_id), capability=asked, now=now
        )
    except TokenError as exc:
        assert exc.reason in REASONS
        return
    assert any(pattern_matches(p, asked) for p in parent) and any(pattern_matches(p, asked) for p in child)
    assert t0 <= now < t0 + 600


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300).map(lambda b: base64.urlsafe_b64encode(b).decode()))
def test_garbage_is_a_token_error(text: str) -> None:
    with pytest.raises(TokenError) as refused:
        verify_token(text, trusted={"x"}, remote_peer="p", capability="c", now=0)
    assert refused.value.reason in ("no_token", "malformed")


@settings(max_examples=60, deadline=None)
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_a_flipped_bit_never_verifies_a_different_token(position: int, bit: int) -> None:
    token = VECTORS["tokens"]["root"]
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[position % len(raw)] ^= 1 << bit
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    try:
        grant = verify_token(
            tampered, trusted={VECTORS["keys"]["issuer"]["peer_id"]},
            remote_peer=VECTORS["keys"]["alice"]["peer_id"], capability="echo", now=1796000010,
        )  # fmt: skip
    except TokenError as refused:
        assert refused.reason in ("malformed", "bad_signature", "untrusted_issuer")
        return
    # Protobuf lets a few bits change the bytes but not the token: a field's tag turned into
    # an unknown field's (which is skipped) whose value was the default anyway, e.g. the
    # algorithm (Ed25519 = 0) of a block's next key. Such a token is the same token: the
    # same signed blocks, so the same revocation ids, and the same grant.
    original = verify_token(
        token, trusted={VECTORS["keys"]["issuer"]["peer_id"]},
        remote_peer=VECTORS["keys"]["alice"]["peer_id"], capability="echo", now=1796000010,
    )  # fmt: skip
    assert grant == original


def test_revocation_lists() -> None:
    issuer, other = Identity.generate(), Identity.generate()
    data = seal_revocations(issuer, ["ab" * 64, "cd" * 64], seq=3, issued=100)
    rl = open_revocations(data, {str(issuer.peer_id)})
    assert rl.ids == {"ab" * 64, "cd" * 64} and rl.seq == 3 and rl.issuer == str(issuer.peer_id)
    with pytest.raises(ProtocolError, match="not a trusted issuer"):
        open_revocations(data, {str(other.peer_id)})
    tampered = data.replace(b"ab" * 64, b"ef" * 64)
    with pytest.raises(ProtocolError, match="signature"):
        open_revocations(tampered, {str(issuer.peer_id)})
    with pytest.raises(ValueError):
        seal_revocations(issuer, ["NOT HEX"], seq=1, issued=1)


def test_durations_and_rates() -> None:
    assert parse_duration("1h") == 3600 and parse_duration("10m") == 600 and parse_duration("90") == 90
    assert parse_rate("60/min") == 60 and parse_rate("2/s") == 120 and parse_rate("120/h") == 2
    assert parse_rate("1/h") == 1  # at least one per minute


def test_cli_issue_inspect_delegate_revoke(tmp_path: Path) -> None:
    for name in ("issuer", "alice", "bob"):
        assert modelnet("id", "--identity", f"{name}.key", cwd=tmp_path).returncode == 0
    ids = {
        n: modelnet("id", "--identity", f"{n}.key", cwd=tmp_path).stdout.strip()
        for n in ("issuer", "alice", "bob")
    }
    out = modelnet(
        "token", "issue", "-c", "echo", "--to", ids["alice"], "--ttl", "1h", "--rate", "60/min",
        "-i", "issuer.key", cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert re.fullmatch(r"[A-Za-z0-9_=-]+", token)
    shown = json.loads(modelnet("token", "inspect", token, "--json", cwd=tmp_path).stdout)
    assert shown["issuer"] == ids["issuer"] and shown["signature_valid"]
    assert (
        f'audience("{ids["alice"]}")' in shown["blocks"][0]["source"]
        and 'limit("rpm", 60)' in shown["blocks"][0]["source"]
    )
    child = modelnet(
        "token", "delegate", token, "--to", ids["bob"], "--ttl", "10m", "-i", "alice.key", cwd=tmp_path
    )
    assert child.returncode == 0, child.stderr
    blocks = json.loads(modelnet("token", "inspect", child.stdout.strip(), "--json", cwd=tmp_path).stdout)[
        "blocks"
    ]
    assert len(blocks) == 2 and blocks[1]["signed_by"].startswith("ed25519/")
    wide = modelnet(
        "token", "delegate", token, "--to", ids["bob"], "-c", "other", "-i", "alice.key", cwd=tmp_path
    )
    assert "cannot widen" in one_line_error(wide)
    revoked = modelnet("token", "revoke", token, "-i", "issuer.key", "-o", "revoked.list", cwd=tmp_path)
    assert revoked.returncode == 0, revoked.stderr
    rl = open_revocations((tmp_path / "revoked.list").read_bytes(), {ids["issuer"]})
    assert shown["blocks"][0]["revocation_id"] in rl.ids
    again = modelnet(
        "token", "revoke", child.stdout.strip(), "-i", "issuer.key", "-o", "revoked.list", cwd=tmp_path
    )
    assert (
        again.returncode == 0
        and open_revocations((tmp_path / "revoked.list").read_bytes(), {ids["issuer"]}).seq == 1
    )
    assert "not a token" in one_line_error(modelnet("token", "inspect", "garbage!", cwd=tmp_path))


@given(st.integers(0, 253_402_300_799))
def test_datalog_dates_match_the_calendar(t: int) -> None:
    import datetime

    from modelnet_p2p.proto.token import _date

    assert _date(t) == datetime.datetime.fromtimestamp(t, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

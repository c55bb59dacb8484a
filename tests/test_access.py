"""Access control on real peers (127.0.0.1): policies, tokens bound to the caller's peer id, caveats."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from modelnet_p2p import Capability, Identity, Peer
from modelnet_p2p.errors import OverloadedError, UnauthorizedError
from modelnet_p2p.proto.card import CapabilityCard, encode_card, parse_card
from modelnet_p2p.proto.token import Caveats, delegate_token, issue_token, seal_revocations
from modelnet_p2p.services.access import retry_after, unauthorized_reason, using_token


def key(identity: Identity) -> bytes:
    return identity.key_pair.private_key.to_bytes()[:32]


def token_for(
    issuer: Identity, audience: str | None, caps: list[str], *, ttl: float = 3600, start: float | None = None,
    **caveats: Any,
) -> str:  # fmt: skip
    now = time.time() if start is None else start
    return issue_token(
        key(issuer), audience=audience, capabilities=caps, not_before=now - 60, expires=now + ttl,
        caveats=Caveats(**caveats), nonce=secrets.token_bytes(16),
    )  # fmt: skip


def serve_echo(peer: Peer, name: str = "secret", **fields: Any) -> None:
    async def echo(request):  # type: ignore[no-untyped-def]
        yield "a"
        yield "b"

    peer.serve(Capability(name=name, task="tool", **fields), echo)


async def reason_of(client: Peer, target: str, name: str = "secret", token: str | None = None) -> str | None:
    with using_token(token):
        try:
            resp = await client.call(target, name, "x", timeout=20)
        except UnauthorizedError as exc:
            return unauthorized_reason(exc)
    assert resp.chunks == ["a", "b"]
    return None


async def test_token_policy_on_the_wire(tmp_path: Path) -> None:
    issuer, other_issuer = Identity.generate(), Identity.generate()
    async with Peer(trust=[str(issuer.peer_id)]) as server, Peer() as alice, Peer() as mallory:
        serve_echo(server, access="token")
        serve_echo(server, name="open")
        target = server.addrs[0]
        me = alice.peer_id
        assert await reason_of(alice, target, "open") is None  # public: no token needed
        assert await reason_of(alice, target) == "no_token"
        good = token_for(issuer, me, ["secret"])
        assert await reason_of(alice, target, token=good) is None
        assert await reason_of(alice, target, token=token_for(issuer, None, ["sec*"])) is None  # any audience
        # bound to the Noise-authenticated peer id: a stolen token is useless to another peer
        assert await reason_of(mallory, target, token=good) == "wrong_audience"
        assert (
            await reason_of(alice, target, token=token_for(other_issuer, me, ["secret"]))
            == "untrusted_issuer"
        )
        assert await reason_of(alice, target, token=token_for(issuer, me, ["other"])) == "not_granted"
        expired = token_for(issuer, me, ["secret"], ttl=30, start=time.time() - 3600)
        assert await reason_of(alice, target, token=expired) == "expired"
        forged = good[:-8] + ("A" if good[-8] != "A" else "B") + good[-7:]
        assert await reason_of(alice, target, token=forged) in ("bad_signature", "malformed")
        assert await reason_of(alice, target, token="not a token") == "malformed"
        # delegation: alice hands mallory a narrower token for 'secret'
        delegated = delegate_token(
            good, key(alice.identity), audience=str(mallory.peer_id), capabilities=["secret"],
            not_before=time.time() - 60, expires=time.time() + 600, nonce=os.urandom(16),
        )  # fmt: skip
        assert await reason_of(mallory, target, token=delegated) is None
        assert await reason_of(alice, target, token=delegated) == "wrong_audience"
        assert server.inference.access.refused["wrong_audience"] >= 2


async def test_revocation_list_file_is_reloaded(tmp_path: Path) -> None:
    issuer = Identity.generate()
    revoked = tmp_path / "revoked.list"
    async with Peer(trust=[str(issuer.peer_id)], revocations=[str(revoked)]) as server, Peer() as alice:
        serve_echo(server, access="token")
        target = server.addrs[0]
        token = token_for(issuer, alice.peer_id, ["secret"])
        assert await reason_of(alice, target, token=token) is None  # no file yet: nothing revoked
        from modelnet_p2p.proto.token import inspect_token

        revoked.write_bytes(seal_revocations(issuer, inspect_token(token).revocation_ids, seq=1, issued=1))
        server.inference.access.reload(force=True)  # the server re-reads it at most every 5 s by itself
        assert await reason_of(alice, target, token=token) == "revoked"
        # a list signed by someone else is not applied, and does not un-revoke
        revoked.write_bytes(seal_revocations(Identity.generate(), [], seq=2, issued=2))
        server.inference.access.reload(force=True)
        assert await reason_of(alice, target, token=token) == "revoked"


async def test_rate_caveats_are_typed_errors() -> None:
    issuer = Identity.generate()
    async with Peer(trust=[str(issuer.peer_id)]) as server, Peer() as alice:
        serve_echo(server, access="token")
        target = server.addrs[0]
        with using_token(token_for(issuer, alice.peer_id, ["secret"], rate_per_minute=2)):
            for _ in range(2):
                assert (await alice.call(target, "secret", "x", timeout=20)).chunks == ["a", "b"]
            with pytest.raises(OverloadedError) as refused:
                await alice.call(target, "secret", "x", timeout=20)
        wait = retry_after(refused.value)
        assert wait is not None and 0 < wait <= 31
        # tokens per day: each answer is 2 chunks, so a budget of 3 allows two requests
        with using_token(token_for(issuer, alice.peer_id, ["secret"], tokens_per_day=3)):
            for _ in range(2):
                await alice.call(target, "secret", "x", timeout=20)
            with pytest.raises(OverloadedError) as spent:
                await alice.call(target, "secret", "x", timeout=20)
        assert "tokens per day" in spent.value.message and (retry_after(spent.value) or 0) > 0
        # the largest input
        with using_token(token_for(issuer, alice.peer_id, ["secret"], max_input=16)):
            await alice.call(target, "secret", "x", timeout=20)
            with pytest.raises(UnauthorizedError) as big:
                await alice.call(target, "secret", "x" * 100, timeout=20)
        assert unauthorized_reason(big.value) == "input_too_large"
        with using_token(token_for(issuer, alice.peer_id, ["secret"], max_input=64)):
            await alice.call(target, "secret", {"vector": [0.5, 1.5]}, timeout=20)  # floats measure too
        # a delegate's requests count against the caveats of every block above it
        async with Peer() as bob:
            parent = token_for(issuer, alice.peer_id, ["secret"], rate_per_minute=1)
            child = delegate_token(
                parent, key(alice.identity), audience=bob.peer_id, not_before=time.time() - 60,
                expires=time.time() + 600, nonce=os.urandom(16),
            )  # fmt: skip
            with using_token(parent):
                await alice.call(target, "secret", "x", timeout=20)
            with using_token(child), pytest.raises(OverloadedError):
                await bob.call(target, "secret", "x", timeout=20)


async def test_allowlist_and_require_token() -> None:
    issuer = Identity.generate()
    async with Peer() as friend, Peer() as stranger:
        async with Peer(trust=[str(issuer.peer_id)], require_token=True) as server:
            serve_echo(server, name="club", access="allowlist", allow=frozenset({friend.peer_id}))
            serve_echo(server, name="open")  # public, but --require-token makes it "token"
            target = server.addrs[0]
            assert await reason_of(friend, target, "club") is None
            assert await reason_of(stranger, target, "club") == "not_granted"
            assert await reason_of(stranger, target, "open") == "no_token"
            token = token_for(issuer, stranger.peer_id, ["open"])
            assert await reason_of(stranger, target, "open", token=token) is None


def test_cards_announce_the_policy() -> None:
    me = Identity.generate()
    caps = (
        Capability(name="a"),
        Capability(name="b", access="token"),
        Capability(name="c", access="allowlist"),
    )
    card = CapabilityCard(
        str(me.peer_id), (), seq=1, issued_at=10**12, expires_at=10**12 + 60_000, capabilities=caps
    )
    parsed = parse_card(encode_card(card))
    assert [c.access for c in parsed.capabilities] == ["public", "token", "allowlist"]
    assert all(not c.allow for c in parsed.capabilities)  # the allowlist itself is not announced


def test_request_token_key() -> None:
    from modelnet_p2p.errors import ProtocolError
    from modelnet_p2p.proto.infer import Request, parse_message

    plain = Request(request_id=b"1" * 16, capability="echo")
    assert "tok" not in plain.to_wire()  # no token, no key: the bytes of r5 are unchanged
    with_token = Request(request_id=b"1" * 16, capability="echo", token="abc")
    wire = with_token.to_wire()
    assert wire["tok"] == "abc" and parse_message(wire) == with_token
    assert parse_message({**wire, "tok": None}) == plain
    for bad in ("", 5, b"abc", "x" * 8193):
        with pytest.raises(ProtocolError, match="tok"):
            parse_message({**wire, "tok": bad})


def test_cli_serve_require_token_and_ask_token(tmp_path: Path) -> None:
    from cli_util import background, clean_env, modelnet, read_event

    assert modelnet("id", "--identity", "issuer.key", cwd=tmp_path).returncode == 0
    assert modelnet("id", "--identity", "me.key", cwd=tmp_path).returncode == 0
    issuer = modelnet("id", "--identity", "issuer.key", cwd=tmp_path).stdout.strip()
    me = modelnet("id", "--identity", "me.key", cwd=tmp_path).stdout.strip()
    card = tmp_path / "card.toml"
    card.write_text(
        '[capability]\nhandler = "modelnet_p2p.demo_models:echo"\nname = "parrot"\naccess = "token"\n'
    )
    with background("serve", str(card), "--json", "--trust", issuer, cwd=tmp_path) as server:
        addr = read_event(server)["addrs"][0]
        ask = ("ask", "parrot", "hi there", "--peer", addr, "-i", "me.key")
        refused = modelnet(*ask, cwd=tmp_path)
        assert refused.returncode == 1 and "no_token" in refused.stderr, refused.stderr
        token = modelnet(
            "token", "issue", "-c", "parrot", "--to", me, "--ttl", "10m", "-i", "issuer.key", cwd=tmp_path
        ).stdout.strip()
        ok = modelnet(*ask, cwd=tmp_path, env=clean_env(MODELNET_TOKEN=token))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.strip() == "hi there"
        stolen = modelnet("ask", "parrot", "hi", "--peer", addr, "--token", token, cwd=tmp_path)
        assert stolen.returncode == 1 and "wrong_audience" in stolen.stderr, stolen.stderr
    usage = modelnet("serve", "modelnet_p2p.demo_models:echo", "--require-token", cwd=tmp_path)
    assert usage.returncode == 2 and "--trust" in usage.stderr

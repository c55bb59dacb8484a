"""Revocation lists distributed (services/revocation.py, specs/token.md "Revocation"): a token
revoked at the issuer is refused by a running provider that trusts the issuer, by gossip and by
polling, without restarting it; forged, older and conflicting lists are ignored. Live peers on
127.0.0.1; the vectors of specs/vectors/revocation.json."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ed25519

from modelnet_p2p import Capability, Identity, Peer
from modelnet_p2p.errors import ProtocolError, UnauthorizedError
from modelnet_p2p.p2p.network import topic
from modelnet_p2p.proto.envelope import seal_body
from modelnet_p2p.proto.packing import canonical_packb
from modelnet_p2p.proto.token import (
    REVOCATION_FORMAT,
    Caveats,
    inspect_token,
    issue_token,
    open_revocations,
    peek_revocations,
    seal_revocations,
)
from modelnet_p2p.services.access import AccessControl, unauthorized_reason, using_token
from modelnet_p2p.services.revocation import RevocationService, revocation_topic

VECTORS = Path(__file__).resolve().parent.parent / "specs" / "vectors" / "revocation.json"
#: Generous bound on how long a revocation may take to reach a provider (behaviour, not timing).
BOUND = 30.0


def key(identity: Identity) -> bytes:
    return identity.key_pair.private_key.to_bytes()[:32]


def token_for(issuer: Identity, audience: str) -> str:
    now = time.time()
    return issue_token(
        key(issuer), audience=audience, capabilities=["secret"], not_before=now - 60, expires=now + 3600,
        caveats=Caveats(), nonce=secrets.token_bytes(16),
    )  # fmt: skip


def serve_secret(peer: Peer) -> None:
    async def echo(request):  # type: ignore[no-untyped-def]
        yield "ok"

    peer.serve(Capability(name="secret", task="tool", access="token"), echo)


async def reason_of(client: Peer, target: str, token: str) -> str | None:
    with using_token(token):
        try:
            await client.call(target, "secret", "x", timeout=20)
        except UnauthorizedError as exc:
            return unauthorized_reason(exc)
    return None


def forged_list(claimed: Identity, signer: Identity, ids: list[str], seq: int) -> bytes:
    """A list that names ``claimed`` as its issuer but is signed by ``signer``."""
    body = canonical_packb({"iss": str(claimed.peer_id), "seq": seq, "at": 1, "ids": sorted(ids)})
    return seal_body(REVOCATION_FORMAT, body, signer)


def write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def wait_for(predicate: Any, bound: float = BOUND) -> float:
    """Seconds until ``predicate()`` (an awaitable-returning callable) holds, within ``bound``."""
    start = trio.current_time()
    with trio.fail_after(bound):
        while not await predicate():
            await trio.sleep(0.1)
    return trio.current_time() - start


# -- gossip --------------------------------------------------------------------------------------


async def test_revoked_at_the_issuer_refused_by_gossip_and_forged_or_older_lists_ignored(
    tmp_path: Path,
) -> None:
    issuer_id, mallory_id = Identity.generate(), Identity.generate()
    iss = str(issuer_id.peer_id)
    revoked = tmp_path / "revoked.list"
    write_atomically(revoked, seal_revocations(issuer_id, [], seq=0, issued=1))
    async with (
        Peer(identity=issuer_id, revocations=[str(revoked)]) as issuer,
        Peer(trust=[iss]) as provider,
        Peer() as alice,
        Peer() as mallory,
    ):
        started = trio.current_time()
        provider.revocation.polling = False  # gossip only
        serve_secret(provider)
        target = provider.addrs[0]
        await provider.connect(issuer.addrs[0])
        await mallory.connect(provider.addrs[0])
        where = revocation_topic(iss, lambda t: topic(t, provider.network))
        assert issuer.availability is not None and mallory.availability is not None
        gi, gm = issuer.availability.gossip, mallory.availability.gossip
        with trio.fail_after(BOUND):  # the provider joined its trusted issuer's topic; a mesh formed
            while provider.peer_id not in gi.subscribers(where) or gi.mesh_size(where) == 0:
                await trio.sleep(0.1)
            while provider.peer_id not in gm.subscribers(where):
                await trio.sleep(0.1)
        token = token_for(issuer_id, alice.peer_id)
        assert await reason_of(alice, target, token) is None

        # the issuer revokes: it re-reads its file (every 5 s) and publishes the new list
        ids = list(inspect_token(token).revocation_ids)
        write_atomically(revoked, seal_revocations(issuer_id, ids, seq=1, issued=2))
        took = await wait_for(lambda: _is(reason_of(alice, target, token), "revoked"))
        print(f"revocation reached the provider by gossip in {took:.2f} s (file re-read every 5 s)")
        assert provider.revocation.stats.get("taken_gossip", 0) >= 1
        assert provider.revocation.seq_of(iss) == 1 and provider.inference.access.revocation_seq(iss) == 1

        # a second revocation, the issuer woken at once (no wait for its file check): gossip alone
        second = token_for(issuer_id, alice.peer_id)
        assert await reason_of(alice, target, second) is None
        ids += list(inspect_token(second).revocation_ids)
        write_atomically(revoked, seal_revocations(issuer_id, ids, seq=2, issued=3))
        issuer.revocation.poke()
        took = await wait_for(lambda: _is(reason_of(alice, target, second), "revoked"))
        print(f"... and in {took:.2f} s with the issuer's file check woken at once")
        assert provider.revocation.seq_of(iss) == 2

        # mallory gossips a list in the issuer's name, signed with its own key, that un-revokes
        refused = dict(provider.revocation.stats)
        await gm.publish(where, forged_list(issuer_id, mallory_id, [], seq=5))
        # ... and an older list of the issuer's own (seq 1, nothing revoked; a copy of one
        # it had heard would be dropped by gossip as already seen: message ids are content digests)
        await gm.publish(where, seal_revocations(issuer_id, [], seq=1, issued=7))
        await gm.publish(where, seal_revocations(mallory_id, [], seq=9, issued=1))  # another issuer's

        async def all_refused() -> bool:
            s = provider.revocation.stats
            return (
                s.get("refused_invalid", 0) > refused.get("refused_invalid", 0)
                and s.get("refused_stale", 0) > refused.get("refused_stale", 0)
                and s.get("refused_issuer", 0) > refused.get("refused_issuer", 0)
            )

        await wait_for(all_refused)
        assert await reason_of(alice, target, token) == "revoked"
        assert provider.revocation.seq_of(iss) == 2
        # the loops wake every 5 s (or when poked), polling or not: no busy loop
        elapsed = trio.current_time() - started
        for p in (issuer, provider, alice, mallory):
            assert p.revocation.rounds <= elapsed / 5 + 5, (p.revocation.rounds, elapsed)


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


# -- polling -------------------------------------------------------------------------------------


async def test_revoked_at_the_issuer_refused_by_polling_without_gossip(tmp_path: Path) -> None:
    issuer_id = Identity.generate()
    iss = str(issuer_id.peer_id)
    revoked = tmp_path / "revoked.list"
    async with (
        Peer(identity=issuer_id, revocations=[str(revoked)], gossip=False) as issuer,
        Peer(trust=[iss], gossip=False) as provider,
        Peer(gossip=False) as alice,
    ):
        provider.revocation.poll_interval = 1.0
        provider.revocation.poke()
        serve_secret(provider)
        target = provider.addrs[0]
        await provider.connect(issuer.addrs[0])
        token = token_for(issuer_id, alice.peer_id)
        assert await reason_of(alice, target, token) is None
        write_atomically(
            revoked, seal_revocations(issuer_id, inspect_token(token).revocation_ids, seq=3, issued=2)
        )
        took = await wait_for(lambda: _is(reason_of(alice, target, token), "revoked"))
        print(f"revocation reached the provider by polling (every 1 s) in {took:.2f} s")
        assert provider.revocation.stats.get("taken_poll", 0) == 1
        assert issuer.revocation.stats.get("answered", 0) >= 1
        # the issuer rewrites an older list: the provider keeps the newer one
        write_atomically(revoked, seal_revocations(issuer_id, [], seq=2, issued=3))
        await trio.sleep(2.5)
        assert await reason_of(alice, target, token) == "revoked"
        assert provider.revocation.seq_of(iss) == 3


async def test_cli_revoke_publishes_to_a_running_provider(tmp_path: Path) -> None:
    from functools import partial

    from cli_util import modelnet

    issuer_key = tmp_path / "issuer.key"
    issuer_id = Identity.load_or_create(str(issuer_key))
    iss = str(issuer_id.peer_id)
    async with Peer(trust=[iss]) as provider, Peer() as alice:
        provider.revocation.polling = False  # gossip only (the CLI's peer is gone at once)
        serve_secret(provider)
        target = provider.addrs[0]
        token = token_for(issuer_id, alice.peer_id)
        assert await reason_of(alice, target, token) is None
        run = partial(
            modelnet, "token", "revoke", token, "-i", str(issuer_key), "-o", str(tmp_path / "r.list"),
            "--publish", provider.addrs[0],
        )  # fmt: skip
        out = await trio.to_thread.run_sync(run)
        assert out.returncode == 0, out.stderr
        assert "published to 1 peer" in out.stderr
        await wait_for(lambda: _is(reason_of(alice, target, token), "revoked"))
        assert provider.revocation.stats.get("taken_gossip", 0) == 1


# -- sans network ----------------------------------------------------------------------------


def test_holding_rule() -> None:
    issuer, mallory = Identity.generate(), Identity.generate()
    iss = str(issuer.peer_id)
    access = AccessControl(trusted=[iss])
    svc = RevocationService(access)
    v1 = seal_revocations(issuer, ["ab" * 64], seq=1, issued=1)
    assert svc.offer(v1, "test") is True and access.revoked == {"ab" * 64}
    assert svc.offer(v1, "test") is None  # the same list again: nothing changes
    assert svc.offer(seal_revocations(issuer, [], seq=0, issued=2), "test") is False  # older
    assert svc.offer(seal_revocations(issuer, ["cd" * 64], seq=1, issued=2), "test") is False  # same seq
    assert svc.offer(forged_list(issuer, mallory, [], seq=7), "test") is False
    assert svc.offer(b"\x00junk", "test") is False
    assert svc.offer(seal_revocations(mallory, [], seq=1, issued=1), "test", issuer=iss) is False
    assert access.revoked == {"ab" * 64}
    # a held list of an untrusted issuer is kept (and served) but not applied
    assert svc.offer(seal_revocations(mallory, ["ef" * 64], seq=1, issued=1), "test") is True
    assert access.revoked == {"ab" * 64} and svc.seq_of(str(mallory.peer_id)) == 1
    # the access control itself never goes back either
    access.add_revocations(seal_revocations(issuer, [], seq=0, issued=3))
    assert access.revoked == {"ab" * 64}
    assert svc.offer(seal_revocations(issuer, [], seq=2, issued=3), "test") is True
    assert access.revoked == frozenset()


async def test_a_list_held_before_its_issuer_is_trusted_applies_once_trusted(tmp_path: Path) -> None:
    issuer = Identity.generate()
    big = tmp_path / "big.list"
    big.write_bytes(b"\x00" * (REVOCATION_FORMAT.max_size + 1))
    async with Peer(revocations=[str(big)]) as peer:
        assert peer.revocation.offer(seal_revocations(issuer, ["ab" * 64], seq=1, issued=1), "test")
        assert peer.inference.access.revoked == frozenset()  # held, not trusted: not applied
        peer.inference.access.trust(str(issuer.peer_id))
        peer.revocation.poke()
        with trio.fail_after(BOUND):
            while peer.inference.access.revoked != {"ab" * 64}:
                await trio.sleep(0.05)
        assert peer.revocation.held.keys() == {str(issuer.peer_id)}  # the oversized file: skipped


def seeded(label: str) -> Identity:
    seed = hashlib.sha256(label.encode()).digest()
    return Identity(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def build_vectors() -> dict[str, Any]:
    """The content of specs/vectors/revocation.json (Ed25519 signatures are deterministic)."""
    labels = {n: f"modelnet revocation vector: {n}" for n in ("issuer", "mallory")}
    issuer, mallory = seeded(labels["issuer"]), seeded(labels["mallory"])
    a, b = "ab" * 64, "cd" * 64

    def valid(name: str, ids: list[str], seq: int, at: int) -> dict[str, Any]:
        data = seal_revocations(issuer, ids, seq=seq, issued=at)
        return {"name": name, "valid": True, "ids": sorted(ids), "seq": seq, "at": at, "envelope": data.hex()}

    lists = [
        valid("seq1", [a], 1, 1_796_000_000),
        valid("seq2", [a, b], 2, 1_796_000_100),
        valid("seq1_other_ids", [b], 1, 1_796_000_050),
        valid("seq0_empty", [], 0, 1_795_999_000),
        {
            "name": "forged_seq9",
            "valid": False,
            "why": "names the issuer, signed by mallory",
            "envelope": forged_list(issuer, mallory, [], seq=9).hex(),
        },
    ]
    holding = [
        {"offer": "seq1", "result": "taken", "held_seq": 1},
        {"offer": "seq1", "result": "same", "held_seq": 1},
        {"offer": "seq1_other_ids", "result": "refused", "held_seq": 1},
        {"offer": "seq0_empty", "result": "refused", "held_seq": 1},
        {"offer": "forged_seq9", "result": "refused", "held_seq": 1},
        {"offer": "seq2", "result": "taken", "held_seq": 2},
        {"offer": "seq1", "result": "refused", "held_seq": 2},
    ]
    return {
        "description": (
            "Revocation list vectors (specs/token.md, Revocation). Keys are Ed25519 seeds = SHA-256 "
            "of the labels. 'lists': envelopes in hex; valid ones decode to ids/seq/at. 'holding': "
            "lists offered in this order to a peer that trusts the issuer, and what it does."
        ),
        "keys": {
            n: {"seed_label": labels[n], "peer_id": str(k.peer_id)}
            for n, k in (("issuer", issuer), ("mallory", mallory))
        },
        "topic": revocation_topic(str(issuer.peer_id)),
        "lists": lists,
        "holding": holding,
    }


def test_vectors_file_is_current() -> None:
    assert json.loads(VECTORS.read_text()) == json.loads(json.dumps(build_vectors()))


def test_vectors() -> None:
    vec = json.loads(VECTORS.read_text())
    keys = {name: seeded(k["seed_label"]) for name, k in vec["keys"].items()}
    for name, k in vec["keys"].items():
        assert str(keys[name].peer_id) == k["peer_id"]
    issuer = vec["keys"]["issuer"]["peer_id"]
    assert revocation_topic(issuer) == vec["topic"]
    for case in vec["lists"]:
        data = bytes.fromhex(case["envelope"])
        if case["valid"]:
            rl = open_revocations(data, {issuer})
            assert (rl.issuer, rl.seq, sorted(rl.ids)) == (issuer, case["seq"], case["ids"]), case["name"]
            assert data == seal_revocations(keys["issuer"], case["ids"], seq=case["seq"], issued=case["at"])
        else:
            with pytest.raises(ProtocolError):
                peek_revocations(data)
    # the holding rule, step by step
    svc = RevocationService(AccessControl(trusted=[issuer]))
    envelopes = {c["name"]: bytes.fromhex(c["envelope"]) for c in vec["lists"]}
    for step in vec["holding"]:
        got = svc.offer(envelopes[step["offer"]], "vector")
        assert {True: "taken", None: "same", False: "refused"}[got] == step["result"], step
        assert svc.seq_of(issuer) == step["held_seq"], step


if __name__ == "__main__":  # regenerate the vectors: python tests/test_token_revocation.py
    VECTORS.write_text(json.dumps(build_vectors(), indent=1) + "\n")

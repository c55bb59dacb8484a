"""Reputation without a chain (issue 12): the score, its file, the operator's lists, and routing
and ``modelnet status`` using them."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import trio

from modelnet_p2p import Capability, Config, ConfigError, Identity, Peer, PeerConfig, UnavailableError
from modelnet_p2p.cli.status import reputation_rows, reputation_table
from modelnet_p2p.config import load_config
from modelnet_p2p.errors import ProtocolError
from modelnet_p2p.mesh.reputation import (
    HALF_LIFE,
    MAX_FILE_BYTES,
    WEIGHTS,
    PeerLists,
    Reputation,
    reputation_path,
)
from modelnet_p2p.mesh.routing import Candidate, Router
from modelnet_p2p.mesh.shared_reputation import HEARSAY_TTL, SharedReputation
from modelnet_p2p.mesh.shared_reputation import MAX_WEIGHT as MAX_WEIGHT_SHARED
from modelnet_p2p.p2p.network import topic
from modelnet_p2p.proto.packing import packb
from modelnet_p2p.proto.peerid import peer_id_bytes
from modelnet_p2p.proto.reputation import MAX_ENTRIES, MAX_EVIDENCE, MAX_MESSAGE_BYTES, decode, encode
from modelnet_p2p.proto.reputation import TOPIC as REPUTATION_TOPIC
from modelnet_p2p.testing import open_peers


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# -- the score ----------------------------------------------------------------------------


def test_trust_starts_at_one_and_falls_by_the_weight_of_each_event():
    rep = Reputation(clock=Clock())
    assert rep.trust("a") == 1.0 and "a" not in rep
    rep.record("a", "success")
    assert rep.trust("a") == 1.0
    rep.record("a", "rejected")
    assert rep.trust("a") == pytest.approx(2 / (2 + WEIGHTS["rejected"]))
    rep.record("b", "error")
    rep.record("c", "stall")
    assert rep.trust("c") < rep.trust("b") < 1.0  # a stall costs more than an error
    assert rep.counts("a") == {"success": 1, "rejected": 1}
    with pytest.raises(ValueError, match="unknown reputation event"):
        rep.record("a", "gossip")


def test_scores_decay_on_the_injected_clock():
    clock = Clock()
    rep = Reputation(clock=clock)
    for _ in range(4):
        rep.record("a", "error")
    low = rep.trust("a")
    clock.t += HALF_LIFE
    assert rep.trust("a") == pytest.approx(1 / (1 + 2))  # half of 4 errors: 2
    clock.t += 10 * HALF_LIFE
    assert rep.trust("a") > 0.99 > low  # forgiven in the end
    assert rep.counts("a")["error"] == 4  # the counts shown stay as they were


def test_at_most_max_peers_are_remembered_least_recently_seen_first_out():
    rep = Reputation(clock=Clock(), max_peers=3)
    for pid in ("a", "b", "c"):
        rep.record(pid, "error")
    rep.record("a", "success")  # a is seen again
    rep.record("d", "error")
    assert len(rep) == 3 and "b" not in rep and {"a", "c", "d"} <= {r["peer_id"] for r in rep.snapshot()}


def test_the_file_round_trips_atomically_beside_the_key(tmp_path):
    key = tmp_path / "peer.key"
    path = reputation_path(key)
    assert path == tmp_path / "peer.key.reputation.json"
    assert reputation_path(None) is None
    clock = Clock()
    rep = Reputation(path, clock=clock)
    rep.record("a", "stall")
    rep.record("b", "success")
    assert rep.dirty
    rep.save()
    assert not rep.dirty
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peer.key.reputation.json"]  # no temp file left
    again = Reputation(path, clock=clock)
    assert again.trust("a") == pytest.approx(rep.trust("a"))
    assert again.counts("a") == {"stall": 1} and again.trust("b") == 1.0


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xffnot json",
        b'{"version": 99, "peers": {}}',
        b'{"version": 1, "peers": []}',
        b"[1, 2, 3]",
        b'{"version": 1, "peers": {"a": {"good": "x", "bad": 1, "at": 0}}}',
    ],
)
def test_a_corrupt_file_is_ignored_and_replaced_on_the_next_save(tmp_path, content, caplog):
    path = tmp_path / "k.reputation.json"
    path.write_bytes(content)
    rep = Reputation(path, clock=Clock())
    assert len(rep) == 0
    rep.record("a", "error")
    rep.save()
    assert "a" in json.loads(path.read_text())["peers"]


def test_a_file_with_some_bad_entries_keeps_the_good_ones_and_an_oversized_one_is_not_read(tmp_path):
    path = tmp_path / "k.reputation.json"
    peers = {"good": {"good": 1, "bad": 3, "at": 1.0, "n": {"error": 3, "bogus": 1}}, "bad": {"good": None}}
    path.write_text(json.dumps({"version": 1, "peers": peers}))
    rep = Reputation(path, clock=Clock(1.0))
    assert "bad" not in rep and rep.counts("good") == {"error": 3}
    assert rep.trust("good") == pytest.approx(0.4)
    path.write_bytes(b" " * (MAX_FILE_BYTES + 1))
    assert len(Reputation(path, clock=Clock())) == 0


# -- the operator's lists and routing ------------------------------------------------------


def cands(*ids: str) -> list[Candidate]:
    return [Candidate(peer_id=i, state="ready", max_concurrency=8) for i in ids]


def test_routing_never_chooses_a_blocked_peer_prefers_a_pinned_one_and_keeps_to_the_allow_list():
    rep = Reputation(lists=PeerLists.of(block=["bad"]))
    router = Router(rng=random.Random(1), reputation=rep)
    assert Counter(router.choose(cands("bad", "ok")).peer_id for _ in range(50)) == {"ok": 50}
    assert router.choose(cands("bad")) is None
    router.reputation.lists = PeerLists.of(pin=["p"])
    for _ in range(5):
        router.started("p")  # the pinned one is busier, and still chosen while it has room
    assert {router.choose(cands("p", "x", "y")).peer_id for _ in range(30)} == {"p"}
    router.reputation.lists = PeerLists.of(allow=["x"])
    assert {router.choose(cands("p", "x", "y")).peer_id for _ in range(30)} == {"x"}


def test_a_distrusted_provider_loses_every_policy():
    rep = Reputation(clock=Clock())
    for policy in ("p2c", "least-loaded", "lowest-latency"):
        router = Router(policy, rng=random.Random(2), reputation=rep)
        for pid in ("a", "b"):
            router.observe_rtt(pid, 5.0)
        rep.record("a", "rejected")
        picks = Counter(router.choose(cands("a", "b")).peer_id for _ in range(20))
        assert picks == {"b": 20}, (policy, picks)
    assert router.snapshot()["a"]["trust"] < 1.0


def test_config_lists_and_timeouts_come_from_file_and_environment(tmp_path):
    f = tmp_path / "modelnet.toml"
    f.write_text('[routing]\nblock_peers = ["12D3KooWbad"]\npin_peers = ["12D3KooWpin"]\nstall_timeout = 5\n')
    cfg, sources = load_config(f, env={"MODELNET_ALLOW_PEERS": "12D3KooWa, 12D3KooWb"})
    assert cfg.block_peers == ["12D3KooWbad"] and cfg.pin_peers == ["12D3KooWpin"]
    assert cfg.allow_peers == ["12D3KooWa", "12D3KooWb"] and sources["allow_peers"] == "environment"
    pc = cfg.peer_config()
    assert pc.stall_timeout == 5.0 and pc.request_timeout == Config.request_timeout
    with pytest.raises(ConfigError, match="stall_timeout"):
        PeerConfig(stall_timeout=60, request_timeout=10).check()
    with pytest.raises(ConfigError, match="request_timeout"):
        load_config(env={"MODELNET_REQUEST_TIMEOUT": "0"})


# -- live peers ------------------------------------------------------------------------------


async def test_scores_persist_across_restarts_and_routing_uses_them(tmp_path):
    async def broken(request):
        raise UnavailableError("no weights")

    async def fine(request):
        return "fine"

    key = tmp_path / "caller.key"
    async with open_peers(3, gossip=False) as (boot, bad, ok):
        bad.serve(Capability(name="job"), broken)
        ok.serve(Capability(name="job"), fine)
        for p in (bad, ok):
            await p.announce()
        async with Peer(identity=key, bootstrap=[boot.addrs[0]], gossip=False) as caller:
            caller.router.observe_rtt(bad.peer_id, 0.1)  # make the broken one look best
            caller.router.observe_rtt(ok.peer_id, 50.0)
            resp = await caller.call(capability="job", timeout=20)
            assert resp.value == "fine" and resp.attempts[0]["peer"] == bad.peer_id
            trust = caller.reputation.trust(bad.peer_id)
            assert trust < 1.0
        path = reputation_path(key)
        assert path is not None and path.exists()
        async with Peer(identity=key, bootstrap=[boot.addrs[0]], gossip=False) as again:
            assert again.reputation.trust(bad.peer_id) == pytest.approx(trust, rel=1e-3)
            assert again.reputation.counts(bad.peer_id) == {"error": 1}
            # the ban did not survive the restart; the score did, and routing uses it
            again.router.observe_rtt(bad.peer_id, 5.0)
            again.router.observe_rtt(ok.peer_id, 5.0)
            for _ in range(5):
                resp = await again.call(capability="job", timeout=20)
                assert [a["peer"] for a in resp.attempts] == [ok.peer_id]
            rows = reputation_rows(again)
            assert rows[0]["peer_id"] == bad.peer_id and rows[0]["error"] == 1
            from rich.console import Console

            console = Console(record=True, width=160)
            console.print(reputation_table(rows))
            assert bad.peer_id[-8:] in console.export_text()
    path.write_bytes(b"garbage")  # a corrupt file does not stop the peer
    async with Peer(identity=key, gossip=False) as third:
        assert len(third.reputation) == 0


async def test_a_blocked_provider_gets_no_routed_call_and_a_pinned_one_gets_them_all():
    counts: Counter[str] = Counter()

    def handler(name: str):
        async def answer(request):
            counts[name] += 1
            return name

        return answer

    async with open_peers(3, gossip=False) as (boot, p1, p2):
        for name, p in (("p1", p1), ("p2", p2)):
            p.serve(Capability(name="job"), handler(name))
            await p.announce()
        async with Peer(bootstrap=[boot.addrs[0]], gossip=False, block_peers=[p1.peer_id]) as caller:
            for _ in range(6):
                assert (await caller.call(capability="job", timeout=20)).value == "p2"
            assert caller.reputation.lists.label(p1.peer_id) == "blocked"
            assert any(r["list"] == "blocked" for r in reputation_rows(caller))
        async with Peer(bootstrap=[boot.addrs[0]], gossip=False, pin_peers=[p1.peer_id]) as caller:
            caller.router.observe_rtt(p1.peer_id, 80.0)  # slower, and still preferred
            caller.router.observe_rtt(p2.peer_id, 1.0)
            for _ in range(6):
                assert (await caller.call(capability="job", timeout=20)).value == "p1"
        assert counts == {"p2": 6, "p1": 6}


# -- shared reputation (optional, off by default) -------------------------------------------


def some_peer_ids(n: int) -> list[str]:
    return [str(Identity.generate(ephemeral=True).peer_id) for _ in range(n)]


def test_shared_messages_round_trip_and_refuse_what_breaks_the_limits():
    a, b = some_peer_ids(2)
    assert decode(encode([(a, 0.25, 7), (b, 1.0, 70000), ("not-a-peer-id", 0.5, 1)])) == [
        (a, 0.25, 7),
        (b, 1.0, MAX_EVIDENCE),
    ]
    too_many = packb({"v": 1, "s": [[peer_id_bytes(a), 1, 1]] * (MAX_ENTRIES + 1)})
    for bad in (
        b"\xc1",
        packb({"v": 2, "s": []}),
        packb({"v": 1, "s": [[peer_id_bytes(a), 1001, 1]]}),
        packb({"v": 1, "s": [[a, 1, 1]]}),
        packb({"v": 1, "s": [[peer_id_bytes(a), True, 1]]}),
        too_many,
        b"\x00" * (MAX_MESSAGE_BYTES + 1),
    ):
        with pytest.raises(ProtocolError):
            decode(bad)


class Msg:
    def __init__(self, origin: str, data: bytes) -> None:
        self.origin, self.data = peer_id_bytes(origin), data


def test_hearsay_counts_only_from_sharers_this_peer_has_used_and_never_outweighs_its_own():
    me, sharer, sybil, subject = some_peer_ids(4)
    clock = Clock()
    rep = Reputation(clock=clock)
    shared = SharedReputation(rep, me, interval=60.0, clock=clock)
    bad_news = encode([(subject, 0.0, 50), (sharer, 1.0, 50), (me, 0.0, 50)])
    assert shared.validate(Msg(sybil, bad_news))  # well-formed: taken and forwarded...
    assert rep.trust(subject) == 1.0  # ...but a stranger's word weighs nothing
    rep.record(sharer, "success")  # this peer has had an answer from the sharer
    assert shared.validate(Msg(sharer, bad_news))
    # one fully trusted sharer whose score rests on enough outcomes weighs one outcome here
    assert rep.trust(subject) == pytest.approx(0.5)
    other = some_peer_ids(1)[0]
    for name in (other, *some_peer_ids(3)):
        rep.record(name, "success")
        shared.validate(Msg(name, encode([(subject, 0.0, 50)])))
    # five trusted sharers: their weights add up to at most MAX_WEIGHT
    assert rep.trust(subject) == pytest.approx(1 - MAX_WEIGHT_SHARED / (MAX_WEIGHT_SHARED + 1))
    assert rep.trust(me) == 1.0 and rep.evidence(sharer) == (1.0, 1)  # nothing about itself or me
    for _ in range(20):
        rep.record(subject, "success")  # what this peer measures soon outweighs hearsay
    assert rep.trust(subject) > 0.9
    assert not shared.validate(Msg(sharer, bad_news))  # a second message within interval / 2
    assert not shared.validate(Msg(sharer, b"junk"))
    clock.t += HEARSAY_TTL + 1
    assert shared.hearsay(subject) is None  # what was said expires
    message = shared.message()
    assert message is not None and {sharer, subject, other} <= {pid for pid, _, _ in decode(message)}


async def test_scores_shared_over_gossip_reach_a_peer_that_trusts_the_sharer():
    subject = some_peer_ids(1)[0]

    async def answer(request):
        return "ok"

    async with open_peers(2, share_reputation=True) as (sharer, caller):
        assert caller.shared_reputation is not None and sharer.shared_reputation is not None
        sharer.serve(Capability(name="job"), answer)
        assert (await caller.call(sharer.addrs[0], "job", timeout=20)).value == "ok"
        for _ in range(10):
            sharer.reputation.record(subject, "rejected")
        where = topic(REPUTATION_TOPIC, sharer.network)
        gossip = sharer.availability.gossip
        with trio.fail_after(30):
            while caller.reputation.trust(subject) == 1.0:
                await sharer.shared_reputation.publish(gossip, where)
                await trio.sleep(0.3)
        assert caller.reputation.trust(subject) < 0.6
        assert subject not in caller.reputation  # hearsay only: nothing measured here
    async with open_peers(1) as (plain,):
        assert plain.shared_reputation is None  # off by default

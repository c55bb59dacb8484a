"""The router's bookkeeping, without a network (the network tests are in test_routing.py)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from modelnet_p2p.mesh.routing import BAN_BASE, BAN_MAX, Candidate, Router


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cands(n: int, **kw) -> list[Candidate]:
    return [Candidate(peer_id=f"p{i}", state="ready", max_concurrency=32, **kw) for i in range(n)]


def test_p2c_spreads_load_without_herding():
    router = Router("p2c", rng=random.Random(1))
    pool = cands(3)
    counts: Counter[str] = Counter()
    for _ in range(60):  # 60 concurrent requests: each pick adds to local in-flight
        c = router.choose(pool)
        assert c is not None
        router.started(c.peer_id)
        counts[c.peer_id] += 1
    assert max(counts.values()) <= 30
    assert set(counts) == {"p0", "p1", "p2"}


def test_at_capacity_and_not_ready_are_skipped():
    router = Router("least-loaded")
    pool = [
        Candidate("busy", state="ready", in_flight=4, max_concurrency=4),
        Candidate("draining", state="draining", max_concurrency=4),
        Candidate("leaving", state="leaving", max_concurrency=4),
        Candidate("ok", state="ready", in_flight=3, max_concurrency=4),
    ]
    assert router.choose(pool).peer_id == "ok"
    router.started("ok")
    assert router.choose(pool) is None  # "ok" is now at capacity too


def test_bans_double_and_clear_on_success():
    clock = Clock()
    router = Router(clock=clock)
    assert router.failure("p0") == BAN_BASE
    assert router.banned("p0")
    assert router.choose(cands(1)) is None
    clock.now += BAN_BASE + 0.1
    assert not router.banned("p0")
    assert router.failure("p0") == 2 * BAN_BASE
    assert router.failure("p0") == 4 * BAN_BASE
    for _ in range(10):
        router.failure("p0")
    assert router.ban_remaining("p0") == pytest.approx(BAN_MAX)
    router.success("p0")
    assert not router.banned("p0")
    assert router.failure("p0") == BAN_BASE


def test_exclude_and_unknown_state_ranked_after_ready():
    router = Router("least-loaded")
    pool = [
        Candidate("new", state=None, max_concurrency=8),
        Candidate("known", state="ready", max_concurrency=8),
    ]
    assert router.choose(pool, exclude={"known"}).peer_id == "new"
    # p2c with two choices prefers the peer whose gossip says ready
    p2c = Router("p2c", rng=random.Random(0))
    assert all(p2c.choose(pool).peer_id == "known" for _ in range(20))


def test_lowest_latency_policy_and_rtt_average():
    router = Router("lowest-latency")
    pool = cands(3)
    router.observe_rtt("p1", 5.0)
    router.observe_rtt("p2", 50.0)
    assert router.choose(pool).peer_id == "p1"
    for _ in range(20):
        router.observe_rtt("p1", 100.0)
    assert router.rtt("p1") > 90
    assert router.choose(pool).peer_id == "p2"


def test_user_policy_and_unknown_policy():
    router = Router(lambda pool, r: sorted(pool, key=lambda c: c.peer_id)[-1])
    assert router.choose(cands(3)).peer_id == "p2"
    with pytest.raises(ValueError, match="unknown routing policy"):
        Router("fastest-please")


def test_overloaded_skips_briefly_without_failure():
    clock = Clock()
    router = Router(clock=clock)
    router.overloaded("p0")
    assert router.banned("p0")
    clock.now += 1.1
    assert not router.banned("p0")
    assert router.snapshot()["p0"]["failures"] == 0

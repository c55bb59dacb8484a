"""The router's bookkeeping and the provider list, without a network (network tests: test_routing.py)."""

from __future__ import annotations

import random
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from modelnet_p2p.mesh.providers import PROVIDER_CACHE_TTL, Providers
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


async def test_bans_run_on_trios_clock(mock_clock):
    """Without an injected clock the router reads trio's, so a mock clock drives the backoff."""
    mock_clock.autojump_threshold = 0
    router = Router()
    assert router.failure("p0") == BAN_BASE
    await trio.sleep(BAN_BASE - 1)
    assert router.banned("p0")
    await trio.sleep(1.1)
    assert not router.banned("p0")
    assert router.failure("p0") == 2 * BAN_BASE  # consecutive failures still double
    await trio.sleep(2 * BAN_BASE + 0.1)
    assert not router.banned("p0")


def test_policy_for_one_choice():
    router = Router("p2c", rng=random.Random(3))
    pool = cands(3)
    router.observe_rtt("p2", 1.0)
    router.observe_rtt("p0", 80.0)
    router.observe_rtt("p1", 90.0)
    assert all(router.choose(pool, policy="lowest-latency").peer_id == "p2" for _ in range(10))
    with pytest.raises(ValueError, match="unknown routing policy"):
        router.choose(pool, policy="nope")


# -- providers: cards joined with gossip, without a network ------------------------------------


def card(peer: str, name: str, *, idempotent: bool = False, addrs: tuple[str, ...] = ()) -> Any:
    cap = SimpleNamespace(name=name, idempotent=idempotent, max_concurrency=16)
    return SimpleNamespace(peer_id=peer, capabilities=[cap], dial_addrs=list(addrs))


def entry(names: tuple[str, ...], state: str = "ready", in_flight: int = 0, max_concurrency: int = 0) -> Any:
    record = SimpleNamespace(in_flight=in_flight, queue=1, max_concurrency=max_concurrency)
    return SimpleNamespace(state=state, capabilities=tuple((n, "") for n in names), record=record)


async def test_providers_join_cards_with_gossip_and_cache_cards(mock_clock):
    mock_clock.autojump_threshold = 0
    lookups: list[str] = []
    cards = [
        card("me", "echo"),
        card(
            "a", "Echo", idempotent=True, addrs=("/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/1/p2p/r/p2p-circuit")
        ),
        card("b", "echo"),
    ]
    gossip = {
        "a": entry(("echo",), in_flight=3, max_concurrency=4),
        "b": entry(("echo",), state="draining"),
        "c": entry(("ECHO ",)),  # gossips the capability, but its card was not found
        "d": entry(("other",)),
        "me": entry(("echo",)),
    }

    async def discover(capability: str, timeout: float) -> list[Any]:
        lookups.append(capability)
        return cards

    providers = Providers(discover, lambda: gossip, "me")
    found = {c.peer_id: c for c in await providers.candidates("echo")}
    assert set(found) == {"a", "b", "c"}
    a = found["a"]
    assert (a.state, a.in_flight, a.queue, a.max_concurrency, a.idempotent, a.name) == (
        "ready",
        3,
        1,
        4,
        True,
        "Echo",
    )
    assert a.addrs[0].endswith("/p2p-circuit")  # relayed addresses are dialed first
    assert found["b"].state == "draining" and not found["b"].idempotent
    assert found["c"].addrs == [] and found["c"].card is None
    await providers.candidates("echo")
    assert lookups == ["echo"]  # cached
    await trio.sleep(PROVIDER_CACHE_TTL + 1)
    await providers.candidates("echo")
    assert lookups == ["echo", "echo"]
    await providers.candidates("echo", refresh=True)
    assert len(lookups) == 3
    # a static list gets gossip joined, and nothing added
    given = [Candidate("a", addrs=["/ip4/1.2.3.4/tcp/1/p2p/a"]), Candidate("z")]
    among = {c.peer_id: c for c in providers.among("echo", given)}
    assert set(among) == {"a", "z"} and among["a"].in_flight == 3 and among["z"].state is None
    assert given[0].in_flight == 0  # the caller's candidates are not changed


def test_a_candidate_copy_is_the_candidate_with_its_own_address_list():
    from dataclasses import replace

    c = Candidate("a", addrs=["/ip4/1.2.3.4/tcp/1/p2p/a"], state="ready", in_flight=2, queue=1,
                  max_concurrency=4, idempotent=True, card=object(), name="Echo", load_at=5.0)  # fmt: skip
    copy = c.copy()
    assert copy == replace(c, addrs=list(c.addrs)) and copy is not c
    copy.addrs.append("/ip4/5.6.7.8/tcp/1")
    copy.in_flight = 9
    assert c.addrs == ["/ip4/1.2.3.4/tcp/1/p2p/a"] and c.in_flight == 2


async def test_a_static_list_looks_each_provider_up_in_gossip_without_reading_the_table():
    gossip = {"a": entry(("echo",), in_flight=3, max_concurrency=4), "me": entry(("echo",))}
    gossip["a"].last_seen = 7.0
    looked_up: list[str] = []

    def table() -> Any:
        raise AssertionError("the whole table was read")

    def one(peer_id: str) -> Any:
        looked_up.append(peer_id)
        return gossip.get(peer_id)

    async def discover(capability: str, timeout: float) -> list[Any]:
        return []

    providers = Providers(discover, table, "me", gossip_entry=one)
    given = [Candidate("a", addrs=["/ip4/1.2.3.4/tcp/1/p2p/a"]), Candidate("z"), Candidate("me")]
    found = {c.peer_id: c for c in providers.among("echo", given)}
    assert looked_up == ["a", "z"]  # once each, and never this peer's own entry
    a = found["a"]
    assert (a.state, a.in_flight, a.queue, a.max_concurrency, a.load_at) == ("ready", 3, 1, 4, 7.0)
    assert found["z"].state is None and found["me"].state is None
    assert given[0].in_flight == 0 and given[0].state is None  # the caller's candidates are not changed
    # the same candidates as joining the table gives
    joined = {c.peer_id: c for c in Providers(discover, lambda: gossip, "me").among("echo", given)}
    assert joined == found


# -- load hints from answers (specs/inference.md, "load") ----------------------------------------

from modelnet_p2p.mesh.routing import LOAD_HINT_TTL  # noqa: E402
from modelnet_p2p.proto.infer import Load  # noqa: E402


def test_a_load_hint_routes_away_from_a_busy_provider_without_gossip():
    router = Router("p2c", rng=random.Random(5))
    pool = [Candidate("a"), Candidate("b")]  # no gossip: state and load unknown
    router.observe_load("a", Load(in_flight=3, max_concurrency=4))
    router.observe_load("b", Load(in_flight=0, max_concurrency=4))
    assert all(router.choose(pool).peer_id == "b" for _ in range(20))
    router.observe_load("a", Load(in_flight=4, max_concurrency=4))
    router.observe_load("b", Load(in_flight=4, max_concurrency=4))
    assert router.choose(pool) is None  # both at capacity, as their answers said


def test_the_newer_of_gossip_and_hint_wins():
    clock = Clock()
    router = Router("least-loaded", clock=clock)
    router.observe_load("a", Load(in_flight=7, max_concurrency=8))  # at 1000.0
    older = Candidate("a", state="ready", in_flight=0, max_concurrency=8, load_at=999.0)
    newer = Candidate("a", state="ready", in_flight=1, max_concurrency=8, load_at=1001.0)
    unknown = Candidate("a", state="ready", in_flight=0, max_concurrency=8)
    assert router.load_of(older) == (7, 0, 8, 0)  # the hint is newer than that gossip
    assert router.load_of(newer) == (1, 0, 8, 0)  # gossip newer than the hint
    assert router.load_of(unknown) == (7, 0, 8, 0)  # gossip of unknown age: the live hint
    assert router.load_of(Candidate("z", in_flight=2)) == (2, 0, 0, 0)  # never heard of


def test_a_hint_expires_so_a_busy_provider_is_not_shunned_for_good():
    clock = Clock()
    router = Router("least-loaded", clock=clock)
    pool = [Candidate("a", state="ready", max_concurrency=4), Candidate("b", state="ready", in_flight=2)]
    router.observe_load("a", Load(in_flight=4, max_concurrency=4))
    assert router.choose(pool).peer_id == "b"  # a is full
    clock.now += LOAD_HINT_TTL - 0.1
    assert router.load_hint("a") is not None and router.choose(pool).peer_id == "b"
    clock.now += 0.2
    assert router.load_hint("a") is None  # dropped: back to what gossip says (idle)
    assert router.choose(pool).peer_id == "a"
    assert router.snapshot()["a"]["load_hint"] is None


def test_a_hint_stands_for_other_callers_and_own_requests_count_once():
    router = Router("least-loaded")
    a = Candidate("a", state="ready", max_concurrency=8)
    router.started("a")
    router.started("a")  # two requests of ours running there when the provider answered...
    router.observe_load("a", Load(in_flight=5, max_concurrency=8, own=2))  # ... which it counts
    assert router.load_of(a) == (3, 0, 8, 2)  # three of other callers, two of ours
    router.started("a")
    assert router.load_of(a) == (3, 0, 8, 3)
    for _ in range(3):
        router.finished("a")
    assert router.load_of(a) == (3, 0, 8, 0)  # ours are done; the others stay until a newer hint
    hint = router.snapshot()["a"]["load_hint"]
    assert hint is not None and hint["in_flight"] == 5


def test_answers_read_out_of_order_leave_no_phantom_load():
    """The provider wrote A's end (B still running: ``own`` 1) before B's, but B's is read first."""
    router = Router("least-loaded")
    c = Candidate("a", state="ready", max_concurrency=4)
    router.started("a")
    router.started("a")  # A and B
    router.observe_load("a", Load(in_flight=0, max_concurrency=4, own=0))  # B's end
    router.finished("a")
    router.observe_load("a", Load(in_flight=1, max_concurrency=4, own=1))  # A's end: B counted, as ours
    router.finished("a")
    assert router.load_of(c) == (0, 0, 4, 0)


def test_a_hint_without_own_counts_every_request_in_flight_as_ours():
    router = Router("least-loaded")
    c = Candidate("a", state="ready", max_concurrency=4)
    router.started("a")
    router.started("a")
    router.observe_load("a", Load(in_flight=3, max_concurrency=4))  # an end: 1 of ours, 2 others
    router.finished("a")
    assert router.load_of(c) == (1, 0, 4, 1)  # errs low by the request that ended
    router.observe_load("a", Load(in_flight=0, max_concurrency=4))
    assert router.load_of(c) == (0, 0, 4, 1)  # never below zero


def test_a_hint_without_max_keeps_the_candidates_limit():
    router = Router("least-loaded")
    router.observe_load("a", Load(in_flight=1))
    assert router.load_of(Candidate("a", max_concurrency=2)) == (1, 0, 2, 0)
    assert router.load_score(Candidate("a", max_concurrency=2)) == pytest.approx(1.0)


async def test_providers_date_gossip_so_the_newer_of_gossip_and_hint_wins(mock_clock):
    mock_clock.autojump_threshold = 0
    gossip = {"a": entry(("echo",), in_flight=1, max_concurrency=4)}
    gossip["a"].last_seen = trio.current_time()

    async def discover(capability: str, timeout: float) -> list[Any]:
        return []

    providers = Providers(discover, lambda: gossip, "me")
    router = Router("least-loaded")
    (a,) = await providers.candidates("echo")
    assert a.load_at == trio.current_time()
    await trio.sleep(1)
    router.observe_load("a", Load(in_flight=3, max_concurrency=4))  # an answer, after the record
    assert router.load_of(a) == (3, 0, 4, 0)
    await trio.sleep(1)
    gossip["a"].last_seen = trio.current_time()  # a newer record (same figures)
    (a,) = await providers.candidates("echo")
    assert router.load_of(a) == (1, 1, 4, 0)

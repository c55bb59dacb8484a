"""The peers heard of in lookup answers (``services/discovery/heard.py``): pure, no network."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from modelnet_p2p.services.discovery.heard import HeardPeers


def vouched(heard: HeardPeers, peer_id: str, key_hash: int = 1, now: float = 0) -> None:
    """Two different peers list ``peer_id``: it becomes a seed."""
    heard.note(peer_id, key_hash, "r1", now)
    heard.note(peer_id, key_hash, "r2", now)


def test_a_peer_listed_by_one_peer_only_is_not_a_seed() -> None:
    heard = HeardPeers(ttl=10)
    heard.note("a", 1, "r1", now=0)
    heard.note("a", 1, "r1", now=1)  # the same reporter again
    assert heard.seeds(0, 5, now=1) == []
    heard.note("a", 1, "r2", now=2)
    assert heard.seeds(0, 5, now=2) == ["a"]


def test_a_peer_does_not_vouch_for_itself() -> None:
    heard = HeardPeers(ttl=10)
    heard.note("a", 1, "a", now=0)
    heard.note("a", 1, "r1", now=0)
    assert heard.seeds(0, 5, now=0) == []


def test_seeds_are_the_closest_by_xor() -> None:
    heard = HeardPeers(ttl=10)
    for pid, h in [("far", 0b1000), ("near", 0b0001), ("mid", 0b0100), ("exact", 0b0110)]:
        vouched(heard, pid, h)
    assert heard.seeds(0b0110, 3, now=0) == ["exact", "mid", "near"]
    assert heard.seeds(0, 2, now=0) == ["near", "mid"]


def test_seeds_expire_with_the_addresses_and_return_when_heard_again() -> None:
    heard = HeardPeers(ttl=10)
    vouched(heard, "a")
    assert heard.seeds(0, 1, now=10) == ["a"]
    assert heard.seeds(0, 1, now=10.5) == []
    heard.note("a", 1, "r3", now=11)
    assert heard.seeds(0, 1, now=11) == ["a"]


def test_a_dropped_peer_must_be_vouched_for_again() -> None:
    heard = HeardPeers(ttl=10)
    vouched(heard, "a")
    heard.drop("a")
    heard.drop("never-heard")
    assert "a" not in heard
    heard.note("a", 1, "r1", now=1)
    assert heard.seeds(0, 1, now=1) == []


def test_the_least_recently_heard_go_first_when_full() -> None:
    heard = HeardPeers(ttl=10, limit=3)
    for pid in "abc":
        heard.note(pid, 1, "r1", now=0)
    heard.note("a", 1, "r2", now=1)  # heard again: now the most recent
    heard.note("d", 1, "r1", now=2)
    assert len(heard) == 3
    assert [p for p in "abcd" if p in heard] == ["a", "c", "d"]


def _hash(pid: str) -> int:
    return int(pid[1:]) * 37 % 256


notes = st.lists(
    st.tuples(
        st.sampled_from([f"p{i}" for i in range(12)]),
        st.sampled_from(["r1", "r2", "r3", "p0"]),
        st.floats(0, 100),
    ),
    max_size=60,
)


@given(notes, st.integers(0, 255), st.integers(0, 8), st.floats(0, 120))
def test_seeds_are_bounded_confirmed_fresh_and_ordered(
    events: list[tuple[str, str, float]], target: int, count: int, now: float
) -> None:
    heard = HeardPeers(ttl=30, limit=6)
    reporters: dict[str, set[str]] = {}
    last: dict[str, float] = {}
    for pid, reporter, at in sorted(events, key=lambda e: e[2]):
        heard.note(pid, _hash(pid), reporter, at)
        if reporter != pid:
            reporters.setdefault(pid, set()).add(reporter)
            last[pid] = at
    assert len(heard) <= 6
    seeds = heard.seeds(target, count, now)
    assert len(seeds) <= count and len(set(seeds)) == len(seeds)
    for pid in seeds:
        assert pid in heard
        assert len(reporters[pid]) >= 2  # two different peers listed it
        assert last[pid] >= now - 30
    distances = [_hash(pid) ^ target for pid in seeds]
    assert distances == sorted(distances)

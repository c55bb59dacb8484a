"""The connection manager: trims idle connections to the low watermark, keeps protected ones.

Real peers on 127.0.0.1. ``connection_check_interval`` is an hour in most tests, so that only
the explicit ``connmgr.trim()`` calls (or a new connection over the high mark) trim.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from modelnet_p2p import ConfigError, Peer
from modelnet_p2p.p2p.connmgr import ConnManager, peer_id_of_addr

HOUR = 3600.0
#: The hub's grace period: a connection its own calls just made is not trimmed under them.
GRACE = 0.5


def hub_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "connections_low": 3,
        "connections_high": 5,
        "connection_grace": GRACE,
        "connection_check_interval": HOUR,
        "gossip": False,
    }
    settings.update(overrides)
    return settings


@asynccontextmanager
async def mesh(n: int, **hub: Any) -> AsyncIterator[tuple[Peer, list[Peer]]]:
    """``n`` leaf peers, then a hub bootstrapped to the first leaf that dials every other one.

    The hub's connections are idle (no kept stream, no stream in flight) and past their grace
    period when this yields.
    """
    async with AsyncExitStack() as stack:
        # Serving nothing, the leaves announce nothing: no DHT traffic makes a connection "used".
        leaves = [await stack.enter_async_context(Peer(gossip=False)) for _ in range(n)]
        settings = hub_settings(**hub)
        high = settings.pop("connections_high")
        a = await stack.enter_async_context(
            Peer(bootstrap=[leaves[0].addrs[0]], connections_high=100, **settings)
        )
        for leaf in leaves[1:]:
            await a.connect(leaf.addrs[0])
        a.connmgr.high = high  # only now: a connection over the high mark would trim at once
        await settle(a)
        await trio.sleep(GRACE)
        yield a, leaves


def connected(a: Peer, b: Peer) -> bool:
    return a.dialer.is_connected(b.peer_id)


async def settle(a: Peer) -> None:
    """Close the kept inference streams and wait until no connection of ``a`` carries a stream."""
    await a.stream_pool.close_all()
    with trio.fail_after(15):
        while a.connmgr.stats().in_use:
            await trio.sleep(0.01)


def test_peer_id_of_addr() -> None:
    assert peer_id_of_addr("/ip4/127.0.0.1/tcp/1/p2p/QmX") == "QmX"
    assert peer_id_of_addr("/ip4/1.2.3.4/tcp/1/p2p/QmR/p2p-circuit/p2p/QmT") == "QmT"
    assert peer_id_of_addr("/ip4/127.0.0.1/tcp/1") is None


def test_protect_tags_and_settings() -> None:
    cm = ConnManager(low=1, high=2, grace_period=0, check_interval=1)
    cm.protect("p", "bootstrap")
    cm.protect("p", "mine")
    assert cm.unprotect("p", "mine") is True  # still tagged "bootstrap"
    assert cm.is_protected("p")
    assert cm.unprotect("p", "bootstrap") is False
    assert not cm.is_protected("p")
    assert cm.unprotect("never", "x") is False
    cm.keep(lambda: ["q"])
    cm.keep(lambda: 1 / 0)  # type: ignore[arg-type,return-value]  # a failing source protects nothing
    assert cm.is_protected("q")
    with pytest.raises(ValueError):
        ConnManager(low=3, high=2, grace_period=0, check_interval=1)
    bad_settings: list[dict[str, Any]] = [
        {"connections_low": 5, "connections_high": 4},
        {"connection_check_interval": 0},
    ]
    for bad in bad_settings:
        with pytest.raises(ConfigError):
            Peer(**bad)


async def test_trims_to_low_and_keeps_protected() -> None:
    release = trio.Event()

    async def slow(request: Any) -> str:
        await release.wait()
        return "done"

    async with mesh(7) as (a, leaves):
        bootstrap, explicit, busy, *idle = leaves
        busy.serve("slow", slow)
        a.connmgr.protect(explicit.peer_id, "test")
        assert a.connmgr.stats().connections == 7
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.call, busy.peer_id, "slow", None)
            with trio.fail_after(5):
                while not a.connmgr.stats().in_use:
                    await trio.sleep(0.01)
            assert await a.connmgr.trim() == 4  # 7 open, 3 protected: every idle one goes, down to low
            stats = a.connmgr.stats()
            assert stats.connections == 3 == a.connmgr.low
            assert stats.protected == 2 and stats.in_use == 1 and stats.trimmed == 4
            assert all(connected(a, p) for p in (bootstrap, explicit, busy))
            assert not any(connected(a, p) for p in idle)
            release.set()
        assert await a.connmgr.trim() == 0  # at or under the high mark: nothing to do


async def test_least_recently_used_go_first_and_can_be_redialed() -> None:
    async with mesh(7, connections_low=5) as (a, leaves):
        bootstrap, *others = leaves
        await trio.sleep(0.05)
        for p in others[2:]:
            assert await a.ping(p.peer_id) is not None  # a stream opened and closed: used now
        await settle(a)
        assert await a.connmgr.trim() == 2
        assert not connected(a, others[0]) and not connected(a, others[1])
        assert all(connected(a, p) for p in (bootstrap, *others[2:]))
        # Trimmed, not forgotten: a stream to its peer id redials from the peerstore.
        assert await a.ping(others[0].peer_id) is not None
        assert connected(a, others[0])
        others[0].serve("echo", lambda r: r.input)
        assert (await a.call(others[0].peer_id, "echo", "again")).value == "again"
        # The stream kept for reuse counts as use: that connection is not trimmed.
        assert a.stream_pool.idle_count(others[0].peer_id) == 1
        await trio.sleep(GRACE)
        a.connmgr.low, a.connmgr.high = 0, 1
        assert await a.connmgr.trim() >= 1
        assert connected(a, others[0]) and connected(a, bootstrap)


async def test_grace_period_protects_new_connections() -> None:
    async with mesh(7, connection_grace=HOUR) as (a, _):
        assert await a.connmgr.trim() == 0
        assert a.connmgr.stats().connections == 7


async def test_a_source_protects_its_peers() -> None:
    async with mesh(7) as (a, leaves):
        kept = {p.peer_id for p in leaves[3:5]}
        a.connmgr.keep(lambda: kept)
        await a.connmgr.trim()
        assert all(connected(a, p) for p in leaves[3:5])
        assert a.connmgr.stats().connections == 3


async def test_a_new_connection_over_high_triggers_a_trim() -> None:
    async with mesh(5) as (a, leaves):
        assert a.connmgr.stats().connections == 5  # at the high mark: nothing happens
        async with Peer(gossip=False) as extra:
            await a.connect(extra.addrs[0])
            with trio.fail_after(15):
                while not a.connmgr.stats().trims:
                    await trio.sleep(0.02)
            assert a.connmgr.stats().connections <= a.connmgr.high
            assert connected(a, leaves[0])  # the bootstrap peer stays
            assert connected(a, extra)  # within its grace period


async def test_periodic_check_trims() -> None:
    async with mesh(6, connection_grace=0.2, connection_check_interval=0.3) as (a, _):
        # Down to low, unless a DHT stream (in use) kept one: then at least under high.
        with trio.fail_after(15):
            while not a.connmgr.stats().trims:
                await trio.sleep(0.05)
        assert a.connmgr.stats().connections <= a.connmgr.high


async def test_trim_and_redial_leak_no_fds(fd_count: Any) -> None:
    async with mesh(7) as (a, leaves):

        async def cycle() -> None:
            a.connmgr.high = 100  # no trim while redialing
            for p in leaves[1:]:
                assert await a.ping(p.peer_id) is not None  # redials the trimmed ones
            await settle(a)
            await trio.sleep(GRACE)  # the redialed connections are new
            a.connmgr.high = 5
            assert await a.connmgr.trim() == 4
            # Both sides have closed their socket once the leaves see no connection to a.
            with trio.fail_after(5):
                while sum(connected(p, a) for p in leaves) > 3:
                    await trio.sleep(0.02)

        await cycle()
        gc.collect()
        before = fd_count()
        for _ in range(5):
            await cycle()
        gc.collect()
        after = fd_count()
        assert after <= before, f"fds went from {before} to {after} over 5 trim and redial cycles"


async def test_relay_reservations_and_gossip_mesh_are_protected() -> None:
    async with Peer(relay_hop=True) as relay:
        async with Peer(bootstrap=[relay.addrs[0]], reachability="private") as private:
            assert relay.relay is not None
            with trio.fail_after(15):
                while private.peer_id not in relay.relay.reserving_peers():
                    await trio.sleep(0.05)
            assert relay.connmgr.is_protected(private.peer_id)  # it holds a reservation here
            # The relay serves echo and the private peer calls it: they share echo's gossip topic.
            relay.serve("echo", lambda request: "echo")
            assert private.availability is not None
            private.availability.follow("echo")
            with trio.fail_after(15):  # GossipSub grafts at its heartbeats (1 s)
                while not private.connmgr.is_protected(relay.peer_id) or relay.peer_id not in (
                    private.availability.gossip.mesh_peers() if private.availability else ()
                ):
                    await trio.sleep(0.05)

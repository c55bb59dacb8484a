"""Canaries and tests for ``modelnet_p2p/p2p/_compat/peerstore.py``, with real hosts on 127.0.0.1.

The ``test_stock_*`` tests assert the upstream behaviour the sweeper works around; when one
fails, upstream has changed: check whether the sweeper is still needed. The other tests drive
:class:`PeerstoreSweeper` with an injected clock (no sleeps: only waits for connections to
close, with generous bounds).
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import libp2p
import multiaddr
import pytest
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import PeerStoreError

from modelnet_p2p import Capability, Peer
from modelnet_p2p.p2p._compat.peerstore import PeerstoreSweeper
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(host: IHost) -> PeerInfo:
    return PeerInfo(host.get_id(), list(host.get_addrs()))


async def identified(host: IHost, peer: ID) -> None:
    """Wait until identify has written ``peer``'s protocols into ``host``'s peerstore."""
    store = host.get_peerstore()
    with trio.fail_after(15):
        while not (store.has_peer(peer) and store.get_protocols(peer)):
            await trio.sleep(0.02)


async def disconnected(host: IHost, peer: ID) -> None:
    """Wait until ``host`` has no connection to ``peer``."""
    with trio.fail_after(15):
        while peer in host.get_connected_peers():
            await trio.sleep(0.02)


@asynccontextmanager
async def victim() -> AsyncIterator[IHost]:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as host:
        yield host


@asynccontextmanager
async def stranger() -> AsyncIterator[IHost]:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as host:
        yield host


async def visit(target: IHost, count: int) -> list[ID]:
    """``count`` strangers connect to ``target`` and leave; their ids once ``target`` saw them go."""
    ids: list[ID] = []

    async def one() -> None:
        async with stranger() as s:
            await s.connect(info(target))
            ids.append(s.get_id())
            await identified(target, s.get_id())

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    for pid in ids:
        await disconnected(target, pid)
    return ids


def sweeper(host: IHost, clock: Clock, *, max_peers: int = 256, grace: float = 60.0, min_idle: float = 0,
            keep: Iterable[str] = ()) -> PeerstoreSweeper:
    kept = list(keep)
    s = PeerstoreSweeper(max_peers=max_peers, min_idle=min_idle, idle_grace=grace, clock=clock)
    s.attach(host, [lambda: kept])
    return s


# -- canaries -------------------------------------------------------------------------------


async def test_stock_peerstore_keeps_a_disconnected_peer() -> None:
    """A stranger that connected and left stays in the store, even once its addresses expired."""
    async with victim() as v:
        (pid,) = await visit(v, 1)
        store = v.get_peerstore()
        assert store.has_peer(pid)
        entry = store.peer_data_map[pid]
        entry.last_identified = 0  # its address TTL ran out long ago
        assert entry.is_expired()
        store.peer_ids()
        store.valid_peer_ids()  # reading expired entries clears addresses, keeps the peer
        assert store.has_peer(pid)
        assert store.max_peers == 1000  # the only bound


def test_stock_cleanup_task_is_started_by_nobody() -> None:
    """Only ``PeerStore.start_cleanup_task`` expires entries; nothing in py-libp2p starts it."""
    root = Path(libp2p.__file__).parent
    callers = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "start_cleanup_task(" in (text := path.read_text(errors="replace"))
        and text.count("start_cleanup_task(") > text.count("def start_cleanup_task(")
    ]
    assert callers == []


async def test_stock_expiry_forgets_a_connected_peer() -> None:
    """Upstream's cleanup deletes a connected peer's whole entry once its address TTL ran out.

    (And it raises on an expired peer that has a signed peer record.)
    """
    async with victim() as v, stranger() as s:
        await s.connect(info(v))
        store = v.get_peerstore()
        await identified(v, s.get_id())
        store.peer_data_map[s.get_id()].last_identified = 0
        # An expired peer with a signed peer record (identify sends one) crashes the cleanup:
        # the task would stop at the first one.
        assert s.get_id() in store.peer_record_map
        with pytest.raises(PeerStoreError):
            store._cleanup_expired_records()
        del store.peer_record_map[s.get_id()]
        store._cleanup_expired_records()
        assert s.get_id() in v.get_connected_peers()
        assert not store.has_peer(s.get_id())  # identify's protocols and the key went with it


# -- the sweeper ------------------------------------------------------------------------------


async def test_strangers_that_left_shrink_back_to_the_bound_then_go() -> None:
    clock = Clock()
    async with victim() as v:
        gone = await visit(v, 12)
        store = v.get_peerstore()
        assert len(store.peer_ids()) == 13
        gc.collect()
        s = sweeper(v, clock, max_peers=5, min_idle=30, grace=60)
        assert s.sweep() == 0  # idle from now: none has been idle for min_idle yet
        clock.now += 30
        assert s.sweep() == 8  # over the bound: the longest idle go, the rest wait
        assert len(store.peer_ids()) == 5
        assert store.has_peer(v.get_id())
        clock.now += 29
        assert s.sweep() == 0
        clock.now += 2  # past the grace period: every idle stranger goes
        assert s.sweep() == 4
        assert store.peer_ids() == [v.get_id()]
        assert not any(store.has_peer(p) for p in gone)
        stats = s.stats()
        assert (stats.peers, stats.forgotten, stats.sweeps, stats.idle) == (1, 12, 4, 0)
        assert store.peer_record_map == {}


async def test_the_longest_idle_go_first() -> None:
    clock = Clock()
    async with victim() as v:
        first = await visit(v, 3)
        s = sweeper(v, clock, max_peers=100, grace=60)
        s.sweep()  # the first three are idle from now
        clock.now += 30
        later = await visit(v, 3)
        s.max_peers = 4  # the victim and three strangers
        assert s.sweep() == 3
        store = v.get_peerstore()
        assert not any(store.has_peer(p) for p in first)
        assert all(store.has_peer(p) for p in later)


async def test_connected_and_kept_peers_are_never_forgotten() -> None:
    clock = Clock()
    async with victim() as v, stranger() as connected, stranger() as kept:
        await connected.connect(info(v))
        await kept.connect(info(v))
        await identified(v, connected.get_id())
        await identified(v, kept.get_id())
        await v.disconnect(kept.get_id())
        await disconnected(v, kept.get_id())
        gone = await visit(v, 3)
        s = sweeper(v, clock, max_peers=1, grace=0, keep=[str(kept.get_id()), "not a peer id"])
        clock.now += 10_000
        assert s.sweep() == 3
        store = v.get_peerstore()
        assert store.has_peer(connected.get_id()) and store.has_peer(kept.get_id())
        assert not any(store.has_peer(p) for p in gone)
        assert store.get_protocols(connected.get_id())  # identify's data of a connected peer stays


async def test_a_failing_source_skips_the_sweep() -> None:
    clock = Clock()

    def broken() -> list[str]:
        raise RuntimeError("the DHT is not running")

    async with victim() as v:
        (pid,) = await visit(v, 1)
        s = PeerstoreSweeper(max_peers=1, idle_grace=0, clock=clock)
        s.attach(v, [broken])
        clock.now += 10_000
        assert s.sweep() == 0
        assert v.get_peerstore().has_peer(pid)
        assert s.stats().skipped == 1


async def test_an_entry_updated_since_counts_as_idle_from_then() -> None:
    clock = Clock()
    async with victim() as v:
        (pid,) = await visit(v, 1)
        store = v.get_peerstore()
        s = sweeper(v, clock, grace=60)
        s.sweep()
        clock.now += 50
        store.peer_data_map[pid].last_identified -= 1  # as if add_addrs ran again since (a dial)
        s.sweep()
        clock.now += 50  # 100 s after it went idle, 50 s after the update
        assert s.sweep() == 0
        clock.now += 11
        assert s.sweep() == 1


async def test_a_forgotten_peer_can_be_dialed_again() -> None:
    clock = Clock()
    async with victim() as v, stranger() as s:
        await s.connect(info(v))
        await identified(v, s.get_id())
        await v.disconnect(s.get_id())
        await disconnected(v, s.get_id())
        sw = sweeper(v, clock, grace=1)
        assert sw.sweep() == 0  # idle from now
        clock.now += 1
        assert sw.sweep() == 1
        assert not v.get_peerstore().has_peer(s.get_id())
        await v.connect(info(s))  # with its addresses, as the dialer and DHT answers give them
        assert s.get_id() in v.get_connected_peers()
        await v.disconnect(s.get_id())
        await disconnected(v, s.get_id())
        assert sw.sweep() == 0  # idle from now, again
        clock.now += 1
        assert sw.sweep() == 1
        await s.connect(info(v))  # and it can dial in again
        assert s.get_id() in v.get_connected_peers()


async def test_a_peer_forgets_strangers_and_keeps_its_routing_table() -> None:
    """The Peer's own sweeper: strangers go; a routing-table peer that stopped stays."""
    async with AsyncExitStack() as stack:
        a = Peer(gossip=False, dht_mode="server")
        a.peerstore.idle_grace = 0
        a.peerstore.interval = 0.05  # read at each turn of its loop
        await stack.enter_async_context(a)
        checks = a.discovery.kad.table_checks
        assert checks is not None
        checks.enabled = False  # b stays in the table after it stops (else a checks and drops it)
        async with Peer(gossip=False, dht_mode="server") as b:
            await b.connect(a.addrs[0])
            b_id = b.host.get_id()
            await identified(a.host, b_id)
            with trio.fail_after(15):
                while not await a.discovery.kad.add_to_routing_table(b.peer_id):
                    await trio.sleep(0.05)
            assert a.discovery.kad.in_routing_table(b.peer_id)
        await disconnected(a.host, b_id)
        gone = await visit(a.host, 3)
        store = a.host.get_peerstore()
        with trio.fail_after(15):
            while any(store.has_peer(p) for p in gone):
                await trio.sleep(0.05)
        assert store.has_peer(b_id)  # in the routing table: kept (if it comes back, it is dialable)
        assert a.peerstore.stats().forgotten >= 3


async def pong(request: object) -> str:
    return "pong"


async def test_a_provider_the_peerstore_forgot_is_called_by_its_id() -> None:
    """A provider outside the connected peers, the routing table and the availability table
    is forgotten by the sweeper; a call by its bare id then finds its addresses in its card in
    the DHT (before: "no known address")."""
    with trio.fail_after(60):
        async with Peer(gossip=False, dht_mode="server") as boot:
            opts = {"gossip": False, "dht_mode": "server", "bootstrap": [boot.addrs[0]]}
            async with Peer(**opts) as provider, Peer(**opts) as caller:  # type: ignore[arg-type]
                provider.serve(Capability("ping", task="chat"), pong)
                assert await provider.discovery.announce() is not None
                await caller.discovery.bootstrapped.wait()
                pid = provider.host.get_id()
                kad = caller.discovery.kad
                if kad.in_routing_table(provider.peer_id):
                    kad.forget(provider.peer_id)  # out of the table (as if it had failed twice)
                if caller.dialer.is_connected(provider.peer_id):
                    await caller.host.disconnect(pid)
                    await disconnected(caller.host, pid)
                caller.peerstore.idle_grace = 0
                assert caller.peerstore.sweep() >= 1  # idle from now: due at once
                assert not caller.host.get_peerstore().has_peer(pid)
                answer = await caller.call(provider.peer_id, "ping", "ping", timeout=20)
                assert answer.value == "pong" and answer.peer == provider.peer_id

"""Lookups start from the peers heard of in answers, and dial a few peers at a time.

``services/discovery/heard.py`` and ``lookup.py``: live peers on 127.0.0.1 and a tarpit (a
listener that never speaks). Nothing is timed.
"""

from __future__ import annotations

import trio
import trio.testing

from modelnet_p2p import Peer
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import KadKind, KadPeer, peer_id_bytes
from modelnet_p2p.services.discovery.lookup import ADDR_TTL, DIAL_CONCURRENCY, Lookups, _hash
from modelnet_p2p.testing.tarpit import tarpit

KEY = b"some key to look up"


def vouch(lookups: Lookups, peer_id: str, addr: str) -> None:
    """Make ``peer_id`` at ``addr`` a seed, as if two servers had listed it."""
    lookups.kad.remember_addrs(KadPeer(peer_id, (addr,)), ADDR_TTL)
    key_hash = _hash(peer_id_bytes(peer_id))
    for reporter in ("reporter-1", "reporter-2"):
        lookups.heard.note(peer_id, key_hash, reporter, trio.current_time())


async def test_a_lookup_reaches_peers_only_heard_of_past_tarpits() -> None:
    """A peer whose routing table is empty, that has heard of three live servers and of six
    peers whose address is a tarpit, finds the live ones: the tarpits' dials give their slots
    up at the patience, and the tarpits stop being seeds once they have failed."""
    async with tarpit() as pit, Peer(gossip=False, dht_mode="server") as searcher:
        async with Peer(gossip=False, dht_mode="server") as a, Peer(
            gossip=False, dht_mode="server"
        ) as b, Peer(gossip=False, dht_mode="server") as c:
            lookups = searcher.discovery.lookups
            assert lookups.kad.table_peers() == [] and lookups.kad.connected_peers() == []
            fakes = [str(Identity.generate(ephemeral=True).peer_id) for _ in range(6)]
            for fake in fakes:
                vouch(lookups, fake, pit)
            live = {a.peer_id: a.addrs[0], b.peer_id: b.addrs[0], c.peer_id: c.addrs[0]}
            for pid, addr in live.items():
                vouch(lookups, pid, addr.rsplit("/p2p/", 1)[0])
            assert len(fakes) > DIAL_CONCURRENCY
            with trio.fail_after(60):
                found = await lookups.closest(KEY, KadKind.FIND_NODE)
            assert set(live) <= set(found)
            assert not set(fakes) & set(found)
            assert all(fake not in lookups.heard for fake in fakes)
            assert all(pid in lookups.heard for pid in live)
            assert lookups.slow_requests >= 1  # the tarpits were slow, and gave their slots up


async def test_dial_slots_are_bounded_and_given_up_once() -> None:
    async with Peer(gossip=False, dht_mode="server") as peer:
        lookups = peer.discovery.lookups
        entered = 0
        release = trio.Event()
        give_ups = []

        async def dial() -> None:
            nonlocal entered
            async with lookups._dial_slot(True) as give_up:
                entered += 1
                give_ups.append(give_up)
                await release.wait()

        async with trio.open_nursery() as nursery:
            for _ in range(DIAL_CONCURRENCY + 1):
                nursery.start_soon(dial)
            await trio.testing.wait_all_tasks_blocked()
            assert entered == DIAL_CONCURRENCY  # the last one waits for a slot
            async with lookups._dial_slot(False):  # a request on an open connection never waits
                pass
            give_ups[0]()
            give_ups[0]()  # a second give-up releases nothing more
            await trio.testing.wait_all_tasks_blocked()
            assert entered == DIAL_CONCURRENCY + 1
            release.set()
        assert lookups._dial_slots.value == DIAL_CONCURRENCY

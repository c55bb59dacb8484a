"""A DHT peer that fails requests in a row leaves the routing table (``p2p/kad.py``).

Live peers on 127.0.0.1. A peer that has stopped is dropped after ``MAX_FAILURES`` failed
requests; one time-out does not drop a live one, and an answer in between starts the count
again. No test times anything: a "time-out" is a request given no time at all.
"""

from __future__ import annotations

import trio

from modelnet_p2p import Peer
from modelnet_p2p.p2p.kad import MAX_FAILURES, KadKind, KadNode, KadRequest

FIND = KadRequest(KadKind.FIND_NODE, b"some key")


async def in_table(kad: KadNode, peer: Peer) -> None:
    """Put ``peer`` (connected, a DHT server) into ``kad``'s routing table."""
    with trio.fail_after(15):
        while not await kad.add_to_routing_table(peer.peer_id):
            await trio.sleep(0.05)


async def test_a_peer_that_stopped_leaves_the_table_after_the_failures() -> None:
    assert MAX_FAILURES == 2
    async with Peer(gossip=False, dht_mode="server") as a:
        kad = a.discovery.kad
        async with Peer(gossip=False, dht_mode="server") as b:
            await b.connect(a.addrs[0])
            await in_table(kad, b)
            answer = await kad.exchange(b.peer_id, FIND, 10)
            assert answer.answer is not None  # alive: answers
        with trio.fail_after(15):
            while a.dialer.is_connected(b.peer_id):
                await trio.sleep(0.02)
        first = await kad.exchange(b.peer_id, FIND, 10)
        assert first.answer is None and not first.opened
        assert kad.in_routing_table(b.peer_id)  # one failure: it stays
        second = await kad.exchange(b.peer_id, FIND, 10)
        assert second.answer is None
        assert not kad.in_routing_table(b.peer_id)


async def test_one_time_out_does_not_drop_a_live_peer() -> None:
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as b:
        kad = a.discovery.kad
        await b.connect(a.addrs[0])
        await in_table(kad, b)
        late = await kad.exchange(b.peer_id, FIND, 0)  # out of time before any answer
        assert late.answer is None and late.timed_out
        assert kad.in_routing_table(b.peer_id)
        assert (await kad.exchange(b.peer_id, FIND, 10)).answer is not None  # the count starts again
        assert (await kad.exchange(b.peer_id, FIND, 0)).timed_out
        assert kad.in_routing_table(b.peer_id)
        assert (await kad.exchange(b.peer_id, FIND, 0)).timed_out  # two in a row
        assert not kad.in_routing_table(b.peer_id)

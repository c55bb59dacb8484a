"""A DHT peer that fails requests in a row leaves the routing table (``p2p/kad.py``).

Live peers on 127.0.0.1. A peer that has stopped is dropped after ``MAX_FAILURES`` requests
in a row to which no stream opened; a peer that takes a request and never answers is not
dropped, and an answer in between starts the count again; a dropped peer is left out of other
servers' answers for a while. Nothing is timed: a request that opens no stream in its time is
one given no time at all.
"""

from __future__ import annotations

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol

from modelnet_p2p import Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import MAX_FAILURES, KadKind, KadNode, KadRequest, peer_id_bytes
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID

FIND = KadRequest(KadKind.FIND_NODE, b"some key")
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


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


async def test_a_peer_that_does_not_answer_in_time_stays() -> None:
    """Out of time with its stream open: slow, not gone; never dropped for it."""
    hole = build_host(Identity.generate())

    async def swallow(stream: INetStream) -> None:
        await trio.sleep_forever()  # accepts DHT requests and never answers

    hole.set_stream_handler(TProtocol(DHT_PROTOCOL_ID), swallow)
    async with Peer(gossip=False, dht_mode="server") as a, running_host(hole, LOOPBACK):
        kad = a.discovery.kad
        hole_id = str(hole.get_id())
        await a.connect(f"{hole.get_addrs()[0]}/p2p/{hole_id}")
        with trio.fail_after(15):
            while not await kad.add_to_routing_table(hole_id):
                await trio.sleep(0.05)
        for _ in range(MAX_FAILURES + 1):
            late = await kad.exchange(hole_id, FIND, 2)
            assert late.answer is None and late.timed_out and late.opened
        assert kad.in_routing_table(hole_id)


async def test_requests_that_open_no_stream_in_time_count_and_an_answer_resets() -> None:
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as b:
        kad = a.discovery.kad
        await b.connect(a.addrs[0])
        await in_table(kad, b)
        late = await kad.exchange(b.peer_id, FIND, 0)  # out of time before a stream opened
        assert late.answer is None and late.timed_out and not late.opened
        assert kad.in_routing_table(b.peer_id)
        assert (await kad.exchange(b.peer_id, FIND, 10)).answer is not None  # the count starts again
        assert not (await kad.exchange(b.peer_id, FIND, 0)).opened
        assert kad.in_routing_table(b.peer_id)
        assert not (await kad.exchange(b.peer_id, FIND, 0)).opened  # two in a row
        assert not kad.in_routing_table(b.peer_id)


async def test_a_dropped_peer_is_left_out_of_other_answers() -> None:
    """Another server's table still lists a peer that stopped; its answers no longer bring it back."""
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as c:
        await a.connect(c.addrs[0])
        await in_table(a.discovery.kad, c)
        kad = a.discovery.kad
        async with Peer(gossip=False, dht_mode="server") as b:
            await b.connect(c.addrs[0])
            await in_table(c.discovery.kad, b)
            near_b = KadRequest(KadKind.FIND_NODE, peer_id_bytes(b.peer_id))
            answer = (await kad.exchange(c.peer_id, near_b, 10)).answer
            assert answer is not None and b.peer_id in {p.peer_id for p in answer.closer}
        for _ in range(MAX_FAILURES):  # b has stopped: a drops it
            assert (await kad.exchange(b.peer_id, FIND, 10)).answer is None
        assert not kad.in_routing_table(b.peer_id)
        assert c.discovery.kad.in_routing_table(b.peer_id)  # c does not know yet
        answer = (await kad.exchange(c.peer_id, near_b, 10)).answer
        assert answer is not None  # c answered (listing b), and a left b out
        assert b.peer_id not in {p.peer_id for p in answer.closer}

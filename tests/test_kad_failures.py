"""A DHT peer that fails requests in a row leaves the routing table (``p2p/kad.py``).

Live peers on 127.0.0.1. A peer that has stopped is dropped after ``MAX_FAILURES`` requests
in a row to which no stream opened; a peer that takes a request and never answers is not
dropped, and an answer in between starts the count again; a dropped peer is left out of other
servers' answers for a while. A server checks the table peers whose last connection closed
(``p2p/kadcheck.py``): callers that stopped leave its table and its answers, a peer that
only disconnected stays. Nothing is timed: a request that opens no stream in its time is
one given no time at all, and the checks are waited for as events.
"""

from __future__ import annotations

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from modelnet_p2p import Peer
from modelnet_p2p.p2p._compat.goaway import pruned_by_peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.kad import MAX_FAILURES, KadKind, KadNode, KadRequest, peer_id_bytes
from modelnet_p2p.p2p.kadcheck import TableChecker
from modelnet_p2p.p2p.notify import on_disconnect
from modelnet_p2p.services.discovery import DHT_PROTOCOL_ID

FIND = KadRequest(KadKind.FIND_NODE, b"some key")
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


async def in_table(kad: KadNode, peer: Peer) -> None:
    """Put ``peer`` (connected, a DHT server) into ``kad``'s routing table."""
    with trio.fail_after(15):
        while not await kad.add_to_routing_table(peer.peer_id):
            await trio.sleep(0.05)


def requests_only(*kads: KadNode) -> None:
    """Count only the test's own requests: no checks of peers whose connection closed."""
    for kad in kads:
        assert kad.table_checks is not None
        kad.table_checks.enabled = False


async def test_a_peer_that_stopped_leaves_the_table_after_the_failures() -> None:
    assert MAX_FAILURES == 2
    async with Peer(gossip=False, dht_mode="server") as a:
        kad = a.discovery.kad
        requests_only(kad)
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
        requests_only(kad, c.discovery.kad)
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


async def called_by(server: Peer, caller: Peer) -> None:
    """``caller`` sends ``server`` a DHT request, and ``server`` adds it to its table (as it
    adds every DHT server that calls it, once identify shows that it serves the DHT)."""
    await caller.connect(server.addrs[0])
    assert await caller.discovery.request(server.peer_id, FIND) is not None
    with trio.fail_after(15):
        while not server.discovery.kad.in_routing_table(caller.peer_id):
            await trio.sleep(0.05)


def checks_of(kad: KadNode) -> TableChecker:
    checks = kad.table_checks
    assert checks is not None  # a server checks its table
    checks.gap = 0  # the failure rule's second request right after the first
    return checks


async def test_callers_that_stopped_leave_the_servers_table_and_its_answers() -> None:
    """A server that never sends its callers a request itself still drops those that left."""
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as asker:
        kad = a.discovery.kad
        checks = checks_of(kad)
        await called_by(a, asker)
        async with Peer(gossip=False, dht_mode="server") as b1, Peer(gossip=False, dht_mode="server") as b2:
            gone = [b1.peer_id, b2.peer_id]
            for b in (b1, b2):
                await called_by(a, b)
            # Not b1's own id as the key: a FIND_NODE for a peer id names that peer while the
            # peerstore holds its addresses (libp2p's FIND_PEER rule), in the table or not.
            answer = await asker.discovery.request(a.peer_id, FIND)
            assert answer is not None and set(gone) <= {p.peer_id for p in answer.closer}
            requests = kad.requests
        # b1 and b2 have stopped; a has sent them nothing since they called
        with trio.fail_after(30):
            while checks.busy or any(kad.in_routing_table(pid) for pid in gone):
                await checks.wait_check()
        assert kad.requests > requests and checks.dropped >= 2
        assert kad.in_routing_table(asker.peer_id)  # connected all along: never checked
        answer = await asker.discovery.request(a.peer_id, FIND)
        assert answer is not None and not set(gone) & {p.peer_id for p in answer.closer}


async def test_a_peer_whose_connection_closed_but_which_is_alive_stays() -> None:
    """A closed connection (a trim, say) is not a failure: the peer answers the check and stays,
    and is not checked again on the next close for a while."""
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as c:
        kad = a.discovery.kad
        checks = checks_of(kad)
        await called_by(a, c)
        for conn in list(a.host.get_network().get_connections(ID.from_base58(c.peer_id))):
            await conn.close()  # as the connection manager closes an idle connection
        with trio.fail_after(30):
            while checks.checks == 0:
                await checks.wait_check()
        assert checks.dropped == 0 and kad.in_routing_table(c.peer_id)
        for conn in list(a.host.get_network().get_connections(ID.from_base58(c.peer_id))):
            await conn.close()
        checks.closed(c.peer_id)  # whether or not the swarm has said so yet
        assert checks.busy == 0  # found alive just now: not checked again
        assert kad.in_routing_table(c.peer_id)


async def test_a_connection_the_connection_manager_closed_is_not_checked() -> None:
    """A trimmed peer did not leave: no dial goes out to it again."""
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as c:
        kad = a.discovery.kad
        checks = checks_of(kad)
        await called_by(a, c)
        closed = trio.Event()
        stop = on_disconnect(a.host, lambda peer, _conn: closed.set() if peer == c.peer_id else None)
        requests = kad.requests
        a.connmgr.grace_period = a.connmgr.low = 0
        a.connmgr.high = 0  # wakes the manager, which trims every idle connection
        with trio.fail_after(30):
            await closed.wait()  # kad heard it in the same round of notifications
        stop()
        assert checks.busy == 0 and checks.checks == 0 and kad.requests == requests
        assert kad.in_routing_table(c.peer_id)


async def test_a_connection_its_peer_let_go_is_not_checked() -> None:
    """A connection that the peer's own connection manager trimmed comes with a GO_AWAY that
    says so (0x1005, as go-libp2p's): that peer is alive, and is not dialed again to check.
    (Checks of every trimmed connection made a 200-peer mesh dial 277 times in a minute of
    idling: trims by one side, checks by the other.)"""
    async with Peer(gossip=False, dht_mode="server") as a, Peer(gossip=False, dht_mode="server") as c:
        kad = a.discovery.kad
        checks = checks_of(kad)
        await called_by(a, c)
        closed = trio.Event()
        pruned: list[bool] = []

        def heard(peer: str, conn: object) -> None:
            if peer == c.peer_id:
                pruned.append(pruned_by_peer(conn))
                closed.set()

        stop = on_disconnect(a.host, heard)
        requests = kad.requests
        c.connmgr.grace_period = c.connmgr.low = 0
        c.connmgr.high = 0  # c trims every idle connection, the one to a among them
        with trio.fail_after(30):
            await closed.wait()
        stop()
        assert pruned == [True]
        assert checks.busy == 0 and checks.checks == 0 and kad.requests == requests
        assert kad.in_routing_table(c.peer_id)

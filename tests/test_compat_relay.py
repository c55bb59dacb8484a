"""Canaries for ``modelnet_p2p/p2p/_compat/relay.py``: stock py-libp2p circuit relay v2 still has the bugs.

Each test runs py-libp2p's own ``CircuitV2Protocol`` as the relay and asserts the behaviour the
shim corrects. When one of them fails, upstream has changed: check whether the correction in
``p2p/_compat/relay.py`` is still needed, and drop it (and its canary) if not. The corrected
behaviour itself is tested in ``tests/test_relay.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service
from test_relay import LOOPBACK, concurrent_connects, echo_through, hop, hosts, relay_addr, start_target

from modelnet_p2p.errors import UnavailableError
from modelnet_p2p.p2p.relay import reserve_slot
from modelnet_p2p.services.relay import HOP_PROTOCOL_ID, RelayService, dial_via_relay, reserve


def limits(**kw: int) -> RelayLimits:
    base = {"duration": 0, "data": 1 << 40, "max_circuit_conns": 8, "max_reservations": 16}
    base.update(kw)
    return RelayLimits(**base)


@asynccontextmanager
async def stock_relay(host: IHost, relay_limits: RelayLimits) -> AsyncIterator[CircuitV2Protocol]:
    protocol = CircuitV2Protocol(host, limits=relay_limits, allow_hop=True)
    async with background_trio_service(protocol):
        with trio.fail_after(10):
            await protocol.event_started.wait()
        yield protocol


async def test_stock_reserve_trusts_the_named_peer_id() -> None:
    """c reserves in t's name; t never reserved, yet circuits to t are relayed."""
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c), trio.open_nursery() as nursery:
        async with stock_relay(r, limits()):
            await start_target(t, nursery)
            await t.connect(PeerInfo(r.get_id(), [r.get_addrs()[0]]))  # connected, no reservation
            named = HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=t.get_id().to_bytes()))
            assert await hop(c, r, named) == StatusCode.OK
            await dial_via_relay(c, f"{relay_addr(r)}/p2p-circuit/p2p/{t.get_id()}", timeout=10)
            await echo_through(c, t, 4096)
            nursery.cancel_scope.cancel()


async def test_stock_keeps_reservations_of_disconnected_peers() -> None:
    async with hosts(LOOPBACK, [], [], LOOPBACK) as (r, t1, t2, _), trio.open_nursery() as nursery:
        async with stock_relay(r, limits(max_reservations=1)):
            await start_target(t1, nursery)
            await start_target(t2, nursery)
            await reserve(t1, relay_addr(r))
            await t1.disconnect(r.get_id())
            with pytest.raises(UnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):
                await reserve(t2, relay_addr(r))
            nursery.cancel_scope.cancel()


async def test_stock_data_limit_zero_lets_nothing_pass() -> None:
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c), trio.open_nursery() as nursery:
        async with stock_relay(r, limits(data=0)):
            await start_target(t, nursery)
            circuit = await reserve(t, relay_addr(r))
            # Not even the Noise handshake gets through.
            with pytest.raises(UnavailableError, match="cannot secure"):
                await dial_via_relay(c, circuit, timeout=10)
            nursery.cancel_scope.cancel()


async def test_stock_circuit_limit_is_checked_before_it_is_counted() -> None:
    """Concurrent CONNECTs to one target all pass a limit of 2."""
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c), trio.open_nursery() as nursery:
        async with stock_relay(r, limits(max_circuit_conns=2)):
            await start_target(t, nursery)
            await reserve(t, relay_addr(r))
            await c.connect(PeerInfo(r.get_id(), [r.get_addrs()[0]]))
            statuses = await concurrent_connects(c, r, t, 8, closed_ok=True)
            assert statuses.count(StatusCode.OK) > 2, statuses
            nursery.cancel_scope.cancel()


async def test_stock_concurrent_circuits_to_one_target_close_each_other() -> None:
    async with hosts(LOOPBACK, [], LOOPBACK, LOOPBACK) as (r, t, c1, c2), trio.open_nursery() as nursery:
        async with stock_relay(r, limits()):
            await start_target(t, nursery)
            circuit = await reserve(t, relay_addr(r))
            await dial_via_relay(c1, circuit, timeout=10)
            await dial_via_relay(c2, circuit, timeout=10)
            await echo_through(c1, t, 4096)
            await echo_through(c2, t, 4096)
            for conn in c1.get_network().get_connections(t.get_id()):
                await conn.close()  # the first circuit ends ...
            broken = False
            with trio.move_on_after(5):
                while not broken:  # ... and takes the last one filed under t's peer id with it
                    await trio.sleep(0.1)
                    try:
                        with trio.fail_after(2):
                            await echo_through(c2, t, 64)
                    except Exception:
                        broken = True
            assert broken, "the other circuit to the target survived"
            nursery.cancel_scope.cancel()


async def test_stock_answers_every_refresh_anew() -> None:
    """Each RESERVE refresh is answered from scratch (a new voucher, a later expiry)."""
    async with hosts(LOOPBACK, []) as (r, t), trio.open_nursery() as nursery:
        async with stock_relay(r, limits()):
            await start_target(t, nursery)
            relay = PeerInfo(r.get_id(), [r.get_addrs()[0]])
            first = await reserve_slot(t, relay, 10)
            await trio.sleep(1.2)
            assert await reserve_slot(t, relay, 10) > first
            nursery.cancel_scope.cancel()


async def test_a_quick_refresh_gets_the_last_answer_again() -> None:
    async with hosts(LOOPBACK, [], []) as (r, t, other), trio.open_nursery() as nursery:
        service = RelayService(r, hop=True)
        await service.start(nursery)
        service._node.protocol.early_delay = 0.05  # repeated answers are late (next test)
        await start_target(t, nursery)
        await start_target(other, nursery)
        relay = PeerInfo(r.get_id(), [r.get_addrs()[0]])
        first = await reserve_slot(t, relay, 10)
        await trio.sleep(1.2)
        for _ in range(5):  # within MIN_REFRESH: the same reservation, not a new one
            assert await reserve_slot(t, relay, 10) == first
        await trio.sleep(1.2)
        assert await reserve_slot(other, relay, 10) > first  # another peer: its own
        await dial_via_relay(other, f"{relay_addr(r)}/p2p-circuit/p2p/{t.get_id()}", timeout=10)
        await echo_through(other, t, 4096)  # the reservation still holds
        nursery.cancel_scope.cancel()


async def test_a_repeated_answer_is_late_and_one_waits_per_peer() -> None:
    """A refresh within MIN_REFRESH gets its answer EARLY_ANSWER_DELAY late; a second request
    of that peer while one waits is reset (one waiting stream per peer)."""
    async with hosts(LOOPBACK, []) as (r, t), trio.open_nursery() as nursery:
        service = RelayService(r, hop=True)
        await service.start(nursery)
        protocol = service._node.protocol
        protocol.early_delay = 3.0
        await start_target(t, nursery)
        relay = PeerInfo(r.get_id(), [r.get_addrs()[0]])
        first = await reserve_slot(t, relay, 10)
        assert protocol.late_answers == 0  # a first RESERVE is answered at once
        got: list[float | str] = []

        async def again() -> None:
            try:
                got.append(await reserve_slot(t, relay, 10))
            except Exception:
                got.append("refused")

        async with trio.open_nursery() as both:
            both.start_soon(again)
            both.start_soon(again)
        assert sorted(got, key=str) == sorted([first, "refused"], key=str)
        assert (protocol.late_answers, protocol.late_resets) == (1, 1)
        assert not protocol._late  # nothing left waiting
        nursery.cancel_scope.cancel()


async def _after_reserve(client: IHost, relay: IHost, wait: float) -> str:
    """RESERVE on a hop stream, then what the relay does with the stream within ``wait`` s."""
    await client.connect(PeerInfo(relay.get_id(), [relay.get_addrs()[0]]))
    stream = await client.new_stream(relay.get_id(), [HOP_PROTOCOL_ID])
    await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
    assert (await read_delimited_msg(stream, HopMessage)).status == StatusCode.OK
    with trio.move_on_after(wait):
        try:
            await stream.read(1)
            return "more"
        except Exception:  # end of stream, or reset
            return "closed"
    await stream.reset()
    return "open"


async def test_stock_reads_a_hop_stream_again_after_answering() -> None:
    """The stock relay keeps a RESERVE's stream open for another message (up to 30 s)."""
    async with hosts(LOOPBACK, []) as (r, t):
        async with stock_relay(r, limits()):
            assert await _after_reserve(t, r, 2.0) == "open"


async def test_a_hop_stream_is_closed_after_its_request() -> None:
    async with hosts(LOOPBACK, [], []) as (r, t, c), trio.open_nursery() as nursery:
        await RelayService(r, hop=True).start(nursery)
        await start_target(t, nursery)
        assert await _after_reserve(t, r, 10.0) == "closed"
        # The reservation made on the closed stream holds: a circuit to t works.
        await dial_via_relay(c, f"{relay_addr(r)}/p2p-circuit/p2p/{t.get_id()}", timeout=10)
        await echo_through(c, t, 4096)
        nursery.cancel_scope.cancel()

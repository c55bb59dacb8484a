"""Sybils against fixed limits (issue 12, "Sybils exhaust fixed limits"; resource limits).

Attacks for ``benchmarks/bench_hostile.py`` (``ATTACKS``; the victim is the runner's provider,
also a relay):

- ``slot-holders``: two identities hold 64 requests each (every slot of a default server):
  each request grants the smallest window (1 KiB), asks for chunks larger than it, reads the
  first and never grants credit, so the server waits with the slot taken until the
  request's deadline (600 s). A request that is ended is asked again at once;
- ``sybil-slot-holders``: the same with 16 identities holding 8 requests each;
- ``idle-connections``: 260 identities each keep an idle connection to the victim and redial
  whenever it is closed (py-libp2p's cap was 256: about 256 idle connections locked new
  peers out);
- ``relay-reservations``: 262 identities each hold a relay reservation on the victim,
  refreshing and re-reserving whenever it is lost;
- ``circuit-flood``: one identity holds a reservation, and 8 others open 80 circuits to it at
  once, again and again (the per-peer circuit limit was checked before an await: 80 were
  accepted against 64).

Everything comes from 127.0.0.1: a victim with the default settings leaves loopback out of
its per-IP limits (``ResourceLimits.limit_loopback``), so these attacks meet the per-peer
rules (fair shares, token buckets, connection and relay limits), as Sybils from many
addresses would. The attackers run in the runner's process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from hostile_common import Target  # type: ignore[import-not-found, unused-ignore]

__all__ = ["ATTACKS"]

log = logging.getLogger(__name__)

#: Input that makes every echo chunk larger than the smallest window a client may grant.
BIG_INPUT = "x" * 4096
#: Seconds between an attacker's redials or re-reservations.
RETRY = 1.0


async def _hold_slot(peer: Any, target: Target) -> None:
    """One request slot held for as long as the server lets it; asked again when it is lost."""
    while True:
        try:
            stream = peer.infer(target.addr, target.capability, BIG_INPUT, timeout=600)
            async for _ in stream:
                await trio.sleep_forever()  # never pull again: no credit
        except Exception:
            await trio.sleep(0.05)


@asynccontextmanager
async def _slot_holders(target: Target, identities: int, each: int) -> AsyncIterator[None]:
    from modelnet_p2p import Peer

    async with AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(Peer(gossip=False, window=1024, listen=[]))
            for _ in range(identities)
        ]
        async with trio.open_nursery() as nursery:
            for peer in peers:
                for _ in range(each):
                    nursery.start_soon(_hold_slot, peer, target)
            await trio.sleep(2.0)  # the slots are taken before the window starts
            yield
            nursery.cancel_scope.cancel()


def _info(addr: str) -> Any:
    from libp2p.peer.peerinfo import info_from_p2p_addr

    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


@asynccontextmanager
async def _bare_hosts(n: int) -> AsyncIterator[list[Any]]:
    from modelnet_p2p.p2p.host import build_host, running_host
    from modelnet_p2p.p2p.identity import Identity

    async with AsyncExitStack() as stack:
        hosts = [running_host(build_host(Identity.generate()), []) for _ in range(n)]
        yield [await stack.enter_async_context(h) for h in hosts]


async def _keep_connected(host: Any, info: Any) -> None:
    while True:
        if not host.get_network().get_connections(info.peer_id):
            unblock = getattr(host.get_network(), "unblock_peer", None)
            if unblock is not None:  # py-libp2p blocks a peer for 60 s after a failed dial
                unblock(info.peer_id)
            with trio.move_on_after(5):
                try:
                    await host.connect(info)
                except Exception:
                    pass
        await trio.sleep(RETRY)


@asynccontextmanager
async def idle_connections(target: Target) -> AsyncIterator[None]:
    info = _info(target.addr)
    async with _bare_hosts(260) as hosts, trio.open_nursery() as nursery:
        for host in hosts:
            nursery.start_soon(_keep_connected, host, info)
        await trio.sleep(3.0)
        yield
        nursery.cancel_scope.cancel()


async def _keep_reservation(host: Any, target: Target) -> None:
    from modelnet_p2p.services.relay import reserve

    while True:
        try:
            await reserve(host, target.addr, timeout=10)
        except Exception:
            pass
        await trio.sleep(RETRY)


@asynccontextmanager
async def relay_reservations(target: Target) -> AsyncIterator[None]:
    from modelnet_p2p.services.relay import RelayService

    async with _bare_hosts(262) as hosts, trio.open_nursery() as nursery:
        for host in hosts:
            await RelayService(host, hop=False).start(nursery)
            nursery.start_soon(_keep_reservation, host, target)
        await trio.sleep(3.0)
        yield
        nursery.cancel_scope.cancel()


async def _connect_once(client: Any, target: Target, held: Any) -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    from modelnet_p2p.services.relay import HOP_PROTOCOL_ID

    info = _info(target.addr)
    try:
        with trio.move_on_after(10):
            if not client.get_network().get_connections(info.peer_id):
                await client.connect(info)
            stream = await client.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
            try:
                msg = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=held.get_id().to_bytes()))
                await write_delimited_msg(stream, msg)
                await read_delimited_msg(stream, HopMessage)
                await trio.sleep(1.0)  # hold the circuit a moment
            finally:
                await stream.reset()
    except Exception:
        await trio.sleep(0.1)


@asynccontextmanager
async def circuit_flood(target: Target) -> AsyncIterator[None]:
    from modelnet_p2p.services.relay import RelayService

    async with _bare_hosts(9) as (held, *clients), trio.open_nursery() as nursery:
        await RelayService(held, hop=False).start(nursery)
        nursery.start_soon(_keep_reservation, held, target)

        async def flood(client: Any) -> None:
            while True:
                async with trio.open_nursery() as wave:
                    for _ in range(10):
                        wave.start_soon(_connect_once, client, target, held)

        for client in clients:
            nursery.start_soon(flood, client)
        await trio.sleep(2.0)
        yield
        nursery.cancel_scope.cancel()


def _holders(identities: int, each: int) -> Callable[[Target], AbstractAsyncContextManager[None]]:
    def attack(target: Target) -> AbstractAsyncContextManager[None]:
        return _slot_holders(target, identities, each)

    return attack


ATTACKS: dict[str, Callable[[Target], AbstractAsyncContextManager[None]]] = {
    "slot-holders": _holders(2, 64),
    "sybil-slot-holders": _holders(16, 8),
    "idle-connections": idle_connections,
    "relay-reservations": relay_reservations,
    "circuit-flood": circuit_flood,
}

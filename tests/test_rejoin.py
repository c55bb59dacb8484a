"""Joining again (``services/discovery/rejoin.py``): a peer left alone dials its bootstrap peers again.

A busy machine or a restarting bootstrap node must not leave a peer running alone until
someone restarts it.
"""

from __future__ import annotations

import itertools
import socket

import multiaddr
import trio
import trio.testing
from libp2p.peer.peerinfo import info_from_p2p_addr

from modelnet_p2p import Capability, Peer
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.services.discovery.rejoin import keep_joined


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def answer(request: object) -> str:
    return "ok"


def test_join_is_retried_with_growing_pauses_while_alone_and_not_while_connected() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    calls: list[float] = []
    state = {"alone": True, "succeed_at": 3}

    async def join() -> bool:
        calls.append(trio.current_time())
        if len(calls) >= state["succeed_at"]:
            state["alone"] = False
            return True
        return False

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_joined(lambda: state["alone"], join))
            await trio.sleep(100)
            assert len(calls) == 3  # connected after the third attempt: no more
            state["alone"], state["succeed_at"] = True, 10**9  # every connection lost again
            await trio.sleep(1000)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(calls)]
    assert gaps[:2] == [2.0, 4.0]  # 1 s, then 2, then 4 after the failures
    assert gaps[3:6] == [2.0, 4.0, 8.0] and max(gaps[3:]) <= 60.0  # again from 1 s, capped
    assert len(calls) < 3 + 30  # backed off, not a dial every second


async def test_a_peer_whose_bootstrap_was_down_at_start_joins_once_it_is_up() -> None:
    port = free_port()
    boot_identity = Identity.generate()
    boot_addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_identity.peer_id}"
    with trio.fail_after(60):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[boot_addr]) as late:
            assert not late.host.get_connected_peers()  # running alone
            await trio.sleep(0.5)
            async with Peer(identity=boot_identity, listen=[f"/ip4/127.0.0.1/tcp/{port}"]) as boot:
                boot.serve(Capability("found-later", task="chat"), answer)
                await boot.announce()
                while str(boot.peer_id) not in {str(p) for p in late.host.get_connected_peers()}:
                    await trio.sleep(0.1)
                cards = await late.discover(model="found-later")
                assert [c.peer_id for c in cards] == [boot.peer_id]
                assert late.discovery.kad.in_routing_table(boot.peer_id)


async def test_stock_swarm_refuses_a_peer_for_a_while_after_one_failed_dial() -> None:
    """Canary of what :meth:`Dialer.unblock` undoes before each new join: py-libp2p's negative
    cache. Once upstream stops refusing, the unblock is no longer needed."""
    port = free_port()
    gone = Identity.generate()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{gone.peer_id}"
    with trio.fail_after(30):
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"]) as peer:
            errors = []
            for _ in range(2):  # the swarm itself (the dialer unblocks: p2p/dialer.py DIAL_BACKOFF)
                try:
                    await peer.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                except Exception as exc:
                    errors.append(str(exc))
            assert len(errors) == 2 and "negative cache" in errors[1]

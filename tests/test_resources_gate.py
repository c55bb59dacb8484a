"""Inbound streams rated per peer before negotiation, and repeat offenders refused
(``specs/network.md``, "Resource limits": streams and repeat offenders).

Findings (issue 12, the hostile benchmark): a DHT request flood reopened streams as fast as the
victim reset them (100-230 a second from one peer), each paying yamux and multistream-select
before any handler ran: a legitimate caller kept 0.21-0.29x of its throughput. And Sybils
redialing as fast as the connection limits closed them had a newcomer's first connection
closed before it carried its first call (it had done no work yet; they had).

Live hosts on 127.0.0.1; the checks count streams, connections and calls, never timings.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import multiaddr
import psutil
import trio
from hostile_util import keep_connected
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from modelnet_p2p import Peer
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.resources import Penalties, ResourceLimits, StreamGate, TokenBuckets

MiB = 1 << 20
RSS_BOUND = 64 * MiB
ECHO = TProtocol("/modelnet-test/gate-echo/1")


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def bounded(what: str, fd_bound: int) -> Iterator[None]:
    rss0, fds0 = rss(), fds()
    yield
    grew, opened = rss() - rss0, fds() - fds0
    assert grew <= RSS_BOUND, f"{what}: RSS grew by {grew / MiB:.0f} MiB"
    assert opened <= fd_bound, f"{what}: {opened} more fds"


def _info(addr: str) -> PeerInfo:
    return info_from_p2p_addr(multiaddr.Multiaddr(addr))


async def hold(request: Any) -> str:
    return "pong"


async def echo(stream: INetStream) -> None:
    try:
        data = await stream.read(64)
        await stream.write(data)
        await stream.close()
    except Exception:
        with trio.move_on_after(1):
            await stream.reset()


def new_host() -> Any:
    return running_host(build_host(Identity.generate()), [])


async def wait_for(condition: Any, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.02)


# -- the parts, sans-I/O ----------------------------------------------------------------------


def test_token_bucket_waits_queue_up_and_refuse_past_max_wait() -> None:
    buckets = TokenBuckets(rate=10.0, burst=2.0)
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) == 0.0
    assert buckets.take("a", 0.0) is None  # empty, no waiting allowed
    assert buckets.take("a", 0.0, max_wait=0.25) == 0.1  # the next token, in 0.1 s
    assert buckets.take("a", 0.0, max_wait=0.25) == 0.2  # queued behind it
    assert buckets.take("a", 0.0, max_wait=0.25) is None  # 0.3 s away
    assert buckets.take("b", 0.0) == 0.0  # another key, its own bucket
    many = TokenBuckets(rate=1.0, burst=1.0, max_keys=100)
    for i in range(1000):
        many.take(str(i), 0.0)
    assert len(many) == 100


def test_penalties_refuse_after_strikes_within_the_window_then_forgive() -> None:
    p = Penalties(window=10.0, duration=30.0, max_peers=50)
    assert not p.strike("x", "connection", 0.0, 3)
    assert not p.strike("x", "connection", 20.0, 3)  # the first fell out of the window
    assert not p.strike("x", "connection", 21.0, 3)
    assert p.strikes("x", "connection", 21.0) == 2
    assert p.strike("x", "connection", 22.0, 3)
    assert p.refused("x", 23.0) and not p.refused("y", 23.0)
    assert not p.refused("x", 52.5)  # 30 s later
    for i in range(500):
        p.strike(str(i), "stream", 0.0, 2)
        p.strike(str(i), "stream", 0.0, 2)
    assert p.refused_now(0.0) <= 50


def test_stream_gate_exempt_peers_are_rated_but_never_refused() -> None:
    limits = ResourceLimits(stream_rate=1.0, stream_burst=1.0, stream_wait=0.0, stream_strikes=2)
    now = [0.0]
    refused: list[str] = []
    gate = StreamGate(limits, Penalties(60, 30), lambda: now[0], on_refused=refused.append,
                      exempt=lambda p: p == "boot")
    for peer in ("boot", "sybil"):
        assert gate.admit(peer) == 0.0
        assert gate.admit(peer) is None
        assert gate.admit(peer) is None
    assert refused == ["sybil"]
    now[0] = 10.0
    assert gate.admit("boot") == 0.0
    assert gate.admit("sybil") is None  # refused for 30 s, whatever its bucket holds


# -- live: a stream flood ----------------------------------------------------------------------

FLOOD_LIMITS = ResourceLimits(stream_rate=20.0, stream_burst=40.0, stream_wait=0.2, stream_strikes=20)
FLOOD_WORKERS = 32
FLOOD_SECONDS = 3.0


async def _flood(host: IHost, victim_id: Any, counts: dict[str, int], stop: trio.Event) -> None:
    """Open streams as fast as they are refused or answered; count what got through."""
    while not stop.is_set():
        try:
            with trio.fail_after(5):
                stream = await host.new_stream(victim_id, [ECHO])
                counts["negotiated"] += 1
                await stream.write(b"x")
                await stream.read(1)
                await stream.close()
        except Exception:
            counts["refused"] += 1
            await trio.sleep(0)  # as fast as the victim lets it


async def test_a_stream_flood_is_rated_and_refused_while_others_are_served() -> None:
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Peer(gossip=False, resource_limits=FLOOD_LIMITS))
        victim.serve("hold", hold)
        victim.host.set_stream_handler(ECHO, echo)
        caller = await stack.enter_async_context(Peer(gossip=False))
        assert (await caller.call(victim.addrs[0], "hold", "ping", timeout=10)).value == "pong"
        with bounded("a stream flood", fd_bound=32):
            attacker = await stack.enter_async_context(new_host())
            await attacker.connect(_info(victim.addrs[0]))
            counts = {"negotiated": 0, "refused": 0}
            served = 0
            stop = trio.Event()
            async with trio.open_nursery() as nursery:
                for _ in range(FLOOD_WORKERS):
                    nursery.start_soon(_flood, attacker, victim.host.get_id(), counts, stop)
                with trio.move_on_after(FLOOD_SECONDS):
                    while True:  # the legitimate caller, on its own connection, all along
                        if (await caller.call(victim.addrs[0], "hold", "ping", timeout=10)).value == "pong":
                            served += 1
                        await trio.sleep(0.05)
                stop.set()
            stats = victim.connmgr.stats()
            # The old code negotiated every stream the attacker opened (thousands in 3 s).
            # Here: the burst, the rate for the time before the attacker was refused, and the
            # streams waiting their turn at that moment.
            allowed = FLOOD_LIMITS.stream_burst + FLOOD_LIMITS.stream_rate * FLOOD_SECONDS + FLOOD_WORKERS
            assert counts["negotiated"] <= allowed, counts
            assert counts["refused"] > 0, counts
            assert stats.streams_refused > 0 and stats.peers_refused >= 1, stats
            # The attacker is refused for a while: its connections were closed, a new one is too.
            await wait_for(lambda: not victim.host.get_network().get_connections(attacker.get_id()), 10)
            try:
                with trio.fail_after(10):
                    await attacker.connect(_info(victim.addrs[0]))
                    await attacker.new_stream(victim.host.get_id(), [ECHO])
                reconnected = True
            except Exception:
                reconnected = False
            assert not reconnected
            assert victim.connmgr.stats().connections_refused >= 1
        assert served >= 5, f"the legitimate caller was served {served} times"
        assert (await caller.call(victim.addrs[0], "hold", "ping", timeout=10)).value == "pong"


async def test_a_caller_over_the_stream_rate_waits_instead_of_failing() -> None:
    """Streams over the rate wait their turn (up to ``stream_wait``): a caller a little over
    it is slowed down, not refused."""
    limits = ResourceLimits(stream_rate=20.0, stream_burst=5.0, stream_wait=1.0, stream_strikes=5)
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Peer(gossip=False, resource_limits=limits))
        victim.host.set_stream_handler(ECHO, echo)
        host = await stack.enter_async_context(new_host())
        await host.connect(_info(victim.addrs[0]))
        ok = 0

        async def one() -> None:
            nonlocal ok
            stream = await host.new_stream(victim.host.get_id(), [ECHO])
            await stream.write(b"x")
            if await stream.read(1) == b"x":
                ok += 1
            await stream.close()

        async with trio.open_nursery() as nursery:  # 15 at once: 5 at once, 10 wait <= 0.5 s
            for _ in range(15):
                nursery.start_soon(one)
        assert ok == 15
        gate = victim.connmgr.streams
        assert gate.delayed >= 5 and gate.rate_limited == 0
        assert victim.connmgr.stats().peers_refused == 0


# -- live: Sybils redialing past the connection limit --------------------------------------------

SYBILS = 16
CHURN_LIMITS = ResourceLimits(max_connections=8, connection_strikes=2, penalty_time=60.0)


@asynccontextmanager
async def _sybils(target: str, n: int) -> AsyncIterator[list[IHost]]:
    """``n`` identities that keep a connection to ``target``, redialing at once when it is
    closed, and each use it once (an echo stream): they have done work, a newcomer has not."""
    info = _info(target)
    async with AsyncExitStack() as stack:
        hosts = [await stack.enter_async_context(new_host()) for _ in range(n)]

        async def use(host: IHost) -> None:
            stream = await host.new_stream(info.peer_id, [ECHO])
            await stream.write(b"x")
            await stream.read(1)
            await stream.close()

        async with trio.open_nursery() as nursery:
            for h in hosts:
                nursery.start_soon(partial(keep_connected, h, info, pause=0.1, use=use))
            yield hosts
            nursery.cancel_scope.cancel()


async def test_redialing_sybils_make_room_before_a_newcomer_and_get_refused() -> None:
    async with AsyncExitStack() as stack:
        victim = await stack.enter_async_context(Peer(gossip=False, resource_limits=CHURN_LIMITS))
        victim.serve("hold", hold)
        victim.host.set_stream_handler(ECHO, echo)
        with bounded("redialing Sybils", fd_bound=64):
            sybils = await stack.enter_async_context(_sybils(victim.addrs[0], SYBILS))
            ids = {str(h.get_id()) for h in sybils}
            await wait_for(lambda: victim.connmgr.stats().limited >= SYBILS, 30)
            newcomers_kept = served = 0
            errors: list[str] = []
            for _ in range(4):
                async with Peer(gossip=False) as newcomer:
                    closed = 0

                    class Count:
                        async def disconnected(self, network: Any, conn: Any) -> None:
                            nonlocal closed
                            closed += 1

                        def __getattr__(self, name: str) -> Any:
                            async def nothing(*_a: Any) -> None:
                                return None

                            return nothing

                    newcomer.host.get_network().register_notifee(Count())  # type: ignore[arg-type]
                    for _ in range(5):
                        try:
                            with trio.fail_after(15):
                                result = await newcomer.call(victim.addrs[0], "hold", "ping", timeout=10)
                            served += result.value == "pong"
                        except Exception as exc:
                            errors.append(repr(exc))
                        await trio.sleep(0.1)
                    if closed == 0:
                        newcomers_kept += 1
            stats = victim.connmgr.stats()
            open_sybils = sum(
                1 for c in victim.host.get_network().get_connections() if str(c.muxed_conn.peer_id) in ids
            )
        # The old code closed most newcomers' first connection before their first call (3 of
        # 4 in three runs of four, 1 in the other: they had done no work; the Sybils had), and
        # let every Sybil back in at once. Here one of 4 is still closed now and then (when
        # every other connection carries a stream at that moment; not solved yet).
        assert newcomers_kept >= 3, f"{4 - newcomers_kept} of 4 newcomers had their connection closed"
        # (a call now and then ends in a stream reset under this churn, not diagnosed yet)
        assert served >= 16, f"{served} of 20 calls served: {errors}"
        assert stats.peers_refused >= 1 and stats.connections_refused >= 1, stats
        assert open_sybils <= CHURN_LIMITS.max_connections + 8

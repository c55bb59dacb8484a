"""Circuit relay v2: real hosts on 127.0.0.1, a relay R, targets T that cannot be dialed, clients C."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
import trio.testing
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

from modelnet_p2p.errors import ConfigError, UnavailableError
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.services.relay import (
    HOP_PROTOCOL_ID,
    CircuitSlots,
    RelayReservation,
    RelayService,
    dial_via_relay,
    is_circuit_addr,
    keep_reservation,
    needs_relay,
    parse_circuit_addr,
    publicly_dialable,
    reserve,
)

ECHO = TProtocol("/modelnet-test/echo/1")
LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
WORKER = Path(__file__).resolve().parent / "relay_worker.py"
ID_R = "12D3KooWJ7HcSFPWpQcjpW8cJ3AGUQVDcwuoeH5dQyvsWsVHYBVc"
ID_T = "12D3KooWEwNmaPKLTX5K9QqGJEG6vw9KRdsoWkeyH7DJ45fmdQRa"


async def echo(stream: INetStream) -> None:
    try:
        while True:
            await stream.write(await stream.read(65536))
    except StreamEOF:
        await stream.close()
    except Exception:
        await stream.reset()


async def echo_through(client: IHost, target: IHost, size: int, chunk: int = 65536) -> None:
    """Send ``size`` random bytes to ``target``'s echo handler and check they all come back."""
    stream = await client.new_stream(target.get_id(), [ECHO])
    data, got = os.urandom(size), bytearray()

    async def write() -> None:
        for i in range(0, size, chunk):
            await stream.write(data[i : i + chunk])
        await stream.close_write()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            while len(got) < size:
                got += await stream.read(65536)
    assert bytes(got) == data
    await stream.close()


@asynccontextmanager
async def hosts(*listen: list[multiaddr.Multiaddr]) -> AsyncIterator[list[IHost]]:
    """One host per argument, listening there ([] for a host that cannot be dialed at all)."""
    async with AsyncExitStack() as stack:
        out = []
        for addrs in listen:
            host = build_host(Identity.generate())
            out.append(await stack.enter_async_context(running_host(host, addrs)))
        yield out


async def start_target(host: IHost, nursery: trio.Nursery) -> RelayService:
    service = RelayService(host, hop=False)
    await service.start(nursery)
    host.set_stream_handler(ECHO, echo)
    return service


def relay_addr(host: IHost) -> str:
    return str(host.get_addrs()[0])


async def hop(client: IHost, relay: IHost, msg: HopMessage) -> StatusCode:
    """Send one hop message from ``client`` to ``relay``; the status of the answer."""
    if not client.get_network().get_connections(relay.get_id()):
        await client.connect(PeerInfo(relay.get_id(), [relay.get_addrs()[0]]))
    stream = await client.new_stream(relay.get_id(), [HOP_PROTOCOL_ID])
    try:
        with trio.fail_after(10):
            await write_delimited_msg(stream, msg)
            return StatusCode((await read_delimited_msg(stream, HopMessage)).status)
    finally:
        await stream.reset()


async def concurrent_connects(
    client: IHost, relay: IHost, target: IHost, n: int, *, closed_ok: bool = False
) -> list[StatusCode | None]:
    """``n`` CONNECT requests for ``target`` sent from ``client`` to ``relay`` at once; their
    statuses. ``closed_ok``: a stream the relay closes without an answer counts as None
    (the stock relay does so on a busy machine) instead of failing the test."""
    connect = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=target.get_id().to_bytes()))
    statuses: list[StatusCode | None] = []

    async def one() -> None:
        try:
            statuses.append(await hop(client, relay, connect))
        except StreamEOF:
            if not closed_ok:
                raise
            statuses.append(None)

    async with trio.open_nursery() as clients:
        for _ in range(n):
            clients.start_soon(one)
    return statuses


# -- a relayed connection ---------------------------------------------------------------


async def test_client_reaches_undialable_target_through_relay() -> None:
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c), trio.open_nursery() as nursery:
        relay = RelayService(r, hop=True)
        await relay.start(nursery)
        await start_target(t, nursery)
        assert t.get_addrs() == []  # T listens nowhere: only the relay can reach it

        circuit = await reserve(t, relay_addr(r), timeout=10)
        assert circuit == f"{relay_addr(r)}/p2p-circuit/p2p/{t.get_id()}"
        assert is_circuit_addr(circuit) and not is_circuit_addr(relay_addr(r))
        assert relay.reservations == 1

        await dial_via_relay(c, circuit, timeout=10)
        (conn,) = c.get_network().get_connections(t.get_id())
        assert conn.get_connection_type().value == "relayed"
        # End-to-end Noise: the secured session on C's side authenticated T itself.
        assert conn.muxed_conn.peer_id == t.get_id()
        assert relay.circuits == 1

        await echo_through(c, t, 1 << 20)
        await dial_via_relay(c, circuit, timeout=10)  # already connected: nothing to do
        assert len(c.get_network().get_connections(t.get_id())) == 1
        nursery.cancel_scope.cancel()


async def test_concurrent_circuits_to_one_target_are_independent() -> None:
    """Stock py-libp2p 0.8.1 closes the other circuit to T when one ends; ours does not."""
    async with hosts(LOOPBACK, [], LOOPBACK, LOOPBACK) as (r, t, c1, c2), trio.open_nursery() as nursery:
        relay = RelayService(r, hop=True)
        await relay.start(nursery)
        await start_target(t, nursery)
        circuit = await reserve(t, relay_addr(r))
        await dial_via_relay(c1, circuit, timeout=10)
        await dial_via_relay(c2, circuit, timeout=10)
        assert relay.circuits == 2
        done: list[str] = []

        async def long_exchange() -> None:  # c2: 40 round trips spanning c1's whole life
            stream = await c2.new_stream(t.get_id(), [ECHO])
            for i in range(40):
                msg = f"ping {i}".encode()
                await stream.write(msg)
                got = b""
                with trio.fail_after(5):
                    while len(got) < len(msg):
                        got += await stream.read(len(msg) - len(got))
                assert got == msg
                await trio.sleep(0.03)
            await stream.close()
            done.append("c2")

        async def short_exchange() -> None:  # c1: 1 MB, then it closes its circuit
            await echo_through(c1, t, 1 << 20)
            for conn in c1.get_network().get_connections(t.get_id()):
                await conn.close()
            done.append("c1")

        async with trio.open_nursery() as clients:
            clients.start_soon(long_exchange)
            clients.start_soon(short_exchange)
        assert sorted(done) == ["c1", "c2"]
        with trio.fail_after(5):
            while relay.circuits != 1:
                await trio.sleep(0.05)
        await echo_through(c2, t, 4096)  # c2's circuit is still up
        nursery.cancel_scope.cancel()


async def test_relay_slots_are_not_squatted() -> None:
    """A peer reserves only for itself, and a peer that left frees its slot."""
    async with hosts(LOOPBACK, [], [], LOOPBACK) as (r, t1, t2, c), trio.open_nursery() as nursery:
        await RelayService(r, hop=True, max_reservations=1).start(nursery)
        await start_target(t1, nursery)
        await start_target(t2, nursery)
        # c asks for a reservation in t1's name: the relay files it under c.
        await c.connect(PeerInfo(r.get_id(), [r.get_addrs()[0]]))
        stream = await c.new_stream(r.get_id(), [HOP_PROTOCOL_ID])
        await write_delimited_msg(
            stream, HopMessage(type=HopMessage.RESERVE, peer=CircuitPeerId(id=t1.get_id().to_bytes()))
        )
        assert (await read_delimited_msg(stream, HopMessage)).status == StatusCode.OK
        await stream.close()
        with pytest.raises(UnavailableError, match="NO_RESERVATION"):
            await dial_via_relay(c, f"{relay_addr(r)}/p2p-circuit/p2p/{t1.get_id()}", timeout=10)
        # The only slot is c's until c disconnects.
        with pytest.raises(UnavailableError, match="RESOURCE_LIMIT_EXCEEDED"):
            await reserve(t1, relay_addr(r))
        await c.disconnect(r.get_id())
        await reserve(t1, relay_addr(r))
        nursery.cancel_scope.cancel()


async def test_a_holder_that_disconnects_leaves_no_connection_behind() -> None:
    """The relay lets go of a holder's connection (its Noise and yamux objects) once it closes,
    not at the next RESERVE (after a Sybil reservation attack: about 128 closed connections
    kept), and the freed slot still serves a newcomer's circuits."""
    async with hosts(LOOPBACK, [], [], LOOPBACK) as (r, t1, t2, c), trio.open_nursery() as nursery:
        relay = RelayService(r, hop=True, max_reservations=1)
        await relay.start(nursery)
        await start_target(t1, nursery)
        await start_target(t2, nursery)
        await reserve(t1, relay_addr(r))
        with trio.fail_after(10):  # the relay files the connection once its answer is out
            while not relay.holder_connections:
                await trio.sleep(0.02)
        assert relay.reservations == 1
        await t1.disconnect(r.get_id())
        with trio.fail_after(10):  # the swarm reports a close after its own clean-up
            while relay.holder_connections:
                await trio.sleep(0.02)
        circuit = await reserve(t2, relay_addr(r))  # the only slot is free again
        assert relay.reserving_peers() == [str(t2.get_id())]
        await dial_via_relay(c, circuit, timeout=10)
        await echo_through(c, t2, 4096)
        nursery.cancel_scope.cancel()


async def test_circuit_limit_holds_against_concurrent_connects() -> None:
    """The slot is taken before the relay waits for the target (stock: 80 accepted against 64)."""
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c), trio.open_nursery() as nursery:
        relay = RelayService(r, hop=True, max_circuits_per_peer=2)
        await relay.start(nursery)
        await start_target(t, nursery)
        await reserve(t, relay_addr(r))
        statuses = await concurrent_connects(c, r, t, 8)
        assert sorted(statuses, key=str) == sorted(
            [StatusCode.OK] * 2 + [StatusCode.RESOURCE_LIMIT_EXCEEDED] * 6, key=str
        )
        with trio.fail_after(10):  # the circuits ended with their streams: the slots are free again
            while relay.slots.total:
                await trio.sleep(0.05)
        circuit = await reserve(t, relay_addr(r))
        await dial_via_relay(c, circuit, timeout=10)
        await echo_through(c, t, 4096)
        nursery.cancel_scope.cancel()


def test_circuit_slots() -> None:
    slots = CircuitSlots(2)
    assert slots.acquire("a") and slots.acquire("a") and not slots.acquire("a")
    assert slots.acquire("b") and slots.total == 3 and slots.open("a") == 2
    slots.release("a")
    assert slots.open("a") == 1 and slots.acquire("a") and not slots.acquire("a")
    for _ in range(4):  # extra releases are ignored
        slots.release("a")
    assert slots.open("a") == 0 and slots.total == 1
    with pytest.raises(ConfigError):
        CircuitSlots(0)


# -- keeping a reservation ------------------------------------------------------------------


class FakeLink:
    """A relay link without a network: each reservation lasts ``ttl`` s on a clock tied to trio's."""

    relay_addr = f"/ip4/127.0.0.1/tcp/4001/p2p/{ID_R}"
    circuit_addr = f"{relay_addr}/p2p-circuit/p2p/{ID_T}"
    EPOCH = 1.8e9  # the Unix time at trio time 0

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.up = True
        self.refuse = False
        self.calls: list[float] = []

    @classmethod
    def wall_clock(cls) -> float:
        return cls.EPOCH + trio.current_time()

    async def reserve(self, timeout: float) -> float:
        self.calls.append(trio.current_time())
        await trio.sleep(0.01)
        if self.refuse:
            raise UnavailableError("relay refused the reservation: RESOURCE_LIMIT_EXCEEDED")
        self.up = True  # reserving connects first
        return self.wall_clock() + self.ttl

    def connected(self) -> bool:
        return self.up


async def test_reservation_refresh_schedule(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    link, changes = FakeLink(ttl=100), []
    kept = RelayReservation(link, changes.append, wall_clock=FakeLink.wall_clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kept.run)
        assert await kept.wait(timeout=1) == link.circuit_addr
        await trio.sleep(1020)
        # Refreshed when half the remaining lifetime has passed: every 50 s.
        gaps = [b - a for a, b in itertools.pairwise(link.calls)]
        assert len(link.calls) == 21 and all(49.9 < g < 50.1 for g in gaps), gaps
        assert kept.refreshes == 21 and changes == [link.circuit_addr]
        assert kept.expires_at is not None and 50 <= kept.expires_at - FakeLink.wall_clock() <= 100

        # The connection to the relay drops: lost at once (within a poll), then reserved again.
        link.up = False
        await trio.sleep(1)
        assert changes == [link.circuit_addr, None, link.circuit_addr]

        # The relay refuses while the connection is down: retries back off 1, 2, 4, 8 s, then 8 s.
        link.refuse, link.up, link.calls = True, False, []
        await trio.sleep(60)
        assert changes[-1] is None and kept.circuit_addr is None
        gaps = [round(b - a) for a, b in itertools.pairwise(link.calls)]
        assert gaps[:5] == [1, 2, 4, 8, 16], gaps
        link.refuse = False
        assert await kept.wait(timeout=120) == link.circuit_addr
        kept.cancel()
    assert not kept.running


async def test_reservation_gives_up_after_max_failures(mock_clock: trio.testing.MockClock) -> None:
    mock_clock.autojump_threshold = 0
    link = FakeLink(ttl=100)
    link.refuse, link.up = True, False
    kept = RelayReservation(link, max_failures=3, max_backoff=4, wall_clock=FakeLink.wall_clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kept.run)
        with pytest.raises(UnavailableError, match="gave up"):
            await kept.wait(timeout=100)
    assert len(link.calls) == 3 and not kept.running
    with pytest.raises(ConfigError):
        RelayReservation(link, refresh_fraction=1.0)


async def test_reservation_is_refreshed_past_its_ttl() -> None:
    async with hosts(LOOPBACK, [], [], LOOPBACK) as (r, t, lapsed, c), trio.open_nursery() as nursery:
        await RelayService(r, hop=True, reservation_ttl=3).start(nursery)
        await start_target(t, nursery)
        await start_target(lapsed, nursery)
        changes: list[str | None] = []
        kept = keep_reservation(t, relay_addr(r), nursery, changes.append, timeout=5)
        circuit = await kept.wait(timeout=10)
        once = await reserve(lapsed, relay_addr(r))  # reserved once, never refreshed

        await trio.sleep(3.5)  # past the TTL (the schedule itself is tested on a mock clock below)
        assert kept.refreshes >= 3 and kept.circuit_addr == circuit
        assert changes == [circuit]  # refreshes do not announce anything new
        await dial_via_relay(c, circuit, timeout=10)
        await echo_through(c, t, 64 * 1024)
        with pytest.raises(UnavailableError, match="NO_RESERVATION"):
            await dial_via_relay(c, once, timeout=10)
        nursery.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_relay_process(key: Path, port: int) -> tuple[trio.Process, str]:
    cmd = [sys.executable, str(WORKER), "--identity", str(key), "--listen", f"/ip4/127.0.0.1/tcp/{port}"]
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(15):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            assert chunk, "relay worker exited"
            line += chunk
    return proc, json.loads(line)["addr"]


async def test_target_reserves_again_after_relay_restarts(tmp_path: Path) -> None:
    """The relay runs in another process; it is killed and started again on the same port."""
    key, port = tmp_path / "relay.key", free_port()
    Identity.generate().save(key)
    procs: list[trio.Process] = []
    try:
        proc, raddr = await start_relay_process(key, port)
        procs.append(proc)
        async with hosts([], LOOPBACK) as (t, c), trio.open_nursery() as nursery:
            await start_target(t, nursery)
            changes: list[str | None] = []
            kept = keep_reservation(t, raddr, nursery, changes.append, timeout=5, max_backoff=2)
            circuit = await kept.wait(timeout=10)
            await dial_via_relay(c, circuit, timeout=10)
            await echo_through(c, t, 64 * 1024)

            proc.kill()
            await proc.wait()
            with trio.fail_after(10):
                while kept.circuit_addr is not None:
                    await trio.sleep(0.05)
            assert changes == [circuit, None]
            for conn in c.get_network().get_connections(t.get_id()):
                await conn.close()  # the old circuit died with the relay

            proc, _ = await start_relay_process(key, port)
            procs.append(proc)
            assert await kept.wait(timeout=15) == circuit
            assert changes == [circuit, None, circuit]
            await dial_via_relay(c, circuit, timeout=10)
            await echo_through(c, t, 64 * 1024)
            nursery.cancel_scope.cancel()
    finally:
        for p in procs:
            p.kill()
            await p.wait()


# -- failures are bounded and explained ----------------------------------------------------


async def test_failures() -> None:
    async with hosts(LOOPBACK, LOOPBACK, [], LOOPBACK) as (r, plain, t, c), trio.open_nursery() as nursery:
        await RelayService(r, hop=True).start(nursery)
        await start_target(t, nursery)
        # A peer that is no relay refuses reservations; a target without one cannot be dialed.
        with pytest.raises(UnavailableError, match="cannot reserve"):
            await reserve(t, relay_addr(plain), timeout=5)
        no_slot = f"{relay_addr(r)}/p2p-circuit/p2p/{t.get_id()}"
        with pytest.raises(UnavailableError, match="NO_RESERVATION"):
            await dial_via_relay(c, no_slot, timeout=10)
        # Nothing listening: fails at once. A listener that never answers: fails at the timeout.
        closed = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{r.get_id()}"
        with pytest.raises(UnavailableError):
            await dial_via_relay(c, f"{closed}/p2p-circuit/p2p/{t.get_id()}", timeout=5)
        with trio.socket.socket() as silent:
            await silent.bind(("127.0.0.1", 0))
            silent.listen()
            port = silent.getsockname()[1]
            mute = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID_R}/p2p-circuit/p2p/{t.get_id()}"
            start = trio.current_time()
            with pytest.raises(UnavailableError, match="timed out"):
                await dial_via_relay(c, mute, timeout=1)
            assert trio.current_time() - start < 3
            with pytest.raises(UnavailableError, match="timed out"):
                await reserve(t, f"/ip4/127.0.0.1/tcp/{port}/p2p/{ID_R}", timeout=1)
        # Giving up after max_failures, and saying so to whoever waits.
        kept = keep_reservation(t, closed, nursery, timeout=1, max_backoff=0.1, max_failures=2)
        with pytest.raises(UnavailableError, match="gave up"):
            await kept.wait(timeout=10)
        assert not kept.running
        nursery.cancel_scope.cancel()


async def test_clean_shutdown(fd_count: Callable[[], int]) -> None:
    def living() -> int:
        return trio.lowlevel.current_statistics().tasks_living

    tasks, fds = living(), fd_count()
    kept: RelayReservation | None = None
    async with hosts(LOOPBACK, [], LOOPBACK) as (r, t, c):
        async with trio.open_nursery() as nursery:
            relay = RelayService(r, hop=True)
            await relay.start(nursery)
            target = await start_target(t, nursery)
            kept = keep_reservation(t, relay_addr(r), nursery)
            circuit = await kept.wait(timeout=10)
            await dial_via_relay(c, circuit, timeout=10)
            await echo_through(c, t, 4096)

            kept.cancel()
            relay.stop()
            target.stop()
            with trio.fail_after(5):
                while kept.running or relay.circuits:
                    await trio.sleep(0.05)
            # A stopped relay answers new relay streams with a reset.
            with pytest.raises(UnavailableError):
                await reserve(t, relay_addr(r), timeout=5)
    assert kept is not None and not kept.running
    with trio.fail_after(5):
        while living() > tasks:
            await trio.sleep(0.05)
    assert fd_count() <= fds


# -- addresses and reachability -----------------------------------------------------------


def test_circuit_addresses() -> None:
    relay = f"/ip4/127.0.0.1/tcp/4001/p2p/{ID_R}"
    assert parse_circuit_addr(f"{relay}/p2p-circuit/p2p/{ID_T}") == (relay, ID_T)
    assert is_circuit_addr(f"{relay}/p2p-circuit/p2p/{ID_T}")
    assert not is_circuit_addr(relay) and not is_circuit_addr("not an address")
    for bad in (
        relay,  # not relayed
        f"{relay}/p2p-circuit",  # no target
        f"/ip4/127.0.0.1/tcp/4001/p2p-circuit/p2p/{ID_T}",  # no relay id
        f"{relay}/p2p-circuit/p2p/{ID_T}/p2p-circuit/p2p/{ID_R}",  # two hops
    ):
        with pytest.raises(ConfigError):
            parse_circuit_addr(bad)


@pytest.mark.parametrize(
    ("listen", "bootstrap", "dialable"),
    [
        ([], [], False),  # listens nowhere
        (["/ip4/127.0.0.1/tcp/0"], [], True),  # a local mesh
        (["/ip4/127.0.0.1/tcp/0"], ["/ip4/127.0.0.1/tcp/4001"], True),
        (["/ip4/192.168.1.5/tcp/0"], ["/ip4/192.168.1.2/tcp/4001"], True),  # a LAN mesh
        (["/ip4/127.0.0.1/tcp/0"], ["/ip4/192.168.1.2/tcp/4001"], False),  # loopback only, LAN mesh
        (["/ip4/10.0.0.5/tcp/0"], ["/ip4/9.9.9.9/tcp/4001"], False),  # behind NAT
        (["/ip4/100.64.0.5/tcp/0"], ["/dns4/boot.example.org/tcp/4001"], False),  # carrier-grade NAT
        (["/ip4/8.8.8.8/tcp/0"], ["/ip4/9.9.9.9/tcp/4001"], True),  # a public address
        (["/ip6/2001:4860::1/tcp/0"], ["/ip6/2606:4700::1/tcp/4001"], True),
        ([f"/ip4/127.0.0.1/tcp/1/p2p/{ID_R}/p2p-circuit/p2p/{ID_T}"], [], False),  # relayed only
    ],
)
def test_publicly_dialable(listen: list[str], bootstrap: list[str], dialable: bool) -> None:
    assert publicly_dialable(listen, bootstrap) is dialable
    assert needs_relay("auto", listen, bootstrap) is not dialable
    assert needs_relay("private", listen, bootstrap) is True
    assert needs_relay("public", listen, bootstrap) is False


def test_bad_settings() -> None:
    with pytest.raises(ConfigError):
        needs_relay("sometimes", [], [])  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RelayService(build_host(Identity.generate()), hop=True, max_reservations=0)

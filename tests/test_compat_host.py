"""Canaries for ``modelnet_p2p/p2p/_compat/host.py``: stock py-libp2p 0.8.1 hosts still behave so.

The ``test_stock_*`` tests assert the upstream behaviour each shim corrects; when one fails,
upstream has changed: check whether the shim is still needed, and drop it (and its canary) if
not. The other tests check that the shim corrects it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMultiselectCommunicator, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.peerinfo import PeerInfo
from libp2p.protocol_muxer.multiselect import Multiselect

from modelnet_p2p.errors import ConfigError
from modelnet_p2p.p2p._compat.host import (
    check_port_free,
    disable_auto_connector,
    gate_inbound,
    guard_handler,
    retire_stream_handler,
)
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROTO = TProtocol("/modelnet-test/compat/1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stock_host() -> IHost:
    """py-libp2p's own host, with the connection settings a modelnet peer uses."""
    return new_host(
        key_pair=Identity.generate().key_pair,
        connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
    )


def port_of(host: IHost) -> int:
    return int(host.get_addrs()[0].value_for_protocol("tcp"))


# -- the listener: SO_REUSEPORT, and leaving run() --------------------------------------------


async def test_stock_listeners_share_a_port() -> None:
    """Two hosts both bind the same fixed port; the kernel splits connections between them."""
    addr = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{free_port()}")]
    a, b = stock_host(), stock_host()
    async with a.run(addr), b.run(addr):
        assert port_of(a) == port_of(b)
    await a.close()
    await b.close()


async def test_taken_port_is_found_before_listening() -> None:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as a:
        taken = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port_of(a)}")
        with pytest.raises(ConfigError, match="in use"):
            check_port_free(taken)
        with pytest.raises(ConfigError, match="in use"):
            async with running_host(build_host(Identity.generate()), [taken]):
                pass


async def test_stock_leaving_run_keeps_the_listener_open() -> None:
    """Hence ``running_host`` always calls ``host.close()``."""
    host = stock_host()
    async with host.run(LOOPBACK):
        port = port_of(host)
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)  # still accepted
        await stream.aclose()
    finally:
        await host.close()
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)


# -- closing connections -----------------------------------------------------------------------


async def test_stock_close_takes_a_tenth_of_a_second_per_connection() -> None:
    # SwarmConn._cleanup sleeps 0.1 s, and Swarm.close() closes connections one after another:
    # at least 0.1 s each (about 0.2 s measured). A concurrent close would take about 0.1 s in all.
    others = [build_host(Identity.generate()) for _ in range(6)]
    host = stock_host()
    async with host.run(LOOPBACK):
        async with trio.open_nursery() as nursery:
            for other in others:
                await nursery.start(_serve_until_cancelled, other)
            for other in others:
                await host.connect(PeerInfo(other.get_id(), other.get_addrs()))
            start = trio.current_time()
            await host.close()
            took = trio.current_time() - start
            nursery.cancel_scope.cancel()
    assert took >= 0.1 * len(others), f"host.close() took {took:.2f} s for {len(others)} connections"


async def _serve_until_cancelled(host: IHost, *, task_status: trio.TaskStatus[None]) -> None:
    async with running_host(host, LOOPBACK):
        task_status.started()
        await trio.sleep_forever()


async def test_connections_close_at_once() -> None:
    others = [build_host(Identity.generate()) for _ in range(6)]
    async with trio.open_nursery() as nursery:
        for other in others:
            await nursery.start(_serve_until_cancelled, other)
        start = 0.0
        async with running_host(build_host(Identity.generate()), LOOPBACK) as host:
            for other in others:
                await host.connect(PeerInfo(other.get_id(), other.get_addrs()))
            start = trio.current_time()
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert took < 0.15 * len(others), f"stopping took {took:.2f} s for {len(others)} connections"


# -- the auto-connector ----------------------------------------------------------------------


async def _auto_connects(host: IHost, other: IHost) -> bool:
    host.get_peerstore().add_addrs(other.get_id(), other.get_addrs(), 3600)
    await host.get_network().auto_connector.maybe_connect()
    with trio.move_on_after(1):
        while not host.get_network().get_connections(other.get_id()):
            await trio.sleep(0.05)
        return True
    return False


async def test_stock_auto_connector_dials_the_peerstore() -> None:
    """Even with both watermarks at 0, it dials whatever peer the peerstore knows."""
    host = stock_host()
    async with running_host(build_host(Identity.generate()), LOOPBACK) as other:
        async with host.run(LOOPBACK):
            assert await _auto_connects(host, other)
        await host.close()


async def test_auto_connector_disabled() -> None:
    host = stock_host()
    disable_auto_connector(host)
    async with running_host(build_host(Identity.generate()), LOOPBACK) as other:
        async with running_host(host, LOOPBACK):
            assert not await _auto_connects(host, other)


# -- stream handlers -------------------------------------------------------------------------


async def _boom(stream: INetStream) -> None:
    raise ValueError("boom")


async def _refused(a: IHost, b: IHost) -> bool:
    """Whether a new stream from ``a`` to ``b`` is reset (while being opened or when read)."""
    try:
        stream = await a.new_stream(b.get_id(), [PROTO])
    except Exception:
        return True
    try:
        with trio.fail_after(5):
            await stream.read(1)
    except trio.TooSlowError:
        return False
    except Exception:
        return True
    finally:
        await stream.reset()
    return False


async def test_stock_handler_exception_stops_the_host() -> None:
    a, b = build_host(Identity.generate()), stock_host()
    with pytest.raises(BaseExceptionGroup) as info:
        async with running_host(a, LOOPBACK), b.run(LOOPBACK):
            b.set_stream_handler(PROTO, _boom)
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            await a.new_stream(b.get_id(), [PROTO])
            await trio.sleep(5)
    assert info.group_contains(ValueError, match="boom", depth=None)
    await b.close()


async def test_guarded_handler_resets_the_stream_and_the_host_serves_on() -> None:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as a:
        async with running_host(build_host(Identity.generate()), LOOPBACK) as b:
            b.set_stream_handler(PROTO, guard_handler(_boom))
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            for _ in range(3):
                assert await _refused(a, b)
            assert a.get_network().get_connections(b.get_id())


class _Communicator(IMultiselectCommunicator):
    """The remote side of multistream-select, scripted; removes the handler when it is chosen."""

    def __init__(self, multiselect: Multiselect, protocol: TProtocol) -> None:
        self.multiselect = multiselect
        self.protocol = protocol
        self.script = ["/multistream/1.0.0", str(protocol)]

    async def read(self) -> str:
        return self.script.pop(0)

    async def write(self, msg_str: str) -> None:
        if msg_str == self.protocol:  # the answer that confirms the protocol ...
            self.multiselect.remove_handler(self.protocol)  # ... meets a concurrent removal
        await trio.lowlevel.checkpoint()


async def test_stock_multiselect_looks_the_handler_up_after_an_await() -> None:
    """Removing a handler mid-negotiation raises ``KeyError`` in the swarm (hence retire, not remove)."""
    multiselect = Multiselect({PROTO: _boom})
    with pytest.raises(KeyError):
        await multiselect.negotiate(_Communicator(multiselect, PROTO))


async def test_retired_handler_resets_new_streams() -> None:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as a:
        async with running_host(build_host(Identity.generate()), LOOPBACK) as b:

            async def hello(stream: INetStream) -> None:
                await stream.write(b"hi")
                await stream.close()

            b.set_stream_handler(PROTO, hello)
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            stream = await a.new_stream(b.get_id(), [PROTO])
            assert await stream.read(2) == b"hi"
            await stream.close()
            retire_stream_handler(b, PROTO)
            assert await _refused(a, b)
            assert a.get_network().get_connections(b.get_id())


async def _connect_and_leave(host: IHost, times: int) -> list[bool]:
    """``times`` new identities connect to ``host`` one after another and disconnect at once."""
    info = PeerInfo(host.get_id(), [listen for listen in host.get_addrs()])
    out = []
    for _ in range(times):
        async with running_host(build_host(Identity.generate()), []) as client:
            try:
                with trio.fail_after(10):
                    await client.connect(info)
                    stream = await client.new_stream(host.get_id(), [PROTO])
                    await stream.close()
                out.append(True)
            except Exception:
                out.append(False)
            await client.disconnect(host.get_id())
        with trio.fail_after(10):
            while host.get_network().get_connections():
                await trio.sleep(0.02)
    return out


async def _echo_close(stream: INetStream) -> None:
    await stream.close()


async def test_stock_inbound_slots_outlive_their_connections() -> None:
    """The swarm's inbound handler keeps its limiter slot until the swarm stops."""
    host = build_host(Identity.generate())
    swarm = host.get_network()
    swarm.upgrade_inbound_raw_conn = type(swarm).upgrade_inbound_raw_conn.__get__(swarm)  # type: ignore[method-assign]
    swarm._inbound_limiter = trio.CapacityLimiter(3)  # type: ignore[attr-defined]
    async with running_host(host, LOOPBACK):
        host.set_stream_handler(PROTO, _echo_close)
        # one connection open at a time, yet the fourth is refused: 3 slots were never given back
        assert await _connect_and_leave(host, 4) == [True, True, True, False]


async def test_inbound_slots_end_with_their_connections() -> None:
    host = build_host(Identity.generate())
    swarm = host.get_network()
    swarm._inbound_limiter = trio.CapacityLimiter(3)  # type: ignore[attr-defined]
    async with running_host(host, LOOPBACK):
        host.set_stream_handler(PROTO, _echo_close)
        assert await _connect_and_leave(host, 6) == [True] * 6
        with trio.fail_after(5):
            while swarm._inbound_limiter.borrowed_tokens:  # type: ignore[attr-defined]
                await trio.sleep(0.02)


# -- gating inbound connections and streams before negotiation --------------------------------


async def test_stock_swarm_negotiates_every_inbound_stream_of_a_peer() -> None:
    """Upstream has no per-peer rate of inbound streams: 300 streams opened at once by one
    peer are all negotiated (and pay multistream-select) before any handler could say no."""
    async with running_host(build_host(Identity.generate()), LOOPBACK) as a, b_run() as b:
        negotiated = 0

        async def count(stream: INetStream) -> None:
            nonlocal negotiated
            negotiated += 1
            await stream.close()

        b.set_stream_handler(PROTO, count)
        await a.connect(PeerInfo(b.get_id(), b.get_addrs()))

        async def one() -> None:
            stream = await a.new_stream(b.get_id(), [PROTO])
            await stream.close()

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(one)
        with trio.fail_after(10):
            while negotiated < 300:
                await trio.sleep(0.01)
    await b.close()


async def _fails(attempt: Any) -> bool:
    try:
        with trio.fail_after(5):
            await attempt()
    except Exception:
        return True
    return False


def b_run() -> Any:
    host = stock_host()

    @asynccontextmanager
    async def run() -> AsyncIterator[IHost]:
        async with host.run(LOOPBACK):
            yield host

    return run()


async def test_gate_refuses_streams_before_negotiation_and_peers_after_noise() -> None:
    async with running_host(build_host(Identity.generate()), LOOPBACK) as a:
        async with running_host(build_host(Identity.generate()), LOOPBACK) as b:
            handled = 0

            async def count(stream: INetStream) -> None:
                nonlocal handled
                handled += 1
                await stream.close()

            b.set_stream_handler(PROTO, count)
            refuse_peer = refuse_streams = False
            asked: list[str] = []

            def admit_stream(peer: str) -> float | None:
                asked.append(peer)
                return None if refuse_streams else 0.0

            assert gate_inbound(b, admit_peer=lambda peer: not refuse_peer, admit_stream=admit_stream)
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            for _ in range(2):
                stream = await a.new_stream(b.get_id(), [PROTO])
                await stream.close()
            refuse_streams = True
            assert await _fails(lambda: a.new_stream(b.get_id(), [PROTO]))
            assert set(asked) == {str(a.get_id())}
            with trio.fail_after(5):
                while handled < 2:
                    await trio.sleep(0.01)
            assert handled == 2  # the third never reached negotiation
            for conn in list(a.get_network().get_connections(b.get_id())):
                await conn.close()
            refuse_peer = True
            a.get_network().unblock_peer(b.get_id())  # type: ignore[attr-defined]
            assert await _fails(lambda: a.connect(PeerInfo(b.get_id(), b.get_addrs())))
            assert not b.get_network().get_connections(a.get_id())

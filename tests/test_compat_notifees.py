"""Canaries of ``modelnet_p2p.p2p._compat.notifees``: they fail once py-libp2p's swarm stops
spawning a task per notifee for a stream event (then the shim can go); and tests of the
inline calls that replace them, on real hosts on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import multiaddr
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.network.swarm import Swarm

from modelnet_p2p.p2p._compat import notifees
from modelnet_p2p.p2p.host import build_host, running_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.testing import open_peers

LOOPBACK = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
PROBE = TProtocol("/modelnet-test/notifee-probe/1")


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


class _Recorder:
    """A notifee that records the stream events it hears (and raises, if told to)."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[str] = []
        self.fail = fail

    async def _hear(self, event: str) -> None:
        self.events.append(event)
        if self.fail:
            raise RuntimeError("a broken notifee")

    async def opened_stream(self, network: Any, stream: Any) -> None:
        await self._hear("opened_stream")

    async def closed_stream(self, network: Any, stream: Any) -> None:
        await self._hear("closed_stream")

    async def connected(self, network: Any, conn: Any) -> None:
        await self._hear("connected")

    async def disconnected(self, network: Any, conn: Any) -> None:
        await self._hear("disconnected")

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


async def _spawns_of(swarm: Any, event: str) -> int:
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        await swarm._notify(event, object())
    finally:
        trio.lowlevel.remove_instrument(spawns)
    return spawns.count


async def test_stock_swarm_spawns_a_task_per_notifee_for_each_stream_event() -> None:
    host = build_host(Identity.generate())
    swarm = host.get_network()
    assert isinstance(swarm, Swarm)
    stock = Swarm._notify.__get__(swarm)
    for _ in range(3):
        swarm.register_notifee(_Recorder())  # type: ignore[arg-type]
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        await stock("opened_stream", object())
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert spawns.count == len(swarm.notifees)


async def test_a_built_host_calls_stream_notifees_inline_and_isolates_a_raising_one() -> None:
    host = build_host(Identity.generate())
    swarm = host.get_network()
    assert notifees.installed(swarm) and notifees.install(swarm)  # idempotent
    broken, after = _Recorder(fail=True), _Recorder()
    swarm.register_notifee(broken)  # type: ignore[arg-type]
    swarm.register_notifee(after)  # type: ignore[arg-type]
    for event in ("opened_stream", "closed_stream"):
        assert await _spawns_of(swarm, event) == 0
    assert broken.events == after.events == ["opened_stream", "closed_stream"]
    # Connection events keep the fan-out: one task per notifee, all of them called.
    assert await _spawns_of(swarm, "connected") == len(swarm.notifees)
    assert after.events[-1] == "connected"


async def test_every_notifee_hears_the_streams_of_a_real_exchange() -> None:
    async with open_peers(2) as (a, b):
        recorder = _Recorder()
        a.host.get_network().register_notifee(recorder)  # type: ignore[arg-type]

        async def echo(stream: Any) -> None:
            await stream.write(await stream.read(4))
            await stream.close()

        b.host.set_stream_handler(PROBE, echo)
        with trio.fail_after(20):
            stream = await a.host.new_stream(b.host.get_id(), [PROBE])
            await stream.write(b"ping")
            assert await stream.read(4) == b"ping"
            await stream.close()
            while recorder.events.count("closed_stream") < 1:
                await trio.sleep(0.01)
        assert "opened_stream" in recorder.events


async def test_a_host_without_the_shim_still_runs() -> None:
    host = build_host(Identity.generate())
    swarm = host.get_network()
    del swarm.__dict__["_notify"]  # upstream's fan-out again
    assert not notifees.installed(swarm)
    async with running_host(host, LOOPBACK):
        assert await _spawns_of(swarm, "opened_stream") == len(swarm.notifees)

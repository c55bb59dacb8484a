"""Canaries of ``modelnet_p2p.p2p._compat.netstream``: they fail once py-libp2p's ``NetStream``
stops going through trio's scheduler at a read with nothing to wait for, or stops building
its streams where :func:`~modelnet_p2p.p2p._compat.netstream.install` hooks in (then the shim
can go); and tests of the streams the swarm builds instead."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.custom_types import TProtocol
from libp2p.network.stream.net_stream import NetStream

from modelnet_p2p.p2p._compat.netstream import LeanNetStream, installed
from modelnet_p2p.p2p.locks import QuickLock
from modelnet_p2p.testing import open_peers

PROBE = TProtocol("/modelnet-test/netstream-probe/1")


class _Steps(trio.abc.Instrument):
    """Counts the steps of one task (each is a trip through the scheduler)."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


@asynccontextmanager
async def _counting() -> AsyncIterator[_Steps]:
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)


@asynccontextmanager
async def _stream_pair() -> AsyncIterator[tuple[Any, Any]]:
    """A stream between two real hosts on 127.0.0.1: (the opener's, the handler's)."""
    async with open_peers(2, gossip=False) as (a, b):
        accepted: list[Any] = []
        got = trio.Event()
        done = trio.Event()

        async def handler(stream: Any) -> None:
            accepted.append(stream)
            got.set()
            await done.wait()

        b.host.set_stream_handler(PROBE, handler)
        await a.connect(b.addrs[0])
        stream = await a.host.new_stream(b.identity.peer_id, [PROBE])
        await stream.write(b"x")  # the handler runs once the protocol is negotiated
        with trio.fail_after(10):
            await got.wait()
            assert await accepted[0].read(1) == b"x"
        try:
            yield stream, accepted[0]
        finally:
            done.set()
            await stream.reset()


async def _buffered(sender: Any, receiver: Any) -> None:
    """Send 8 bytes and wait until all but the first are in ``receiver``'s buffer."""
    await sender.write(b"abcdefgh")
    with trio.fail_after(10):
        assert await receiver.read(1) == b"a"  # the rest came in the same frame


async def test_canary_upstream_netstream_reads_through_the_scheduler_with_data_buffered() -> None:
    # Once this fails, NetStream's reads no longer yield when nothing waits: the shim can go.
    async with _stream_pair() as (opener, accepted):
        await _buffered(opener, accepted)
        stock = NetStream(accepted.muxed_stream, None, None)  # upstream's class, same muxed stream
        assert type(stock._state_lock) is trio.Lock
        async with _counting() as steps:
            assert await stock.read(3) == b"bcd"
        assert steps.steps > 0


async def test_the_swarm_builds_lean_streams_on_both_sides() -> None:
    # Once this fails, py-libp2p builds its streams elsewhere (install() found no hook).
    async with _stream_pair() as (opener, accepted):
        assert installed()
        assert type(opener) is LeanNetStream and type(accepted) is LeanNetStream
        assert isinstance(opener._state_lock, QuickLock)
        assert isinstance(accepted._state_lock, QuickLock)


async def test_a_read_of_buffered_data_takes_no_trip_through_the_scheduler() -> None:
    async with _stream_pair() as (opener, accepted):
        await _buffered(opener, accepted)
        async with _counting() as steps:
            assert await accepted.read(3) == b"bcd"
        assert steps.steps == 0
        assert await accepted.read(4) == b"efgh"


async def test_a_cancelled_read_raises_and_takes_nothing() -> None:
    async with _stream_pair() as (opener, accepted):
        await _buffered(opener, accepted)
        got: list[bytes] = []
        with trio.CancelScope() as scope:
            scope.cancel()
            got.append(await accepted.read(3))
        assert scope.cancelled_caught and got == []
        assert await accepted.read(7) == b"bcdefgh"  # still a cancel point, before any byte
        with trio.CancelScope() as scope:
            scope.cancel()
            await opener.write(b"never")
        assert scope.cancelled_caught
        await opener.write(b"after")
        with trio.fail_after(10):
            assert await accepted.read(16) == b"after"  # the cancelled write sent nothing


async def test_the_state_lock_still_excludes_and_waits_in_order() -> None:
    async with _stream_pair() as (opener, _accepted):
        lock = opener._state_lock
        order: list[str] = []

        async def other(name: str) -> None:
            async with lock:
                order.append(name)

        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(other, "second")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(other, "third")
                await trio.testing.wait_all_tasks_blocked()
                assert lock.locked() and order == []  # held: the others wait
                order.append("first")
        assert order == ["first", "second", "third"]

        # A write waits while a state transition holds the lock, then goes on.
        written = trio.Event()

        async def write() -> None:
            await opener.write(b"late")
            written.set()

        async with trio.open_nursery() as nursery:
            async with lock:
                nursery.start_soon(write)
                await trio.testing.wait_all_tasks_blocked()
                assert not written.is_set()
        assert written.is_set()


async def test_state_changes_still_take_effect() -> None:
    from libp2p.network.stream.exceptions import StreamClosed

    async with _stream_pair() as (opener, accepted):
        await opener.close_write()
        with pytest.raises(StreamClosed):
            await opener.write(b"after close")
        await accepted.write(b"reply")
        with trio.fail_after(10):
            assert await opener.read(16) == b"reply"

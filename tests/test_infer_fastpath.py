"""The per-request and per-chunk work of the inference service (issue 15, small requests):
what the server does for a one-chunk request on a kept stream, and when the first chunk of a
streamed answer leaves. Real peers on 127.0.0.1; no timing assertions beyond generous bounds
that tell the behaviours apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from modelnet_p2p import Capability
from modelnet_p2p.p2p.dialer import PEER_OF_CACHE, Dialer
from modelnet_p2p.testing import open_peers

WORKER = Path(__file__).resolve().parent / "infer_worker.py"


async def ok(request):
    return "ok"


class _SpawnCounter(trio.abc.Instrument):
    """Counts the tasks the inference service spawns (not the DHT's, gossip's or libp2p's)."""

    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        if "services.inference" in task.name:
            self.spawned += 1


async def test_one_chunk_requests_on_a_kept_stream_spawn_no_task_each():
    """A coroutine handler gives one chunk after it returns, so the server runs it in the
    stream's own task: N requests on a kept stream spawn far fewer than N tasks (before: a
    producer task per request, at least N)."""
    async with open_peers(2) as (a, b):
        b.serve(Capability("ok"), ok)
        for _ in range(5):  # the stream is opened and kept
            assert (await a.call(b.addrs[0], "ok")).value == "ok"
        counter = _SpawnCounter()
        n = 60
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(n):
                assert (await a.call(b.addrs[0], "ok")).value == "ok"
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert a.stream_pool.stats().reused >= n
        assert counter.spawned == 0, counter.spawned


async def test_first_chunk_leaves_before_the_handler_goes_on():
    """A handler that never awaits between chunks: its first chunk is written before it runs
    on, so the caller has it while the handler still works (before, the first chunk waited in
    the queue until the handler blocked or ended, and came together with the rest).

    The server runs in its own process: its handler blocks its event loop for 1.5 s after the
    first chunk, which would also block a client in the same loop."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                data = await proc.stdout.receive_some(4096)
                assert data, "the worker exited before it served"
                line += data
        addr = json.loads(line)["addr"]
        async with open_peers(1) as (a,):
            # Connect and let the connection's start-up (its first RTT ping, 0.5 s in) pass:
            # a server whose loop is blocked then could not answer it, and the connection
            # would be closed.
            assert (await a.call(addr, "ok")).value == "ok"
            await trio.sleep(1.5)
            got: list[tuple[str, float]] = []
            with trio.fail_after(30):
                async with a.infer(addr, "stall-after-first", None, block=1.5) as stream:
                    async for chunk in stream:
                        got.append((chunk, trio.current_time()))
            assert [c for c, _ in got] == ["first", "second"]
            gap = got[1][1] - got[0][1]
            # Written at once, the first chunk arrives about 1.5 s before the second; held
            # back, both arrive in the same read (a gap of about 0).
            assert gap > 0.7, gap
    finally:
        await proc.stdin.aclose()
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _tokens_noting_their_task(count, tasks):
    """A handler of ``count`` tokens "t0 ", "t1 ", ... that appends the task running it to ``tasks``."""

    async def tokens(request):
        tasks.append(trio.lowlevel.current_task())
        for i in range(count):
            yield f"t{i} "

    return tokens


async def test_the_handlers_task_writes_its_first_chunk_and_the_writer_the_rest(monkeypatch):
    """The first chunk of a streamed answer is written by the task that runs the handler, at
    once (the writer task's first turn would be a scheduler pass later); the rest go out from
    the writer, joined, in order, and the answer is whole."""
    from modelnet_p2p.services.inference import server

    writes: list[tuple[trio.lowlevel.Task, bytes]] = []
    real = server.write_whole

    async def spy(stream, data):
        writes.append((trio.lowlevel.current_task(), bytes(data)))
        await real(stream, data)

    monkeypatch.setattr(server, "write_whole", spy)
    handler_tasks: list[trio.lowlevel.Task] = []
    tokens = _tokens_noting_their_task(50, handler_tasks)

    async with open_peers(2, gossip=False) as (a, b):
        b.serve(Capability("tokens"), tokens)
        for _ in range(3):  # a new stream, then kept ones
            writes.clear()
            handler_tasks.clear()
            with trio.fail_after(30):
                async with a.infer(b.addrs[0], "tokens", None) as stream:
                    got = [chunk async for chunk in stream]
            assert got == [f"t{i} " for i in range(50)]
            assert len(handler_tasks) == 1 and len(writes) >= 2
            assert writes[0][0] is handler_tasks[0]  # the first chunk, from the handler's task
            assert b"t0 " in writes[0][1] and b"t1 " not in writes[0][1]
            assert all(task is not handler_tasks[0] for task, _ in writes[1:])  # the writer's


async def test_the_task_that_reads_a_request_runs_it(monkeypatch):
    """A stream's two server tasks take turns: the one that decodes a request runs its handler
    (no wake-up of another task first) while the other reads on; the turns alternate over the
    requests of a kept stream, and each answer is whole."""
    from modelnet_p2p.services.inference import server

    read_by: list[trio.lowlevel.Task] = []
    real = server._Link.read_until_turn

    async def spy(self):
        await real(self)
        read_by.append(trio.lowlevel.current_task())

    monkeypatch.setattr(server._Link, "read_until_turn", spy)
    ran_in: list[trio.lowlevel.Task] = []
    tokens = _tokens_noting_their_task(20, ran_in)

    async with open_peers(2, gossip=False) as (a, b):
        b.serve(Capability("tokens"), tokens)
        for _ in range(4):
            read_by.clear()
            with trio.fail_after(30):
                async with a.infer(b.addrs[0], "tokens", None) as stream:
                    got = [chunk async for chunk in stream]
            assert got == [f"t{i} " for i in range(20)]
            assert read_by and ran_in[-1] is read_by[0]  # the reader of the request ran it
        assert len(set(ran_in)) == 2  # a kept stream: the two tasks took turns


def test_peer_of_remembers_text_targets_within_a_bound():
    """The mesh client asks for the peer id of its target once per request; a multiaddr parse
    cost about 0.12 ms of a 0.7 ms request. Text targets are remembered, at most PEER_OF_CACHE."""
    pid = "12D3KooWJ7HcSFPWpQcjpW8cJ3AGUQVDcwuoeH5dQyvsWsVHYBVc"
    dialer = Dialer(None, connect_timeout=1.0)  # type: ignore[arg-type]  # peer_of needs no host
    for port in range(PEER_OF_CACHE + 10):
        assert dialer.peer_of(f"/ip4/127.0.0.1/tcp/{port + 1}/p2p/{pid}") == pid
    assert dialer.peer_of(pid) == pid


async def _produced_while_not_reading(item: str, total: int) -> tuple[int, int]:
    """How many chunks a handler that never awaits has produced while its caller, with the
    smallest window (1024 bytes), holds the stream without reading, and how many arrived."""
    produced = 0

    async def many(request):
        nonlocal produced
        for _ in range(total):
            produced += 1
            yield item

    async with open_peers(2, window=1024) as (a, b):
        b.serve(Capability("many"), many)
        with trio.fail_after(30):
            async with a.infer(b.addrs[0], "many", None) as stream:
                async for _ in stream:  # the first chunk; then the caller stops reading
                    break
                await trio.sleep(1.0)
                held = produced
    return held, total


async def test_short_chunks_queue_beyond_64_within_the_write_batch():
    """A handler of short tokens runs ahead of a writer held back by credit by more than
    HANDLER_BUFFER (64) chunks, so that they fill one write; long chunks stop at 64 as before,
    so what the queue holds stays within max(64 chunks, MAX_WRITE_BATCH)."""
    from modelnet_p2p.services.inference.server import HANDLER_BUFFER, SMALL_CHUNK_BUFFER

    short, _ = await _produced_while_not_reading("tok ", 3000)
    # What the window let out plus the queue. A window of 1024 bytes lets out about 200 of
    # these (5 bytes each in a batch frame); the caller's first read may take a window's worth
    # with the first chunk (written at once, the rest right after it) and credit it, which
    # lets out a second window that nobody reads.
    assert 2 * HANDLER_BUFFER + 200 < short <= SMALL_CHUNK_BUFFER + 2 * 220, short  # old code: 156
    long, _ = await _produced_while_not_reading("x" * 8192, 3000)
    assert long <= HANDLER_BUFFER + 8, long  # an 8 KiB chunk exceeds the window: one at a time


def test_small_bodies_keep_every_limit():
    """unpackb decodes bodies of at most 4096 bytes without its counting hooks: the limits
    still hold there (depth, extension types and timestamps, trailing bytes, control limits)."""
    import msgpack
    import pytest

    from modelnet_p2p.errors import ProtocolError
    from modelnet_p2p.proto.framing import unpack_body
    from modelnet_p2p.proto.limits import MAX_DEPTH
    from modelnet_p2p.proto.packing import packb, unpackb

    nested: object = []
    for _ in range(MAX_DEPTH - 2):
        nested = [nested]
    ok = packb({"d": nested})  # the map and 31 arrays: exactly 32 levels, in 34 bytes
    assert len(ok) < 4096 and unpack_body(ok)["d"] == nested
    with pytest.raises(ProtocolError, match="deeper than 32"):
        unpack_body(packb({"d": [nested]}))
    with pytest.raises(ProtocolError, match="extension type"):
        unpack_body(packb({"d": msgpack.ExtType(5, b"x")}))
    with pytest.raises(ProtocolError, match="extension type"):  # a timestamp (type -1)
        unpack_body(msgpack.packb({"d": msgpack.Timestamp(1, 0)}, datetime=False))
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        unpack_body(packb({"t": "chunk"}) + b"\x00")
    with pytest.raises(ProtocolError, match="more than 4 values"):
        unpackb(packb([1, 2, 3, 4]), max_objects=4)
    with pytest.raises(ProtocolError, match="more than 2 maps and arrays"):
        unpackb(packb([[], []]), max_containers=2)
    assert unpack_body(packb({"t": "chunk", "seq": 1, "d": "tok "})) == {"t": "chunk", "seq": 1, "d": "tok "}


async def test_a_stream_link_wakes_its_waiters_and_counts_those_still_parked() -> None:
    """The server's per-chunk wake-up checks a count instead of calling into trio; the count
    stays that of the tasks parked, whether a waiter is woken or cancelled, in either order."""
    from trio.testing import wait_all_tasks_blocked

    from modelnet_p2p.services.inference.server import _Link

    link = _Link(None, None)  # type: ignore[arg-type]  # (only its wake-ups are used)
    woke: list[str] = []
    scopes = {"x": trio.CancelScope(), "y": trio.CancelScope()}

    async def wait(name: str) -> None:
        with scopes.get(name, trio.CancelScope()):
            await link.changed()
            woke.append(name)

    async with trio.open_nursery() as nursery:
        for name in ("a", "b"):
            nursery.start_soon(wait, name)
        await wait_all_tasks_blocked()
        assert link.waiting == 2
        link.notify()
        await wait_all_tasks_blocked()
        assert sorted(woke) == ["a", "b"] and link.waiting == 0
        for name in ("x", "c"):
            nursery.start_soon(wait, name)
        await wait_all_tasks_blocked()
        scopes["x"].cancel()
        await wait_all_tasks_blocked()
        assert link.waiting == 1  # only c is still parked
        link.notify()
        await wait_all_tasks_blocked()
        assert woke[-1] == "c" and link.waiting == 0
        for name in ("y", "d"):
            nursery.start_soon(wait, name)
        await wait_all_tasks_blocked()
        scopes["y"].cancel()
        link.notify()  # before the cancelled waiter has run
        await wait_all_tasks_blocked()
        assert woke[-1] == "d" and "x" not in woke and "y" not in woke and link.waiting == 0
        nursery.start_soon(wait, "e")
        await wait_all_tasks_blocked()
        assert link.waiting == 1
        link.notify()
        await wait_all_tasks_blocked()
    assert sorted(woke[:2]) == ["a", "b"] and woke[2:] == ["c", "d", "e"]

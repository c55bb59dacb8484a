"""Run K modelnet peers with availability gossip in this process, for benchmark meshes that span processes.

Used by ``benchmarks/bench_availability.py`` (through :func:`open_worker`), because py-libp2p
gossip is CPU-bound: one process saturates a core at about 15-20 peers that all publish every
2 s. (The tests have their own worker in ``tests/``; neither imports the other.)

::

    python benchmarks/availability_worker.py --peers 10 --interval 2

Stdout gets one JSON line per peer (``{"peer": i, "id": ..., "addr": ...}``),
then ``{"ready": true}``. Commands, one JSON object per stdin line:

- ``{"cmd": "connect", "links": [[i, addr], ...]}``: peer ``i`` dials ``addr``;
  answers ``{"connected": n, "failed": m}``.
- ``{"cmd": "watch", "id": ID}``: answers ``{"watching": ID}``, then reports
  ``{"seen": ID, "peer": i, "t": T}`` once per local peer when ``ID`` enters its table
  (``T``: ``time.monotonic()``, the same clock in every process on Linux).
- ``{"cmd": "stats"}``: ``{"stats": {...}}`` (counters summed over local peers, gossip bytes
  written, CPU seconds of this process).

Peers run with the DHT in client mode: availability gossip does not use it, and a DHT server
per peer costs more CPU in one process than the gossip does. The worker exits when stdin
closes, on SIGTERM, or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Peer
from modelnet_p2p.services.availability import (
    AvailabilityConfig,
    AvailabilityService,
    LoadSnapshot,
    start_availability,
)

WORKER = Path(__file__).resolve()

#: Passed to every Peer here: the availability service is attached by hand.
NO_GOSSIP: dict[str, Any] = {"gossip": False}


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buf = b""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


async def serve_commands(handle: Callable[[str, trio.Nursery], Awaitable[None]]) -> None:
    """Call ``handle(line, nursery)`` for every non-empty stdin line, until stdin closes or SIGTERM."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            async for line in read_lines(stdin):
                if line:
                    await handle(line, nursery)
            nursery.cancel_scope.cancel()


async def run_peer(
    config: AvailabilityConfig, stop: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], dht_mode="client", **NO_GOSSIP) as peer:
        service = await start_availability(
            peer.host,
            peer.identity,
            peer.nursery,
            config,
            load_provider=lambda: LoadSnapshot(peer.inference.in_flight, 0, peer.limits.max_concurrency),
            capabilities=[("echo", "1.0")],
        )
        task_status.started((peer, service))
        await stop.wait()


async def watch(service: AvailabilityService, index: int, pid: str) -> None:
    await service.wait_for(pid, timeout=3600)
    emit({"seen": pid, "peer": index, "t": time.monotonic()})


def stats(services: list[AvailabilityService]) -> dict[str, Any]:
    rejected: dict[str, int] = {}
    for s in services:
        for k, v in s.stats.rejected.items():
            rejected[k] = rejected.get(k, 0) + v
    return {
        "cpu": time.process_time(),
        "wall": time.monotonic(),
        "bytes_sent": sum(s.bytes_sent for s in services),
        "published": sum(s.stats.published for s in services),
        "published_bytes": sum(s.stats.published_bytes for s in services),
        "validated": sum(s.stats.validated for s in services),
        "accepted": sum(s.stats.accepted for s in services),
        "rejected": rejected,
        "restarts": sum(s.stats.pubsub_restarts for s in services),
        "peers": len(services),
    }


async def main(args: argparse.Namespace) -> None:
    config = AvailabilityConfig(publish_interval=args.interval)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nodes: list[tuple[Peer, AvailabilityService]] = []
        for i in range(args.peers):
            peer, service = await nursery.start(run_peer, config, stop)
            nodes.append((peer, service))
            emit({"peer": i, "id": peer.peer_id, "addr": peer.addrs[0]})
        emit({"ready": True})

        async def handle(line: str, tasks: trio.Nursery) -> None:
            cmd = json.loads(line)
            kind = cmd.get("cmd")
            if kind == "connect":
                ok = failed = 0
                for i, addr in cmd["links"]:
                    try:
                        await nodes[i][0].connect(addr)
                        ok += 1
                    except Exception:
                        failed += 1
                emit({"connected": ok, "failed": failed})
            elif kind == "watch":
                for i, (_, service) in enumerate(nodes):
                    tasks.start_soon(watch, service, i, cmd["id"])
                emit({"watching": cmd["id"]})
            elif kind == "stats":
                emit({"stats": stats([s for _, s in nodes])})
            else:
                emit({"error": f"unknown command {line!r}"})

        await serve_commands(handle)
        stop.set()


# -- the benchmark's side ----------------------------------------------------------------


class Worker:
    """A running worker process, driven from a trio program (see :func:`open_worker`)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.peers: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._replies: trio.MemorySendChannel[dict[str, Any]]
        self._replies_recv: trio.MemoryReceiveChannel[dict[str, Any]]
        self._replies, self._replies_recv = trio.open_memory_channel[dict[str, Any]](1000)
        self._lines = read_lines(proc.stdout)  # type: ignore[arg-type]

    async def read_startup(self) -> None:
        async for line in self._lines:
            obj = json.loads(line)
            if obj.get("ready"):
                return
            self.peers.append(obj)
        raise RuntimeError("worker exited during startup")

    async def read_events(self) -> None:
        async for line in self._lines:
            obj = json.loads(line)
            if "seen" in obj:
                self.events.append(obj)
            else:
                await self._replies.send(obj)

    async def request(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all((json.dumps(cmd) + "\n").encode())
        with trio.fail_after(timeout):
            return await self._replies_recv.receive()

    def seen(self, pid: str) -> dict[int, float]:
        """Local peer index -> time it first had ``pid`` in its table."""
        return {e["peer"]: e["t"] for e in self.events if e.get("seen") == pid}


@asynccontextmanager
async def open_worker(
    peers: int, interval: float = 2.0, max_seconds: float = 600.0, startup_timeout: float = 120.0
) -> AsyncIterator[Worker]:
    """Start a worker with ``peers`` peers; stop it (closing its stdin) on exit."""
    cmd = [sys.executable, str(WORKER), "--peers", str(peers), "--interval", str(interval)]
    cmd += ["--max-seconds", str(max_seconds)]
    proc = await trio.lowlevel.open_process(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        worker = Worker(proc)
        with trio.fail_after(startup_timeout):
            await worker.read_startup()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.read_events)
            try:
                yield worker
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            if proc.stdin is not None:
                await proc.stdin.aclose()
            with trio.move_on_after(15):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


def random_links(ids: list[int], k: int, rng: random.Random) -> list[tuple[int, int]]:
    """Each node dials ``k`` random earlier nodes (a connected graph, as bootstrapping makes)."""
    links = []
    for pos, node in enumerate(ids):
        for other in rng.sample(ids[:pos], min(k, pos)):
            links.append((node, other))
    return links


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=600.0, help="hard limit on the run")
    ns = parser.parse_args()

    async def bounded() -> None:
        with trio.move_on_after(ns.max_seconds):
            await main(ns)

    trio.run(bounded)

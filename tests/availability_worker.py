"""Run K modelnet peers with availability gossip in this process, for test meshes that span processes.

Used by ``tests/test_availability.py`` (through :func:`open_worker`), because py-libp2p gossip is
CPU-bound: one process saturates a core at about 15-20 peers that all publish every 2 s.
(``benchmarks/`` has its own, larger worker.)

::

    python tests/availability_worker.py --peers 10 --interval 2

Stdout gets one JSON line per peer (``{"peer": i, "id": ..., "addr": ...}``),
then ``{"ready": true}``. Commands, one JSON object per stdin line (see ``worker_loop.py``):

- ``{"cmd": "connect", "links": [[i, addr], ...]}``: peer ``i`` dials ``addr`` (all at once);
  answers ``{"connected": n, "failed": m}``.
- ``{"cmd": "watch", "id": ID}``: answers ``{"watching": ID}``, then reports
  ``{"seen": ID, "peer": i, "t": T}`` once per local peer when ``ID`` enters its table
  (``T``: ``time.monotonic()``, the same clock in every process on Linux).
- ``{"cmd": "stats"}``: ``{"stats": {...}}`` (counters summed over local peers, and the smallest
  GossipSub mesh among them, ``min_mesh``).

Peers run with the DHT in client mode: availability gossip does not use it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker_loop import emit, read_lines, run_bounded, serve_commands

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
        "published": sum(s.stats.published for s in services),
        "accepted": sum(s.stats.accepted for s in services),
        "rejected": rejected,
        "restarts": sum(s.stats.pubsub_restarts for s in services),
        "peers": len(services),
        "min_mesh": min((s.gossip.mesh_size(s.config.topic) for s in services), default=0),
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
                outcomes: list[bool] = []

                async def dial(i: int, addr: str) -> None:
                    try:
                        await nodes[i][0].connect(addr)
                        outcomes.append(True)
                    except Exception:
                        outcomes.append(False)

                async with trio.open_nursery() as dialing:
                    for i, addr in cmd["links"]:
                        dialing.start_soon(dial, i, addr)
                emit({"connected": outcomes.count(True), "failed": outcomes.count(False)})
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


# -- the test's side -------------------------------------------------------------------


class Worker:
    """A running worker process, driven from a trio test (see :func:`open_worker`)."""

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
    run_bounded(lambda: main(ns), ns.max_seconds)

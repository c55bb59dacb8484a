"""The parent side of :mod:`modelnet_p2p.testing.worker`: start worker processes from trio and talk to them.

A mesh of 20 peers, half of them in another process, whose peers all see a new provider::

    from modelnet_p2p import Peer
    from modelnet_p2p.testing import open_worker

    async def test_everyone_sees_me():
        async with open_worker(10, dht_mode="client", link=False) as w:
            async with Peer(dht_mode="client") as me:
                await w.request({"cmd": "watch", "id": me.peer_id})
                for i, info in enumerate(w.peers):
                    await me.connect(info["addr"])
                await w.wait_seen(me.peer_id, 10, timeout=30)

Each worker runs its peers in its own trio run, so a test (or a benchmark) can use every core
of the machine. ``peers[i]`` is the startup line of local peer ``i`` (``id``, ``addr``,
``addrs``); :meth:`Worker.request` sends one command and returns its reply; ``seen``
events are collected in :attr:`Worker.events`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

__all__ = [
    "Worker",
    "WorkerError",
    "open_worker",
    "open_workers",
    "random_links",
    "read_lines",
    "worker_command",
]


async def read_lines(stream: trio.abc.ReceiveStream, chunk: int = 65536) -> AsyncIterator[str]:
    """The lines of ``stream``, stripped, until it ends."""
    buf = b""
    while data := await stream.receive_some(chunk):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode().strip()


class WorkerError(RuntimeError):
    """A worker process exited early, or failed to stop cleanly."""


class Worker:
    """A running worker process (see :func:`open_worker`)."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        #: The startup line of each local peer: ``{"peer": i, "id": ..., "addr": ..., "addrs": [...]}``.
        self.peers: list[dict[str, Any]] = []
        #: Every event line received so far (``{"event": "seen", ...}``).
        self.events: list[dict[str, Any]] = []
        self._replies_in, self._replies = trio.open_memory_channel[dict[str, Any]](1000)
        self._changed = trio.Event()
        assert proc.stdout is not None
        self._lines = read_lines(proc.stdout)
        self._lock = trio.Lock()

    async def read_startup(self) -> None:
        """Read the startup lines into :attr:`peers`, up to ``ready``."""
        async for line in self._lines:
            obj = json.loads(line)
            if obj.get("ready"):
                return
            self.peers.append(obj)
        raise WorkerError(f"worker exited during startup with {await self.proc.wait()}")

    async def read_events(self) -> None:
        """Sort the worker's lines into events and replies, until it exits."""
        async for line in self._lines:
            obj = json.loads(line)
            if "event" in obj:
                self.events.append(obj)
                self._changed.set()
                self._changed = trio.Event()
            else:
                await self._replies_in.send(obj)
        await self._replies_in.aclose()

    async def request(self, cmd: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """Send one command (see :mod:`~modelnet_p2p.testing.worker`) and return its reply."""
        assert self.proc.stdin is not None
        async with self._lock:  # one command in flight, so that replies pair with commands
            await self.proc.stdin.send_all((json.dumps(dict(cmd)) + "\n").encode())
            with trio.fail_after(timeout):
                try:
                    return await self._replies.receive()
                except trio.EndOfChannel:
                    raise WorkerError(f"worker exited with {await self.proc.wait()}") from None

    def seen(self, pid: str) -> dict[int, float]:
        """Local peer index -> ``time.monotonic()`` when ``pid`` first entered its table."""
        return {e["peer"]: e["t"] for e in self.events if e.get("seen") == pid}

    async def wait_seen(self, pid: str, count: int, timeout: float = 30.0) -> dict[int, float]:
        """Wait until ``count`` local peers have seen ``pid`` (after a ``watch``); :meth:`seen`."""
        with trio.fail_after(timeout):
            while len(found := self.seen(pid)) < count:
                await self._changed.wait()
        return found


def worker_command(
    peers: int,
    *,
    bootstrap: Sequence[str] = (),
    link: bool = True,
    dht_mode: str | None = None,
    gossip: bool = True,
    publish_interval: float | None = None,
    card_ttl: float | None = None,
    announce_interval: float | None = None,
    serve: Mapping[int | str, Sequence[Mapping[str, Any]]] | None = None,
    max_seconds: float = 600.0,
) -> list[str]:
    """The command line that runs a worker of ``peers`` peers.

    ``bootstrap``: addresses the worker's peers bootstrap from, in turn; without them peer
    ``i > 0`` bootstraps from the worker's peer 0, and with ``link=False`` no peer bootstraps
    (connect them with the ``connect`` command). ``serve`` maps a peer index (or ``"*"``, every
    peer) to :class:`~modelnet_p2p.Capability` keyword arguments. ``dht_mode``, ``gossip``,
    ``publish_interval``, ``card_ttl`` and ``announce_interval`` are :class:`~modelnet_p2p.Peer`
    settings (``None``: the default). The worker stops itself after ``max_seconds``.
    """
    cmd = [sys.executable, "-m", "modelnet_p2p.testing.worker", "--peers", str(peers)]
    cmd += ["--max-seconds", str(max_seconds)]
    if bootstrap:
        cmd += ["--bootstrap", ",".join(bootstrap)]
    if not link:
        cmd.append("--unlinked")
    if not gossip:
        cmd.append("--no-gossip")
    if serve:
        cmd += ["--serve", json.dumps({str(k): [dict(c) for c in v] for k, v in serve.items()})]
    options = {
        "--dht-mode": dht_mode,
        "--publish-interval": publish_interval,
        "--card-ttl": card_ttl,
        "--announce-interval": announce_interval,
    }
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd


@asynccontextmanager
async def open_worker(
    peers: int,
    *,
    startup_timeout: float = 120.0,
    stop_timeout: float = 15.0,
    stderr: int | None = None,
    command: Sequence[str] | None = None,
    **options: Any,
) -> AsyncIterator[Worker]:
    """Start a worker process with ``peers`` peers; stop it (by closing its stdin) on exit.

    ``options`` are those of :func:`worker_command`. ``stderr`` is passed to the process
    (e.g. ``subprocess.DEVNULL``). ``command`` replaces the whole command line (then
    ``peers`` and ``options`` are ignored): any program that speaks the worker's protocol,
    such as a baseline written against another stack. Yields once every peer runs
    (``startup_timeout``). Raises :class:`WorkerError` if the worker exits early, or if the
    block ends normally but the worker does not exit with status 0 within ``stop_timeout``
    (it is then killed).
    """
    cmd = list(command) if command is not None else worker_command(peers, **options)
    # The worker imports this very package, installed or not.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = await trio.lowlevel.open_process(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env
    )
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
                try:
                    await proc.stdin.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            with trio.move_on_after(stop_timeout):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    if proc.returncode != 0:
        raise WorkerError(f"worker exited with {proc.returncode}")


@asynccontextmanager
async def open_workers(
    specs: Sequence[int | Mapping[str, Any]], **options: Any
) -> AsyncIterator[list[Worker]]:
    """Start several workers at once; stop them all on exit.

    Each spec is a number of peers, or :func:`open_worker` keyword arguments (``peers``
    included) that override ``options`` for that worker. The workers are yielded in the order
    of ``specs``, each one running in its own task of this context's nursery.
    """
    workers: dict[int, Worker] = {}
    done = trio.Event()

    async def run(i: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        spec = specs[i]
        kwargs = {**options, **({"peers": spec} if isinstance(spec, int) else spec)}
        async with open_worker(**kwargs) as worker:
            workers[i] = worker
            task_status.started()
            await done.wait()

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for i in range(len(specs)):
                starting.start_soon(nursery.start, run, i)
        try:
            yield [workers[i] for i in range(len(specs))]
        finally:
            done.set()


def random_links(ids: list[int], k: int, rng: random.Random) -> list[tuple[int, int]]:
    """Each node dials ``k`` random earlier nodes (a connected graph, as bootstrapping makes)."""
    links = []
    for pos, node in enumerate(ids):
        for other in rng.sample(ids[:pos], min(k, pos)):
            links.append((node, other))
    return links

"""Scale benchmark (issue 11): what one peer costs as the mesh grows, beside stock py-libp2p.

Usage::

    python benchmarks/bench_scale.py [--quick] [--sizes 20,50,100,200] [--size-limit S] [--netns]

For each mesh size N (20, 50, 100 and 200; ``--quick`` stops at 50) it runs two meshes of N
peers on 127.0.0.1, one after the other, on the same machine, in the same run:

- **modelnet**: peers of ``python -m modelnet_p2p.testing.worker``;
- **stock**: py-libp2p hosts of ``benchmarks/stock_mesh_worker.py`` (a process that never imports
  modelnet_p2p) running Kademlia (``KadDHT``, ``provide``/``find_providers``) and GossipSub, every
  peer subscribed to one availability topic, each serving peer publishing a small record on it
  every 2 s (a naive availability design) and providing its key in the DHT.

Both are spread over the same number of worker processes (N/20, at least 4, at most 10), all
bootstrapping from the first process's peers; the first process starts alone, the others in
batches of 3. Each mesh gets ``--size-limit`` seconds; a phase that does not finish in time is
reported as not measured (the benchmark never hangs). Then, for each mesh:

1. **Idle**: 3 peers serve (modelnet: a capability of the task ``chat``; stock: the key), the mesh
   settles (the settle time, then until the workers' CPU over one second is near idle, at most
   60 s: the time this took is printed; the same rule as the follow wave's below), and nobody
   calls. Over a window: CPU per peer (utime + stime of the worker
   processes from ``/proc/<pid>/stat``, per peer, in % of one core), RSS per peer (the workers'
   RSS less that of an idle worker process without peers, per peer), connections per peer (peers
   each host is connected to: min/median/max) and bytes per second per peer (TCP bytes sent by
   the worker processes, summed over their sockets from the kernel's ``TCP_INFO``, which each
   worker reports; on loopback every byte sent is also read by another peer).
2. **First lookup of a fresh peer**: a new peer, in a process of its own, started with one
   bootstrap address (a different random peer each time), looks up the 3 providers once. Time
   from its start (bootstrap connected) until it has all 3, and how many it found.
3. **serve() to discoverable**: an existing peer starts serving something new (modelnet:
   ``serve()`` of a new capability; stock: ``provide()`` of a new key), a different peer each
   trial; another existing peer, in another process, picked at random each trial, looks it up
   again and again (a new lookup every 0.1 s, up to 6 at once, so that the figure is not rounded
   up to the end of a lookup that began before the record was placed); the time from the call
   until a lookup returns it.
4. **State-change propagation**: every peer follows the providers' capability (modelnet: as
   routing does, by looking its providers up, the worker's ``watch`` with ``capability`` and
   ``lookup``; stock: every peer is subscribed to the one topic from the start). Once the
   follow wave is over (every peer's lookup done, at least 3 s, and then until the workers' CPU
   over one second is back near idle, at most 30 s: the time this took is printed), a new
   provider starts serving it; the time until each other peer has its record. "The peers that
   care" are those following when the change happens; the wave itself (every peer's first lookup
   and dials at once) is no steady state.
5. **Under load**: the lookups of 2. again while two busy processes burn both cores.

Ratios are modelnet / stock (lower is better). The goals are those of issue 11. p95 of k samples
is the nearest rank (with fewer than 20 samples that is the slowest one). Nothing here asserts:
it prints figures and exits 0. Each size's table also goes to stderr as soon as that size is
measured, so that a run cut short keeps the sizes it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelnet_p2p.testing import Worker, WorkerError, open_worker, open_workers  # noqa: E402

STOCK_WORKER = [sys.executable, str(ROOT / "benchmarks" / "stock_mesh_worker.py")]
PROVIDERS = 3
TASK = "chat"
CAPABILITY = "bench-model"
STOCK_KEY = "modelnet-bench/chat"
#: Workers started at once after the first one.
BATCH = 3
#: Seconds one lookup (fresh peer, or one find loop) may take; twice that under load.
LOOKUP_LIMIT = 10.0
#: Seconds a propagation trial waits for every follower.
PROPAGATION_LIMIT = 10.0
#: Least seconds between the end of the followers' ``watch`` and the state change (a few
#: GossipSub heartbeats), and most seconds waited for the workers to be quiet after it.
FOLLOW_SETTLE = 3.0
FOLLOW_QUIET_LIMIT = 30.0
#: Most seconds the idle window waits, after the settle time, for the workers to be quiet:
#: a big mesh is still joining (refreshes, first announces) 10 s after its start.
IDLE_QUIET_LIMIT = 60.0
#: The workers are quiet when their summed CPU over one second is under this many cores per
#: peer, plus QUIET_BASE (the idle mesh costs well under 0.2 % of a core per peer).
QUIET_PER_PEER = 0.004
QUIET_BASE = 0.1
#: Before each serve() trial the workers must be quieter (the idle mesh's own cost is about
#: 0.001 per peer): the previous trial's announce, whose records beyond the first go on for
#: seconds after it was found, would otherwise be measured as the next trial's load.
SERVE_QUIET_PER_PEER = 0.002
SERVE_QUIET_LIMIT = 10.0
#: Seconds one worker may take to start its peers.
STARTUP_LIMIT = 150.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
LIMITS: dict[str, Any] = {"startup_timeout": STARTUP_LIMIT, "stop_timeout": 20, "stderr": subprocess.DEVNULL}


def workers_for(n: int) -> int:
    return min(10, max(4, math.ceil(n / 20)))


@dataclass(frozen=True)
class Settings:
    settle: float
    window: float
    lookups: int
    serve_trials: int
    busy_lookups: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(settle=8.0, window=10.0, lookups=4, serve_trials=2, busy_lookups=2)
        # A 60 s idle window holds two periods of the peers' 30 s timers (yamux keep-alive,
        # housekeeping); with 15 s windows the figure went 0.057, 0.095, 0.214, 0.102 % per
        # peer at 20, 50, 100, 200 peers: no trend, one window catching a timer or not.
        return cls(settle=10.0, window=60.0, lookups=6, serve_trials=5, busy_lookups=3)


@dataclass
class Lookup:
    all_s: float | None  # None: not every provider within the limit
    found: int


@dataclass
class SideResult:
    side: str
    n: int
    workers: int
    startup_s: float | None = None
    notes: list[str] = field(default_factory=list)
    cpu_pct: float | None = None
    rss_mib: float | None = None
    conns: list[int] = field(default_factory=list)
    bytes_s: float | None = None
    discoverable: list[float] = field(default_factory=list)  # inf: not within the limit
    #: modelnet: per serve() trial, how long the lookup that found it had run (inf: none found it)
    finding: list[float] = field(default_factory=list)
    #: modelnet: per serve() trial, when its announce ended (inf: not within the limit) and its rounds.
    placed: list[tuple[float, int]] = field(default_factory=list)
    #: modelnet: per serve() trial, seconds from its announce's start to each
    #: acknowledgement of its model key.
    model_acked: list[list[float]] = field(default_factory=list)
    lookups: list[Lookup] = field(default_factory=list)
    propagation: list[float] = field(default_factory=list)  # per follower; inf: never
    follow_settle_s: float | None = None  # the follow wave: from its end until the workers were quiet
    idle_settle_s: float | None = None  # after the settle time, until the workers were quiet
    serve_settle_s: list[float] = field(default_factory=list)  # before each serve() trial
    busy: list[Lookup] = field(default_factory=list)
    elapsed_s: float = 0.0


# -- the two sides -----------------------------------------------------------------------------


class Side:
    """What differs between the modelnet mesh and the stock one: commands and worker options."""

    name = ""

    def options(self, peers: int, bootstrap: Sequence[str], max_seconds: float) -> dict[str, Any]:
        """:func:`open_worker` keyword arguments for a worker of ``peers`` peers."""
        raise NotImplementedError

    def serve(self, peer: int, name: str, task: str) -> dict[str, Any]:
        raise NotImplementedError

    def find(self, peer: int, name: str, pid: str, timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    def fresh(self, boot: str, expect: list[str], timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    def watch(self, pid: str) -> dict[str, Any]:
        raise NotImplementedError


class Modelnet(Side):
    name = "modelnet"

    def options(self, peers: int, bootstrap: Sequence[str], max_seconds: float) -> dict[str, Any]:
        return {"peers": peers, "bootstrap": bootstrap, "max_seconds": max_seconds, **LIMITS}

    def serve(self, peer: int, name: str, task: str) -> dict[str, Any]:
        return {"cmd": "serve", "peer": peer, "capability": {"name": name, "task": task, "version": "1"}}

    def find(self, peer: int, name: str, pid: str, timeout: float) -> dict[str, Any]:
        return {"cmd": "find", "peer": peer, "model": name, "id": pid, "timeout": timeout}

    def fresh(self, boot: str, expect: list[str], timeout: float) -> dict[str, Any]:
        return {"cmd": "fresh", "bootstrap": boot, "task": TASK, "expect": expect, "timeout": timeout}

    def watch(self, pid: str) -> dict[str, Any]:
        return {"cmd": "watch", "id": pid, "capability": CAPABILITY, "lookup": True}


class Stock(Side):
    name = "stock"

    def options(self, peers: int, bootstrap: Sequence[str], max_seconds: float) -> dict[str, Any]:
        cmd = [*STOCK_WORKER, "--peers", str(peers), "--max-seconds", str(max_seconds)]
        if bootstrap:
            cmd += ["--bootstrap", ",".join(bootstrap)]
        return {"peers": peers, "command": cmd, **LIMITS}

    def serve(self, peer: int, name: str, task: str) -> dict[str, Any]:
        return {
            "cmd": "serve",
            "peer": peer,
            "key": STOCK_KEY if name == CAPABILITY else f"modelnet-bench/{name}",
        }

    def find(self, peer: int, name: str, pid: str, timeout: float) -> dict[str, Any]:
        return {"cmd": "find", "peer": peer, "key": f"modelnet-bench/{name}", "id": pid, "timeout": timeout}

    def fresh(self, boot: str, expect: list[str], timeout: float) -> dict[str, Any]:
        return {"cmd": "fresh", "bootstrap": boot, "key": STOCK_KEY, "expect": expect, "timeout": timeout}

    def watch(self, pid: str) -> dict[str, Any]:
        return {"cmd": "watch", "id": pid}


# -- measuring ----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tcp_sent(before: dict[str, list[int]], after: dict[str, list[int]]) -> int:
    """Bytes sent between two ``tcp`` stats of one worker (a socket opened since counts from 0;
    one closed since is not counted)."""
    return sum(v[0] - before.get(k, [0, 0])[0] for k, v in after.items())


def describe(exc: BaseException) -> str:
    """The innermost errors of ``exc`` (nurseries wrap them in groups), one line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def request(worker: Worker, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    reply = await worker.request(cmd, timeout=timeout)
    if "error" in reply:
        raise WorkerError(f"{cmd['cmd']}: {reply['error']}")
    return reply


async def fresh_lookups(
    side: Side, fresh: Worker, everyone: list[str], expect: list[str], count: int, limit: float,
    rng: random.Random,
) -> list[Lookup]:  # fmt: skip
    out = []
    for _ in range(count):
        r = await request(fresh, side.fresh(rng.choice(everyone), expect, limit), timeout=limit + 60)
        out.append(Lookup(r["all_s"], int(r["found"])))
    return out


async def start_mesh(side: Side, n: int, stack: AsyncExitStack, max_seconds: float) -> list[Worker]:
    w = workers_for(n)
    sizes = [n // w + (1 if i < n % w else 0) for i in range(w)]
    first = await stack.enter_async_context(open_worker(**side.options(sizes[0], [], max_seconds)))
    boot = [p["addr"] for p in first.peers]
    workers = [first]
    for start in range(1, w, BATCH):
        batch = [side.options(sizes[i], boot, max_seconds) for i in range(start, min(w, start + BATCH))]
        workers += await stack.enter_async_context(open_workers(batch))
    return workers


async def run_side(
    side: Side, n: int, settings: Settings, limit: float, rss0_kib: int, rng: random.Random
) -> SideResult:
    result = SideResult(side.name, n, workers_for(n))
    t0 = time.perf_counter()
    phase = "start"
    with trio.move_on_after(limit) as scope:
        try:
            async with AsyncExitStack() as stack:
                fresh = await stack.enter_async_context(open_worker(**side.options(0, [], limit + 60)))
                workers = await start_mesh(side, n, stack, limit + 60)
                result.startup_s = time.perf_counter() - t0
                slots = [(w, p["peer"]) for w in range(len(workers)) for p in workers[w].peers]
                ids = {(w, p["peer"]): p["id"] for w in range(len(workers)) for p in workers[w].peers}
                everyone = [p["addr"] for wk in workers for p in wk.peers]
                eligible = [s for s in slots if s[0] > 0]
                picks = rng.sample(eligible, PROVIDERS + settings.serve_trials + 1)
                providers, late = picks[:PROVIDERS], picks[PROVIDERS:-1]
                phase = "serve"
                for w, i in providers:
                    await request(workers[w], side.serve(i, CAPABILITY, TASK))
                expect = [ids[s] for s in providers]
                phase = "idle"
                await trio.sleep(settings.settle)
                result.idle_settle_s = await quiet(workers, n, 0.0, IDLE_QUIET_LIMIT)
                await idle(result, workers, settings.window, rss0_kib)
                phase = "fresh lookups"
                result.lookups = await fresh_lookups(
                    side, fresh, everyone, expect, settings.lookups, LOOKUP_LIMIT, rng
                )
                phase = "serve to discoverable"
                print(f"... {side.name} N={n}: {phase}", file=sys.stderr, flush=True)
                for k in range(settings.serve_trials):
                    pw, pi = late[k]
                    # the finder lives in another process (it may serve something itself)
                    fw, fi = rng.choice([s for s in eligible if s[0] != pw])
                    name = f"late-{k}"
                    result.serve_settle_s.append(
                        await quiet(workers, n, 0.0, SERVE_QUIET_LIMIT, SERVE_QUIET_PER_PEER)
                    )
                    served = await request(workers[pw], side.serve(pi, name, "late"))
                    found = await request(
                        workers[fw],
                        side.find(fi, name, ids[(pw, pi)], LOOKUP_LIMIT),
                        timeout=LOOKUP_LIMIT + 30,
                    )
                    result.discoverable.append(math.inf if found["t"] is None else found["t"] - served["t"])
                    if side.name == "modelnet":
                        result.finding.append(math.inf if found["lookup_s"] is None else found["lookup_s"])
                        placed = await request(workers[pw], {"cmd": "placed", "peer": pi, "timeout": 30})
                        ended = math.inf if placed["t"] is None else placed["t"] - served["t"]
                        result.placed.append((ended, int(placed["rounds"])))
                        acks = placed["ack_times"].get(f"model:{name}", [])
                        result.model_acked.append([float(t) for t in acks])
                phase = "propagation"
                print(f"... {side.name} N={n}: {phase}", file=sys.stderr, flush=True)
                result.propagation, result.follow_settle_s = await propagation(side, workers, ids, picks[-1])
                phase = "lookups under load"
                result.busy = await busy_lookups(side, fresh, everyone, expect, settings.busy_lookups, rng)
                phase = "stop"
        except Exception as exc:  # a size that fails is reported, and the next one runs
            result.notes.append(f"{phase}: {describe(exc)}")
    if scope.cancelled_caught:
        result.notes.append(f"size limit of {limit:.0f} s reached during: {phase}")
    result.elapsed_s = time.perf_counter() - t0
    return result


async def idle(result: SideResult, workers: list[Worker], window: float, rss0_kib: int) -> None:
    pids = [w.proc.pid for w in workers]
    before = [(await request(w, {"cmd": "stats"}))["stats"]["tcp"] for w in workers]
    c0, t0 = sum(map(proc_cpu_s, pids)), time.monotonic()
    await trio.sleep(window)
    c1, t1 = sum(map(proc_cpu_s, pids)), time.monotonic()
    stats = [(await request(w, {"cmd": "stats"}))["stats"] for w in workers]
    n = sum(s["peers"] for s in stats)
    result.cpu_pct = (c1 - c0) / (t1 - t0) / n * 100
    sent = sum(tcp_sent(b, s["tcp"]) for b, s in zip(before, stats, strict=True))
    result.bytes_s = sent / (t1 - t0) / n
    result.rss_mib = (sum(s["rss_kib"] for s in stats) - len(stats) * rss0_kib) / n / 1024
    result.conns = sorted(c for s in stats for c in s["conns"])
    if n != result.n:
        result.notes.append(f"only {n} of {result.n} peers running")


async def quiet(
    workers: list[Worker],
    n: int,
    least: float = FOLLOW_SETTLE,
    most: float = FOLLOW_QUIET_LIMIT,
    per_peer: float = QUIET_PER_PEER,
) -> float:
    """Wait (at least ``least``, at most ``most`` s) until the workers are quiet; seconds."""
    pids = [w.proc.pid for w in workers]
    t0 = time.monotonic()
    await trio.sleep(least)  # e.g. the followers have joined the topic's mesh by the change
    while time.monotonic() - t0 < most:
        c0 = sum(map(proc_cpu_s, pids))
        await trio.sleep(1.0)
        if sum(map(proc_cpu_s, pids)) - c0 < QUIET_BASE + n * per_peer:
            break
    return time.monotonic() - t0


async def propagation(
    side: Side, workers: list[Worker], ids: dict[tuple[int, int], str], publisher: tuple[int, int]
) -> tuple[list[float], float]:
    pid = ids[publisher]
    async with trio.open_nursery() as watching:  # all at once: modelnet's peers look up the providers
        for w in workers:
            watching.start_soon(request, w, side.watch(pid), 90.0)
    settle = await quiet(workers, len(ids))
    served = await request(workers[publisher[0]], side.serve(publisher[1], CAPABILITY, TASK))
    followers = len(ids) - 1
    with trio.move_on_after(PROPAGATION_LIMIT):
        while sum(len(w.seen(pid)) for w in workers) < len(ids):
            await trio.sleep(0.1)
    delays = [
        t - served["t"]
        for wi, w in enumerate(workers)
        for i, t in w.seen(pid).items()
        if (wi, i) != publisher
    ]
    return sorted(delays) + [math.inf] * (followers - len(delays)), settle


async def busy_lookups(
    side: Side, fresh: Worker, everyone: list[str], expect: list[str], count: int, rng: random.Random
) -> list[Lookup]:
    burn = "while True:\n    pass\n"
    procs = [await trio.lowlevel.open_process([sys.executable, "-c", burn]) for _ in range(2)]
    try:
        return await fresh_lookups(side, fresh, everyone, expect, count, 2 * LOOKUP_LIMIT, rng)
    finally:
        for p in procs:
            p.kill()
        with trio.CancelScope(shield=True):
            for p in procs:
                await p.wait()


async def idle_rss(side: Side) -> int:
    async with open_worker(**side.options(0, [], 60)) as worker:
        return int((await request(worker, {"cmd": "stats"}))["stats"]["rss_kib"])


# -- report -------------------------------------------------------------------------------------


def rank(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (``inf`` counts as a sample that never arrived)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def lookup_times(ls: list[Lookup]) -> list[float]:
    return [math.inf if x.all_s is None else x.all_s for x in ls]


def fmt(v: float | None, spec: str = ".2f") -> str:
    if v is None or math.isnan(v):
        return "-"
    if math.isinf(v):
        return "never"
    return format(v, spec)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b) or not b:
        return "-"
    return f"{a / b:.2f}"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("meets" if ok else "MISSES")


@dataclass
class Row:
    label: str
    value: Callable[[SideResult], float | None]
    text: Callable[[SideResult], str]
    goal: str
    ok: Callable[[SideResult], bool | None]


def complete(ls: list[Lookup]) -> str:
    return f"{sum(1 for x in ls if x.all_s is not None)}/{len(ls)}" if ls else "-"


def within(values: list[float], limit: float) -> float | None:
    return sum(1 for v in values if v <= limit) / len(values) * 100 if values else None


def rows_for(n: int) -> list[Row]:
    def cpu_ok(r: SideResult) -> bool | None:
        return None if r.cpu_pct is None or n != 100 else r.cpu_pct <= 0.5

    def conns_text(r: SideResult) -> str:
        c = r.conns
        return f"{c[0]}/{statistics.median(c):g}/{c[-1]}" if c else "-"

    def lk_ok(r: SideResult) -> bool | None:
        if not r.lookups:
            return None
        t = lookup_times(r.lookups)
        return rank(t, 0.5) < 1.0 and rank(t, 0.95) < 3.0 and all(x.found == PROVIDERS for x in r.lookups)

    return [
        Row("idle CPU/peer, % of a core", lambda r: r.cpu_pct, lambda r: fmt(r.cpu_pct, ".3f"),
            "<= 0.5 at N=100", cpu_ok),
        Row("RSS/peer, MiB", lambda r: r.rss_mib, lambda r: fmt(r.rss_mib, ".1f"), "", lambda r: None),
        Row("connections/peer min/med/max", lambda r: statistics.median(r.conns) if r.conns else None,
            conns_text, "", lambda r: None),
        Row("TCP bytes sent/s/peer (idle)", lambda r: r.bytes_s, lambda r: fmt(r.bytes_s, ".0f"), "",
            lambda r: None),
        Row("serve->discoverable p50 s", lambda r: rank(r.discoverable, 0.5),
            lambda r: fmt(rank(r.discoverable, 0.5)), "", lambda r: None),
        Row("serve->discoverable p95 s", lambda r: rank(r.discoverable, 0.95),
            lambda r: fmt(rank(r.discoverable, 0.95)), "p95 <= 1 s",
            lambda r: None if not r.discoverable else rank(r.discoverable, 0.95) <= 1.0),
        Row("fresh first lookup p50 s", lambda r: rank(lookup_times(r.lookups), 0.5),
            lambda r: fmt(rank(lookup_times(r.lookups), 0.5)), "p50 < 1 s,", lambda r: None),
        Row("fresh first lookup p95 s", lambda r: rank(lookup_times(r.lookups), 0.95),
            lambda r: fmt(rank(lookup_times(r.lookups), 0.95)), "p95 < 3 s,", lambda r: None),
        Row("fresh lookups complete", lambda r: None, lambda r: complete(r.lookups), "all complete", lk_ok),
        Row("idle window quiet after s", lambda r: r.idle_settle_s,
            lambda r: fmt(r.idle_settle_s, ".1f"), "", lambda r: None),
        Row("serve() trials quiet after s (max)", lambda r: max(r.serve_settle_s, default=None),
            lambda r: fmt(max(r.serve_settle_s, default=None), ".1f"), "", lambda r: None),
        Row("follow wave settled after s", lambda r: r.follow_settle_s,
            lambda r: fmt(r.follow_settle_s, ".1f"), "", lambda r: None),
        Row("propagation p50 s", lambda r: rank(r.propagation, 0.5),
            lambda r: fmt(rank(r.propagation, 0.5)), "", lambda r: None),
        Row("propagation p95 s", lambda r: rank(r.propagation, 0.95),
            lambda r: fmt(rank(r.propagation, 0.95)), "", lambda r: None),
        Row("followers within 2 s, %", lambda r: within(r.propagation, 2.0),
            lambda r: fmt(within(r.propagation, 2.0), ".0f"), ">= 95 %",
            lambda r: None if not r.propagation else (within(r.propagation, 2.0) or 0) >= 95),
        Row("lookups, cores busy: p50 s", lambda r: rank(lookup_times(r.busy), 0.5),
            lambda r: fmt(rank(lookup_times(r.busy), 0.5)), "", lambda r: None),
        Row("lookups, cores busy: complete", lambda r: None, lambda r: complete(r.busy), "all complete",
            lambda r: None if not r.busy else all(x.all_s is not None for x in r.busy)),
    ]  # fmt: skip


def size_table(m: SideResult, s: SideResult) -> list[str]:
    """The lines of one size's table: modelnet beside stock, with the goals."""
    lines = [
        f"N = {m.n} peers in {m.workers} worker processes each side; startup modelnet"
        f" {fmt(m.startup_s, '.0f')} s, stock {fmt(s.startup_s, '.0f')} s;"
        f" measured in {m.elapsed_s:.0f} s + {s.elapsed_s:.0f} s",
        f"  {'':31} {'modelnet':>10} {'stock':>10} {'ratio':>6}  {'goal (modelnet)':<16} {''}",
    ]
    for row in rows_for(m.n):
        lines.append(
            f"  {row.label:31} {row.text(m):>10} {row.text(s):>10} {ratio(row.value(m), row.value(s)):>6}"
            f"  {row.goal:<16} {verdict(row.ok(m))}"
        )
    lines += [
        f"  serve() trials ({r.side}), s: " + ", ".join(fmt(t) for t in r.discoverable)
        for r in (m, s)
        if r.discoverable
    ]
    lines += [
        f"  the lookups that found them ({r.side}) had run, s: " + ", ".join(fmt(t) for t in r.finding)
        for r in (m, s)
        if r.finding
    ]
    lines += [
        f"  their announces ended after ({r.side}), s (rounds): "
        + ", ".join(f"{fmt(t)} ({n})" for t, n in r.placed)
        for r in (m, s)
        if r.placed
    ]
    lines += [
        f"  their model keys acknowledged ({r.side}), s after the announce began (first/fifth/last): "
        + ", ".join("/".join(fmt(t[i]) if -len(t) <= i < len(t) else "-" for i in (0, 4, -1))
                    for t in r.model_acked)
        for r in (m, s)
        if r.model_acked
    ]
    lines += [f"  note ({r.side}): {note}" for r in (m, s) for note in r.notes]
    return lines


def report(pairs: list[tuple[SideResult, SideResult]], settings: Settings, header: list[str]) -> None:
    print()
    print("\n".join(header))
    for m, s in pairs:
        print()
        print("\n".join(size_table(m, s)))
    print()
    print("Idle CPU per peer across sizes (goal: at most 1.5x from 20 to 200 peers):")
    for side in (0, 1):
        got = [(p[side].n, c) for p in pairs if (c := p[side].cpu_pct) is not None]
        name = pairs[0][side].side if pairs else ""
        if len(got) < 2:
            print(f"  {name}: fewer than two sizes measured")
            continue
        (n0, c0), (n1, c1) = got[0], got[-1]
        growth = c1 / c0 if c0 else math.nan
        in_range = n0 <= 20 and n1 >= 200
        ok = verdict(growth <= 1.5) if side == 0 and in_range else "(not the goal's 20-200 range)"
        line = ", ".join(f"{n}: {c:.3f}%" for n, c in got)
        print(f"  {name:8} {line}; {n0} -> {n1} peers: x{growth:.2f} {ok if side == 0 else ''}".rstrip())


async def main(args: argparse.Namespace) -> None:
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else ([20, 50] if args.quick else [20, 50, 100, 200])
    )
    settings = Settings.make(args.quick)
    if args.serve_trials:
        settings = dataclasses.replace(settings, serve_trials=args.serve_trials)
    rng = random.Random(args.seed)
    started, load0 = time.perf_counter(), os.getloadavg()
    wanted = set(args.sides.split(","))
    sides: list[Side] = [s for s in (Modelnet(), Stock()) if s.name in wanted]
    rss0 = {s.name: await idle_rss(s) for s in sides}
    pairs = []
    for n in sizes:
        # (each serve() trial may first wait SERVE_QUIET_LIMIT for a quiet mesh: the stock one never is)
        limit = args.size_limit or (180.0 + 1.5 * n + settings.serve_trials * SERVE_QUIET_LIMIT)
        results = []
        for side in sides:
            print(f"... {side.name} N={n} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
            try:
                results.append(await run_side(side, n, settings, limit, rss0[side.name], rng))
            except Exception as exc:
                # The size limit cancelled the mesh and workers that did not stop in time were
                # killed: their errors leave with the cancellation, past run_side's handler.
                failed = SideResult(side.name, n, workers_for(n))
                failed.notes.append(f"size limit of {limit:.0f} s reached; stopping: {describe(exc)}")
                results.append(failed)
        by_side = {r.side: r for r in results}
        m, st = (
            by_side.get(name) or SideResult(name, n, workers_for(n), notes=["not run (--sides)"])
            for name in ("modelnet", "stock")
        )
        pairs.append((m, st))
        # Each size as soon as it is measured (stderr), so that a run cut short keeps its figures.
        print("\n".join(["", *size_table(*pairs[-1]), ""]), file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    header = [
        f"modelnet_p2p scale benchmark{' (--quick)' if args.quick else ''}: {os.cpu_count()} CPUs,"
        f" python {sys.version.split()[0]}, 127.0.0.1 only; {PROVIDERS} providers;"
        f" settle {settings.settle:.0f} s,"
        f" idle window {settings.window:.0f} s; {settings.lookups} fresh lookups, {settings.serve_trials}"
        f" serve trials, {settings.busy_lookups} lookups under load per side and size",
        f"  load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f};"
        f" whole run {time.perf_counter() - started:.0f} s",
        "  stock = py-libp2p KadDHT + GossipSub (one topic, every peer subscribed,"
        " servers publish every 2 s)",
        "  CPU from /proc/<pid>/stat; bytes = TCP bytes sent (kernel TCP_INFO of the workers' sockets),"
        " RSS net of an idle worker ("
        + ", ".join(f"{name} {kib / 1024:.0f} MiB" for name, kib in rss0.items())
        + ")",
        "  ratio = modelnet / stock; 'never' = not within the limit"
        f" ({LOOKUP_LIMIT:.0f} s, {2 * LOOKUP_LIMIT:.0f} s under load,"
        f" {PROPAGATION_LIMIT:.0f} s for propagation)",
    ]
    report(pairs, settings, header)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 20 and 50, shorter windows")
    parser.add_argument("--sizes", default="", help="comma-separated mesh sizes")
    parser.add_argument(
        "--size-limit", type=float, default=0.0, help="seconds per mesh (default 180 + 1.5 N)"
    )
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--serve-trials", type=int, default=0, help="serve() trials per size (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--sides", default="modelnet,stock", help="which meshes to run: modelnet, stock or both (a trial)"
    )
    parser.add_argument(
        "--netns", action="store_true", help="namespaces behind a router, 50 ms RTT (scale_netns.py; N=40)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.netns:
        from scale_netns import main as netns_main

        trio.run(netns_main, args)
    else:
        trio.run(main, args)

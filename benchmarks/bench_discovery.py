"""Discovery benchmark: a fresh peer finds every provider of a task, beside py-libp2p's own lookup.

Usage::

    python benchmarks/bench_discovery.py [--quick] [--sizes 10,20,50] [--repeats N]

For each mesh size N, N peers run on 127.0.0.1 spread over several worker
processes (``python -m modelnet_p2p.testing.worker``), 3 of them serving a capability of the task
``chat``. Then, in this process, fresh peers that know one bootstrap address
each (a different one each time, no listen address, so DHT clients) look up
the task, and the benchmark reports:

1. the time from the fresh peer's start (bootstrap connected) until it holds all
   3 verified cards, and until ``discover()`` returns;
2. the DHT requests the fresh peer sent (outbound streams on the DHT protocol);
3. how many of the 3 providers it found;
4. the memory per peer: the RSS of the worker processes divided by their peers,
   and the same minus the RSS of a worker process that runs no peer.

Baseline, measured in the same run on the same mesh: py-libp2p 0.8.1's own
``ProviderStore.find_providers`` (the lookup ``KadDHT.find_providers`` runs),
from another fresh peer, on the same key. It returns peer ids only (no cards,
nothing verified) and may stop before it has them all, which the "found" row
shows. Ratios are modelnet / baseline. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelnet_p2p import Peer  # noqa: E402
from modelnet_p2p.proto.card import task_key  # noqa: E402
from modelnet_p2p.testing import open_worker, open_workers  # noqa: E402

PROVIDERS = 3
TASK = "chat"
#: Seconds a worker may take to start its peers.
STARTUP_LIMIT = 120.0
#: Seconds one lookup may take.
LOOKUP_LIMIT = 30.0


def workers_for(n: int) -> int:
    return min(5, max(2, math.ceil(n / 10)))


@dataclass
class Sample:
    all_found_s: float | None
    done_s: float
    requests: int
    found: int


@dataclass
class SizeResult:
    n: int
    workers: int
    startup_s: float = 0.0
    modelnet: list[Sample] = field(default_factory=list)
    stock: list[Sample] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    peers_per_worker: list[int] = field(default_factory=list)


# -- lookups from fresh peers ----------------------------------------------------------------


async def modelnet_lookup(boot: str, expected: set[str]) -> Sample:
    peer = Peer(listen=[], bootstrap=[boot])
    peer.discovery.refresh_on_start = False  # count the lookup's requests only
    async with peer:
        t0 = time.perf_counter()
        before = peer.discovery.requests_sent
        found: set[str] = set()
        all_found: float | None = None
        with trio.move_on_after(LOOKUP_LIMIT):
            async for card in peer.discover_iter(TASK, timeout=LOOKUP_LIMIT):
                found.add(card.peer_id)
                if all_found is None and expected <= found:
                    all_found = time.perf_counter() - t0
        done = time.perf_counter() - t0
        return Sample(all_found, done, peer.discovery.requests_sent - before, len(found & expected))


async def stock_lookup(boot: str, expected: set[str]) -> Sample:
    peer = Peer(listen=[], bootstrap=[boot])
    peer.discovery.refresh_on_start = False
    async with peer:
        kad = peer.discovery.kad
        t0 = time.perf_counter()
        before = peer.discovery.requests_sent
        providers: list[str] = []
        with trio.move_on_after(LOOKUP_LIMIT):
            providers = await kad.library_find_providers(task_key(TASK), 20)
        done = time.perf_counter() - t0
        found = set(providers) & expected
        return Sample(
            done if found == expected else None, done, peer.discovery.requests_sent - before, len(found)
        )


# -- one mesh size ------------------------------------------------------------------------


async def measure(n: int, repeats: int, rng: random.Random) -> SizeResult:
    w = workers_for(n)
    sizes = [n // w + (1 if i < n % w else 0) for i in range(w)]
    result = SizeResult(n, w, peers_per_worker=sizes)
    cap = {"name": "bench-model", "task": TASK, "version": "1", "tags": ["bench"]}
    # Providers live in the workers other than the first (whose peers everyone
    # bootstraps from), spread over them: worker 1 + k % (w - 1), peer 1 + k // (w - 1).
    serve: list[dict[int, list[dict[str, Any]]]] = [{} for _ in range(w)]
    for k in range(PROVIDERS):
        serve[1 + k % (w - 1)][1 + k // (w - 1)] = [cap]
    t0 = time.perf_counter()
    limits = {"max_seconds": 900, "startup_timeout": STARTUP_LIMIT, "stop_timeout": 20, "stderr": DEVNULL}
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_worker(sizes[0], **limits))
        boot = [p["addrs"][0] for p in first.peers]
        rest = [{"peers": sizes[i], "serve": serve[i]} for i in range(1, w)]
        workers = [first, *await stack.enter_async_context(open_workers(rest, bootstrap=boot, **limits))]
        # Announce once the whole mesh is up, so records reach their closest peers.
        announced = 0
        for i in range(w):
            if serve[i]:
                announced += (await workers[i].request({"cmd": "announce"}))["announced"]
        result.startup_s = time.perf_counter() - t0
        expected = {p["id"] for i in range(w) for p in workers[i].peers if p["peer"] in serve[i]}
        assert announced == PROVIDERS == len(expected), (announced, expected)
        everyone = [p["addrs"][0] for i in range(w) for p in workers[i].peers]
        await trio.sleep(1.0)  # ADD_PROVIDER is fire-and-forget: let the last ones land
        for _ in range(repeats):
            result.modelnet.append(await modelnet_lookup(rng.choice(everyone), expected))
            result.stock.append(await stock_lookup(rng.choice(everyone), expected))
        for i in range(w):
            result.rss_kib.append((await workers[i].request({"cmd": "stats"}))["stats"]["rss_kib"])
    return result


async def baseline_rss() -> int:
    async with open_worker(0, stderr=DEVNULL) as worker:
        stats = (await worker.request({"cmd": "stats"}))["stats"]
        return int(stats["rss_kib"])


# -- report ------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}"


def report(results: list[SizeResult], rss0: int, quick: bool, elapsed: float) -> None:
    print()
    print(f"modelnet_p2p discovery benchmark{' (--quick)' if quick else ''}")
    print(
        f"  python {sys.version.split()[0]}, {os.cpu_count()} CPUs, 127.0.0.1 only; {PROVIDERS} providers of"
    )
    print("  one task; each lookup from a fresh DHT-client peer that knows one random bootstrap address.")
    print("  modelnet = Peer.discover(): network-only, de-duplicated, every card fetched and verified.")
    print(
        "  stock    = py-libp2p 0.8.1 ProviderStore.find_providers(key, 20): peer ids only, nothing verified."
    )
    print("  ratio    = modelnet / stock (lower is better for time and requests)")
    print()
    head = (
        f"{'peers':>5} {'procs':>5} {'runs':>4} | {'all found s':>11} {'stock s':>8} {'ratio':>5} |"
        f" {'done s':>7} | {'DHT reqs':>8} {'stock':>6} {'ratio':>5} | {'found':>7} {'stock':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        m_all = [s.all_found_s for s in r.modelnet if s.all_found_s is not None]
        m_done = _med([s.done_s for s in r.modelnet])
        s_done = _med([s.done_s for s in r.stock])
        m_req = _med([float(s.requests) for s in r.modelnet])
        s_req = _med([float(s.requests) for s in r.stock])
        m_found = f"{min(s.found for s in r.modelnet)}-{max(s.found for s in r.modelnet)}/{PROVIDERS}"
        s_found = f"{min(s.found for s in r.stock)}-{max(s.found for s in r.stock)}/{PROVIDERS}"
        m_med = _med(m_all) if len(m_all) == len(r.modelnet) else None
        print(
            f"{r.n:>5} {r.workers:>5} {len(r.modelnet):>4} | {_fmt(m_med):>11} {_fmt(s_done):>8}"
            f" {_ratio(m_med, s_done):>5} | {_fmt(m_done):>7} | {_fmt(m_req, '.0f'):>8}"
            f" {_fmt(s_req, '.0f'):>6} {_ratio(m_req, s_req):>5} | {m_found:>7} {s_found:>7}"
        )
    print("-" * len(head))
    print("  all found s: median time until all 3 cards were verified ('-' if a run missed one);")
    print("  stock s: median time find_providers took (whether or not it found all 3; see 'found');")
    print("  done s: median time until discover() returned (the lookup also confirms nothing is missing).")
    for r in results:
        worst = max((s.all_found_s or math.inf) for s in r.modelnet)
        print(
            f"  {r.n} peers: slowest modelnet run {_fmt(worst)} s; mesh start + announce {r.startup_s:.1f} s"
        )
    print()
    head2 = (
        f"{'peers':>5} {'procs':>5} | {'RSS/proc MiB':>12} | {'RSS/peer MiB':>12} | {'above empty proc':>16}"
    )
    print(head2)
    print("-" * len(head2))
    for r in results:
        total = sum(r.rss_kib) / 1024
        extra = (sum(r.rss_kib) - rss0 * len(r.rss_kib)) / 1024
        print(
            f"{r.n:>5} {r.workers:>5} | {total / len(r.rss_kib):>12.1f} | {total / r.n:>12.2f} |"
            f" {extra / r.n:>16.2f}"
        )
    print("-" * len(head2))
    print(f"  baseline: a worker process with modelnet_p2p imported and no peer: {rss0 / 1024:.1f} MiB;")
    print("  'above empty proc' = (sum of worker RSS - that baseline per worker) / peers.")
    print(f"\ntotal time {elapsed:.0f} s")


async def run(sizes: list[int], repeats: int, quick: bool, seed: int) -> None:
    t0 = time.perf_counter()
    rng = random.Random(seed)
    rss0 = await baseline_rss()
    results = []
    for n in sizes:
        print(f"mesh of {n} peers over {workers_for(n)} processes ...", file=sys.stderr, flush=True)
        results.append(await measure(n, repeats, rng))
    report(results, rss0, quick, time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one lookup per mesh size")
    parser.add_argument("--sizes", default="10,20,50", help="mesh sizes, comma-separated (default 10,20,50)")
    parser.add_argument("--repeats", type=int, default=None, help="fresh-peer lookups per size (default 5)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = args.repeats or (1 if args.quick else 5)
    trio.run(run, sizes, repeats, args.quick, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Availability gossip benchmark: how fast a new provider becomes known, and what gossip costs.

Usage::

    python benchmarks/bench_availability.py [--quick] [--runs 10@2,20@2,40@2,40@6]

For each run ``N@P`` (N peers publishing every P seconds; by default 10, 20
and 40 peers at the default 2 s, and 40 peers at 6 s) it starts N peers on
127.0.0.1, spread over worker processes (``python -m modelnet_p2p.testing.worker``)
(about 10 peers each), connects them as bootstrapping does (each peer dials 3
random earlier ones), lets the mesh settle, and measures:

1. **Time until 95 % of the N peers see a new provider**: a provider peer in this
   process starts its availability service, dials 3 random peers, and each
   worker reports when each of its peers first has the provider in its table.
   Measured from the service start; repeated for several providers (each leaves
   gracefully afterwards); the median over trials is reported, with p50 and max
   over peers of one trial for context.
2. **Gossip bytes per peer per second** in steady state: every pubsub byte the
   peers write (records, relays, GossipSub control, subscriptions; before yamux
   and Noise framing), beside a baseline computed from the same run, the
   **theoretical minimum**: every record published during the window, at its
   actual size, delivered once to each of the N-1 other peers:
   ``sum(record sizes) x (N-1) / N / seconds``. A naive full-mesh broadcast over
   direct streams would send exactly that payload (plus a few bytes of framing
   per record) but needs N-1 connections per peer; the ratio shows what
   GossipSub's redundancy and control traffic cost on top of it.

It also prints the CPU the workers used (per core of this machine): py-libp2p
gossip costs about 1 ms of CPU per message copy, and once the workers saturate
the cores, latency measures the machine rather than the protocol. On a 2-core
machine 40 peers publishing every 2 s do saturate it (each would have a machine
of its own in a real mesh); the ``40@6`` run shows the same mesh at a load the
machine can carry.

Everything listens on 127.0.0.1 only. Nothing here asserts on timings: it
reports numbers and exits 0.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelnet_p2p import Peer
from modelnet_p2p.log import quiet_libp2p
from modelnet_p2p.services.availability import AvailabilityConfig, start_availability
from modelnet_p2p.testing import Worker, open_workers, random_links

#: Passed to the provider: its availability service is attached by hand.
NO_GOSSIP: dict[str, Any] = {"gossip": False}
#: What every worker peer serves (it is in each availability record, so it sets their size).
ECHO = {"name": "echo", "version": "1.0"}

#: Peers per worker process.
PEERS_PER_WORKER = 10
#: Each peer dials this many random earlier peers.
LINKS = 3
#: Seconds one trial may wait for 95 % of the peers.
TRIAL_LIMIT = 30.0


@dataclass(frozen=True)
class Settings:
    window: float
    trials: int
    settle_periods: float

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(window=8.0, trials=2, settle_periods=2)
        return cls(window=12.0, trials=3, settle_periods=3)


@dataclass
class Result:
    peers: int
    interval: float
    workers: int
    t95: list[float] = field(default_factory=list)
    p50_first: float = math.nan
    max_first: float = math.nan
    missed: int = 0
    bytes_per_peer_s: float = 0.0
    min_bytes_per_peer_s: float = 0.0
    record_size: float = 0.0
    records_per_s: float = 0.0
    cpu_per_core: float = 0.0
    stale_per_s: float = 0.0
    restarts: int = 0


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("cpu", "bytes_sent", "published", "published_bytes", "restarts")
    out = {k: float(sum(s[k] for s in stats)) for k in keys}
    out["stale"] = float(sum(s["rejected"].get("stale", 0) for s in stats))
    out["wall"] = max(s["wall"] for s in stats)
    return out


async def _stats(workers: list[Worker]) -> dict[str, float]:
    return _sum_stats([(await w.request({"cmd": "stats"}))["stats"] for w in workers])


async def run_size(n: int, interval: float, settings: Settings, rng: random.Random) -> Result:
    n_workers = max(1, math.ceil(n / PEERS_PER_WORKER))
    sizes = [n // n_workers + (1 if i < n % n_workers else 0) for i in range(n_workers)]
    result = Result(peers=n, interval=interval, workers=n_workers)
    options = {
        "dht_mode": "client",
        "link": False,
        "publish_interval": interval,
        "serve": {"*": [ECHO]},
        "max_seconds": 900,
    }
    async with open_workers(sizes, **options) as workers:
        where = [(w, i) for w in workers for i in range(len(w.peers))]
        rng.shuffle(where)
        plan: dict[int, list[list[Any]]] = {id(w): [] for w in workers}
        for a, b in random_links(list(range(n)), LINKS, rng):
            (wa, ia), (wb, ib) = where[a], where[b]
            plan[id(wa)].append([ia, wb.peers[ib]["addr"]])
        for w in workers:
            reply = await w.request({"cmd": "connect", "links": plan[id(w)]}, timeout=120)
            if reply.get("failed"):
                print(f"  warning: {reply['failed']} connections failed", file=sys.stderr)
        await trio.sleep(settings.settle_periods * interval)

        # 1. Steady state: bytes and CPU over a window with no joins.
        before = await _stats(workers)
        await trio.sleep(settings.window)
        after = await _stats(workers)
        seconds = after["wall"] - before["wall"]
        published_bytes = after["published_bytes"] - before["published_bytes"]
        published = after["published"] - before["published"]
        result.bytes_per_peer_s = (after["bytes_sent"] - before["bytes_sent"]) / n / seconds
        result.min_bytes_per_peer_s = published_bytes * (n - 1) / n / seconds
        result.record_size = published_bytes / published if published else math.nan
        result.records_per_s = published / seconds
        result.cpu_per_core = (after["cpu"] - before["cpu"]) / seconds / (os.cpu_count() or 1)
        result.stale_per_s = (after["stale"] - before["stale"]) / seconds

        # 2. New providers.
        config = AvailabilityConfig(publish_interval=interval)
        need = math.ceil(0.95 * n)
        for trial in range(settings.trials):
            async with Peer(listen=["/ip4/127.0.0.1/tcp/0"], dht_mode="client", **NO_GOSSIP) as provider:
                for w in workers:
                    # Every worker peer cares about the new capability (routing follows what it calls).
                    await w.request({"cmd": "watch", "id": provider.peer_id, "capability": "new"})
                started = time.monotonic()
                service = await start_availability(
                    provider.host, provider.identity, provider.nursery, config, capabilities=[("new", "1")]
                )
                for j in rng.sample(range(n), LINKS):
                    w, i = where[j]
                    await provider.connect(w.peers[i]["addr"])
                while time.monotonic() - started < TRIAL_LIMIT:
                    if sum(len(w.seen(provider.peer_id)) for w in workers) >= n:
                        break
                    await trio.sleep(0.02)
                delays = sorted(t - started for w in workers for t in w.seen(provider.peer_id).values())
                if len(delays) >= need:
                    result.t95.append(delays[need - 1])
                else:
                    result.missed += 1
                if trial == 0 and delays:
                    result.p50_first = delays[len(delays) // 2]
                    result.max_first = delays[-1] if len(delays) == n else math.inf
                await service.leave()
            if result.missed:
                break  # saturated: further trials would only take TRIAL_LIMIT each
            await trio.sleep(interval)
        result.restarts = int((await _stats(workers))["restarts"])
    return result


def _fmt(x: float, unit: str = "", digits: int = 2) -> str:
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "never"
    return f"{x:.{digits}f}{unit}"


def print_table(results: list[Result]) -> None:
    print()
    print("Time until 95 % of the peers see a new provider (requirement: all peers within 3 periods)")
    print(
        f"{'peers':>5} {'period':>6} {'procs':>5} {'t95 median':>11} {'t95 range':>14} "
        f"{'trial 1 p50/max':>16} {'cpu/core':>8}"
    )
    for r in results:
        t95 = statistics.median(r.t95) if r.t95 else math.nan
        rng = f"{_fmt(min(r.t95))}-{_fmt(max(r.t95))} s" if r.t95 else "n/a"
        missed = f"  ({r.missed} trial(s) under 95 %)" if r.missed else ""
        sat = "  (saturated)" if r.cpu_per_core > 0.85 else ""
        print(
            f"{r.peers:>5} {_fmt(r.interval, ' s', 0):>6} {r.workers:>5} {_fmt(t95, ' s'):>11} {rng:>14} "
            f"{_fmt(r.p50_first) + '/' + _fmt(r.max_first) + ' s':>16} {r.cpu_per_core * 100:>7.0f}%"
            f"{sat}{missed}"
        )
    print()
    print("Gossip traffic per peer, steady state, vs the theoretical minimum measured in the same run")
    print("(minimum = each record published in the window, at its size, delivered once to each other peer;")
    print(" a naive full-mesh direct-stream broadcast sends that much, over N-1 connections per peer)")
    print(
        f"{'peers':>5} {'period':>6} {'record':>7} {'records/s':>9} {'gossip B/peer/s':>15} "
        f"{'minimum B/peer/s':>16} {'ratio':>6} {'stale/s':>7}"
    )
    for r in results:
        ratio = r.bytes_per_peer_s / r.min_bytes_per_peer_s if r.min_bytes_per_peer_s else math.nan
        print(
            f"{r.peers:>5} {_fmt(r.interval, ' s', 0):>6} {_fmt(r.record_size, ' B', 0):>7} "
            f"{r.records_per_s:>9.1f} "
            f"{r.bytes_per_peer_s:>15,.0f} {r.min_bytes_per_peer_s:>16,.0f} {_fmt(ratio, 'x', 1):>6} "
            f"{r.stale_per_s:>7.1f}"
        )
    restarts = sum(r.restarts for r in results)
    if restarts:
        print(f"\nwarning: pubsub restarted {restarts} time(s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer trials")
    parser.add_argument(
        "--runs",
        default="10@2,20@2,40@2,40@6",
        help="comma-separated PEERS@PUBLISH_INTERVAL_SECONDS",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    quiet_libp2p()
    settings = Settings.make(args.quick)
    runs = []
    for item in args.runs.split(","):
        peers, _, interval = item.partition("@")
        runs.append((int(peers), float(interval or 2.0)))
    try:
        libp2p_version = version("libp2p")
    except PackageNotFoundError:
        libp2p_version = "?"
    print(
        f"bench_availability: python {platform.python_version()}, libp2p {libp2p_version}, "
        f"trio {trio.__version__}, {os.cpu_count()} CPUs, {'quick' if args.quick else 'full'} run"
    )
    print(
        f"window {settings.window:g} s, {settings.trials} new providers per size, "
        f"{PEERS_PER_WORKER} peers per worker process, each peer dials {LINKS} others"
    )
    rng = random.Random(args.seed)
    results = []
    for n, interval in runs:
        started = time.monotonic()
        result = trio.run(run_size, n, interval, settings, rng)
        print(f"  {n} peers @ {interval:g} s measured in {time.monotonic() - started:.0f} s", flush=True)
        results.append(result)
    print_table(results)
    routing_overhead(20 if args.quick else 200)
    return 0


def routing_overhead(calls: int) -> None:
    """3. The cost of routing: a capability call (no target) against a call to an explicit target.

    Three providers and a client in this process; both kinds of call run the
    same one-chunk handler, alternating, after warm-up (the provider list is
    cached, as it is in steady state).
    """

    async def run() -> tuple[list[float], list[float]]:
        from modelnet_p2p import Capability
        from modelnet_p2p.testing import open_peers

        async def tiny(request: Any) -> str:
            return "ok"

        async with open_peers(4) as (client, *providers):
            for p in providers:
                p.serve(Capability(name="tiny", task="tool"), tiny)
                await p.announce()
            target = providers[0].addrs[0]
            for _ in range(10):
                await client.call(capability="tiny", input=None, timeout=10)
                await client.call(target, "tiny", None, timeout=10)
            routed: list[float] = []
            direct: list[float] = []
            for _ in range(calls):
                t = time.perf_counter()
                await client.call(capability="tiny", input=None, timeout=10)
                routed.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                await client.call(target, "tiny", None, timeout=10)
                direct.append((time.perf_counter() - t) * 1000)
            return routed, direct

    routed, direct = trio.run(run)
    r50, d50 = statistics.median(routed), statistics.median(direct)
    print("\n3. routing overhead (one-chunk call, 3 providers, all peers in this process)")
    print(f"   {'':28}{'routed':>10}{'explicit':>10}{'ratio':>8}")
    print(f"   {'p50 ms':28}{r50:10.2f}{d50:10.2f}{r50 / d50:8.2f}")
    r99 = sorted(routed)[int(len(routed) * 0.99) - 1]
    d99 = sorted(direct)[int(len(direct) * 0.99) - 1]
    print(f"   {'p99 ms':28}{r99:10.2f}{d99:10.2f}{r99 / d99:8.2f}")


if __name__ == "__main__":
    sys.exit(main())

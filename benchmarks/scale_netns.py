"""Scale benchmark, netns variant (issue 11): bench_scale's phases with the peers' worker processes
in network namespaces behind a router, with delay between them.

Usage::

    python benchmarks/bench_scale.py --netns [--quick] [--sizes 40] [--size-limit S] [--seed 11]

One mesh size (40 peers unless ``--sizes`` says otherwise) for modelnet and for stock py-libp2p
(``benchmarks/stock_mesh_worker.py``), one after the other, in the same run and over the same
namespaces (``netns_common.Star``):

- each of the ``W`` worker processes of a mesh (``bench_scale.workers_for``: 4 at N = 40) runs
  in a host namespace of its own, ``h1`` .. ``hW``, its peers listening on that namespace's
  address (the workers' ``--listen``); the fresh peer of the lookups runs in one more host,
  ``h(W+1)``, so its every lookup crosses the router;
- every host is linked to one router namespace; a packet leaving a host waits
  :data:`DELAY_MS` (25 ms) before the router forwards it, nothing is added on the way back:
  one way between two hosts is 25 ms, a round trip 50 ms (measured and printed in the header,
  TCP, from h1 to h2). Peers of one worker share a namespace and reach each other without
  delay (a quarter of the pairs at W = 4). No loss, no NAT: every peer is reachable.

The phases, the figures and their ratios are those of ``bench_scale.py`` (``run_side``,
``rows_for``): idle CPU, RSS, connections and bytes per peer, a fresh peer's first lookup,
``serve()`` to discoverable, state-change propagation, lookups with both cores busy. The
packets the forwarder passed during each side are printed too (its CPU is not the workers').
The namespaces are removed on exit, also after an error, Ctrl-C or SIGTERM; those of a run
that was killed are removed by the next one. Nothing here asserts: it prints figures and exits
0, or 1 if namespaces cannot be made here.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import time
from typing import Any

import trio
from bench_scale import (
    LOOKUP_LIMIT,
    PROPAGATION_LIMIT,
    PROVIDERS,
    Modelnet,
    Settings,
    Side,
    SideResult,
    Stock,
    fmt,
    idle_rss,
    ratio,
    rows_for,
    run_side,
    verdict,
    workers_for,
)
from netns_common import NetnsUnavailable, Star, in_ns, star

from modelnet_p2p.testing import worker_command

#: Milliseconds each packet from a host waits before the router forwards it.
DELAY_MS = 25.0
DEFAULT_SIZE = 40


class InNetns(Side):
    """A side whose worker processes each run in a host namespace, listening on its address.

    ``run_side`` opens the fresh peer's worker first, then the mesh's workers in order;
    :meth:`place` lists the hosts they get, in that order.
    """

    def __init__(self, inner: Side, topo: Star) -> None:
        self.inner, self.topo, self.name = inner, topo, inner.name
        self.slots: list[int] = []

    def place(self, hosts: list[int]) -> None:
        self.slots = list(hosts)

    def options(self, peers: int, bootstrap: Any, max_seconds: float) -> dict[str, Any]:
        if not self.slots:
            raise RuntimeError("more worker processes than host namespaces")
        k = self.slots.pop(0)
        opts = self.inner.options(peers, bootstrap, max_seconds)
        cmd = opts.pop("command", None)
        if cmd is None:  # modelnet: the command open_worker would have built
            cmd = worker_command(peers, bootstrap=opts.pop("bootstrap"), max_seconds=opts.pop("max_seconds"))
        opts["command"] = in_ns(self.topo.host(k), [*cmd, "--listen", f"/ip4/{self.topo.addr(k)}/tcp/0"])
        return opts

    def serve(self, peer: int, name: str, task: str) -> dict[str, Any]:
        return self.inner.serve(peer, name, task)

    def find(self, peer: int, name: str, pid: str, timeout: float) -> dict[str, Any]:
        return self.inner.find(peer, name, pid, timeout)

    def fresh(self, boot: str, expect: list[str], timeout: float) -> dict[str, Any]:
        return self.inner.fresh(boot, expect, timeout)

    def watch(self, pid: str) -> dict[str, Any]:
        return self.inner.watch(pid)


def table(m: SideResult, s: SideResult, wire: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"N = {m.n} peers in {m.workers} worker processes (one per namespace) each side; startup"
        f" modelnet {fmt(m.startup_s, '.0f')} s, stock {fmt(s.startup_s, '.0f')} s;"
        f" measured in {m.elapsed_s:.0f} s + {s.elapsed_s:.0f} s",
        f"  {'':31} {'modelnet':>10} {'stock':>10} {'ratio':>6}  {'goal (modelnet)':<16}",
    ]
    for row in rows_for(m.n):
        lines.append(
            f"  {row.label:31} {row.text(m):>10} {row.text(s):>10} {ratio(row.value(m), row.value(s)):>6}"
            f"  {row.goal:<16} {verdict(row.ok(m))}"
        )
    for r in (m, s):
        found = " ".join(str(x.found) for x in r.lookups) or "-"
        busy = " ".join(str(x.found) for x in r.busy) or "-"
        lines.append(f"  providers found per fresh lookup ({r.side}): {found}; cores busy: {busy}")
    for r in (m, s):
        w = wire.get(r.side, {})
        lines.append(
            f"  router ({r.side}): {w.get('packets', '-')} packets forwarded, {w.get('dropped', '-')}"
            f" dropped, forwarder CPU {w.get('cpu_s', '-')} s"
        )
        lines += [f"  note ({r.side}): {note}" for note in r.notes]
    return lines


def wire_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    keys = ("packets", "dropped", "cpu_s")
    if any(k not in before or k not in after for k in keys):
        return {"packets": f"? ({after.get('error', before.get('error', ''))})"}
    return {k: round(after[k] - before[k], 2) for k in keys}


async def measure(args: argparse.Namespace, topo: Star, sizes: list[int]) -> list[str]:
    settings = Settings.make(args.quick)
    rng = random.Random(args.seed)
    rtt = topo.rtt_ms(1, 2)
    fresh_host = topo.hosts
    sides = [InNetns(Modelnet(), topo), InNetns(Stock(), topo)]
    rss0 = {}
    for side in sides:
        side.place([fresh_host])
        rss0[side.name] = await idle_rss(side)
    out = [
        f"  TCP round trip h1 -> h2 (through the router): {', '.join(f'{x:.1f}' for x in rtt)} ms"
        f" (median {statistics.median(rtt) if rtt else float('nan'):.1f})",
    ]
    for n in sizes:
        limit = args.size_limit or (180.0 + 1.5 * n)
        results, wire = [], {}
        for side in sides:
            side.place([fresh_host, *range(1, workers_for(n) + 1)])
            print(f"... netns {side.name} N={n} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
            before = topo.wire_request()
            results.append(await run_side(side, n, settings, limit, rss0[side.name], rng))
            wire[side.name] = wire_delta(before, topo.wire_request())
        out += ["", *table(results[0], results[1], wire)]
    out.insert(
        0,
        f"  {settings.settle:.0f} s settle, {settings.window:.0f} s idle window; {settings.lookups} fresh"
        f" lookups, {settings.serve_trials} serve trials, {settings.busy_lookups} lookups under load;"
        f" {PROVIDERS} providers; limits {LOOKUP_LIMIT:.0f} s per lookup, {PROPAGATION_LIMIT:.0f} s"
        f" propagation; RSS net of an idle worker (modelnet {rss0['modelnet'] / 1024:.0f} MiB,"
        f" stock {rss0['stock'] / 1024:.0f} MiB); ratio = modelnet / stock",
    )
    return out


async def main(args: argparse.Namespace) -> None:
    """Build the namespaces, run every size for both sides, print the tables; always clean up."""
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else [DEFAULT_SIZE]
    hosts = max(map(workers_for, sizes)) + 1
    started, load0 = time.perf_counter(), os.getloadavg()
    lines: list[str] = []
    try:
        with star(hosts, DELAY_MS) as topo:
            with trio.open_signal_receiver(signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:

                    async def on_term() -> None:
                        async for _ in signals:
                            print("SIGTERM: stopping", file=sys.stderr, flush=True)
                            nursery.cancel_scope.cancel()

                    async def run() -> None:
                        lines.extend(await measure(args, topo, sizes))
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(on_term)
                    nursery.start_soon(run)
    except NetnsUnavailable as exc:
        print(f"netns variant not run: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    load1 = os.getloadavg()
    print()
    print(
        f"modelnet_p2p scale benchmark, netns variant{' (--quick)' if args.quick else ''}:"
        f" {os.cpu_count()} CPUs, python {sys.version.split()[0]}; {hosts} host namespaces around"
        f" a router, each host's packets delayed {DELAY_MS:g} ms on their way to the router"
        f" (one way {DELAY_MS:g} ms, round trip {2 * DELAY_MS:g} ms between hosts; none within one)"
    )
    print(
        f"  load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f};"
        f" whole run {time.perf_counter() - started:.0f} s"
    )
    print("\n".join(lines))

"""Collaboration benchmark: what pipelines and ensembles cost beside plain calls, in one run.

Usage::

    python benchmarks/bench_collab.py [--quick]

Every figure is printed next to baselines measured in the same run:

1. **Pipeline hops.** A pipeline of n = 1..4 steps of a trivial capability
   (``noop``: returns its input) against n direct sequential calls (target
   given, no routing), n routed sequential calls (``peer.call(capability=...)``,
   the mesh picks the provider), and a single direct call. The overhead per hop
   is (pipeline - n direct calls) / n.
2. **Ensemble latency.** Five members with fixed delays (10, 20, 40, 80,
   160 ms), each a capability of its own in its own process, asked through
   ``ensemble(capabilities=[...])``. ``all`` is compared with the slowest
   member and with the sum of all five asked one after another; ``first`` with
   the fastest member; ``majority`` over the k fastest members with the k-th
   fastest (the slowest it waits for) and with the sum of the k. Member
   baselines are direct calls to each member.

Process layout: five provider processes (``modelnet serve`` of this file's
``HANDLERS``), each serving ``noop`` and one delayed member, bootstrapped from
the client peer, which runs in this process. Everything listens on 127.0.0.1.
Figures are medians (p90 beside them) in milliseconds. Nothing here asserts on
timings: it reports numbers and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

import trio

HERE = Path(__file__).resolve()
#: Member delays in milliseconds, fastest first; one provider process each.
DELAYS_MS = (10, 20, 40, 80, 160)
#: Seconds a provider process may take to print its ready event.
STARTUP_LIMIT = 60.0
#: Seconds one measured operation may take before it counts as failed.
OP_LIMIT = 20.0
#: The ensembles' own deadline (the slowest member takes 160 ms).
ENSEMBLE_LIMIT = 5.0


# -- the providers' handlers (served by `modelnet serve benchmarks/bench_collab.py:HANDLERS`) ----


async def noop(request: Any) -> Any:
    """A trivial capability: the input, unchanged."""
    return request.input


def _delayed(ms: int) -> Callable[[Any], Awaitable[str]]:
    async def member(request: Any) -> str:
        await trio.sleep(ms / 1000)
        return "42"

    member.__name__ = f"d{ms}"
    return member


#: Capability name -> handler. Plain handlers: `modelnet serve` names them by key.
HANDLERS: dict[str, Any] = {"noop": noop, **{f"d{ms}": _delayed(ms) for ms in DELAYS_MS}}


# -- settings ----------------------------------------------------------------------------


class Settings:
    """How much work each measurement does.

    (No dataclasses in this file: ``modelnet serve file.py:attr`` imports it without
    registering it in ``sys.modules``, where ``@dataclass`` looks itself up.)
    """

    def __init__(self, hop_reps: int, ensemble_reps: int, warmup: int) -> None:
        self.hop_reps, self.ensemble_reps, self.warmup = hop_reps, ensemble_reps, warmup

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(hop_reps=40, ensemble_reps=6, warmup=5)
        return cls(hop_reps=200, ensemble_reps=20, warmup=20)


# -- provider processes --------------------------------------------------------------------


class Provider:
    def __init__(self, index: int, boot: str) -> None:
        self.name = f"provider {index} (noop, d{DELAYS_MS[index]})"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELNET_")}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelnet_p2p.cli",
                "serve",
                f"{HERE}:HANDLERS",
                "--only",
                "noop",
                "--only",
                f"d{DELAYS_MS[index]}",
                "--json",
                "--exit-on-stdin-eof",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--bootstrap",
                boot,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=HERE.parent.parent,
        )
        self.stderr: list[str] = []
        assert self.proc.stderr is not None
        self._drain = threading.Thread(target=self._read_stderr, args=(self.proc.stderr,), daemon=True)
        self._drain.start()
        self.ready: dict[str, Any] = {}

    def _read_stderr(self, pipe: IO[str]) -> None:
        for line in pipe:
            self.stderr.append(line.rstrip())

    def wait_ready(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + STARTUP_LIMIT
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited (code {self.proc.poll()}): {self.stderr[-5:]}")
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "ready":
                    self.ready = event
                    return event
        raise RuntimeError(f"{self.name} did not start in {STARTUP_LIMIT:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


# -- measuring ---------------------------------------------------------------------------


class Stat:
    def __init__(self, samples: list[float], errors: int = 0) -> None:
        self.samples, self.errors = samples, errors

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def p90(self) -> float:
        if not self.samples:
            return float("nan")
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


ERRORS: Counter[str] = Counter()


async def measure(reps: int, warmup: int, ops: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, Stat]:
    """Run every op ``warmup`` times unmeasured, then ``reps`` times; milliseconds per run.

    The ops take turns (one run of each per round), so a burst of load from
    elsewhere on the machine hits them all alike.
    """
    stats = {name: Stat([]) for name in ops}
    for i in range(warmup + reps):
        for name, op in ops.items():
            started = time.perf_counter()
            try:
                with trio.fail_after(OP_LIMIT):
                    await op()
            except Exception as exc:
                ERRORS[f"{name}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
                stats[name].errors += 1
                continue
            if i >= warmup:
                stats[name].samples.append((time.perf_counter() - started) * 1000)
    return stats


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


async def run(settings: Settings, quick: bool) -> None:
    from modelnet_p2p import Peer
    from modelnet_p2p.mesh.collab import Trace, ensemble, pipeline

    started = time.monotonic()
    providers: list[Provider] = []
    async with Peer(listen=["/ip4/127.0.0.1/tcp/0"]) as client:
        boot = client.addrs[0]
        try:
            providers = [Provider(i, boot) for i in range(len(DELAYS_MS))]
            for p in providers:
                await trio.to_thread.run_sync(p.wait_ready)
            direct_target = {
                f"d{ms}": p.ready["addrs"][0] for ms, p in zip(DELAYS_MS, providers, strict=True)
            }
            noop_target = providers[0].ready["addrs"][0]
            # wait until discovery finds every provider
            with trio.fail_after(60):
                for cap, want in [("noop", len(providers)), *[(f"d{ms}", 1) for ms in DELAYS_MS]]:
                    while len(await client.find_providers(cap, timeout=5)) < want:
                        await trio.sleep(0.2)
            setup_s = time.monotonic() - started
            await _report(
                client, settings, quick, setup_s, direct_target, noop_target, pipeline, ensemble, Trace
            )
        finally:
            for p in providers:
                await trio.to_thread.run_sync(p.stop)
            failed = [p for p in providers if p.proc.returncode not in (0, None)]
            for p in failed:
                print(f"\n{p.name} exited with {p.proc.returncode}; stderr (last 20 lines):")
                for line in p.stderr[-20:]:
                    print(f"  | {line}")


async def _report(
    client: Any,
    settings: Settings,
    quick: bool,
    setup_s: float,
    direct_target: dict[str, str],
    noop_target: str,
    pipeline: Any,
    ensemble: Any,
    trace_cls: Any,
) -> None:
    reps, warm = settings.hop_reps, settings.warmup
    payload = "hello mesh"

    async def direct_seq(n: int) -> None:
        value: Any = payload
        for _ in range(n):
            value = (await client.call(noop_target, "noop", value, timeout=OP_LIMIT)).value

    async def routed_seq(n: int) -> None:
        value: Any = payload
        for _ in range(n):
            value = (await client.call(capability="noop", input=value, timeout=OP_LIMIT)).value

    async def piped(n: int) -> None:
        result = await pipeline(client, ["noop"] * n, payload, timeout=OP_LIMIT)
        if result.output != payload:
            raise RuntimeError(f"pipeline answered {result.output!r}")

    print()
    print(f"modelnet_p2p collaboration benchmark{' (--quick)' if quick else ''}")
    print(
        f"  python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}; "
        f"{len(DELAYS_MS)} provider processes + this client; setup {setup_s:.1f} s"
    )
    print("  times in ms: median (p90); each figure beside baselines from this run")

    # 1. pipeline hops -------------------------------------------------------------------
    hops: dict[str, Callable[[], Awaitable[Any]]] = {"single": partial(direct_seq, 1)}
    for n in range(1, 5):
        hops[f"direct{n}"] = partial(direct_seq, n)
        hops[f"routed{n}"] = partial(routed_seq, n)
        hops[f"pipeline{n}"] = partial(piped, n)
    h = await measure(reps, warm, hops)
    single = h["single"]
    print()
    print(f"1. pipeline of n noop steps ({reps} runs each)   single direct call: {_fmt(single)}")
    head = (
        f"{'n':>2}  {'pipeline':>16}  {'n direct':>16}  {'n routed':>16}  "
        f"{'pipe/direct':>11}  {'pipe/routed':>11}  {'pipe/single':>11}  {'overhead/hop':>12}"
    )
    print(head)
    print("-" * len(head))
    for n in range(1, 5):
        d, r, p = h[f"direct{n}"], h[f"routed{n}"], h[f"pipeline{n}"]
        per_hop = (p.median - d.median) / n
        print(
            f"{n:>2}  {_fmt(p):>16}  {_fmt(d):>16}  {_fmt(r):>16}  "
            f"{_ratio(p.median, d.median):>11}  {_ratio(p.median, r.median):>11}  "
            f"{_ratio(p.median, single.median):>11}  {per_hop:>+10.2f}ms"
        )
    print("-" * len(head))
    print("  overhead/hop = (pipeline - n direct calls) / n: routing (provider choice) plus the trace")

    # 2. ensemble latency -------------------------------------------------------------------
    ereps = settings.ensemble_reps
    ewarm = max(2, warm // 5)
    members = [f"d{ms}" for ms in DELAYS_MS]
    failed_members: Counter[str] = Counter()

    def ens(caps: list[str], aggregate: str) -> Callable[[], Awaitable[Any]]:
        async def op() -> None:
            trace = trace_cls("ensemble")
            try:
                await ensemble(client, caps, "q", aggregate=aggregate, timeout=ENSEMBLE_LIMIT, trace=trace)
            finally:
                for node in trace.children:
                    if node.status == "error":
                        failed_members[f"{aggregate}: {node.error}"[:150]] += 1

        return op

    eops: dict[str, Callable[[], Awaitable[Any]]] = {
        cap: partial(client.call, direct_target[cap], cap, "q", timeout=OP_LIMIT) for cap in members
    }
    eops["all"] = ens(members, "all")
    for k in range(1, len(members) + 1):
        eops[f"majority{k}"] = ens(members[:k], "majority")
    e = await measure(ereps, ewarm, eops)
    # "first" cancels the members still running: measured last and on its own, so that if a
    # cancellation disturbs a connection, the figures above are not affected.
    e.update(await measure(ereps, ewarm, {"first": ens(members, "first")}))
    member_ms = [e[c].median for c in members]

    print()
    print(
        f"2. ensembles of members with fixed delays {', '.join(map(str, DELAYS_MS))} ms ({ereps} runs each)"
    )
    print("   member baselines (direct calls): " + ", ".join(f"{c} {_fmt(e[c])}" for c in members))
    head = f"{'ensemble':<22}  {'latency':>16}  {'baseline':<28}  {'ratio':>7}  {'vs sum':>7}"
    print(head)
    print("-" * len(head))

    def row(label: str, stat: Stat, base_label: str, base: float, total: float) -> None:
        print(
            f"{label:<22}  {_fmt(stat):>16}  {f'{base_label} {base:.1f}':<28}  "
            f"{_ratio(stat.median, base):>7}  {_ratio(stat.median, total):>7}"
        )

    row("all (5 members)", e["all"], "slowest member", max(member_ms), sum(member_ms))
    row("first (5 members)", e["first"], "fastest member", min(member_ms), sum(member_ms))
    for k in range(1, len(members) + 1):
        nth = {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")
        base = member_ms[k - 1]
        row(f"majority (k={k} fastest)", e[f"majority{k}"], f"{nth} fastest member", base, sum(member_ms[:k]))
    print("-" * len(head))
    print("  ratio = ensemble / baseline (about 1 means parallel); vs sum = ensemble / members one by one")
    if failed_members:
        print("\nensemble members that failed (count x error):")
        for msg, n in failed_members.most_common():
            print(f"  {n} x {msg}")


def _fmt(stat: Stat) -> str:
    text = f"{stat.median:.2f} ({stat.p90:.2f})"
    return text + (f" !{stat.errors}" if stat.errors else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="less work, about 30 s")
    args = parser.parse_args()
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    started = time.monotonic()
    trio.run(run, Settings.make(args.quick), args.quick)
    if ERRORS:
        print("\nerrors (count x message):")
        for msg, n in ERRORS.most_common():
            print(f"  {n} x {msg}")
    else:
        print("\nno measured operation failed.")
    print(f"done in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

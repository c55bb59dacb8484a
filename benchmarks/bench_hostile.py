"""Hostile-peer benchmark (issue 12): legitimate callers' service during each attack.

Usage::

    python benchmarks/bench_hostile.py [--quick] [--json] [--only NAME[,NAME...]]

The victim runs in its own process: a Peer on 127.0.0.1 serving an echo capability that
streams 8 chunks, in DHT server mode, with ``relay_hop`` (it is also the bootstrap peer and
a relay). A legitimate caller, in another process, calls the echo for a fixed window with
4 calls in flight, and looks the capability up in the DHT once at a time (``discover``).
This is measured without any attack (the baseline) right before each attack, then during
it (``--one-baseline``: one baseline at the start; on a machine shared with other work the
load changes from minute to minute). The attacks run in this process; they come from
every ``benchmarks/hostile_*.py`` module found (each defines ``ATTACKS``, see
``hostile_common.py``).

One row per attack: the caller's calls/s, p50 and p99 latency under attack beside the
baseline, as a ratio; the discoveries that succeeded; the victim's peak RSS growth during
the attack (sampled every 50 ms), its open file descriptors, and the CPU the victim and
the attackers (this process) used, in % of a core (all share the machine's cores, so a
busy attacker slows the victim down too); and which goals the attack meets: throughput
>= 0.5x the baseline, and RSS growth <= 64 MiB (the per-peer budget).
Nothing here asserts on timings; the run exits 0 unless the victim could not be started.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hostile_common import HOST, Target, cpu_seconds, open_fds, percentile, rss_bytes

CAPABILITY = "echo"
CHUNKS = 8
CONCURRENCY = 4
#: Seconds one legitimate call may take before it counts as failed.
CALL_TIMEOUT = 10.0
#: Seconds one legitimate discovery may take.
DISCOVER_TIMEOUT = 5.0
THROUGHPUT_GOAL = 0.5
RSS_BUDGET = 64 << 20
#: Seconds the victim gets to settle after each attack before the next.
SETTLE = 2.0


# -- child process: the victim ------------------------------------------------------------------


async def _wait_for_stdin_eof() -> None:
    pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with pipe:
        while await pipe.receive_some(4096):
            pass


async def _victim() -> None:
    from modelnet_p2p import Capability, InferenceRequest, Peer

    async def echo(request: InferenceRequest) -> AsyncIterator[str]:
        for i in range(CHUNKS):
            yield f"{request.input} {i} "

    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], relay_hop=True, dht_mode="server") as peer:
        peer.serve(Capability(CAPABILITY, task="chat"), echo)
        await peer.announce()
        print(json.dumps({"addr": peer.addrs[0], "peer_id": peer.peer_id, "pid": os.getpid()}), flush=True)
        await _wait_for_stdin_eof()


# -- child process: the legitimate caller -------------------------------------------------------


async def _caller(addr: str, seconds: float) -> None:
    from modelnet_p2p import Peer

    latencies: list[float] = []
    failed = 0
    found: list[float] = []
    lookups = 0
    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], bootstrap=[addr]) as peer:
        with trio.move_on_after(CALL_TIMEOUT):
            try:
                await peer.call(addr, CAPABILITY, "warm-up", timeout=CALL_TIMEOUT)
            except Exception:
                pass
        end = trio.current_time() + seconds
        cpu0, wall0 = time.process_time(), time.monotonic()

        async def calls() -> None:
            nonlocal failed
            while trio.current_time() < end:
                t0 = trio.current_time()
                try:
                    with trio.fail_after(CALL_TIMEOUT):
                        await peer.call(addr, CAPABILITY, "hi", timeout=CALL_TIMEOUT)
                    latencies.append(trio.current_time() - t0)
                except Exception:
                    failed += 1

        async def discoveries() -> None:
            nonlocal lookups
            while trio.current_time() < end:
                lookups += 1
                t0 = trio.current_time()
                try:
                    cards = await peer.discover(model=CAPABILITY, timeout=DISCOVER_TIMEOUT)
                except Exception:
                    cards = []
                if cards:
                    found.append(trio.current_time() - t0)

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(calls)
            nursery.start_soon(discoveries)
    print(
        json.dumps(
            {
                "ok": len(latencies),
                "failed": failed,
                "seconds": seconds,
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
                "lookups": lookups,
                "found": len(found),
                "discover_p50": percentile(found, 0.5),
                "cpu": (time.process_time() - cpu0) / (time.monotonic() - wall0),
            }
        ),
        flush=True,
    )


# -- the runner ----------------------------------------------------------------------------------


@dataclass
class Window:
    ok: int = 0
    failed: int = 0
    seconds: float = 1.0
    p50: float = math.nan
    p99: float = math.nan
    lookups: int = 0
    found: int = 0
    discover_p50: float = math.nan
    cpu: float = math.nan

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


@dataclass
class Row:
    attack: str
    module: str
    base: Window
    under: Window
    rss_growth: int
    fds_before: int
    fds_peak: int
    victim_alive: bool
    victim_cpu: float = math.nan
    attacker_cpu: float = math.nan

    @property
    def ratio(self) -> float:
        return self.under.rate / self.base.rate if self.base.rate else math.nan

    @property
    def goals(self) -> dict[str, bool]:
        return {
            "throughput": self.victim_alive and self.ratio >= THROUGHPUT_GOAL,
            "memory": self.victim_alive and self.rss_growth <= RSS_BUDGET,
        }


def load_attacks() -> list[tuple[str, str, Callable[[Target], AbstractAsyncContextManager[None]]]]:
    """``(module, name, attack)`` of every ``hostile_*.py`` module beside this file."""
    here = os.path.dirname(os.path.abspath(__file__))
    found = []
    for path in sorted(glob.glob(os.path.join(here, "hostile_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name == "hostile_common":
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            print(f"skipping {name}: it does not import ({exc!r})", file=sys.stderr)
            continue
        for attack, factory in getattr(module, "ATTACKS", {}).items():
            found.append((name, attack, factory))
    return found


async def _read_line(stream: trio.abc.ReceiveStream, limit: float) -> str:
    data = b""
    with trio.fail_after(limit):
        while b"\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data.decode().strip().splitlines()[-1] if data.strip() else ""


async def _measure(addr: str, seconds: float) -> Window:
    """Run the legitimate caller process for ``seconds``; its figures."""
    cmd = [sys.executable, os.path.abspath(__file__), "--caller", addr, "--seconds", str(seconds)]
    proc = await trio.run_process(
        cmd, capture_stdout=True, check=False, stderr=trio.lowlevel.FdStream(os.dup(2))
    )
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if not lines:
        return Window(seconds=seconds)
    return Window(**json.loads(lines[-1]))


@asynccontextmanager
async def _victim_process() -> AsyncIterator[tuple[trio.Process, Target]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--victim"]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                cmd, stdin=__import__("subprocess").PIPE, stdout=__import__("subprocess").PIPE,
                check=False, task_status=task_status,
            )
        )  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        info = json.loads(await _read_line(proc.stdout, 60))
        target = Target(info["addr"], info["peer_id"], CAPABILITY, info["pid"], info["addr"])
        try:
            yield proc, target
        finally:
            await proc.stdin.aclose()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()


async def _sample(pid: int, peak: list[int], fds: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss_bytes(pid))
        fds[0] = max(fds[0], open_fds(pid))
        await trio.sleep(0.05)


async def run(
    window: float, only: str | None, fresh_baselines: bool
) -> tuple[Window, list[Row], dict[str, Any]]:
    wanted = None if only is None else set(only.split(","))
    attacks = [(m, n, a) for m, n, a in load_attacks() if wanted is None or n in wanted or m in wanted]
    rows: list[Row] = []
    async with _victim_process() as (proc, target):
        rss_start = rss_bytes(target.pid)
        t0, v0 = time.monotonic(), cpu_seconds(target.pid)
        base = await _measure(target.addr, window)
        base_cpu = (cpu_seconds(target.pid) - v0) / (time.monotonic() - t0)
        for module, name, attack in attacks:
            alive = proc.returncode is None
            if not alive:
                rows.append(Row(name, module, base, Window(seconds=window), 0, 0, 0, False))
                continue
            row_base = await _measure(target.addr, window) if fresh_baselines else base
            before, fds_before = rss_bytes(target.pid), open_fds(target.pid)
            peak, fds = [before], [fds_before]
            under = Window(seconds=window)
            cpu: list[float] = [math.nan, math.nan]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample, target.pid, peak, fds)
                try:
                    async with attack(target):
                        t0, v0, a0 = time.monotonic(), cpu_seconds(target.pid), cpu_seconds(os.getpid())
                        under = await _measure(target.addr, window)
                        dt = time.monotonic() - t0
                        cpu = [(cpu_seconds(target.pid) - v0) / dt, (cpu_seconds(os.getpid()) - a0) / dt]
                except Exception as exc:
                    print(f"attack {name} failed: {exc!r}", file=sys.stderr)
                nursery.cancel_scope.cancel()
            alive = proc.returncode is None and rss_bytes(target.pid) > 0
            rows.append(Row(name, module, row_base, under, peak[0] - before, fds_before, fds[0], alive, *cpu))
            await trio.sleep(SETTLE)
        meta = {
            "victim_rss_start": rss_start,
            "victim_rss_end": rss_bytes(target.pid),
            "window_s": window,
            "victim_cpu_baseline": base_cpu,
        }
    return base, rows, meta


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 100:.0f}"


def _ms(x: float) -> str:
    return "-" if math.isnan(x) else f"{x * 1000:.1f}"


def print_table(base: Window, rows: list[Row], meta: dict[str, Any]) -> None:
    print(
        f"baseline (no attack): {base.rate:.1f} calls/s, p50 {_ms(base.p50)} ms, p99 {_ms(base.p99)} ms, "
        f"{base.failed} failed; discover {base.found}/{base.lookups} found, p50 {_ms(base.discover_p50)} ms; "
        f"victim RSS {meta['victim_rss_start'] / 2**20:.0f} MiB at start, "
        f"CPU {meta['victim_cpu_baseline'] * 100:.0f}% of a core"
    )
    head = (
        f"{'attack':<26} {'calls/s base':>12} {'attack':>7} {'ratio':>6} {'p50 ms':>13} {'p99 ms':>15} "
        f"{'fail':>5} {'disc ok':>8} {'RSS +MiB':>8} {'fds':>9} {'CPU v/a %':>9}  goals (>=0.5x, <=64 MiB)"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        g = r.goals
        goals = ", ".join(f"{k} {'met' if ok else 'MISSED'}" for k, ok in g.items())
        if not r.victim_alive:
            goals += " (victim down)"
        print(
            f"{r.attack:<26} {r.base.rate:>12.1f} {r.under.rate:>7.1f} {r.ratio:>5.2f}x "
            f"{_ms(r.base.p50) + '/' + _ms(r.under.p50):>13} {_ms(r.base.p99) + '/' + _ms(r.under.p99):>15} "
            f"{r.under.failed:>5} {str(r.under.found) + '/' + str(r.under.lookups):>8} "
            f"{r.rss_growth / 2**20:>8.1f} {str(r.fds_before) + '->' + str(r.fds_peak):>9} "
            f"{_pct(r.victim_cpu) + '/' + _pct(r.attacker_cpu):>9}  {goals}"
        )
    print(
        f"victim RSS {meta['victim_rss_end'] / 2**20:.0f} MiB at the end; window {meta['window_s']} s per row"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short windows (3 s instead of 10 s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument(
        "--only", metavar="NAME", help="run only these attacks (names or module names, comma-separated)"
    )
    parser.add_argument(
        "--one-baseline",
        action="store_true",
        help="compare every attack with the first baseline (default: a baseline right before each attack)",
    )
    parser.add_argument("--victim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--caller", metavar="ADDR", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    if args.victim:
        trio.run(_victim)
        return
    if args.caller:
        trio.run(_caller, args.caller, args.seconds)
        return
    window = 3.0 if args.quick else 10.0
    started = time.time()
    base, rows, meta = trio.run(run, window, args.only, not args.one_baseline)
    meta["wall_s"] = round(time.time() - started, 1)
    if args.json:
        doc = {
            "baseline": asdict(base) | {"rate": base.rate},
            "rows": [asdict(r) | {"ratio": r.ratio, "goals": r.goals, "rate": r.under.rate} for r in rows],
            "meta": meta,
        }
        print(json.dumps(doc, indent=2, default=str))
    else:
        print_table(base, rows, meta)


if __name__ == "__main__":
    main()

"""Hostile-peer benchmark (issue 12): legitimate callers' service during each attack.

Usage::

    python benchmarks/bench_hostile.py [--quick] [--json] [--only NAME[,NAME...]]

The victim runs in its own process: a Peer on 127.0.0.1 serving an echo capability that
streams 8 chunks, in DHT server mode, with ``relay_hop`` (it is also the bootstrap peer and
a relay). A legitimate caller, in another process, calls the echo for a fixed window with
4 calls in flight, and looks the capability up in the DHT once at a time (``discover``).
The caller paces its calls to 0.9x the victim's request rate per caller
(``ResourceLimits.request_rate``): over it the victim refuses calls with ``overloaded``, and a
baseline would measure the caller's own limit (a quiet machine's baseline is capped there).
This is measured without any attack (the baseline) right before each attack, then during
it (``--one-baseline``: one baseline at the start; on a machine shared with other work the
load changes from minute to minute). The attacks run in this process; they come from
every ``benchmarks/hostile_*.py`` module found (each defines ``ATTACKS``, see
``hostile_common.py``).

One row per attack: the caller's calls/s, p50 and p99 latency under attack beside the
baseline, as a ratio; the discoveries that succeeded; the victim's peak RSS growth during
the attack (sampled every 50 ms), its open file descriptors, and the CPU the victim and
the attackers (this process) used, in % of a core (all share the machine's two cores: the
victim and the caller run in sessions of their own and the attackers at the lowest CPU share,
so that the attackers' CPU comes out of idle time as it would on their own machines;
``--same-share`` puts all three in one share); and which goals the attack meets: throughput
>= 0.5x the baseline, and RSS growth <= 64 MiB (the per-peer budget). The ``ovl`` column
counts the requests the victim refused (or ended) with ``overloaded`` in the baseline and
under attack. Below the table: the caller's failures by error type and message, and the
victim's pauses in each window (its full garbage collections, and the event-loop stalls over
50 ms a watchdog task saw), with what it held at the window's end (tasks, connections, known
peers, objects tracked by the collector: state that earlier rows leave behind shows there).
Each attack window's start and end go to stderr as they happen (to profile the victim then).
Nothing here asserts on timings; the run exits 0 unless the victim could not be started.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field
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
#: The legitimate caller's call starts per second, as a share of the victim's request rate per
#: caller (``ResourceLimits.request_rate``): a caller that goes over it is refused with
#: ``overloaded``, so a baseline would measure the caller's own limit, not the victim.
PACE = 0.9
#: Run the victim and the caller each in a session of its own, and give this process (the
#: attackers) the lowest CPU share (``--same-share`` turns both off). Linux shares the CPU
#: between sessions (autogroups) before threads: in one session the victim, the caller and the
#: attackers split one share, and the attackers' CPU comes straight out of the victim's and
#: the caller's, as on no real network, where attackers run on machines of their own. Measured
#: (relay-reservations, 10 s windows, quiet machine): one share 0.24x with the attackers at 74 %
#: of a core, the caller process starved to 24 %, the victim at 70 %; own shares 1.00x with the
#: attackers at 34 %, the victim at 71 %. The attackers' CPU is in every row either way.
OWN_SESSIONS = True
#: Where the victim and the callers write their ``modelnet_p2p`` logs (DEBUG), if set (``--log-dir``).
LOG_DIR: str | None = None
#: Distinct failure kinds (error type and message) a window keeps, with their counts.
MAX_ERROR_KINDS = 8


# -- child process: the victim ------------------------------------------------------------------


class _Pauses:
    """The victim's event-loop stalls (a watchdog's lateness) and garbage-collection pauses,
    since the last :meth:`take`."""

    #: Seconds between the watchdog's wake-ups; a wake-up later than ``STALL`` counts as a stall.
    TICK = 0.01
    STALL = 0.05

    def __init__(self) -> None:
        self.gc_started = 0.0
        self.reset()

    def reset(self) -> None:
        self.stalls: list[float] = []
        self.gc: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
        else:
            pauses = self.gc[info["generation"]]
            if len(pauses) < 100_000:
                pauses.append(time.perf_counter() - self.gc_started)

    async def watchdog(self) -> None:
        while True:
            t0 = time.perf_counter()
            await trio.sleep(self.TICK)
            late = time.perf_counter() - t0 - self.TICK
            if late > self.STALL and len(self.stalls) < 100_000:
                self.stalls.append(late)

    def take(self) -> dict[str, Any]:
        full = self.gc[2]
        doc = {
            "stalls": len(self.stalls),
            "stall_max": max(self.stalls, default=0.0),
            "stall_sum": sum(self.stalls),
            "gc_full": len(full),
            "gc_full_max": max(full, default=0.0),
            "gc_full_p50": percentile(full, 0.5),
            "gc_young_max": max(self.gc[0] + self.gc[1], default=0.0),
            "gc_sum": sum(full) + sum(self.gc[0]) + sum(self.gc[1]),
        }
        self.reset()
        return doc


def _state(peer: Any) -> dict[str, int]:
    """What the victim holds now, to see whether earlier rows leave state behind: its live
    tasks, open connections, peers in its peerstore and objects tracked by the collector."""
    import gc

    connections = peer.host.get_network().connections
    return {
        "tasks": trio.lowlevel.current_statistics().tasks_living,
        "connections": sum(len(c) for c in connections.values()) if isinstance(connections, dict) else -1,
        "peers_known": len(peer.host.get_peerstore().peer_ids()),
        "gc_objects": len(gc.get_objects()),
    }


async def _serve_stdin(peer: Any, pauses: _Pauses) -> None:
    """Answer each ``stats`` line on stdin with one JSON line (admission counters, pauses); return at EOF."""
    import gc

    pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with pipe:
        while chunk := await pipe.receive_some(4096):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip() == b"stats":
                    adm = peer.inference.admission.stats()
                    doc = asdict(adm) | pauses.take() | {"gc_frozen": gc.get_freeze_count()} | _state(peer)
                    print(json.dumps(doc), flush=True)


async def _victim() -> None:
    import gc

    from modelnet_p2p import Capability, InferenceRequest, Peer

    async def echo(request: InferenceRequest) -> AsyncIterator[str]:
        for i in range(CHUNKS):
            yield f"{request.input} {i} "

    pauses = _Pauses()
    gc.callbacks.append(pauses.on_gc)
    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], relay_hop=True, dht_mode="server") as peer:
        peer.serve(Capability(CAPABILITY, task="chat"), echo)
        await peer.announce()
        print(json.dumps({"addr": peer.addrs[0], "peer_id": peer.peer_id, "pid": os.getpid()}), flush=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pauses.watchdog)
            await _serve_stdin(peer, pauses)
            nursery.cancel_scope.cancel()


# -- child process: the legitimate caller -------------------------------------------------------


class _Pace:
    """Call starts at most ``rate`` a second, spread evenly (no bursts) over the tasks that wait."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = 0.0

    async def wait(self) -> None:
        now = trio.current_time()
        at = max(self.next, now)
        self.next = at + self.interval
        if at > now:
            await trio.sleep_until(at)


def _error_kind(exc: BaseException) -> str:
    """A failure's kind: its type and its message without numbers and ids (like ones count together)."""
    text = re.sub(r"\b[0-9A-Za-z]{40,}\b", "<id>", str(exc))
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return f"{type(exc).__name__}: {text[:160]}"


async def _caller(addr: str, seconds: float) -> None:
    from modelnet_p2p import Peer
    from modelnet_p2p.p2p.resources import ResourceLimits

    latencies: list[float] = []
    failed = 0
    errors: dict[str, int] = {}
    first_failure: list[float] = []
    pace = _Pace(ResourceLimits.request_rate * PACE)
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
                await pace.wait()
                t0 = trio.current_time()
                try:
                    with trio.fail_after(CALL_TIMEOUT):
                        await peer.call(addr, CAPABILITY, "hi", timeout=CALL_TIMEOUT)
                    latencies.append(trio.current_time() - t0)
                except Exception as exc:
                    failed += 1
                    kind = _error_kind(exc)
                    if kind in errors or len(errors) < MAX_ERROR_KINDS:
                        errors[kind] = errors.get(kind, 0) + 1
                    if not first_failure:
                        first_failure.append(trio.current_time() - (end - seconds))

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
                "errors": errors,
                "peer_id": peer.peer_id,
                "first_failure_s": first_failure[0] if first_failure else None,
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
    errors: dict[str, int] = field(default_factory=dict)
    first_failure_s: float | None = None
    #: The caller's peer id (a new one in each window), to find it in the logs.
    peer_id: str = ""
    #: The victim's side of the window (:func:`_victim_window`): refusals and pauses.
    victim: dict[str, Any] = field(default_factory=dict)

    @property
    def overloaded(self) -> int:
        """Requests the victim refused or ended with ``overloaded`` during the window."""
        return sum(int(self.victim.get(k, 0)) for k in ("refused_rate", "refused_share", "preempted"))

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
    #: The machine's 1-minute load average at the end of the row.
    load: float = math.nan

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
    if LOG_DIR:
        cmd += ["--log-file", os.path.join(LOG_DIR, f"caller-{time.strftime('%H%M%S')}.log")]
    proc = await trio.run_process(
        cmd, capture_stdout=True, check=False, stderr=trio.lowlevel.FdStream(os.dup(2)),
        start_new_session=OWN_SESSIONS,
    )  # fmt: skip
    lines = [line for line in proc.stdout.decode().splitlines() if line.startswith("{")]
    if not lines:
        return Window(seconds=seconds)
    return Window(**json.loads(lines[-1]))


async def _victim_stats(proc: trio.Process) -> dict[str, Any]:
    """The victim's counters (cumulative) and pauses (since the last ask); ``{}`` if it does not answer."""
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await proc.stdin.send_all(b"stats\n")
        line = await _read_line(proc.stdout, 10)
        return dict(json.loads(line)) if line.startswith("{") else {}
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ValueError):
        return {}


async def _victim_window(proc: trio.Process, addr: str, seconds: float) -> Window:
    """:func:`_measure`, with the victim's refusals and pauses during the window."""
    before = await _victim_stats(proc)
    window = await _measure(addr, seconds)
    after = await _victim_stats(proc)
    window.victim = dict(after)
    for key in ("refused_rate", "refused_share", "preempted"):
        window.victim[key] = int(after.get(key, 0)) - int(before.get(key, 0))
    return window


@asynccontextmanager
async def _victim_process() -> AsyncIterator[tuple[trio.Process, Target]]:
    cmd = [sys.executable, os.path.abspath(__file__), "--victim"]
    if LOG_DIR:
        cmd += ["--log-file", os.path.join(LOG_DIR, "victim.log")]
    async with trio.open_nursery() as nursery:
        proc: trio.Process = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                cmd, stdin=__import__("subprocess").PIPE, stdout=__import__("subprocess").PIPE,
                check=False, task_status=task_status, start_new_session=OWN_SESSIONS,
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


def _progress(what: str) -> None:
    """One line on stderr, so that a profiler can be started on the victim during a given row."""
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


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
        base = await _victim_window(proc, target.addr, window)
        base_cpu = (cpu_seconds(target.pid) - v0) / (time.monotonic() - t0)
        for module, name, attack in attacks:
            alive = proc.returncode is None
            if not alive:
                rows.append(Row(name, module, base, Window(seconds=window), 0, 0, 0, False))
                continue
            row_base = await _victim_window(proc, target.addr, window) if fresh_baselines else base
            before, fds_before = rss_bytes(target.pid), open_fds(target.pid)
            peak, fds = [before], [fds_before]
            under = Window(seconds=window)
            cpu: list[float] = [math.nan, math.nan]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample, target.pid, peak, fds)
                try:
                    async with attack(target):
                        t0, v0, a0 = time.monotonic(), cpu_seconds(target.pid), cpu_seconds(os.getpid())
                        _progress(f"attack window of {name} starts (victim pid {target.pid})")
                        under = await _victim_window(proc, target.addr, window)
                        _progress(f"attack window of {name} ends")
                        dt = time.monotonic() - t0
                        cpu = [(cpu_seconds(target.pid) - v0) / dt, (cpu_seconds(os.getpid()) - a0) / dt]
                except Exception as exc:
                    print(f"attack {name} failed: {exc!r}", file=sys.stderr)
                nursery.cancel_scope.cancel()
            alive = proc.returncode is None and rss_bytes(target.pid) > 0
            rows.append(Row(
                name, module, row_base, under, peak[0] - before, fds_before, fds[0], alive,
                victim_cpu=cpu[0], attacker_cpu=cpu[1], load=os.getloadavg()[0],
            ))  # fmt: skip
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
        f"{base.failed} failed, {base.overloaded} overloaded; "
        f"discover {base.found}/{base.lookups} found, p50 {_ms(base.discover_p50)} ms; "
        f"victim RSS {meta['victim_rss_start'] / 2**20:.0f} MiB at start, "
        f"CPU {meta['victim_cpu_baseline'] * 100:.0f}% of a core"
    )
    print(f"CPU shares: {meta.get('cpu_share', '-')}")
    head = (
        f"{'attack':<26} {'calls/s base':>12} {'attack':>7} {'ratio':>6} {'p50 ms':>13} {'p99 ms':>15} "
        f"{'fail':>5} {'ovl b/a':>9} {'disc ok':>8} {'RSS +MiB':>8} {'fds':>9} {'CPU v/a %':>9} {'load':>5}  "
        "goals (>=0.5x, <=64 MiB)"
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
            f"{r.under.failed:>5} {str(r.base.overloaded) + '/' + str(r.under.overloaded):>9} "
            f"{str(r.under.found) + '/' + str(r.under.lookups):>8} "
            f"{r.rss_growth / 2**20:>8.1f} {str(r.fds_before) + '->' + str(r.fds_peak):>9} "
            f"{_pct(r.victim_cpu) + '/' + _pct(r.attacker_cpu):>9} {r.load:>5.2f}  {goals}"
        )
    print(
        f"victim RSS {meta['victim_rss_end'] / 2**20:.0f} MiB at the end; window {meta['window_s']} s per row"
    )
    windows = [("baseline", base)] + [(f"{r.attack} (baseline)", r.base) for r in rows if r.base is not base]
    windows += [(r.attack, r.under) for r in rows]
    for label, w in windows:
        if w.errors:
            at = "" if w.first_failure_s is None else f", first at {w.first_failure_s:.2f} s"
            print(f"failures of {label} ({w.failed}{at}; caller {w.peer_id}):")
            for kind, n in sorted(w.errors.items(), key=lambda kv: -kv[1]):
                print(f"  {n:>7}  {kind}")
    print("victim pauses (full collections: count, max/p50 ms; event-loop stalls over 50 ms: count, max ms):")
    for label, w in windows:
        v = w.victim
        if v:
            print(
                f"  {label:<38} gc {v.get('gc_full', 0):>3}, {_ms(v.get('gc_full_max', math.nan))}/"
                f"{_ms(v.get('gc_full_p50', math.nan))} ms "
                f"(young max {_ms(v.get('gc_young_max', math.nan))}); "
                f"stalls {v.get('stalls', 0):>3}, max {_ms(v.get('stall_max', math.nan))} ms, "
                f"sum {_ms(v.get('stall_sum', math.nan))} ms; frozen {v.get('gc_frozen', 0)}; "
                f"at the end {v.get('tasks', '-')} tasks, {v.get('connections', '-')} connections, "
                f"{v.get('peers_known', '-')} peers known, {v.get('gc_objects', '-')} gc objects"
            )


def _in_own_session() -> None:
    """Run this benchmark again in a session of its own, and exit with its status: the lowest
    CPU share is then given to that session only, not to the caller's (a terminal's) session."""
    import subprocess

    proc = subprocess.Popen([sys.executable, *sys.argv, "--in-session"], start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        code = 130
    raise SystemExit(code)


def _lower_attackers() -> str:
    """Give this process's session (the attackers) the lowest CPU share; what was done."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("19")
    except OSError as exc:
        return f"victim and caller in sessions of their own; attackers' share not lowered ({exc.strerror})"
    return "victim and caller in sessions of their own; attackers at the lowest share (autogroup nice 19)"


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
    parser.add_argument(
        "--same-share",
        action="store_true",
        help="run the victim, the caller and the attackers in one session (one CPU share); by "
        "default the victim and the caller get sessions of their own and the attackers the lowest share",
    )
    parser.add_argument(
        "--log-dir",
        metavar="DIR",
        help="the victim and each caller write their modelnet_p2p log (DEBUG) to a file in DIR",
    )
    parser.add_argument("--in-session", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--victim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--log-file", help=argparse.SUPPRESS)
    parser.add_argument("--caller", metavar="ADDR", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.getLogger("modelnet_p2p").addHandler(handler)
        logging.getLogger("modelnet_p2p").setLevel(logging.DEBUG)
        # Only to the file: a handler on the root logger (one is installed by the time the
        # peer runs) would also write every DEBUG record to the shared stderr, at a cost to
        # the victim and the caller that a run without --log-dir does not pay.
        logging.getLogger("modelnet_p2p").propagate = False
    if args.victim:
        trio.run(_victim)
        return
    if args.caller:
        trio.run(_caller, args.caller, args.seconds)
        return
    global OWN_SESSIONS, LOG_DIR
    OWN_SESSIONS = not args.same_share
    if OWN_SESSIONS and not args.in_session:
        _in_own_session()
    share = _lower_attackers() if OWN_SESSIONS else "victim, caller and attackers in one CPU share"
    LOG_DIR = os.path.abspath(args.log_dir) if args.log_dir else None
    window = 3.0 if args.quick else 10.0
    started = time.time()
    base, rows, meta = trio.run(run, window, args.only, not args.one_baseline)
    meta["cpu_share"] = share
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

"""What ``bench_stream.py`` needs besides its measurements: child processes, result rows, the
goal table (issue 15) and the output, as a table and as JSON.

Nothing here measures anything or asserts on timings.
"""

from __future__ import annotations

import json
import math
import os
import platform
import selectors
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

import trio

#: Seconds one request may take before it counts as failed.
REQUEST_LIMIT = 20.0
#: Seconds a child process may take to print its address.
STARTUP_LIMIT = 30.0
#: A phase stops after this many failed requests.
MAX_ERRORS = 10


# -- child processes --------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[str]
    stderr: IO[str]

    def stderr_text(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()


def spawn(script: str, role: str) -> Child:
    """Start ``script --role role`` with a pipe on stdin (closing it asks the child to exit)."""
    err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script), "--role", role],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=env,
    )
    return Child(role, proc, err)


def read_hello(child: Child, deadline: float) -> dict[str, Any]:
    """The JSON line a child prints once it listens."""
    assert child.proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(child.proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"{child.name} printed no address within {STARTUP_LIMIT:.0f} s")
            line = child.proc.stdout.readline()
            if not line:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.wait()}:\n{child.stderr_text()[-2000:]}"
                )
            line = line.strip()
            if line.startswith("{"):
                hello: dict[str, Any] = json.loads(line)
                return hello


def stop(child: Child) -> None:
    proc = child.proc
    try:
        if proc.stdin is not None:
            proc.stdin.close()  # asks the child to exit cleanly
    except OSError:
        pass
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_stdin_eof() -> None:
    """Return when the parent closes our stdin (or dies)."""
    pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with pipe:
        while await pipe.receive_some(4096):
            pass


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (all threads), Linux only."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- results ----------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    label: str
    unit: str
    higher_is_better: bool
    #: Short name the goal table and the JSON use (``""``: none).
    key: str = ""
    modelnet: float | None = None
    baseline: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.modelnet is None or self.baseline is None or not self.baseline or not self.modelnet:
            return None
        if math.isnan(self.modelnet) or math.isnan(self.baseline):
            return None
        return self.modelnet / self.baseline


@dataclass(frozen=True)
class Goal:
    """A goal of issue 15 on the ratio of one row: ``ratio <= limit`` (or ``>=``, ``at_least``)."""

    key: str
    text: str
    limit: float
    at_least: bool = False

    def met(self, ratio: float | None) -> bool | None:
        if ratio is None:
            return None
        return ratio >= self.limit if self.at_least else ratio <= self.limit

    @property
    def wanted(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g}x"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    load_before: str = ""
    load_after: str = ""

    def row(self, section: str, label: str, unit: str, higher_is_better: bool = False, key: str = "") -> Row:
        r = Row(section, label, unit, higher_is_better, key)
        self.rows.append(r)
        return r

    def by_key(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    s = sorted(samples)
    if not s:
        return math.nan
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class PhaseFailedError(Exception):
    pass


async def attempt(report: Report, where: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    """Run one request; count a failure instead of raising, up to MAX_ERRORS per phase."""
    try:
        with trio.fail_after(REQUEST_LIMIT):
            return await fn()
    except trio.TooSlowError:
        msg = f"{where}: request took longer than {REQUEST_LIMIT:.0f} s"
    except Exception as exc:
        msg = f"{where}: {describe(exc)}"
    report.errors[msg] += 1
    if sum(n for m, n in report.errors.items() if m.startswith(where + ":")) >= MAX_ERRORS:
        raise PhaseFailedError(f"{where}: stopped after {MAX_ERRORS} failed requests")
    return None


async def sequential(report: Report, where: str, n: int, fn: Callable[[], Awaitable[Any]]) -> list[Any]:
    out = []
    for _ in range(n):
        got = await attempt(report, where, fn)
        if got is not None:
            out.append(got)
    return out


async def alternating(
    report: Report,
    n: int,
    first: tuple[str, Callable[[], Awaitable[Any]]],
    second: tuple[str, Callable[[], Awaitable[Any]]],
) -> tuple[list[Any], list[Any]]:
    """``n`` requests of each kind, one of each in turn, so that load from elsewhere on the
    machine falls on both alike; the order within each pair alternates too."""
    a: list[Any] = []
    b: list[Any] = []
    for i in range(n):
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for (where, fn), out in order:
            got = await attempt(report, where, fn)
            if got is not None:
                out.append(got)
    return a, b


async def concurrent(
    report: Report, where: str, workers: int, per_worker: int, fn: Callable[[], Awaitable[Any]]
) -> int:
    """Run ``per_worker`` requests in each of ``workers`` tasks; returns how many succeeded."""
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for _ in range(per_worker):
            if await attempt(report, where, fn) is not None:
                ok += 1

    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker)
    return ok


async def phase(report: Report, name: str, fn: Callable[[], Awaitable[None]]) -> None:
    try:
        await fn()
    except PhaseFailedError as exc:
        report.errors[str(exc)] += 1
    except Exception as exc:
        report.errors[f"{name}: {describe(exc)}"] += 1


# -- output -----------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    if unit == "chunks/s":
        return f"{value:,.0f}"
    if unit == "cores":
        return f"{value:.2f}"
    if unit in ("MB/s", "us"):
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def verdict(row: Row) -> tuple[str, str]:
    ratio = row.ratio
    if ratio is None:
        return "n/a", ""
    if row.unit == "cores":
        return f"{ratio:.2f}", ""
    better = ratio if row.higher_is_better else 1 / ratio
    return f"{ratio:.2f}", (f"{better:.2f}x better" if better >= 1 else f"{1 / better:.2f}x worse")


def package_version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("trio", "libp2p", "httpx", "uvicorn", "starlette"):
        out[dist] = package_version(dist)
    return out


def print_table(report: Report, baselines: dict[str, str]) -> None:
    header = ("measurement", "unit", "modelnet", "baseline", "ratio", "modelnet is")
    widths = (44, 9, 12, 12, 7, 14)

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    head = line(header)
    print()
    print(head)
    print("-" * len(head))
    section = ""
    for row in report.rows:
        if row.section != section:
            section = row.section
            print(f"{section}  [baseline: {baselines.get(section.split('.')[0], '?')}]")
        ratio, word = verdict(row)
        mn, base = fmt(row.modelnet, row.unit), fmt(row.baseline, row.unit)
        print(line(("  " + row.label, row.unit, mn, base, ratio, word)))
    print("-" * len(head))


def goal_rows(report: Report, goals: list[Goal]) -> list[dict[str, Any]]:
    out = []
    for goal in goals:
        row = report.by_key(goal.key)
        ratio = None if row is None else row.ratio
        out.append(
            {
                "key": goal.key,
                "goal": goal.text,
                "wanted": goal.wanted,
                "ratio": None if ratio is None else round(ratio, 4),
                "met": goal.met(ratio),
            }
        )
    return out


def print_goals(report: Report, goals: list[Goal]) -> None:
    print(f"\ngoals (issue 15), ratio = modelnet / baseline, load average {report.load_after}:")
    for g in goal_rows(report, goals):
        state = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        print(f"  {g['goal']:<58} {g['wanted']:>9}  {ratio:>7}  {state}")


def _num(value: float | None) -> float | None:
    """A figure as JSON can hold it (NaN, from an empty sample, becomes ``null``)."""
    return None if value is None or math.isnan(value) else value


def report_json(
    report: Report, goals: list[Goal], settings: dict[str, Any], elapsed: float
) -> dict[str, Any]:
    return {
        "benchmark": "bench_stream",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "cpus": os.cpu_count(),
        "load_average": {"before": report.load_before, "after": report.load_after},
        "settings": settings,
        "elapsed_s": round(elapsed, 2),
        "rows": [
            {
                "section": r.section,
                "label": r.label,
                "key": r.key,
                "unit": r.unit,
                "modelnet": _num(r.modelnet),
                "baseline": _num(r.baseline),
                "ratio": r.ratio,
                "higher_is_better": r.higher_is_better,
            }
            for r in report.rows
        ],
        "goals": goal_rows(report, goals),
        "notes": report.notes,
        "errors": dict(report.errors),
    }


def print_child_stderr(children: list[Child]) -> None:
    for child in children:
        text = child.stderr_text().strip()
        if text:
            lines = text.splitlines()
            print(f"\nstderr of {child.name} ({len(lines)} lines, last 40):")
            for ln in lines[-40:]:
                print(f"  | {ln}")

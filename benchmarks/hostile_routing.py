"""Hostile providers against a caller (issue 12, "Routing trusts providers").

Three attacks, each a set of hostile providers of the target's capability that join the
target's mesh and claim to be idle with room for 128 requests (a lie that drew every call
before routing learnt to weigh it):

- ``lying-provider``: answers at once, but wrong;
- ``stalling-provider``: sends one chunk, then nothing, for ever;
- ``internal-error-provider``: fails every request with ``internal``.

The victim of these attacks is a *caller that routes* by capability, not the provider it
would otherwise reach. Under ``benchmarks/bench_hostile.py`` (``ATTACKS``, see the contract
in the issue) the attack adds its providers to the target's mesh, so the runner's legitimate
callers are hit only if they route by capability; a caller that dials the target itself
never meets them. This module therefore also measures inside itself (``python
benchmarks/hostile_routing.py``): in one process, an honest provider (the target) streaming 8
chunks, a fresh routing caller per phase (its reputation starts empty, so the figure includes
what it costs to learn), and the attack's providers. It reports the caller's correct answers
per second and p50/p99 latency with each attack beside the same without any attack (the
baseline, measured in the same run), as a ratio, and whether it meets the goal of issue 12
(>= 0.5x the unloaded throughput, with RSS growth within the 64 MiB per-peer budget).

The caller checks every answer (the chunks must be the echo of its input) and reports a wrong
one to its reputation (``MeshClient.report(peer, "rejected")``), as a verifier would; a wrong
answer counts as a failed call. The capability is idempotent, so a stalled stream is replayed
elsewhere; the caller's ``stall_timeout`` is 1 s (the default, 30 s, would spend most of a
short window on the first stall). RSS and file descriptors are the whole process's, which
holds every peer: an upper bound on the caller's own growth.

    python benchmarks/hostile_routing.py [--quick] [--json] [--only NAME] [--window S]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from modelnet_p2p import Capability, ModelNetError, Peer
from modelnet_p2p.proto.infer import Load

try:  # the shared runner's Target (benchmarks/hostile_common.py), when it is there
    from hostile_common import Target  # type: ignore[import-not-found, unused-ignore]
except ImportError:

    @dataclass(frozen=True)
    class Target:  # type: ignore[no-redef]
        """The contract's Target, for running this module on its own."""

        addr: str
        peer_id: str
        capability: str
        pid: int
        bootstrap: str


#: Hostile providers each attack starts.
HOSTILE_PROVIDERS = 2
#: Chunks of the echo (the contract's echo streams 8).
CHUNKS = 8
#: The goal of issue 12: legitimate callers keep at least this share of their throughput.
GOAL_RATIO = 0.5
#: The goal of issue 12: no attack grows a victim by more than this.
BUDGET_MIB = 64.0
#: The caller's stall timeout in this module's own measurement (seconds).
STALL_TIMEOUT = 1.0
#: Concurrent legitimate calls.
CONCURRENCY = 4

log = logging.getLogger("hostile_routing")


def _lie() -> Load:
    return Load(in_flight=0, queue=0, max_concurrency=128)


@asynccontextmanager
async def _hostile(target: Target, handler: Callable[..., Any]) -> AsyncIterator[None]:
    """Hostile providers of ``target.capability`` in ``target``'s mesh, while the body runs."""
    async with AsyncExitStack() as stack:
        for _ in range(HOSTILE_PROVIDERS):
            peer = await stack.enter_async_context(Peer(bootstrap=[target.bootstrap], gossip=False))
            peer.serve(Capability(name=target.capability, idempotent=True), handler)
            peer.inference.load_provider = _lie
            await peer.announce()
        yield


def lying_provider(target: Target) -> AbstractAsyncContextManager[None]:
    async def wrong(request: Any) -> AsyncIterator[str]:
        for _ in range(CHUNKS):
            yield "wrong "

    return _hostile(target, wrong)


def stalling_provider(target: Target) -> AbstractAsyncContextManager[None]:
    async def stall(request: Any) -> AsyncIterator[str]:
        yield "w0 "
        await trio.sleep_forever()

    return _hostile(target, stall)


def internal_error_provider(target: Target) -> AbstractAsyncContextManager[None]:
    async def broken(request: Any) -> str:
        raise ValueError("hostile internal error")

    return _hostile(target, broken)


ATTACKS: dict[str, Callable[[Target], AbstractAsyncContextManager[None]]] = {
    "lying-provider": lying_provider,
    "stalling-provider": stalling_provider,
    "internal-error-provider": internal_error_provider,
}


# -- this module's own measurement ------------------------------------------------------------

WORDS = " ".join(f"w{i}" for i in range(CHUNKS))
EXPECTED = [f"w{i} " for i in range(CHUNKS)]


async def _echo(request: Any) -> AsyncIterator[str]:
    for word in str(request.input).split():
        yield word + " "


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Phase:
    name: str
    ok: int
    failed: int
    wrong: int
    seconds: float
    latencies: list[float]
    hostile_attempts: int
    rss_growth_mib: float
    peak_rss_mib: float
    fd_growth: int

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float | None:
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "calls_per_s": round(self.rate, 1),
            "ok": self.ok,
            "failed": self.failed,
            "wrong": self.wrong,
            "p50_ms": self.pct(0.5),
            "p99_ms": self.pct(0.99),
            "attempts_on_hostile": self.hostile_attempts,
            "rss_growth_mib": round(self.rss_growth_mib, 1),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "fd_growth": self.fd_growth,
        }


async def _phase(name: str, target: Target, honest: Peer, window: float) -> Phase:
    """A fresh routing caller calls for ``window`` seconds, ``CONCURRENCY`` at a time."""
    rss0, fd0 = _rss_mib(), _fds()
    peak = rss0
    ok = failed = wrong = hostile = 0
    latencies: list[float] = []
    async with Peer(bootstrap=[target.bootstrap], gossip=False, stall_timeout=STALL_TIMEOUT) as caller:
        expected = 1 if name == "baseline" else 1 + HOSTILE_PROVIDERS
        with trio.fail_after(30):
            while len(await caller.providers(target.capability, refresh=True)) < expected:
                await trio.sleep(0.1)
        client = caller.mesh_client
        start = trio.current_time()
        end = start + window

        async def one_loop() -> None:
            nonlocal ok, failed, wrong, hostile, peak
            while trio.current_time() < end:
                t0 = trio.current_time()
                try:
                    resp = await client.call(target.capability, WORDS, timeout=10)
                except ModelNetError as exc:
                    failed += 1
                    log.debug("call failed: %s", exc)
                    continue
                hostile += sum(1 for a in resp.attempts if a.get("peer") != honest.peer_id)
                if resp.chunks != EXPECTED:
                    wrong += 1
                    client.report(resp.peer, "rejected")  # as a verifier would
                    continue
                ok += 1
                latencies.append(trio.current_time() - t0)
                peak = max(peak, _rss_mib())

        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(one_loop)
        seconds = trio.current_time() - start
    return Phase(name, ok, failed, wrong, seconds, latencies, hostile, _rss_mib() - rss0, peak, _fds() - fd0)


async def run(window: float, only: str | None) -> list[Phase]:
    async with Peer(gossip=False) as honest:
        honest.serve(Capability(name="echo8", idempotent=True), _echo)
        await honest.announce()
        target = Target(honest.addrs[0], honest.peer_id, "echo8", os.getpid(), honest.addrs[0])
        phases = [await _phase("baseline", target, honest, window)]
        for name, attack in ATTACKS.items():
            if only and name != only:
                continue
            async with attack(target):
                phases.append(await _phase(name, target, honest, window))
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s windows")
    parser.add_argument("--window", type=float, default=None, help="seconds per phase (default 10)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--only", choices=sorted(ATTACKS), default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("modelnet_p2p").setLevel(logging.ERROR)  # hostile answers are expected
    window = args.window or (3.0 if args.quick else 10.0)
    phases = trio.run(run, window, args.only)
    base = phases[0]
    rows = []
    for p in phases[1:]:
        ratio = p.rate / base.rate if base.rate else 0.0
        meets = ratio >= GOAL_RATIO and p.rss_growth_mib <= BUDGET_MIB
        rows.append({**p.as_dict(), "ratio": round(ratio, 2), "goal_met": meets})
    if args.json:
        print(json.dumps({"window_s": window, "baseline": base.as_dict(), "attacks": rows}))
        return 0
    print(f"routing caller, {CONCURRENCY} calls at a time, {window:g} s per phase, all peers in one process")
    print(
        f"baseline: {base.rate:.1f} correct calls/s, p50 {base.pct(0.5) or 0:.1f} ms, "
        f"p99 {base.pct(0.99) or 0:.1f} ms, {base.failed} failed"
    )
    head = (
        f"{'attack':<26}{'calls/s':>9}{'ratio':>7}{'p50 ms':>8}{'p99 ms':>9}{'failed':>7}{'wrong':>6}"
        f"{'on hostile':>11}{'RSS +MiB':>9}  goal (>= {GOAL_RATIO}x, <= {BUDGET_MIB:g} MiB)"
    )
    print(head)
    for r in rows:
        print(
            f"{r['name']:<26}{r['calls_per_s']:>9.1f}{r['ratio']:>7.2f}{r['p50_ms'] or 0:>8.1f}"
            f"{r['p99_ms'] or 0:>9.1f}{r['failed']:>7}{r['wrong']:>6}{r['attempts_on_hostile']:>11}"
            f"{r['rss_growth_mib']:>9.1f}  {'met' if r['goal_met'] else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What an idle peer spends on its connections: modelnet hosts beside stock py-libp2p hosts.

Issue 11 ("cheap idle"): keepalives and heartbeats must not wake every connection every
second for nothing, and what an idle peer spends (CPU, bytes, wake-ups) must stay flat as
the mesh grows. This benchmark isolates the connection-level cost: N hosts over worker
processes of ``--per-process`` hosts each, linked by the same random graph (host ``i`` dials
``--links`` random earlier hosts, seeded), nothing served, no gossip. Three kinds run one
after another on the same graph:

- ``stock``: the baseline, ``libp2p.new_host`` with Noise and yamux (upstream's defaults
  otherwise: every yamux connection runs an RTT ping loop and a stale-stream sweeper);
- ``modelnet``: the host every modelnet peer runs (``modelnet_p2p.p2p.host``);
- ``peer``: a whole :class:`modelnet_p2p.Peer` with ``gossip=False`` (its DHT, connection
  manager, stream pool and relay service included).

After ``--settle`` seconds the parent reads, over ``--window`` seconds, each worker's CPU time
and scheduler run count (``/proc/<pid>/task/*/schedstat``, in ns; a run is a wake-up) and the
TCP bytes its sockets sent (``ss -ti``), and prints them per host and per connection, with
each kind's ratio to ``stock``. Run::

    python benchmarks/bench_idle.py [--peers 20,40] [--per-process 10] [--links 8]

Figures taken while other work uses the cores are "loaded"; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

KINDS = ("stock", "modelnet", "peer")
#: The goal of issue 11 for idle CPU per peer (percent of a core, at 100 peers).
CPU_GOAL_PCT = 0.5


# -- child: K hosts of one kind ---------------------------------------------------------------


async def _stock_host(stack: Any) -> tuple[Any, str]:
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX
    from libp2p.stream_muxer.yamux.yamux import Yamux

    keys = create_new_key_pair()
    noise = NoiseTransport(keys, noise_privkey=new_x25519_key_pair().private_key)
    host = new_host(
        key_pair=keys,
        sec_opt={TProtocol(NOISE): noise},
        muxer_opt={TProtocol(YAMUX): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
    addr = f"{host.get_addrs()[0]}"
    if "/p2p/" not in addr:
        addr += f"/p2p/{host.get_id()}"
    return host, addr


async def _modelnet_host(stack: Any) -> tuple[Any, str]:
    from modelnet_p2p.p2p.host import build_host, parse_multiaddr, running_host
    from modelnet_p2p.p2p.identity import Identity

    identity = Identity.generate()
    host = build_host(identity)
    await stack.enter_async_context(running_host(host, [parse_multiaddr("/ip4/127.0.0.1/tcp/0")]))
    return host, f"{host.get_addrs()[0]}"


async def _peer(stack: Any) -> tuple[Any, str]:
    from modelnet_p2p import Peer

    peer = await stack.enter_async_context(Peer(listen=["/ip4/127.0.0.1/tcp/0"], gossip=False))
    return peer, peer.addrs[0]


async def _dial(kind: str, node: Any, addr: str) -> bool:
    try:
        with trio.fail_after(20):
            if kind == "peer":
                await node.connect(addr)
            else:
                import multiaddr
                from libp2p.peer.peerinfo import info_from_p2p_addr

                await node.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        return True
    except Exception:
        return False


async def child(kind: str, hosts: int, first: int, known: list[str], links: list[tuple[int, int]]) -> None:
    """Run ``hosts`` hosts (global indices from ``first``); dial ``links``; stop when stdin closes."""
    from contextlib import AsyncExitStack

    make = {"stock": _stock_host, "modelnet": _modelnet_host, "peer": _peer}[kind]
    async with AsyncExitStack() as stack:
        nodes: list[Any] = []
        addrs = list(known)
        for _ in range(hosts):
            node, addr = await make(stack)
            nodes.append(node)
            addrs.append(addr)
        print(json.dumps({"addrs": addrs[len(known) :]}), flush=True)
        outcomes: list[bool] = []

        async def dial(src: int, dst: int) -> None:
            outcomes.append(await _dial(kind, nodes[src - first], addrs[dst]))

        async with trio.open_nursery() as nursery:
            for src, dst in links:
                nursery.start_soon(dial, src, dst)
        print(json.dumps({"dialed": outcomes.count(True), "failed": outcomes.count(False)}), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        while await stdin.receive_some(1024):
            pass


# -- parent: measure ----------------------------------------------------------------------------


@dataclass
class Sample:
    cpu: float
    runs: int
    sent: int
    conns: int


def sample(pid: int, ss_out: str) -> Sample:
    cpu_ns = runs = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                on_cpu, _, slices = f.read().split()[:3]
        except OSError:
            continue
        cpu_ns += int(on_cpu)
        runs += int(slices)
    cpu = cpu_ns / 1e9
    sent = conns = 0
    for block in re.split(r"\n(?=\S)", ss_out):
        if f"pid={pid}," in block:
            conns += 1
            m = re.search(r"bytes_sent:(\d+)", block)
            sent += int(m.group(1)) if m else 0
    return Sample(cpu, runs, sent, conns)


def ss() -> str:
    return subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True).stdout


def graph(n: int, links: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(i, j) for i in range(1, n) for j in rng.sample(range(i), min(links, i))]


async def run_kind(
    kind: str, n: int, per: int, links: list[tuple[int, int]], settle: float, window: float
) -> dict[str, Any]:
    procs: list[trio.Process] = []
    known: list[str] = []
    dialed = failed = 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        for first in range(0, n, per):
            count = min(per, n - first)
            mine = [(s, d) for s, d in links if first <= s < first + count]
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--child",
                kind,
                "--hosts",
                str(count),
                "--first",
                str(first),
                "--known",
                json.dumps(known),
                "--dial",
                json.dumps(mine),
            ]
            proc = await trio.lowlevel.open_process(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
            )
            procs.append(proc)
            assert proc.stdout is not None
            lines = _lines(proc.stdout)
            with trio.fail_after(120):
                known += json.loads(await lines.__anext__())["addrs"]
                result = json.loads(await lines.__anext__())
            dialed += result["dialed"]
            failed += result["failed"]
        await trio.sleep(settle)
        pids = [p.pid for p in procs]
        out = ss()
        before = [sample(pid, out) for pid in pids]
        t0 = time.monotonic()
        await trio.sleep(window)
        out = ss()
        after = [sample(pid, out) for pid in pids]
        dt = time.monotonic() - t0
    finally:
        for proc in procs:
            if proc.stdin is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await proc.stdin.aclose()
                    except Exception:
                        pass
        with trio.move_on_after(30) as waited:
            for proc in procs:
                await proc.wait()
        if waited.cancelled_caught:
            for proc in procs:
                proc.kill()
    conns = sum(a.conns for a in after)
    pairs = list(zip(after, before, strict=True))
    cpu = sum(a.cpu - b.cpu for a, b in pairs) / dt
    runs = sum(a.runs - b.runs for a, b in pairs) / dt
    sent = sum(a.sent - b.sent for a, b in pairs) / dt
    return {
        "kind": kind,
        "hosts": n,
        "dialed": dialed,
        "failed": failed,
        "conns_per_host": conns / n,
        "cpu_pct_per_host": 100 * cpu / n,
        "wakeups_per_s_per_host": runs / n,
        "bytes_per_s_per_host": sent / n,
        "wakeups_per_s_per_conn": runs / max(conns, 1),
        "bytes_per_s_per_conn": sent / max(conns, 1),
    }


async def _lines_gen(stream: Any) -> Any:
    buf = b""
    while data := await stream.receive_some(65536):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode()


_lines = _lines_gen


def _ratio(ours: float, base: float) -> str:
    return f"{ours / base:.2f}x" if base else "n/a"


def report(rows: list[dict[str, Any]]) -> None:
    base = {r["hosts"]: r for r in rows if r["kind"] == "stock"}
    cols = (
        "conns_per_host",
        "cpu_pct_per_host",
        "wakeups_per_s_per_host",
        "bytes_per_s_per_host",
        "wakeups_per_s_per_conn",
        "bytes_per_s_per_conn",
    )
    print(
        f"{'kind':9} {'N':>4} {'conns/host':>10} {'cpu%/host':>10} {'wake/s/host':>11} {'B/s/host':>9} "
        f"{'wake/s/conn':>11} {'B/s/conn':>9}   ratios to stock (cpu, wake/conn, B/conn)"
    )
    for r in rows:
        b = base.get(r["hosts"])
        ratios = ""
        if b is not None and r["kind"] != "stock":
            keys = ("cpu_pct_per_host", "wakeups_per_s_per_conn", "bytes_per_s_per_conn")
            ratios = ", ".join(_ratio(r[k], b[k]) for k in keys)
        cells = " ".join(f"{r[c]:>{w}.3f}" for c, w in zip(cols, (10, 10, 11, 9, 11, 9), strict=True))
        print(f"{r['kind']:9} {r['hosts']:>4} {cells}   {ratios}")
    for r in rows:
        if r["kind"] == "peer":
            verdict = "meets" if r["cpu_pct_per_host"] <= CPU_GOAL_PCT else "misses"
            print(
                f"goal (issue 11, idle CPU per peer <= {CPU_GOAL_PCT}% of a core): N={r['hosts']} "
                f"{r['cpu_pct_per_host']:.3f}% with gossip off: {verdict} it (gossip not measured here)"
            )
    peers = sorted((r for r in rows if r["kind"] == "peer"), key=lambda r: r["hosts"])
    if len(peers) >= 2:
        lo, hi = peers[0], peers[-1]
        growth = hi["cpu_pct_per_host"] / lo["cpu_pct_per_host"] if lo["cpu_pct_per_host"] else float("nan")
        print(
            f"goal (flat per-peer cost, at most 1.5x growth): peer CPU per host N={lo['hosts']} -> "
            f"N={hi['hosts']}: {growth:.2f}x"
        )


async def parent(args: argparse.Namespace) -> None:
    rows = []
    for n in [int(x) for x in args.peers.split(",")]:
        links = graph(n, args.links, args.seed)
        for kind in args.kinds.split(","):
            row = await run_kind(kind, n, args.per_process, links, args.settle, args.window)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report(rows)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--peers", default="20,40", help="comma-separated mesh sizes")
    parser.add_argument("--per-process", type=int, default=10)
    parser.add_argument("--links", type=int, default=8, help="each host dials this many earlier hosts")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--settle", type=float, default=35.0)
    parser.add_argument("--window", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--hosts", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--known", default="[]", help=argparse.SUPPRESS)
    parser.add_argument("--dial", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        links = [(int(s), int(d)) for s, d in json.loads(args.dial)]
        trio.run(child, args.child, args.hosts, args.first, json.loads(args.known), links)
    else:
        trio.run(parent, args)


if __name__ == "__main__":
    main()

"""Bulk benchmark (issue 15): 64 KiB chunks over modelnet beside stock py-libp2p and raw TCP.

Usage::

    python benchmarks/stream_bulk.py [--quick] [--mib 64] [--reps 3] [--json]

Every kind moves the same bytes from a server to a client in 64 KiB writes, and each
kind's best time of ``--reps`` is printed as MB/s beside the others, in one run:

- ``modelnet``: inference requests whose handler yields 64 KiB ``bytes`` chunks
  (``peer.infer``, 16 MiB a request), server and client peers in two processes;
- ``stock 2 procs``: the baseline, a stock py-libp2p ``new_host`` (Noise + yamux, upstream
  classes) writing 64 KiB ``stream.write()`` calls, server and client in two processes that
  never import ``modelnet_p2p`` (each child checks and reports it);
- ``stock 1 proc``: the same two stock hosts in one process (the figure measured before);
- ``raw TCP``: trio ``send_all`` of 64 KiB blocks, two processes: the physical limit here.

The goal (issue 15): modelnet >= 2x ``stock 2 procs``. Ratios to raw TCP say how far each
is from the limit. The reps of the kinds are interleaved (modelnet, stock, TCP, modelnet,
...), so load from elsewhere on the machine spreads over all of them; the load average is
printed beside the figures. CPU seconds of both processes per transfer are read from
``/proc`` and printed as MB per CPU second. ``--profile DIR`` also records py-spy
profiles of every server and client (needs py-spy and ptrace rights).

:func:`run_bulk` is the entry point for ``bench_stream.py``. Nothing here asserts on
timings: it reports numbers and exits 0 (1 if some kind failed altogether).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any

import trio

HOST = "127.0.0.1"
CHUNK = 64 * 1024
MB = 1_000_000
PROTOCOL = "/bench/bulk/1.0.0"
#: Seconds a child may take to start, and one transfer may take.
STARTUP_LIMIT = 60.0
TRANSFER_LIMIT = 120.0
#: The goal of issue 15: modelnet's throughput over the stock two-process baseline.
GOAL_RATIO = 2.0
#: Most bytes one modelnet request moves: a client reads at most 32 MiB of one answer by
#: default (``MAX_ANSWER_SIZE``), so larger transfers are several requests on one connection.
MN_REQUEST = 16 << 20
#: Kinds in the order they are measured and printed.
KINDS = ("modelnet", "stock-2proc", "stock-1proc", "tcp")
LABELS = {
    "modelnet": "modelnet (2 procs)",
    "stock-2proc": "stock py-libp2p, 2 procs",
    "stock-1proc": "stock py-libp2p, 1 proc",
    "tcp": "raw TCP (trio), 2 procs",
}


# -- children: servers print {"addr": ...}; clients print {"ready"} then one result per line --


def _header(total: int) -> bytes:
    return struct.pack("!QQ", total, CHUNK)


async def _read_header(stream: Any) -> tuple[int, int]:
    buf = b""
    while len(buf) < 16:
        data = await stream.read(16 - len(buf))
        if not data:
            raise EOFError("no header")
        buf += data
    total, size = struct.unpack("!QQ", buf)
    return int(total), int(size)


async def _stock_host(stack: Any) -> tuple[Any, str]:
    """A stock py-libp2p host: Noise + yamux, upstream classes only."""
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
    await stack.enter_async_context(host.run(listen_addrs=[multiaddr.Multiaddr(f"/ip4/{HOST}/tcp/0")]))
    addr = f"{host.get_addrs()[0]}"
    if "/p2p/" not in addr:
        addr += f"/p2p/{host.get_id()}"
    return host, addr


async def _stock_source(stream: Any) -> None:
    """Stock handler: read (total, size), write ``total`` bytes in ``size`` writes, close."""
    try:
        total, size = await _read_header(stream)
        block = bytes(size)
        sent = 0
        while sent < total:
            part = block if total - sent >= size else block[: total - sent]
            await stream.write(part)
            sent += len(part)
        await stream.close()
    except Exception:
        await stream.reset()


async def _stock_sink(host: Any, peer_id: Any, total: int) -> float:
    from libp2p.custom_types import TProtocol
    from libp2p.network.stream.exceptions import StreamEOF

    t0 = time.perf_counter()
    stream = await host.new_stream(peer_id, [TProtocol(PROTOCOL)])
    await stream.write(_header(total))
    got = 0
    try:
        while True:
            got += len(await stream.read(CHUNK))
    except StreamEOF:
        pass
    elapsed = time.perf_counter() - t0
    await stream.close()
    if got != total:
        raise RuntimeError(f"stock: got {got} bytes of {total}")
    return elapsed


async def _stock_server() -> None:
    from contextlib import AsyncExitStack

    from libp2p.custom_types import TProtocol

    async with AsyncExitStack() as stack:
        host, addr = await _stock_host(stack)
        host.set_stream_handler(TProtocol(PROTOCOL), _stock_source)
        _hello({"addr": addr})
        await _wait_for_stdin_eof()


async def _stock_connect(host: Any, addr: str) -> Any:
    import multiaddr
    from libp2p.peer.peerinfo import info_from_p2p_addr

    info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
    await host.connect(info)
    return info.peer_id


async def _stock_client(addr: str) -> None:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        host, _ = await _stock_host(stack)
        peer_id = await _stock_connect(host, addr)
        await _serve_commands(lambda total: _stock_sink(host, peer_id, total))


async def _stock_both() -> None:
    from contextlib import AsyncExitStack

    from libp2p.custom_types import TProtocol

    async with AsyncExitStack() as stack:
        server, addr = await _stock_host(stack)
        server.set_stream_handler(TProtocol(PROTOCOL), _stock_source)
        client, _ = await _stock_host(stack)
        peer_id = await _stock_connect(client, addr)
        await _serve_commands(lambda total: _stock_sink(client, peer_id, total))


async def _tcp_source(stream: trio.SocketStream) -> None:
    try:
        buf = b""
        while len(buf) < 16:
            data = await stream.receive_some(16 - len(buf))
            if not data:
                return
            buf += data
        total, size = struct.unpack("!QQ", buf)
        block = bytes(size)
        sent = 0
        while sent < total:
            part = block if total - sent >= size else block[: total - sent]
            await stream.send_all(part)
            sent += len(part)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


async def _tcp_server() -> None:
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, _tcp_source, listeners)
        _hello({"addr": f"{HOST}:{port}"})
        await _wait_for_stdin_eof()
        nursery.cancel_scope.cancel()


async def _tcp_sink(addr: str, total: int) -> float:
    host, port = addr.rsplit(":", 1)
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream(host, int(port))
    got = 0
    async with stream:
        await stream.send_all(_header(total))
        while got < total:
            data = await stream.receive_some(CHUNK)
            if not data:
                break
            got += len(data)
    if got != total:
        raise RuntimeError(f"tcp: got {got} bytes of {total}")
    return time.perf_counter() - t0


async def _tcp_client(addr: str) -> None:
    await _serve_commands(lambda total: _tcp_sink(addr, total))


async def _mn_chunks(request: Any) -> AsyncIterator[bytes]:
    total = int(request.params["total"])
    block = bytes(CHUNK)
    sent = 0
    while sent < total:
        part = block if total - sent >= CHUNK else block[: total - sent]
        yield part
        sent += len(part)


async def _mn_server() -> None:
    from modelnet_p2p import Capability, Peer

    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], gossip=False) as peer:
        peer.serve(Capability("bulk"), _mn_chunks)
        _hello({"addr": peer.addrs[0]})
        await _wait_for_stdin_eof()


async def _mn_client(addr: str) -> None:
    from modelnet_p2p import Peer

    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], gossip=False) as peer:
        await peer.connect(addr)

        async def once(total: int) -> float:
            t0 = time.perf_counter()
            got = 0
            while got < total:
                part = min(total - got, MN_REQUEST)
                async with peer.infer(addr, "bulk", None, total=part) as stream:
                    async for chunk in stream:
                        got += len(chunk)
            if got != total:
                raise RuntimeError(f"modelnet: got {got} bytes of {total}")
            return time.perf_counter() - t0

        await _serve_commands(once)


def _hello(obj: dict[str, Any]) -> None:
    obj["modelnet_imported"] = "modelnet_p2p" in sys.modules
    print(json.dumps(obj), flush=True)


async def _wait_for_stdin_eof() -> None:
    pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with pipe:
        while await pipe.receive_some(4096):
            pass


async def _serve_commands(transfer: Any) -> None:
    """Client loop: print ``ready``; for each stdin line ``<total>``, one transfer's result."""

    async def one(line: str) -> dict[str, Any]:
        return {"s": await transfer(int(line))}

    await serve_lines(one)


async def serve_lines(run: Callable[[str], Awaitable[dict[str, Any]]]) -> None:
    """Client loop: print ``ready``; for each stdin line, print what ``run(line)`` returns
    (or ``{"error": ...}``), each within ``TRANSFER_LIMIT`` seconds."""
    _hello({"ready": True})
    pipe = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buf = b""
    async with pipe:
        while True:
            data = await pipe.receive_some(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    with trio.fail_after(TRANSFER_LIMIT):
                        out = await run(line.decode())
                except Exception as exc:
                    out = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                _hello(out)


def child_main(role: str, addr: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    runs = {
        "stock-server": _stock_server,
        "stock-client": lambda: _stock_client(addr),
        "stock-both": _stock_both,
        "tcp-server": _tcp_server,
        "tcp-client": lambda: _tcp_client(addr),
        "mn-server": _mn_server,
        "mn-client": lambda: _mn_client(addr),
    }
    trio.run(runs[role])


# -- parent -----------------------------------------------------------------------------------


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[str]
    stderr: IO[str]

    def stderr_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-1500:]


@dataclass
class Result:
    kind: str
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    #: CPU seconds of the server and of the client process, per transfer.
    sides: list[tuple[float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    modelnet_imported: bool | None = None

    def mbps(self, total: int) -> float | None:
        return total / min(self.times) / MB if self.times else None

    def mb_per_cpu_s(self, total: int) -> float | None:
        return total / min(self.cpu) / MB if self.cpu and min(self.cpu) > 0 else None

    def side_cpu_us_per_chunk(self, total: int) -> tuple[float | None, float | None]:
        """Median CPU microseconds per 64 KiB chunk on the server and on the client."""
        if not self.sides:
            return None, None
        chunks = total / CHUNK
        server = sorted(s for s, _ in self.sides)[len(self.sides) // 2]
        client = sorted(c for _, c in self.sides)[len(self.sides) // 2]
        return (server / chunks * 1e6 if server else None), client / chunks * 1e6


def _spawn(role: str, addr: str = "", script: str = __file__) -> Child:
    """Start ``script --role ROLE --addr ADDR`` (this file by default) as a child process."""
    err = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script), "--role", role, "--addr", addr],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    return Child(role, proc, err)


def _line(child: Child, limit: float) -> dict[str, Any]:
    assert child.proc.stdout is not None
    deadline = time.monotonic() + limit
    with selectors.DefaultSelector() as sel:
        sel.register(child.proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"{child.role}: no answer within {limit:.0f} s")
            line = child.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{child.role} exited ({child.proc.wait()}): {child.stderr_tail()}")
            if line.startswith("{"):
                out: dict[str, Any] = json.loads(line)
                return out


def _stop(child: Child) -> None:
    try:
        if child.proc.stdin is not None:
            child.proc.stdin.close()
        child.proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        child.proc.kill()
        child.proc.wait()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROLES = {
    "modelnet": ("mn-server", "mn-client"),
    "stock-2proc": ("stock-server", "stock-client"),
    "stock-1proc": (None, "stock-both"),
    "tcp": ("tcp-server", "tcp-client"),
}


@dataclass
class Pair:
    kind: str
    server: Child | None
    client: Child
    imported: bool

    def pids(self) -> list[int]:
        return [c.proc.pid for c in (self.server, self.client) if c is not None]


def _start(kind: str) -> Pair:
    server_role, client_role = ROLES[kind]
    server = None
    imported = False
    addr = ""
    if server_role is not None:
        server = _spawn(server_role)
        hello = _line(server, STARTUP_LIMIT)
        addr, imported = hello["addr"], bool(hello["modelnet_imported"])
    client = _spawn(client_role, addr)
    hello = _line(client, STARTUP_LIMIT)
    return Pair(kind, server, client, imported or bool(hello["modelnet_imported"]))


def _transfer(pair: Pair, total: int, result: Result) -> None:
    assert pair.client.proc.stdin is not None
    before = [_cpu_seconds(p) for p in pair.pids()]
    pair.client.proc.stdin.write(f"{total}\n")
    pair.client.proc.stdin.flush()
    out = _line(pair.client, TRANSFER_LIMIT + 10)
    used = [_cpu_seconds(p) - b for p, b in zip(pair.pids(), before, strict=True)]
    if "s" in out:
        result.times.append(float(out["s"]))
        result.cpu.append(sum(used))
        result.sides.append((used[0], used[1]) if len(used) == 2 else (0.0, used[0]))
    else:
        result.errors.append(str(out.get("error")))


def _profile(pairs: list[Pair], directory: str, seconds: float) -> list[subprocess.Popen[bytes]]:
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not found: no profiles", file=sys.stderr)
        return []
    os.makedirs(directory, exist_ok=True)
    procs = []
    for pair in pairs:
        for child in (pair.server, pair.client):
            if child is None:
                continue
            out = os.path.join(directory, f"{pair.kind}-{child.role}.txt")
            cmd = [spy, "record", "--pid", str(child.proc.pid), "--format", "raw", "--output", out]
            cmd += ["--duration", str(int(seconds)), "--rate", "200", "--nonblocking"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def run_bulk(
    total: int = 64 << 20, reps: int = 3, kinds: tuple[str, ...] = KINDS, profile: str | None = None
) -> dict[str, Result]:
    """Measure every kind in ``kinds``: a warm-up transfer each, then ``reps`` interleaved rounds."""
    results = {k: Result(k) for k in kinds}
    pairs: list[Pair] = []
    try:
        for kind in kinds:
            try:
                pair = _start(kind)
            except Exception as exc:
                results[kind].errors.append(f"start: {exc}")
                continue
            pairs.append(pair)
            results[kind].modelnet_imported = pair.imported
            _transfer(pair, 4 << 20, Result(kind))  # warm-up
        spies = _profile(pairs, profile, 30) if profile else []
        for _ in range(reps):
            for pair in pairs:
                _transfer(pair, total, results[pair.kind])
        for spy in spies:
            spy.wait()
    finally:
        for pair in pairs:
            for child in (pair.client, pair.server):
                if child is not None:
                    _stop(child)
    return results


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def rows(results: dict[str, Result], total: int) -> list[dict[str, Any]]:
    """One row per kind: MB/s, MB per CPU second, ratios to the stock 2-process baseline and TCP."""
    stock = results.get("stock-2proc")
    tcp = results.get("tcp")
    base = stock.mbps(total) if stock else None
    limit = tcp.mbps(total) if tcp else None
    out = []
    for kind, r in results.items():
        mbps = r.mbps(total)
        server_us, client_us = r.side_cpu_us_per_chunk(total)
        out.append(
            {
                "kind": kind,
                "label": LABELS[kind],
                "mb_s": mbps,
                "mb_per_cpu_s": r.mb_per_cpu_s(total),
                "server_cpu_us_per_chunk": server_us,
                "client_cpu_us_per_chunk": client_us,
                "vs_stock_2proc": mbps / base if mbps and base else None,
                "vs_tcp": mbps / limit if mbps and limit else None,
                "runs": len(r.times),
                "errors": r.errors,
                "modelnet_imported": r.modelnet_imported,
            }
        )
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_report(table: list[dict[str, Any]], total: int, reps: int, load_before: str) -> None:
    print(f"bulk: {total >> 20} MiB in {CHUNK >> 10} KiB chunks, best of {reps} interleaved runs")
    print(f"load average before: {load_before}; after: {load_average()}")
    print(
        f"{'kind':<28} {'MB/s':>8} {'vs stock 2p':>11} {'vs TCP':>7} {'MB/cpu-s':>9}"
        f" {'cpu us/chunk srv':>16} {'cli':>6}  imports modelnet"
    )
    for row in table:
        print(
            f"{row['label']:<28} {_fmt(row['mb_s'], '8.1f')}"
            f" {_fmt(row['vs_stock_2proc'], '10.2f')}x {_fmt(row['vs_tcp'], '6.3f')}x"
            f" {_fmt(row['mb_per_cpu_s'], '9.1f')} {_fmt(row['server_cpu_us_per_chunk'], '16.0f')}"
            f" {_fmt(row['client_cpu_us_per_chunk'], '6.0f')}  {row['modelnet_imported']}"
        )
        for err in row["errors"][:3]:
            print(f"    error: {err}")
    mn = next((r for r in table if r["kind"] == "modelnet"), None)
    if mn and mn["vs_stock_2proc"] is not None:
        met = "MET" if mn["vs_stock_2proc"] >= GOAL_RATIO else "NOT met"
        print(
            f"goal: modelnet >= {GOAL_RATIO:.0f}x stock py-libp2p in separate processes:"
            f" {mn['vs_stock_2proc']:.2f}x, {met}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--addr", default="", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="1 run of 32 MiB per kind")
    ap.add_argument("--mib", type=int, default=64, help="MiB per transfer (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="runs per kind (default 3)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--profile", metavar="DIR", help="record py-spy profiles of every child into DIR")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = ap.parse_args()
    if args.role:
        child_main(args.role, args.addr)
        return 0
    total = (32 if args.quick else args.mib) << 20
    reps = 1 if args.quick else args.reps
    kinds = tuple(k for k in args.kinds.split(",") if k)
    load_before = load_average()
    results = run_bulk(total, reps, kinds, args.profile)
    table = rows(results, total)
    if args.json:
        load = [load_before, load_average()]
        print(json.dumps({"total": total, "reps": reps, "load": load, "rows": table}))
    else:
        print_report(table, total, reps, load_before)
    return 0 if all(r["runs"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())


def add_rows(report: Any, quick: bool = False) -> None:
    """Measure and add the bulk rows to a ``bench_stream`` report (``stream_common.Report``):
    modelnet beside stock py-libp2p in two processes (the row the goal uses, key
    ``bulk_vs_stock``) and in one, with each kind's distance from raw TCP as notes."""
    total = (32 if quick else 64) << 20
    reps = 1 if quick else 3
    results = run_bulk(total, reps)
    table = {r["kind"]: r for r in rows(results, total)}
    mn = table["modelnet"]["mb_s"]
    section = f"2b. bulk, {CHUNK >> 10} KiB chunks, {total >> 20} MiB (stream_bulk.py)"
    for kind, label, key in (
        ("stock-2proc", "vs stock py-libp2p, 2 procs", "bulk_vs_stock"),
        ("stock-1proc", "vs stock py-libp2p, 1 proc", "bulk_vs_stock_1proc"),
        ("tcp", "vs raw TCP (trio)", "bulk_vs_tcp"),
    ):
        row = report.row(section, f"{label} (best of {reps})", "MB/s", True, key)
        row.modelnet, row.baseline = mn, table[kind]["mb_s"]
    for r in table.values():
        vs_tcp = "-" if r["vs_tcp"] is None else f"{r['vs_tcp']:.3f}x"
        cpu = r["mb_per_cpu_s"]
        report.notes.append(
            f"bulk {r['label']}: {_fmt(r['mb_s'], '.1f')} MB/s, {vs_tcp} raw TCP, "
            f"{_fmt(cpu, '.0f')} MB per CPU second (imports modelnet: {r['modelnet_imported']})"
        )
        for err in r["errors"][:3]:
            report.errors[f"bulk/{r['kind']}: {err}"] += 1

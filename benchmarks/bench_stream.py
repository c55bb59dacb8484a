"""Streaming benchmark: modelnet inference streams beside HTTP/SSE and raw TCP, in one run.

Usage::

    python benchmarks/bench_stream.py [--quick] [--json FILE]

Every figure is printed next to a baseline measured in the same run, with the
ratio modelnet / baseline:

1. A request answered with 256 short text chunks, sent one after another:
   modelnet vs an SSE endpoint (starlette on uvicorn) read with httpx.
2. Bulk throughput in 64 KiB chunks: modelnet vs a raw trio TCP stream.
3. A one-chunk request on an already open connection: modelnet (the stream pool keeps
   the stream open between requests) vs a tiny GET on a keep-alive httpx connection.
4. 64 concurrent requests of 256 chunks each: total chunks/s and chunks/s per
   core, modelnet vs the SSE endpoint under the same load.

Then the goal table of issue 15 (each goal on a ratio above, met or MISSED), and with
``--json FILE`` every row and goal as JSON (``-``: stdout), so that runs can be compared.
The sequential measurements alternate modelnet and baseline request by request, and the
load rounds alternate too, so that load from elsewhere on the machine falls on both; the
load average is printed (and saved) before and after.

Process layout: the modelnet server peer (with the raw TCP source beside it) runs
in one child process, uvicorn in another, and the clients (the modelnet peer and
httpx, both under trio) in this process. Everything listens on 127.0.0.1 only.
Nothing here asserts on timings: it reports numbers and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stream_bulk
from stream_common import (
    REQUEST_LIMIT,
    STARTUP_LIMIT,
    Child,
    Goal,
    Report,
    alternating,
    attempt,
    concurrent,
    cpu_seconds,
    describe,
    load_average,
    percentile,
    phase,
    print_child_stderr,
    print_goals,
    print_table,
    read_hello,
    report_json,
    sequential,
    spawn,
    stop,
    versions,
    wait_for_stdin_eof,
)

if TYPE_CHECKING:
    import httpx
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse

    from modelnet_p2p import InferenceRequest, Peer

HOST = "127.0.0.1"
STREAM_CHUNKS = 256
BULK_CHUNK = 64 * 1024
CONCURRENCY = 64
MB = 1_000_000

#: The goals of issue 15 this benchmark measures, each on one row's ratio.
GOALS = [
    Goal("stream_total", f"{STREAM_CHUNKS} chunks a request, time p50 vs SSE", 0.35),
    Goal("stream_first", f"{STREAM_CHUNKS} chunks a request, first chunk p50 vs SSE", 1.0),
    Goal("tiny_p50", "one-chunk request, p50 vs HTTP keep-alive", 1.0),
    Goal("tiny_p99", "one-chunk request, p99 vs HTTP keep-alive", 1.5),
    Goal("load_per_core", f"{CONCURRENCY} concurrent streams, chunks/s per core vs SSE", 1.3, at_least=True),
    Goal("bulk_vs_stock", "bulk 64 KiB chunks, MB/s vs stock py-libp2p (2 procs)", 2.0, at_least=True),
]


@dataclass(frozen=True)
class Settings:
    """How much work each measurement does."""

    stream_requests: int
    bulk_bytes: int
    bulk_reps: int
    tiny_requests: int
    load_per_stream: int
    rounds: int
    warmup: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                stream_requests=100,
                bulk_bytes=16 * 1024 * 1024,
                bulk_reps=1,
                tiny_requests=400,
                load_per_stream=2,
                rounds=2,
                warmup=10,
            )
        return cls(
            stream_requests=200,
            bulk_bytes=16 * 1024 * 1024,  # one answer: at most 32 MiB (MAX_ANSWER_SIZE)
            bulk_reps=5,
            tiny_requests=1000,
            load_per_stream=8,
            rounds=4,
            warmup=20,
        )


# -- child process: modelnet server peer and raw TCP source ----------------------------


async def _tokens(request: InferenceRequest) -> AsyncIterator[str]:
    for i in range(int(request.params.get("n", STREAM_CHUNKS))):
        yield f"tok{i} "


async def _bulk(request: InferenceRequest) -> AsyncIterator[bytes]:
    size = int(request.params["size"])
    total = int(request.params["total"])
    block = bytes(size)
    sent = 0
    while sent < total:
        part = block if total - sent >= size else block[: total - sent]
        yield part
        sent += len(part)


async def _tiny(request: InferenceRequest) -> str:
    return "ok"


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError("connection closed before the header arrived")
        buf += data
    return bytes(buf)


async def _tcp_source(stream: trio.SocketStream) -> None:
    """Raw TCP baseline server: read (total, size), send ``total`` bytes in ``size`` writes."""
    try:
        total, size = struct.unpack("!QQ", await _receive_exactly(stream, 16))
        block = bytes(size)
        sent = 0
        while sent < total:
            part = block if total - sent >= size else block[: total - sent]
            await stream.send_all(part)
            sent += len(part)
    except (trio.BrokenResourceError, EOFError, OSError):
        pass
    finally:
        await stream.aclose()


async def _modelnet_server() -> None:
    from modelnet_p2p import Capability, Peer

    # The defaults (64 at once, 16 per caller) would answer "overloaded" to a
    # 64-stream load from one client, so the limits are raised for the benchmark.
    async with Peer(
        listen=[f"/ip4/{HOST}/tcp/0"], max_concurrency=1024, max_concurrency_per_peer=1024
    ) as peer:
        peer.serve(Capability("tokens"), _tokens)
        peer.serve(Capability("bulk"), _bulk)
        peer.serve(Capability("tiny"), _tiny)
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        tcp_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, _tcp_source, listeners)
            print(json.dumps({"addr": peer.addrs[0], "tcp_port": tcp_port}), flush=True)
            await wait_for_stdin_eof()
            nursery.cancel_scope.cancel()


# -- child process: SSE baseline on uvicorn ---------------------------------------------


def _sse_server() -> None:
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    async def sse(request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", str(STREAM_CHUNKS)))

        async def events() -> AsyncIterator[bytes]:
            for i in range(n):
                yield f"data: tok{i} \n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def tiny(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/sse", sse), Route("/tiny", tiny)])
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on sockets whose proto
    # says TCP, and without it every small response waits out a 40 ms delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(1024)  # connections queue here until uvicorn starts accepting
    config = uvicorn.Config(
        app, loop="asyncio", http="h11", lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)

    def watch_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    asyncio.run(server.serve(sockets=[sock]))


# -- client requests --------------------------------------------------------------------


@dataclass
class Timed:
    total: float
    first: float


async def _mn_tokens(peer: Peer, addr: str, n: int = STREAM_CHUNKS) -> Timed:
    t0 = time.perf_counter()
    first = math.nan
    count = 0
    async with peer.infer(addr, "tokens", None, n=n) as stream:
        async for _ in stream:
            if not count:
                first = time.perf_counter() - t0
            count += 1
    if count != n:
        raise RuntimeError(f"got {count} chunks, expected {n}")
    return Timed(time.perf_counter() - t0, first)


async def _sse_tokens(http: httpx.AsyncClient, n: int = STREAM_CHUNKS) -> Timed:
    t0 = time.perf_counter()
    first = math.nan
    count = 0
    async with http.stream("GET", "/sse", params={"n": n}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if line.startswith("data:"):
                if not count:
                    first = time.perf_counter() - t0
                count += 1
    if count != n:
        raise RuntimeError(f"got {count} events, expected {n}")
    return Timed(time.perf_counter() - t0, first)


async def _mn_tiny(peer: Peer, addr: str) -> float:
    t0 = time.perf_counter()
    resp = await peer.call(addr, "tiny", None)
    if resp.value != "ok":
        raise RuntimeError(f"unexpected answer {resp.value!r}")
    return time.perf_counter() - t0


async def _http_tiny(http: httpx.AsyncClient) -> float:
    t0 = time.perf_counter()
    resp = await http.get("/tiny")
    resp.raise_for_status()
    if resp.text != "ok":
        raise RuntimeError(f"unexpected answer {resp.text!r}")
    return time.perf_counter() - t0


async def _mn_bulk(peer: Peer, addr: str, total: int) -> float:
    t0 = time.perf_counter()
    got = 0
    async with peer.infer(addr, "bulk", None, size=BULK_CHUNK, total=total) as stream:
        async for chunk in stream:
            got += len(chunk)
    if got != total:
        raise RuntimeError(f"got {got} bytes, expected {total}")
    return time.perf_counter() - t0


async def _tcp_bulk(port: int, total: int) -> float:
    t0 = time.perf_counter()
    stream = await trio.open_tcp_stream(HOST, port)
    got = 0
    async with stream:
        await stream.send_all(struct.pack("!QQ", total, BULK_CHUNK))
        while got < total:
            data = await stream.receive_some(BULK_CHUNK)
            if not data:
                break
            got += len(data)
    if got != total:
        raise RuntimeError(f"got {got} bytes, expected {total}")
    return time.perf_counter() - t0


# -- measurements -----------------------------------------------------------------------


async def bench_streaming(
    report: Report, s: Settings, peer: Peer, addr: str, http: httpx.AsyncClient
) -> None:
    sec = f"1. {STREAM_CHUNKS} chunks/request, sequential"
    p50 = report.row(sec, "request time p50", "ms", key="stream_total")
    p99 = report.row(sec, "request time p99", "ms", key="stream_p99")
    ttfc = report.row(sec, "first chunk p50", "ms", key="stream_first")
    per_chunk = report.row(sec, "per chunk (mean)", "us", key="stream_per_chunk")
    await sequential(report, "stream/modelnet", s.warmup, lambda: _mn_tokens(peer, addr))
    await sequential(report, "stream/sse", s.warmup, lambda: _sse_tokens(http))
    mn, sse = await alternating(
        report,
        s.stream_requests,
        ("stream/modelnet", lambda: _mn_tokens(peer, addr)),
        ("stream/sse", lambda: _sse_tokens(http)),
    )
    for samples, attr in ((mn, "modelnet"), (sse, "baseline")):
        if not samples:
            continue
        totals = [t.total for t in samples]
        setattr(p50, attr, percentile(totals, 50) * 1e3)
        setattr(p99, attr, percentile(totals, 99) * 1e3)
        setattr(ttfc, attr, percentile([t.first for t in samples], 50) * 1e3)
        setattr(per_chunk, attr, sum(totals) / (len(totals) * STREAM_CHUNKS) * 1e6)


async def bench_bulk(report: Report, s: Settings, peer: Peer, addr: str, tcp_port: int) -> None:
    sec = f"2. bulk, {BULK_CHUNK // 1024} KiB chunks, {s.bulk_bytes // (1 << 20)} MiB"
    row = report.row(sec, f"throughput (best of {s.bulk_reps})", "MB/s", higher_is_better=True)
    await attempt(report, "bulk/modelnet", lambda: _mn_bulk(peer, addr, 4 << 20))
    await attempt(report, "bulk/tcp", lambda: _tcp_bulk(tcp_port, 4 << 20))
    mn: list[float] = []
    tcp: list[float] = []
    for _ in range(s.bulk_reps):
        mn += await sequential(report, "bulk/modelnet", 1, lambda: _mn_bulk(peer, addr, s.bulk_bytes))
        tcp += await sequential(report, "bulk/tcp", 1, lambda: _tcp_bulk(tcp_port, s.bulk_bytes))
    if mn:
        row.modelnet = s.bulk_bytes / min(mn) / MB
    if tcp:
        row.baseline = s.bulk_bytes / min(tcp) / MB


async def bench_tiny(report: Report, s: Settings, peer: Peer, addr: str, http: httpx.AsyncClient) -> None:
    sec = "3. 1-chunk request, connection already open"
    p50 = report.row(sec, "latency p50", "ms", key="tiny_p50")
    p99 = report.row(sec, "latency p99", "ms", key="tiny_p99")
    await sequential(report, "tiny/modelnet", s.warmup, lambda: _mn_tiny(peer, addr))
    await sequential(report, "tiny/http", s.warmup, lambda: _http_tiny(http))
    mn, web = await alternating(
        report,
        s.tiny_requests,
        ("tiny/modelnet", lambda: _mn_tiny(peer, addr)),
        ("tiny/http", lambda: _http_tiny(http)),
    )
    for samples, attr in ((mn, "modelnet"), (web, "baseline")):
        if samples:
            setattr(p50, attr, percentile(samples, 50) * 1e3)
            setattr(p99, attr, percentile(samples, 99) * 1e3)


@dataclass
class LoadResult:
    chunks: int = 0
    wall: float = 0.0
    #: CPU seconds used by the client and by the server process (None: cannot tell).
    cpu_client: float | None = 0.0
    cpu_server: float | None = 0.0


def _add_cpu(total: float | None, before: float | None, after: float | None) -> float | None:
    if total is None or before is None or after is None:
        return None
    return total + after - before


async def _load_round(
    report: Report,
    where: str,
    per_worker: int,
    fn: Callable[[], Awaitable[Any]],
    server_pid: int,
    res: LoadResult,
) -> None:
    client0, server0 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
    t0 = time.perf_counter()
    ok = await concurrent(report, where, CONCURRENCY, per_worker, fn)
    res.wall += time.perf_counter() - t0
    client1, server1 = cpu_seconds(os.getpid()), cpu_seconds(server_pid)
    res.chunks += ok * STREAM_CHUNKS
    res.cpu_client = _add_cpu(res.cpu_client, client0, client1)
    res.cpu_server = _add_cpu(res.cpu_server, server0, server1)


async def bench_load(
    report: Report,
    s: Settings,
    peer: Peer,
    addr: str,
    http: httpx.AsyncClient,
    mn_pid: int,
    sse_pid: int,
) -> None:
    per_worker = max(1, s.load_per_stream // s.rounds)
    total = CONCURRENCY * per_worker * s.rounds
    sec = f"4. {CONCURRENCY} concurrent x {STREAM_CHUNKS} chunks, {total} requests"
    rate = report.row(sec, "total chunks/s", "chunks/s", higher_is_better=True)
    cores = report.row(sec, "cores used: client+server CPU s / wall s", "cores")
    client_cores = report.row(sec, "  of which client process", "cores")
    server_cores = report.row(sec, "  of which server process", "cores")
    per_core = report.row(
        sec, "chunks/s per core used", "chunks/s", higher_is_better=True, key="load_per_core"
    )
    # Warm up: open the connections (httpx needs one per concurrent SSE stream).
    await concurrent(report, "load/modelnet", CONCURRENCY, 1, lambda: _mn_tokens(peer, addr, 4))
    await concurrent(report, "load/sse", CONCURRENCY, 1, lambda: _sse_tokens(http, 4))
    mn = LoadResult()
    sse = LoadResult()
    rounds = (
        ("load/modelnet", lambda: _mn_tokens(peer, addr), mn_pid, mn),
        ("load/sse", lambda: _sse_tokens(http), sse_pid, sse),
    )
    for i in range(s.rounds):  # alternating which goes first
        for where, fn, pid, res in rounds if i % 2 == 0 else rounds[::-1]:
            await _load_round(report, where, per_worker, fn, pid, res)
    for res, attr in ((mn, "modelnet"), (sse, "baseline")):
        if not res.chunks or res.wall <= 0:
            continue
        setattr(rate, attr, res.chunks / res.wall)
        if res.cpu_client is not None and res.cpu_server is not None:
            cpu = res.cpu_client + res.cpu_server
            setattr(client_cores, attr, res.cpu_client / res.wall)
            setattr(server_cores, attr, res.cpu_server / res.wall)
            if cpu > 0:
                setattr(cores, attr, cpu / res.wall)
                setattr(per_core, attr, res.chunks / cpu)


async def run_client(
    s: Settings,
    report: Report,
    mn_addr: str,
    tcp_port: int,
    sse_port: int,
    mn_pid: int,
    sse_pid: int,
) -> None:
    import httpx

    from modelnet_p2p import Peer

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with (
        Peer(listen=[f"/ip4/{HOST}/tcp/0"]) as peer,
        httpx.AsyncClient(base_url=f"http://{HOST}:{sse_port}", limits=limits, timeout=REQUEST_LIMIT) as http,
    ):
        t0 = time.perf_counter()
        await peer.connect(mn_addr)
        report.notes.append(
            f"modelnet connect (dial + Noise + yamux): {(time.perf_counter() - t0) * 1e3:.1f} ms"
        )
        await phase(report, "stream", lambda: bench_streaming(report, s, peer, mn_addr, http))
        await phase(report, "bulk", lambda: bench_bulk(report, s, peer, mn_addr, tcp_port))
        await phase(report, "tiny", lambda: bench_tiny(report, s, peer, mn_addr, http))
        await phase(
            report,
            "load",
            lambda: bench_load(report, s, peer, mn_addr, http, mn_pid, sse_pid),
        )


BASELINES = {
    "1": "SSE: starlette StreamingResponse on uvicorn, httpx stream",
    "2": "raw TCP, trio SocketStream",
    "3": "GET on a keep-alive httpx connection to uvicorn",
    "4": "the same SSE endpoint, 64 httpx connections",
    "2b": "stock py-libp2p (Noise + yamux) in processes that never import modelnet; raw TCP",
}


def print_report(report: Report, s: Settings, quick: bool, elapsed: float) -> None:
    v = versions()
    print()
    print(f"modelnet_p2p stream benchmark{' (--quick)' if quick else ''}")
    print(
        f"  python {v['python']}, trio {v['trio']}, libp2p {v['libp2p']}, httpx {v['httpx']}, "
        f"uvicorn {v['uvicorn']} (asyncio loop, h11), starlette {v['starlette']}"
    )
    print(
        f"  {os.cpu_count()} CPUs; 3 processes: client (modelnet peer + httpx, both under trio), "
        "modelnet server peer (+ raw TCP source), uvicorn"
    )
    print(f"  load average (1, 5, 15 min): {report.load_before} before, {report.load_after} after")
    print("  ratio = modelnet / baseline; the last column says which way is better")
    print(
        "  modelnet requests reuse a kept stream on the one open connection (stream pool); httpx "
        "reuses keep-alive connections; per chunk = mean request time / 256; per core = chunks / "
        "(client + server process CPU seconds, from /proc)"
    )
    for note in report.notes:
        print(f"  {note}")
    print_table(report, BASELINES)
    print(
        f"requests: {s.stream_requests} streamed, {s.tiny_requests} tiny, {s.bulk_reps} bulk "
        f"per side, after {s.warmup} warm-up requests; streamed and tiny requests alternate "
        f"between modelnet and baseline one by one, the load in {s.rounds} alternating round(s). "
        f"Run took {elapsed:.1f} s."
    )
    print_goals(report, GOALS)
    if report.errors:
        print("\nerrors (count x message):")
        for msg, n in report.errors.most_common():
            print(f"  {n} x {msg}")
    else:
        print("no request failed.")


# -- entry point ------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="less work, about 20 s")
    parser.add_argument("--json", metavar="FILE", help="also write every row and goal as JSON (- for stdout)")
    parser.add_argument("--role", choices=["modelnet-server", "sse-server"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "modelnet-server":
        trio.run(_modelnet_server)
        return 0
    if args.role == "sse-server":
        _sse_server()
        return 0

    settings = Settings.make(args.quick)
    report = Report()
    children: list[Child] = []
    started = time.perf_counter()
    try:
        report.load_before = load_average()
        children = [spawn(__file__, "modelnet-server"), spawn(__file__, "sse-server")]
        deadline = time.monotonic() + STARTUP_LIMIT
        mn_hello = read_hello(children[0], deadline)
        sse_hello = read_hello(children[1], deadline)
        trio.run(
            run_client,
            settings,
            report,
            mn_hello["addr"],
            int(mn_hello["tcp_port"]),
            int(sse_hello["port"]),
            children[0].proc.pid,
            children[1].proc.pid,
        )
        stream_bulk.add_rows(report, args.quick)  # bulk beside stock py-libp2p in its own processes
    except Exception as exc:
        report.errors[f"setup: {describe(exc)}"] += 1
    finally:
        for child in children:
            stop(child)
    report.load_after = load_average()
    elapsed = time.perf_counter() - started
    if args.json != "-":
        print_report(report, settings, args.quick, elapsed)
        print_child_stderr(children)
    if args.json:
        doc = report_json(report, GOALS, {"quick": args.quick, **asdict(settings)}, elapsed)
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    for child in children:
        child.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

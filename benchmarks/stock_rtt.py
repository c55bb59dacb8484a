"""The round-trip floor (issue 15): small request/response exchanges with no modelnet at all.

Usage::

    python benchmarks/stock_rtt.py [--requests 300] [--gaps 0,3,10] [--json]

A stock py-libp2p host (upstream ``new_host``: TCP, Noise, yamux) in one process answers
a ``SIZE``-byte message with a ``SIZE``-byte message; a stock host in another process asks,
one exchange at a time, with ``--gaps`` milliseconds of idle between two exchanges (a
request that follows others at once, or one that wakes a process that went to sleep). The
kinds, each with the median and p99 of its exchange times:

- ``open``: every exchange on one stream that stays open (the fastest a request over the
  stock stack can be);
- ``new``: a new stream for every exchange (open, negotiate the protocol, exchange, close);
- ``tcp``: the same exchange over a raw trio TCP connection between the same two
  processes: the physical limit here.

Neither process imports ``modelnet_p2p`` (each child checks and reports it). The figures
are the floor under any request that crosses a process boundary on this stack: whatever
modelnet adds is above them. ``bench_gateway.py`` prints them beside its own figures
(:func:`measure`). Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import stream_bulk
import trio
from stream_bulk import HOST, STARTUP_LIMIT, TRANSFER_LIMIT, _hello, _line, _spawn, _stop

#: Bytes of a request and of its answer (a small chat request, a small answer).
SIZE = 200
PROTOCOL = "/bench/echo/1.0.0"
KINDS = ("open", "new", "tcp")
LABELS = {
    "open": "stock py-libp2p, one open stream",
    "new": "stock py-libp2p, a new stream each",
    "tcp": "raw TCP (trio), one connection",
}


async def _read_exactly(read: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        data = await read(n - len(buf))
        if not data:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += data
    return buf


async def _echo_stream(stream: Any) -> None:
    """Stock handler: answer every ``SIZE`` bytes with ``SIZE`` bytes until the caller closes."""
    from libp2p.network.stream.exceptions import StreamEOF

    try:
        while True:
            await stream.write(await _read_exactly(stream.read, SIZE))
    except (StreamEOF, EOFError):
        await stream.close()
    except Exception:
        await stream.reset()


async def _echo_tcp(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send_all(await _read_exactly(stream.receive_some, SIZE))
        except (EOFError, trio.BrokenResourceError, OSError):
            pass


async def _server() -> None:
    from libp2p.custom_types import TProtocol

    listeners = await trio.open_tcp_listeners(0, host=HOST)
    port = listeners[0].socket.getsockname()[1]
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        host, addr = await stream_bulk._stock_host(stack)
        host.set_stream_handler(TProtocol(PROTOCOL), _echo_stream)
        nursery.start_soon(trio.serve_listeners, _echo_tcp, listeners)
        _hello({"addr": f"{addr},{HOST}:{port}"})
        await stream_bulk._wait_for_stdin_eof()
        nursery.cancel_scope.cancel()


def _summary(times: list[float]) -> dict[str, Any]:
    ordered = sorted(times)
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1e3,
    }


async def _client(addrs: str) -> None:
    from libp2p.custom_types import TProtocol

    libp2p_addr, tcp_addr = addrs.split(",")
    tcp_host, tcp_port = tcp_addr.rsplit(":", 1)
    message = bytes(SIZE)
    protocols = [TProtocol(PROTOCOL)]
    async with AsyncExitStack() as stack:
        host, _ = await stream_bulk._stock_host(stack)
        peer_id = await stream_bulk._stock_connect(host, libp2p_addr)
        kept = await host.new_stream(peer_id, protocols)
        tcp = await trio.open_tcp_stream(tcp_host, int(tcp_port))
        stack.push_async_callback(tcp.aclose)

        async def on_open() -> None:
            await kept.write(message)
            await _read_exactly(kept.read, SIZE)

        async def on_new() -> None:
            stream = await host.new_stream(peer_id, protocols)
            await stream.write(message)
            await _read_exactly(stream.read, SIZE)
            await stream.close()

        async def on_tcp() -> None:
            await tcp.send_all(message)
            await _read_exactly(tcp.receive_some, SIZE)

        exchanges = {"open": on_open, "new": on_new, "tcp": on_tcp}

        async def run(line: str) -> dict[str, Any]:
            kind, n, gap_ms = line.split()
            exchange = exchanges[kind]
            for _ in range(5):  # warm-up: buffers, caches, the first window updates
                await exchange()
            times = []
            for _ in range(int(n)):
                await trio.sleep(float(gap_ms) / 1e3)
                t0 = time.perf_counter()
                await exchange()
                times.append(time.perf_counter() - t0)
            return _summary(times)

        await stream_bulk.serve_lines(run)


def measure(requests: int = 300, gaps_ms: tuple[float, ...] = (0.0, 10.0)) -> dict[str, Any]:
    """Run the two stock processes and every kind at every gap, the kinds taking turns gap by
    gap. Returns ``{"rows": {kind: {gap: summary}}, "modelnet_imported": bool, "errors": [...]}``,
    the gaps as strings of milliseconds (JSON keys)."""
    out: dict[str, Any] = {"rows": {k: {} for k in KINDS}, "errors": [], "size": SIZE}
    server = _spawn("echo-server", script=__file__)
    client = None
    try:
        hello = _line(server, STARTUP_LIMIT)
        imported = bool(hello["modelnet_imported"])
        client = _spawn("echo-client", hello["addr"], script=__file__)
        imported = bool(_line(client, STARTUP_LIMIT)["modelnet_imported"]) or imported
        out["modelnet_imported"] = imported
        assert client.proc.stdin is not None
        for gap in gaps_ms:
            for kind in KINDS:
                client.proc.stdin.write(f"{kind} {requests} {gap}\n")
                client.proc.stdin.flush()
                answer = _line(client, TRANSFER_LIMIT + 10)
                if "error" in answer:
                    out["errors"].append(f"{kind} at {gap:g} ms: {answer['error']}")
                else:
                    out["rows"][kind][f"{gap:g}"] = answer
    except Exception as exc:
        out["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
    finally:
        for child in (client, server):
            if child is not None:
                _stop(child)
    return out


def lines(result: dict[str, Any]) -> list[str]:
    """The table as printable lines: a row per kind, p50 / p99 in ms at every gap."""
    gaps = sorted({g for row in result["rows"].values() for g in row}, key=float)
    head = f"  {'exchange of ' + str(result['size']) + ' B each way':<38}" + "".join(
        f"{'gap ' + g + ' ms: p50 / p99':>26}" for g in gaps
    )
    out = [head]
    for kind in KINDS:
        row = result["rows"][kind]
        cells = "".join(
            f"{row[g]['p50_ms']:>17.2f} / {row[g]['p99_ms']:<6.2f}" if g in row else f"{'-':>26}"
            for g in gaps
        )
        out.append(f"  {LABELS[kind]:<38}{cells}")
    out.append(f"  (imports modelnet: {result.get('modelnet_imported')})")
    out.extend(f"  error: {e}" for e in result["errors"][:3])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--role", choices=["echo-server", "echo-client"], help=argparse.SUPPRESS)
    ap.add_argument("--addr", default="", help=argparse.SUPPRESS)
    ap.add_argument("--requests", type=int, default=300, help="exchanges per kind and gap (default 300)")
    ap.add_argument("--gaps", default="0,3,10", help="idle ms between two exchanges (default 0,3,10)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead")
    args = ap.parse_args()
    if args.role == "echo-server":
        trio.run(_server)
        return 0
    if args.role == "echo-client":
        trio.run(_client, args.addr)
        return 0
    result = measure(args.requests, tuple(float(g) for g in args.gaps.split(",")))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"round trips with no modelnet, {args.requests} exchanges per kind and gap")
        print("\n".join(lines(result)))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

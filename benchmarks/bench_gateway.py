"""Gateway benchmark: streamed chat through gateway -> mesh -> peer, beside direct servers, in one run.

Usage::

    python benchmarks/bench_gateway.py [--quick] [--json FILE]

The same model handler (an async generator that streams tokens) is served four ways:

* **mesh**: client -> gateway process (a peer, ``modelnet_p2p.openai.app``: starlette on
  hypercorn's trio worker) -> provider process (a peer serving the handler) over
  ``/modelnet/infer/1.0.0`` (TCP, Noise, yamux);
* **direct**: client -> one process running the gateway's own HTTP code with the handler
  called in-process: the same server with no mesh. The issue's goals are against it;
* **heavy**: client -> starlette on uvicorn, each token a whole ``chat.completion.chunk``
  JSON-encoded and written on its own, the way vLLM's server does it;
* **bare**: client -> a peer with the smallest starlette app that streams from the same
  provider over the mesh (no auth, routing, catalog or metrics), to show what the gateway
  itself costs beside the mesh hop.

The client (this process) streams ``POST /v1/chat/completions`` with httpx under trio and
parses every SSE event. Measurements, each taking the paths in turns request by request
(or round by round) so that drift hits all alike:

1. ``fast``: 256 tokens as fast as the handler yields them: the mesh's whole cost;
2. ``paced``: 128 tokens at 5 ms each (200 tokens/s, a fast real model);
3. ``concurrent``: 16 streams at once of the fast handler, each making ``SUSTAINED_EACH``
   requests in a row, total tokens/s (best round: the goal's figure); and one burst of 16
   requests at once (each stream's start: new HTTP requests, new mesh requests), shown beside it;
4. CPU ms per fast request in each process (``/proc``), serial and in the best concurrent
   round (with the cores busy in all, and the tokens/s ratio the CPU would allow were the
   cores the limit), and the gateway's memory: RSS growth per concurrent stream, and what
   serial requests leave behind; ``--pin`` gives the HTTP servers a core of their own;
5. the floor (``stock_rtt.py``): a small exchange between two stock py-libp2p processes that
   never import modelnet, on one open stream and on a new stream each, and over raw TCP.
   Any gateway hop on this stack costs at least one such round trip, so "direct + one stock
   round trip" bounds what the mesh path can reach; the bound is printed as a ratio too.

It ends with the issue's goals, each with the figure of this run and ``met`` or ``MISSED``.
``--json FILE`` writes every figure as JSON, so that runs can be compared. Everything
listens on 127.0.0.1. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stock_rtt

HOST = "127.0.0.1"
#: Model name -> seconds between two tokens.
MODELS = {"bench-fast": 0.0, "bench-paced": 0.005}
#: Seconds a child process may take to print its ready line.
STARTUP_LIMIT = 60.0
#: Seconds one request may take.
REQUEST_LIMIT = 60.0
#: Requests each of the 16 concurrent streams makes in a row (the goal's measure: a steady
#: load; a single burst of 16 requests, also shown, is mostly their starts).
SUSTAINED_EACH = 16
#: Concurrent streams of the memory measurement (RSS moves in pages: many streams show more).
MEMORY_STREAMS = 64


# -- the model handler (the same on every path) --------------------------------------------------


async def bench_handler(request: Any) -> AsyncIterator[str]:
    """Streams ``max_tokens`` tokens (the OpenAI field), as fast as its model name says."""
    n = int(request.params.get("max_tokens", 256))
    delay = MODELS[request.capability.name]
    for i in range(n):
        if delay:
            await trio.sleep(delay)
        yield f" tok{i}"
    request.usage.update(prompt_tokens=8, completion_tokens=n, tokens=n)


def _capability(name: str) -> Any:
    from modelnet_p2p import Capability

    return Capability(name=name, task="chat", description="benchmark token streamer")


def _routes(provider: str) -> list[Any]:
    from modelnet_p2p.openai.app import ModelRoute

    return [ModelRoute(name=name, tasks=("chat",), providers=(provider,)) for name in MODELS]


async def _wait_for_stdin_eof() -> None:
    async with trio.lowlevel.FdStream(os.dup(sys.stdin.fileno())) as pipe:
        while await pipe.receive_some(4096):
            pass


def _ready(**data: Any) -> None:
    print(json.dumps(data), flush=True)


# -- child processes -------------------------------------------------------------------------------


async def _provider() -> None:
    from modelnet_p2p import Peer

    limits: dict[str, Any] = {"max_concurrency": 1024, "max_concurrency_per_peer": 1024}
    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"], **limits) as peer:
        for name in MODELS:
            peer.serve(_capability(name), bench_handler)
        _ready(addr=peer.addrs[0])
        await _wait_for_stdin_eof()


async def _gateway(provider: str) -> None:
    from modelnet_p2p import Peer
    from modelnet_p2p.openai.app import Gateway

    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"]) as peer:
        await peer.connect(provider)
        gateway = Gateway(peer, models=_routes(provider))
        binds = await peer.nursery.start(gateway.serve, f"{HOST}:0")
        _ready(url=binds[0])
        await _wait_for_stdin_eof()


@dataclass
class _LocalInfo:
    """The part of ``stream.info`` the gateway reads."""

    peer: str = "local"
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    attempts: list[dict[str, Any]] = field(default_factory=lambda: [{"peer": "local", "status": "ok"}])


class _LocalStream:
    """What ``MeshClient.stream`` returns, for a handler called in this process."""

    def __init__(self, capability: str, input: Any, params: dict[str, Any], timeout: float | None) -> None:
        self.info = _LocalInfo()
        self._agen = self._run(capability, input, params, timeout)

    async def _run(
        self, capability: str, input: Any, params: dict[str, Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        from modelnet_p2p import InferenceRequest

        deadline = trio.current_time() + (timeout or REQUEST_LIMIT)
        request = InferenceRequest(
            request_id=os.urandom(16),
            capability=_capability(capability),
            input=input,
            params=params,
            deadline=deadline,
            remote_peer="local",
            cancel_scope=trio.CancelScope(deadline=deadline),
        )
        agen = bench_handler(request)
        try:
            async for chunk in agen:
                yield chunk
        finally:
            await agen.aclose()  # type: ignore[attr-defined]
        self.info.finish_reason = request.finish_reason
        self.info.usage = dict(request.usage)

    def __aiter__(self) -> _LocalStream:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    async def batches(self) -> AsyncIterator[list[Any]]:
        """As ``InferenceStream.batches``: a handler in this process gives one chunk at a time."""
        async for chunk in self._agen:
            yield [chunk]

    async def aclose(self) -> None:
        await self._agen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> _LocalStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _LocalClient:
    """Just enough of a ``MeshClient`` for the gateway: every request runs the handler in-process."""

    def stream(
        self,
        capability: str,
        input: Any = None,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        **routing: Any,
    ) -> _LocalStream:
        return _LocalStream(capability, input, dict(params or {}), timeout)


class _LocalServer:
    """What the gateway's metrics read of a peer's inference server."""

    in_flight = 0
    on_request_done: Any = None


class _LocalPeer:
    """Just enough of a Peer for the gateway, with a local client in place of the mesh."""

    peer_id = "local"
    network = "local"

    def __init__(self, nursery: trio.Nursery) -> None:
        from modelnet_p2p.p2p.pool import StreamPool

        self.nursery = nursery
        self.mesh_client = _LocalClient()
        self.inference = _LocalServer()
        self.stream_pool = StreamPool()


async def _direct() -> None:
    from modelnet_p2p.openai.app import Gateway

    async with trio.open_nursery() as nursery:
        peer: Any = _LocalPeer(nursery)
        gateway = Gateway(peer, models=_routes("local"))
        binds = await nursery.start(gateway.serve, f"{HOST}:0")
        _ready(url=binds[0])
        await _wait_for_stdin_eof()
        nursery.cancel_scope.cancel()


async def _bare(provider: str) -> None:
    """A peer with the smallest starlette app that streams from the provider over the mesh:
    no auth, routing, catalog, metrics or failover; the gateway's event writer."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from modelnet_p2p import Peer
    from modelnet_p2p.openai.app import Gateway
    from modelnet_p2p.openai.calls import Outcome
    from modelnet_p2p.openai.sse import EventStream
    from modelnet_p2p.openai.translate import ChatFrames

    async with Peer(listen=[f"/ip4/{HOST}/tcp/0"]) as peer:
        await peer.connect(provider)

        async def chat(request: Request) -> Response:
            body = json.loads(await request.body())
            model = body["model"]
            params = {"max_tokens": body.get("max_tokens", 256)}
            stream = peer.mesh_client.stream(model, body["messages"], params=params, target=provider)
            outcome = Outcome()

            async def rest() -> AsyncIterator[list[Any]]:
                async with stream:
                    async for batch in stream.batches():
                        outcome.chunks += len(batch)
                        yield batch
                outcome.finish_reason, outcome.usage = stream.info.finish_reason, stream.info.usage

            chunks = rest()
            first = await chunks.__anext__()
            frames = ChatFrames("chatcmpl-" + os.urandom(12).hex(), int(time.time()), model, False)
            return EventStream(chunks, outcome, first, frames, {"cache-control": "no-cache"})  # type: ignore[arg-type]

        # served the way the gateway serves (hypercorn's trio worker, the same settings)
        gateway = Gateway(peer, models=_routes(provider))
        gateway.app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
        binds = await peer.nursery.start(gateway.serve, f"{HOST}:0")
        _ready(url=binds[0])
        await _wait_for_stdin_eof()


def _heavy() -> None:
    """A direct server as vLLM's is built: starlette on uvicorn (asyncio), each token one
    ``chat.completion.chunk`` object JSON-encoded whole, one write per event."""
    import asyncio
    import socket
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        model, n = body["model"], int(body.get("max_tokens", 256))
        delay = MODELS[model]
        cid, created = "chatcmpl-" + os.urandom(12).hex(), int(time.time())

        def event(delta: dict[str, Any], finish: str | None) -> str:
            chunk = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }
            return f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"

        async def events() -> AsyncIterator[str]:
            yield event({"role": "assistant", "content": ""}, None)
            for i in range(n):
                if delay:
                    await asyncio.sleep(delay)
                yield event({"content": f" tok{i}"}, None)
            yield event({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets whose proto says TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    sock.listen(1024)
    config = uvicorn.Config(
        app, loop="asyncio", http="h11", lifespan="off", log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)

    def watch_stdin() -> None:
        sys.stdin.read()
        server.should_exit = True

    threading.Thread(target=watch_stdin, daemon=True).start()
    _ready(url=f"http://{HOST}:{sock.getsockname()[1]}")
    asyncio.run(server.serve(sockets=[sock]))


# -- the client ------------------------------------------------------------------------------------

#: The paths, in the order the tables show them: the project's, then what it is measured against.
PATHS = {
    "mesh": "client -> gateway process -> provider process (the project's path)",
    "direct": "client -> one process: the gateway's HTTP code, the handler in-process (the goals' baseline)",
    "heavy": "client -> starlette on uvicorn, each token JSON-encoded whole as vLLM does (a second baseline)",
    "bare": "client -> a peer with a minimal starlette app streaming from the provider (the gateway's share)",
}
#: (key, label, goal, compare): the issue's goals, each against the direct server.
GOALS = [
    ("fast_total_ratio", "gateway, fast stream, total time vs direct", "<= 1.2x", lambda v: v <= 1.2),
    ("first_token_gap_ms", "gateway, first token vs direct", "<= +2 ms", lambda v: v <= 2.0),
    (
        "concurrent_tps_ratio",
        "gateway, 16 concurrent streams, tokens/s vs direct",
        ">= 0.8x",
        lambda v: v >= 0.8,
    ),
]


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[str]
    ready: dict[str, Any]


def _spawn(role: str, *args: str) -> Child:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--role", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = _read_line(proc.stdout, STARTUP_LIMIT)
    if not line:
        proc.kill()
        raise RuntimeError(f"{role} exited before it was ready (code {proc.poll()})")
    return Child(role, proc, json.loads(line))


def _read_line(stream: IO[str], limit: float) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    if not sel.select(limit):
        raise RuntimeError(f"no ready line within {limit} s")
    return stream.readline()


def _stop(children: list[Child]) -> None:
    for child in children:
        if child.proc.stdin is not None:
            child.proc.stdin.close()
    for child in children:
        try:
            child.proc.wait(10)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _cpu_row(children: Sequence[Child], before: list[float], mine: float, requests: int) -> dict[str, float]:
    """CPU ms per request in each of ``children`` since ``before`` and in this client since ``mine``."""
    after = [_cpu_seconds(c.proc.pid) for c in children]
    row = {c.role: 1000 * (a - b) / requests for c, a, b in zip(children, after, before, strict=True)}
    row["client"] = 1000 * (time.process_time() - mine) / requests
    return row


def _preempted() -> int:
    """How often the kernel has taken this process's core from it (nonvoluntary switches)."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches"))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Sample:
    ttft: float
    total: float
    tokens: int


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)

    def p90(self, attr: str) -> float:
        values = sorted(getattr(s, attr) for s in self.samples)
        return values[min(len(values) - 1, int(0.9 * len(values)))]

    def tokens_per_s(self) -> float:
        return statistics.median(s.tokens / s.total for s in self.samples)

    def summary(self) -> dict[str, float]:
        return {
            "requests": len(self.samples),
            "first_token_ms": 1000 * self.median("ttft"),
            "total_ms": 1000 * self.median("total"),
            "total_p90_ms": 1000 * self.p90("total"),
            "tokens_per_s": self.tokens_per_s(),
        }


async def _stream_once(http: Any, url: str, model: str, n: int) -> Sample:
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": n}
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    with trio.fail_after(REQUEST_LIMIT):
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    continue  # read on to the end, as the openai client does: httpx keeps the connection
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    if not tokens:
                        first = time.perf_counter() - started
                    tokens += 1
    if tokens != n:
        raise RuntimeError(f"{url}: {tokens} tokens, {n} asked")
    return Sample(first, time.perf_counter() - started, tokens)


async def _alternate(
    http: Any, urls: dict[str, str], model: str, n: int, requests: int, warmup: int
) -> dict[str, Series]:
    """``requests`` requests per path, the paths taking turns (in reversed order every other round)."""
    series = {path: Series() for path in urls}
    for i in range(warmup + requests):
        order = list(urls) if i % 2 == 0 else list(reversed(list(urls)))
        for path in order:
            sample = await _stream_once(http, urls[path], model, n)
            if i >= warmup:
                series[path].samples.append(sample)
    return series


async def _concurrent_round(
    http: Any, url: str, n: int, streams: int, each: int = 1, children: Sequence[Child] = ()
) -> tuple[float, dict[str, Any]]:
    """Total tokens/s of ``streams`` streams at once, each making ``each`` requests in a row
    (1: one burst of ``streams`` requests, which the start of each request dominates), and
    (with ``children``) the round's CPU: ``ms``, ms per request in each of them and in this
    client; the cores busy in all and in the client; the client's preemptions per request."""
    total = 0
    before = [_cpu_seconds(c.proc.pid) for c in children]
    mine, preempted = time.process_time(), _preempted()

    async def one() -> None:
        nonlocal total
        for _ in range(each):
            sample = await _stream_once(http, url, "bench-fast", n)  # not `total += await ...`: racy
            total += sample.tokens

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    wall = time.perf_counter() - started
    if not children:
        return total / wall, {}
    requests = streams * each
    ms = _cpu_row(children, before, mine, requests)
    busy = requests / 1000 / wall  # CPU ms per request -> cores busy
    return total / wall, {
        "ms": ms,
        "cores_busy": sum(ms.values()) * busy,
        "client_busy": ms["client"] * busy,
        "client_preempted_per_request": (_preempted() - preempted) / requests,
    }


async def _concurrent(
    http: Any,
    urls: dict[str, str],
    n: int,
    streams: int,
    rounds: int,
    each: int = 1,
    procs: dict[str, list[Child]] | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Best total tokens/s per path over ``rounds`` rounds, the paths taking turns, and (with
    ``procs``) each path's CPU in its best round (:func:`_concurrent_round`)."""
    best = dict.fromkeys(urls, 0.0)
    cpu: dict[str, dict[str, Any]] = {}
    for i in range(rounds):
        for path in list(urls) if i % 2 == 0 else list(reversed(list(urls))):
            children = procs[path] if procs else ()
            tps, round_cpu = await _concurrent_round(http, urls[path], n, streams, each, children)
            if tps > best[path]:
                best[path] = tps
                if round_cpu:
                    cpu[path] = round_cpu
    return best, cpu


async def _cpu_per_request(
    http: Any, urls: dict[str, str], procs: dict[str, list[Child]], requests: int
) -> dict[str, dict[str, float]]:
    """CPU ms per fast request in each server process of each path, and in this client."""
    out: dict[str, dict[str, float]] = {}
    for path, url in urls.items():
        children = procs[path]
        before = [_cpu_seconds(c.proc.pid) for c in children]
        mine = time.process_time()
        for _ in range(requests):
            await _stream_once(http, url, "bench-fast", 256)
        out[path] = _cpu_row(children, before, mine, requests)
    return out


async def _memory(http: Any, url: str, pid: int, n: int, streams: int, serial: int) -> dict[str, float]:
    """The gateway's RSS: growth per concurrent stream (peak over idle), and what ``serial``
    more requests leave behind."""
    idle = _rss_kib(pid)
    peak = idle
    done = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_kib(pid))
            await trio.sleep(0.002)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        await _concurrent_round(http, url, n, streams)
        done.set()
    before = _rss_kib(pid)
    for _ in range(serial):
        await _stream_once(http, url, "bench-fast", n)
    after = _rss_kib(pid)
    return {
        "rss_idle_mib": idle / 1024,
        "rss_peak_mib": peak / 1024,
        "concurrent_streams": streams,
        "kib_per_concurrent_stream": (peak - idle) / streams,
        "retained_kib_per_request": (after - before) / serial,
        "serial_requests": serial,
    }


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def _measure(urls: dict[str, str], procs: dict[str, list[Child]], quick: bool) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    result: dict[str, Any] = {"load_before": _load()}
    async with httpx.AsyncClient(timeout=REQUEST_LIMIT, limits=limits) as http:
        fast = await _alternate(http, urls, "bench-fast", 256, 40 if quick else 200, 5 if quick else 20)
        paced = await _alternate(http, urls, "bench-paced", 128, 4 if quick else 20, 1 if quick else 3)
        burst, _ = await _concurrent(http, urls, 256, 16, 2 if quick else 5)
        conc, conc_cpu = await _concurrent(http, urls, 256, 16, 3 if quick else 5, SUSTAINED_EACH, procs)
        cpu = await _cpu_per_request(http, urls, procs, 50 if quick else 200)
        gateway_pid = procs["mesh"][-1].proc.pid
        memory = await _memory(http, urls["mesh"], gateway_pid, 256, MEMORY_STREAMS, 100 if quick else 500)
    result["load_after"] = _load()
    result["fast"] = {p: s.summary() for p, s in fast.items()}
    result["paced"] = {p: s.summary() for p, s in paced.items()}
    result["concurrent_tokens_per_s"] = conc
    result["burst_tokens_per_s"] = burst
    result["concurrent_cpu"] = conc_cpu
    # Were the cores the limit, the ratio of tokens/s would be the inverse ratio of CPU per request.
    result["concurrent_cpu_bound_ratio"] = sum(conc_cpu["direct"]["ms"].values()) / sum(
        conc_cpu["mesh"]["ms"].values()
    )
    result["cpu_ms_per_request"] = cpu
    result["gateway_memory"] = memory
    f = result["fast"]
    result["floor"] = floor = await trio.to_thread.run_sync(_floor, 200 if quick else 500)
    direct_ms = f["direct"]["total_ms"]
    result["floor_bound_total_ratio"] = {
        gap: (direct_ms + row["p50_ms"]) / direct_ms for gap, row in floor["rows"]["open"].items()
    }
    result["goals"] = {
        "fast_total_ratio": f["mesh"]["total_ms"] / direct_ms,
        "first_token_gap_ms": f["mesh"]["first_token_ms"] - f["direct"]["first_token_ms"],
        "concurrent_tps_ratio": conc["mesh"] / conc["direct"],
    }
    return result


def _floor(requests: int) -> dict[str, Any]:
    """:func:`stock_rtt.measure`, its processes free of any ``--pin`` (they inherit this thread's)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    return stock_rtt.measure(requests)


def _pin(children: list[Child]) -> str:
    """``--pin``: this client and the provider on the first core, every HTTP server (the gateway,
    the direct server, ...) on the second, so that each path's server has a core of its own."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return "not pinned (needs 2 cores and sched_setaffinity)"
    os.sched_setaffinity(0, {0})
    for child in children:
        os.sched_setaffinity(child.proc.pid, {0} if child.role == "provider" else {1})
    return "pinned: the client and the provider on core 0, each HTTP server on core 1"


def _report(r: dict[str, Any], quick: bool) -> None:
    paths = list(r["fast"])
    print(f"\nmodelnet_p2p gateway benchmark{' (--quick)' if quick else ''}")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, hypercorn {_version('hypercorn')}, "
        f"uvicorn {_version('uvicorn')}, starlette {_version('starlette')}, httpx {_version('httpx')}, "
        f"libp2p {_version('libp2p')}; load average before {r['load_before']}, after {r['load_after']}"
    )
    if r.get("pinned"):
        print(f"  {r['pinned']}")
    for path in paths:
        print(f"  {path:<7} {PATHS[path]}")
    header = (
        f"{'':<24}" + "".join(f"{p:>10}" for p in paths) + "".join(f"{'mesh/' + p:>13}" for p in paths[1:])
    )
    for title, key in (("fast: 256 tokens, no delay", "fast"), ("paced: 128 tokens, 5 ms each", "paced")):
        t = r[key]
        print(f"\n{title} ({t['mesh']['requests']} requests per path, the paths taking turns)")
        print(header)
        for label, field_, unit in (
            ("first token, median", "first_token_ms", "ms"),
            ("total, median", "total_ms", "ms"),
            ("total, p90", "total_p90_ms", "ms"),
            ("tokens/s per stream", "tokens_per_s", ""),
        ):
            values = [t[p][field_] for p in paths]
            cells = "".join(f"{v:>8.1f}{unit:<2}" for v in values)
            ratios = "".join(f"{values[0] / v:>12.2f}x" for v in values[1:])
            print(f"  {label:<22}{cells}{ratios}")
    conc, burst = r["concurrent_tokens_per_s"], r["burst_tokens_per_s"]
    for title, t in (
        (f"concurrent: 16 streams at once, each {SUSTAINED_EACH} requests of 256 tokens in a row", conc),
        ("one burst: 16 requests of 256 tokens at once", burst),
    ):
        print(f"\n{title}, total tokens/s (best round)")
        print(
            "  "
            + ", ".join(f"{p} {t[p]:.0f}" for p in paths)
            + "; mesh/"
            + ", mesh/".join(f"{p} {t['mesh'] / t[p]:.2f}x" for p in paths[1:])
        )
    print("\nCPU ms per request in the best round of 16 concurrent streams, by process")
    cc = r["concurrent_cpu"]
    for path, row in cc.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["ms"].items())
        print(
            f"  {path:<7} {parts}; in all {sum(row['ms'].values()):.2f}, cores busy {row['cores_busy']:.2f} "
            f"(the client {row['client_busy']:.2f})"
        )
    print(
        f"  direct/mesh CPU per request {r['concurrent_cpu_bound_ratio']:.2f}x: the tokens/s ratio "
        f"were the {os.cpu_count()} cores the limit"
    )
    client_ratio = cc["direct"]["ms"]["client"] / cc["mesh"]["ms"]["client"]
    print(
        f"  direct/mesh client CPU per request {client_ratio:.2f}x: "
        "the tokens/s ratio were this one-process client the limit (it keeps "
        f"mesh {cc['mesh']['client_busy']:.2f}, direct {cc['direct']['client_busy']:.2f} of a core busy)"
    )
    print(
        "  the client loses its core to another process "
        + ", ".join(f"{p} {row['client_preempted_per_request']:.1f}" for p, row in cc.items())
        + " times per request"
    )
    print("\nCPU ms per fast request (256 tokens), by process (serial requests)")
    for path, row in r["cpu_ms_per_request"].items():
        servers = sum(v for k, v in row.items() if k != "client")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row.items())
        print(f"  {path:<7} {parts}; servers in all {servers:.2f}")
    m = r["gateway_memory"]
    print(
        f"\ngateway memory: RSS {m['rss_idle_mib']:.0f} MiB idle, "
        f"+{m['kib_per_concurrent_stream']:.1f} KiB per concurrent stream (peak of "
        f"{m['concurrent_streams']}), "
        f"{m['retained_kib_per_request']:+.1f} KiB retained per request over "
        f"{m['serial_requests']} more"
    )
    print("\ngoals (each against the direct server, measured in this run)")
    for key, label, goal, ok in GOALS:
        value = r["goals"][key]
        shown = f"{value:+.1f} ms" if key.endswith("_ms") else f"{value:.2f}x"
        print(f"  {label:<52}{shown:>10}  goal {goal:<9} {'met' if ok(value) else 'MISSED'}")
    heavy = r["fast"].get("heavy")
    if heavy is not None:
        f = r["fast"]
        print(
            f"  (against the heavy server: total {f['mesh']['total_ms'] / heavy['total_ms']:.2f}x, "
            "first token "
            f"{f['mesh']['first_token_ms'] - heavy['first_token_ms']:+.1f} ms, 16 streams "
            f"{conc['mesh'] / conc['heavy']:.2f}x)"
        )
    _report_floor(r)


def _report_floor(r: dict[str, Any]) -> None:
    """The stock round trips, and the total time the mesh path could reach over them."""
    floor, f = r["floor"], r["fast"]
    print("\nfloor: the same exchange with no modelnet, two stock processes (stock_rtt.py)")
    print("\n".join(stock_rtt.lines(floor)))
    # The paths take turns request by request: a path idles while the others run theirs.
    idle = sum(f[p]["total_ms"] for p in f if p != "mesh")
    direct = f["direct"]["total_ms"]
    for gap, ratio in r["floor_bound_total_ratio"].items():
        rtt = floor["rows"]["open"][gap]["p50_ms"]
        print(
            f"  direct total {direct:.2f} ms + one stock round trip at gap {gap} ms ({rtt:.2f}) = "
            f"{ratio:.2f}x direct: the least total ratio a hop on this stack allows"
        )
    print(f"  (here the mesh path idles about {idle:.0f} ms between its requests, while the others run)")


async def _client(
    urls: dict[str, str], procs: dict[str, list[Child]], quick: bool, as_json: str | None, pinned: str
) -> None:
    result = await _measure(urls, procs, quick)
    result["pinned"] = pinned
    result["goals_met"] = {key: bool(ok(result["goals"][key])) for key, _, _, ok in GOALS}
    result["quick"] = quick
    result["versions"] = {
        n: _version(n) for n in ("hypercorn", "uvicorn", "starlette", "httpx", "libp2p", "trio")
    }
    result["python"] = platform.python_version()
    result["cores"] = os.cpu_count()
    _report(result, quick)
    if as_json:
        text = json.dumps(result, indent=2, sort_keys=True)
        if as_json == "-":
            print(text)
        else:
            with open(as_json, "w") as f:
                f.write(text + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="less work, about 30 s")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE ('-': stdout)")
    parser.add_argument(
        "--extra",
        default="heavy,bare",
        help="paths measured beside mesh and direct, comma-separated (default: heavy,bare; '' for none)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the client and the provider on core 0, the HTTP servers on core 1 (each server's own core)",
    )
    parser.add_argument(
        "--role", choices=["provider", "gateway", "direct", "bare", "heavy"], help=argparse.SUPPRESS
    )
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    if args.role == "heavy":
        _heavy()
        return 0
    if args.role is not None:
        roles: dict[str, Any] = {"provider": _provider, "gateway": _gateway, "direct": _direct, "bare": _bare}
        fn = roles[args.role]
        trio.run(fn, *([args.provider] if args.role in ("gateway", "bare") else []))
        return 0
    paths = ["mesh", "direct", *(p for p in args.extra.split(",") if p)]
    children: list[Child] = []
    try:
        provider = _spawn("provider")
        children.append(provider)
        urls: dict[str, str] = {}
        procs: dict[str, list[Child]] = {}
        for path in paths:
            role = {"mesh": "gateway"}.get(path, path)
            args_ = ["--provider", provider.ready["addr"]] if role in ("gateway", "bare") else []
            child = _spawn(role, *args_)
            children.append(child)
            urls[path] = child.ready["url"]
            procs[path] = [provider, child] if role in ("gateway", "bare") else [child]
        pinned = _pin(children) if args.pin else ""
        trio.run(_client, urls, procs, args.quick, args.json, pinned)
    finally:
        _stop(children)
    return 0


if __name__ == "__main__":
    sys.exit(main())

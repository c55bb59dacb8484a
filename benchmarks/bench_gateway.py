"""Gateway benchmark: streamed chat through gateway → mesh → peer, beside a direct endpoint, in one run.

Usage::

    python benchmarks/bench_gateway.py [--quick]

Two paths serve the same model handler (an async generator that streams
tokens) behind the same OpenAI-compatible HTTP code (``modelnet_p2p.openai.app``:
starlette on hypercorn's trio worker, the same SSE rendering):

* **mesh**: client → gateway process (a peer) → provider process (a peer
  serving the handler) over ``/modelnet/infer/1.0.0`` (TCP, Noise, yamux);
* **direct**: client → one server process that calls the handler in-process,
  a plain single-server OpenAI-compatible endpoint with no mesh.

The client (this process) streams ``POST /v1/chat/completions`` with httpx under
trio and parses every SSE event. Three measurements, each alternating the
two paths request by request so that drift hits both alike:

1. ``fast``: 256 tokens as fast as the handler yields them: the mesh's whole
   cost, with nothing to hide it;
2. ``paced``: 128 tokens at 5 ms each (200 tokens/s, a fast real model);
3. ``concurrent``: 16 streams at once of the fast handler, total tokens/s.

For each it prints time to first token, total latency and tokens/s, and the
ratios mesh / direct: the latency ratio (median total latency) and the
tokens/s ratio. Target: the mesh path costs under 20% more than the direct one.
Everything listens on 127.0.0.1. Nothing here asserts on timings.
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import IO, Any

import trio

HOST = "127.0.0.1"
#: Model name → seconds between two tokens.
MODELS = {"bench-fast": 0.0, "bench-paced": 0.005}
#: Seconds a child process may take to print its ready line.
STARTUP_LIMIT = 60.0
#: Seconds one request may take.
REQUEST_LIMIT = 60.0


# -- the model handler (the same on both paths) --------------------------------------------------


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

    limits = {"max_concurrency": 1024, "max_concurrency_per_peer": 1024}
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


class _LocalPeer:
    """Just enough of a Peer for the gateway, with a local client in place of the mesh."""

    peer_id = "local"
    network = "local"

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.mesh_client = _LocalClient()


async def _direct() -> None:
    from modelnet_p2p.openai.app import Gateway

    async with trio.open_nursery() as nursery:
        peer: Any = _LocalPeer(nursery)
        gateway = Gateway(peer, models=_routes("local"))
        binds = await nursery.start(gateway.serve, f"{HOST}:0")
        _ready(url=binds[0])
        await _wait_for_stdin_eof()
        nursery.cancel_scope.cancel()


# -- the client ------------------------------------------------------------------------------------


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
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    if not tokens:
                        first = time.perf_counter() - started
                    tokens += 1
    return Sample(first, time.perf_counter() - started, tokens)


async def _alternate(
    http: Any, urls: dict[str, str], model: str, n: int, requests: int, warmup: int
) -> dict[str, Series]:
    series = {path: Series() for path in urls}
    for i in range(warmup + requests):
        order = list(urls) if i % 2 == 0 else list(reversed(list(urls)))
        for path in order:
            sample = await _stream_once(http, urls[path], model, n)
            if i >= warmup:
                series[path].samples.append(sample)
    return series


async def _concurrent(http: Any, url: str, n: int, streams: int, rounds: int) -> float:
    """Total tokens/s with ``streams`` streams at once, best of ``rounds``."""
    best = 0.0
    for _ in range(rounds):
        total = 0
        started = time.perf_counter()

        async def one() -> None:
            nonlocal total
            sample = await _stream_once(http, url, "bench-fast", n)
            total += sample.tokens

        async with trio.open_nursery() as nursery:
            for _ in range(streams):
                nursery.start_soon(one)
        best = max(best, total / (time.perf_counter() - started))
    return best


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "-"


async def _client(urls: dict[str, str], quick: bool) -> None:
    import httpx

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=REQUEST_LIMIT, limits=limits) as http:
        fast = await _alternate(http, urls, "bench-fast", 256, 40 if quick else 200, 5 if quick else 20)
        paced = await _alternate(http, urls, "bench-paced", 128, 5 if quick else 20, 1 if quick else 3)
        conc = {p: await _concurrent(http, u, 256, 16, 2 if quick else 5) for p, u in urls.items()}

    print(f"\nmodelnet_p2p gateway benchmark{' (--quick)' if quick else ''}")
    print(
        f"python {platform.python_version()}, {os.cpu_count()} cores, hypercorn {_version('hypercorn')}, "
        f"starlette {_version('starlette')}, httpx {_version('httpx')}, libp2p {_version('libp2p')}"
    )
    print("mesh: client -> gateway process -> provider process; direct: client -> one server process\n")
    header = f"{'':<24}{'mesh':>12}{'direct':>12}{'mesh/direct':>14}"
    for title, series in (("fast: 256 tokens, no delay", fast), ("paced: 128 tokens, 5 ms each", paced)):
        print(title + f" ({len(series['mesh'].samples)} requests per path)")
        print(header)
        m, d = series["mesh"], series["direct"]
        rows = [
            ("first token, median", m.median("ttft") * 1000, d.median("ttft") * 1000, "ms"),
            ("total, median", m.median("total") * 1000, d.median("total") * 1000, "ms"),
            ("total, p90", m.p90("total") * 1000, d.p90("total") * 1000, "ms"),
            ("tokens/s per stream", m.tokens_per_s(), d.tokens_per_s(), ""),
        ]
        for label, a, b, unit in rows:
            print(f"  {label:<22}{a:>10.1f}{unit:>2}{b:>10.1f}{unit:>2}{a / b:>13.2f}x")
        latency_ratio = m.median("total") / d.median("total")
        tps_ratio = m.tokens_per_s() / d.tokens_per_s()
        verdict = "within" if latency_ratio < 1.2 else "over"
        print(
            f"  => latency ratio {latency_ratio:.2f}, tokens/s ratio {tps_ratio:.2f} "
            f"({verdict} the 20% target: mesh costs {100 * (latency_ratio - 1):+.0f}%)\n"
        )
    print("concurrent: 16 streams of 256 tokens at once, total tokens/s (best round)")
    ratio = conc["mesh"] / conc["direct"]
    print(f"  mesh {conc['mesh']:.0f}, direct {conc['direct']:.0f}, ratio {ratio:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="less work, about 15 s")
    parser.add_argument("--role", choices=["provider", "gateway", "direct"], help=argparse.SUPPRESS)
    parser.add_argument("--provider", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from modelnet_p2p.log import quiet_libp2p

    quiet_libp2p()
    if args.role == "provider":
        trio.run(_provider)
        return 0
    if args.role == "gateway":
        trio.run(_gateway, args.provider)
        return 0
    if args.role == "direct":
        trio.run(_direct)
        return 0
    children: list[Child] = []
    try:
        provider = _spawn("provider")
        children.append(provider)
        gateway = _spawn("gateway", "--provider", provider.ready["addr"])
        children.append(gateway)
        direct = _spawn("direct")
        children.append(direct)
        trio.run(_client, {"mesh": gateway.ready["url"], "direct": direct.ready["url"]}, args.quick)
    finally:
        _stop(children)
    return 0


if __name__ == "__main__":
    sys.exit(main())

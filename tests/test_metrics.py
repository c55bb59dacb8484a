"""Prometheus metrics on any peer (issue 14): the collector over a peer's own counters, the
small ``/metrics`` server, ``--metrics-listen`` on ``modelnet bootstrap``, and the gateway's
series through ``prometheus_client``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from modelnet_p2p import Capability, InternalError
from modelnet_p2p.dashboard.metrics import MAX_REQUEST_HEAD, peer_registry, serve_metrics
from modelnet_p2p.errors import ConfigError
from modelnet_p2p.openai.metrics import Metrics
from modelnet_p2p.testing import open_peers

ROOT = Path(__file__).resolve().parent.parent


async def http_get(url: str, head: bytes | None = None) -> tuple[int, str]:
    """A GET over a plain trio socket: (status, body)."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head or f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode()


def count(got: dict[Any, float], name: str, **labels: str) -> float | None:
    return got.get((name, tuple(sorted(labels.items()))))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def chunks(request: Any) -> Any:
    yield from ("a", "b", "c")


def broken(request: Any) -> str:
    raise InternalError("no")


async def test_a_peer_serves_its_metrics() -> None:
    async with open_peers(2) as (caller, provider):
        provider.serve(Capability(name="three", task="text-generation"), chunks)
        provider.serve(Capability(name="broken"), broken)
        # served requests are counted from the first registry of the peer on
        registry = peer_registry(provider)
        for _ in range(3):
            assert (await caller.call(provider.addrs[0], "three", "x")).chunks == ["a", "b", "c"]
        with pytest.raises(InternalError):
            await caller.call(provider.addrs[0], "broken", "x")
        urls = await provider.nursery.start(partial(serve_metrics, registry, "127.0.0.1:0"))
        assert urls[0].startswith("http://127.0.0.1:") and urls[0].endswith("/metrics")
        # a second registry of the same peer counts the same requests (once, not twice)
        urls2 = await provider.nursery.start(partial(serve_metrics, peer_registry(provider), "127.0.0.1:0"))
        await caller.call(provider.addrs[0], "three", "x")
        await provider.discover(model="three", timeout=5)

        status, text = await http_get(urls[0])
        assert status == 200
        got = samples(text)
        assert count(got, "modelnet_inference_requests_total", capability="three", code="ok") == 4
        assert count(got, "modelnet_inference_requests_total", capability="broken", code="internal") == 1
        assert got[("modelnet_inference_chunks_total", (("capability", "three"),))] == 12
        assert got[("modelnet_inference_in_flight", ())] == 0
        assert got[("modelnet_capabilities_served", ())] == 2
        assert got[("modelnet_connections", (("kind", "open"),))] >= 1
        assert ("modelnet_gossip_records_accepted_total", ()) in got
        assert got[("modelnet_discovery_lookups_count", ())] >= 1
        assert got[("modelnet_discovery_lookups_sum", ())] > 0
        assert ("modelnet_connections_trimmed_total", ()) in got
        assert (
            samples((await http_get(urls2[0]))[1]).get(
                ("modelnet_inference_requests_total", (("capability", "three"), ("code", "ok")))
            )
            == 4
        )
        # the load figures the peer publishes still see the finished requests (the callback chains)
        assert provider.inference.on_request_done is not None

        # anything but GET /metrics, and oversized heads, are refused
        assert (await http_get(urls[0].replace("/metrics", "/other")))[0] == 404
        post = b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await http_get(urls[0], head=post))[0] == 405
        huge = b"GET /metrics HTTP/1.1\r\nX-Pad: " + b"a" * (MAX_REQUEST_HEAD + 10) + b"\r\n\r\n"
        assert (await http_get(urls[0], head=huge))[0] == 431

        with pytest.raises(ConfigError, match="HOST:PORT"):
            await provider.nursery.start(partial(serve_metrics, peer_registry(provider), "nonsense"))


async def test_the_gateway_series_through_prometheus_client() -> None:
    m = Metrics()
    m.done("/v1/chat/completions", 200, 0.02, None)
    m.done("/v1/models", 401, 0.001, "invalid_api_key")
    m.first_chunk_after("/v1/chat/completions", 0.004)
    m.chunks['/v1/x"y'] += 2
    m.failovers += 1
    got = samples(m.render({"modelnet_gateway_models": ("Models known now.", 2.0)}))
    chat = "/v1/chat/completions"
    assert count(got, "modelnet_gateway_requests_total", endpoint=chat, status="200") == 1
    assert count(got, "modelnet_gateway_errors_total", code="invalid_api_key", endpoint="/v1/models") == 1
    assert count(got, "modelnet_gateway_first_chunk_seconds_bucket", endpoint=chat, le="0.005") == 1
    assert got[("modelnet_gateway_chunks_total", (("endpoint", '/v1/x"y'),))] == 2
    assert got[("modelnet_gateway_failovers_total", ())] == 1
    assert got[("modelnet_gateway_models", ())] == 2
    # the gauges belong to one render only
    assert ("modelnet_gateway_models", ()) not in samples(m.render())


def test_bootstrap_serves_metrics_with_metrics_listen(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    env.pop("MODELNET_METRICS_LISTEN", None)
    cmd = [
        sys.executable, "-m", "modelnet_p2p.cli", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0",
        "--metrics-listen", "127.0.0.1:0", "--json", "--exit-on-stdin-eof",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        events: dict[str, Any] = {}
        for line in proc.stdout:
            event = json.loads(line)
            events[event["event"]] = event
            if event["event"] == "ready":
                break
        assert "metrics" in events, events
        url = events["metrics"]["urls"][0]
        status, text = trio.run(http_get, url)
        assert status == 200
        assert ("modelnet_connections", (("kind", "open"),)) in samples(text)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""

"""The gateway's counters, exposed with ``prometheus_client`` (text format version 0.0.4).

Bookkeeping: the app calls :meth:`Metrics.done` once per answered request (a stream:
when its last byte went out), :meth:`Metrics.first_chunk_after` on a request's first
chunk, counts ``chunks``, ``failovers`` and ``in_flight`` in place, and serves
:meth:`Metrics.render` on ``/metrics``. The counters stay plain Python values (tests
and the caller read them); a collector turns them into series at scrape time, and the
histograms are ``prometheus_client`` histograms of the gateway's own registry.

Series: ``modelnet_gateway_requests_total{endpoint,status}``,
``modelnet_gateway_errors_total{endpoint,code}``, the histograms
``modelnet_gateway_request_duration_seconds{endpoint}`` and
``modelnet_gateway_first_chunk_seconds{endpoint}``,
``modelnet_gateway_chunks_total{endpoint}``, ``modelnet_gateway_failovers_total``,
``modelnet_gateway_in_flight``, plus the gauges the caller passes to :meth:`Metrics.render`.
With a peer (``Metrics(peer=...)``) the peer's own series are added
(:class:`~modelnet_p2p.dashboard.metrics.PeerCollector`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..dashboard.metrics import CONTENT_TYPE, PeerCollector

if TYPE_CHECKING:
    from ..peer import Peer

__all__ = ["BUCKETS", "CONTENT_TYPE", "Metrics"]

#: Histogram bucket bounds, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _Counters:
    """The collector of :class:`Metrics`' plain counters and of the gauges of one render."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.gauges: Mapping[str, tuple[str, float]] = {}

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "modelnet_gateway_requests", "HTTP requests answered, by endpoint and status.",
            labels=["endpoint", "status"],
        )  # fmt: skip
        for (endpoint, status), n in sorted(m.requests.items()):
            requests.add_metric([endpoint, status], n)
        yield requests
        errors = CounterMetricFamily(
            "modelnet_gateway_errors", "Requests that failed, by endpoint and error code.",
            labels=["endpoint", "code"],
        )  # fmt: skip
        for (endpoint, code), n in sorted(m.errors.items()):
            errors.add_metric([endpoint, code], n)
        yield errors
        chunks = CounterMetricFamily(
            "modelnet_gateway_chunks", "Chunks received from the mesh, by endpoint.", labels=["endpoint"]
        )
        for endpoint, n in sorted(m.chunks.items()):
            chunks.add_metric([endpoint], n)
        yield chunks
        yield CounterMetricFamily(
            "modelnet_gateway_failovers", "Requests moved to another provider.", value=m.failovers
        )
        yield GaugeMetricFamily(
            "modelnet_gateway_in_flight", "Requests being answered now.", value=m.in_flight
        )
        for name, (text, value) in self.gauges.items():
            yield GaugeMetricFamily(name, text, value=value)


class Metrics:
    """The gateway's counters and histograms, in a registry of their own.

    Args:
        peer: add the peer's series (requests served, discovery, gossip, connections).
    """

    def __init__(self, peer: Peer | None = None) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.chunks: Counter[str] = Counter()
        self.failovers = 0
        self.in_flight = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self._counters = _Counters(self)
        self.registry.register(self._counters)
        self.latency = Histogram(
            "modelnet_gateway_request_duration_seconds",
            "Seconds from request to last byte.",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.first_chunk = Histogram(
            "modelnet_gateway_first_chunk_seconds",
            "Seconds from request to first chunk.",
            ["endpoint"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        if peer is not None:
            self.registry.register(PeerCollector(peer))

    def done(self, endpoint: str, status: int, seconds: float, error_code: str | None) -> None:
        """Count one answered request (``error_code``: the OpenAI code of an error answer)."""
        self.requests[(endpoint, str(status))] += 1
        if error_code:
            self.errors[(endpoint, error_code)] += 1
        self.latency.labels(endpoint).observe(seconds)

    def first_chunk_after(self, endpoint: str, seconds: float) -> None:
        """Observe the time from a request to its first chunk from the mesh."""
        self.first_chunk.labels(endpoint).observe(seconds)

    def render(self, gauges: Mapping[str, tuple[str, float]] | None = None) -> str:
        """Every series, plus ``gauges`` (name → (help text, value)), as exposition text."""
        self._counters.gauges = gauges or {}
        try:
            return generate_latest(self.registry).decode()
        finally:
            self._counters.gauges = {}

"""The gateway's counters, rendered by hand in the Prometheus text format (version 0.0.4).

Pure bookkeeping: the app calls :meth:`Metrics.done` once per answered request
(a stream: when its last byte went out), :meth:`Metrics.first_chunk_after` on a
request's first chunk, and serves :meth:`Metrics.render` on ``/metrics``.

Series: ``modelnet_gateway_requests_total{endpoint,status}``,
``modelnet_gateway_errors_total{endpoint,code}``, the histograms
``modelnet_gateway_request_duration_seconds{endpoint}`` and
``modelnet_gateway_first_chunk_seconds{endpoint}``,
``modelnet_gateway_chunks_total{endpoint}``, ``modelnet_gateway_failovers_total``,
``modelnet_gateway_in_flight``, plus the gauges the caller passes to :meth:`Metrics.render`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["BUCKETS", "Histogram", "Metrics"]

#: Histogram bucket bounds, in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class Histogram:
    """A cumulative histogram over :data:`BUCKETS`."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())


class Metrics:
    """The gateway's counters, rendered in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.errors: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.first_chunk: dict[str, Histogram] = {}
        self.chunks: Counter[str] = Counter()
        self.failovers = 0
        self.in_flight = 0

    def done(self, endpoint: str, status: int, seconds: float, error_code: str | None) -> None:
        """Count one answered request (``error_code``: the OpenAI code of an error answer)."""
        self.requests[(endpoint, str(status))] += 1
        if error_code:
            self.errors[(endpoint, error_code)] += 1
        self.latency.setdefault(endpoint, Histogram()).observe(seconds)

    def first_chunk_after(self, endpoint: str, seconds: float) -> None:
        """Observe the time from a request to its first chunk from the mesh."""
        self.first_chunk.setdefault(endpoint, Histogram()).observe(seconds)

    def render(self, gauges: Mapping[str, tuple[str, float]]) -> str:
        """Every series, plus ``gauges`` (name → (help text, value)), as exposition text."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {name} {text}")
            out.append(f"# TYPE {name} {kind}")

        head("modelnet_gateway_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
        for (endpoint, status), n in sorted(self.requests.items()):
            out.append(f"modelnet_gateway_requests_total{{{_labels(endpoint=endpoint, status=status)}}} {n}")
        head("modelnet_gateway_errors_total", "counter", "Requests that failed, by endpoint and error code.")
        for (endpoint, code), n in sorted(self.errors.items()):
            out.append(f"modelnet_gateway_errors_total{{{_labels(endpoint=endpoint, code=code)}}} {n}")
        for name, table, text in (
            ("modelnet_gateway_request_duration_seconds", self.latency, "Seconds from request to last byte."),
            (
                "modelnet_gateway_first_chunk_seconds",
                self.first_chunk,
                "Seconds from request to first chunk.",
            ),
        ):
            head(name, "histogram", text)
            for endpoint, h in sorted(table.items()):
                for bound, count in zip(BUCKETS, h.counts, strict=True):
                    labels = _labels(endpoint=endpoint, le=repr(bound))
                    out.append(f"{name}_bucket{{{labels}}} {count}")
                out.append(f"{name}_bucket{{{_labels(endpoint=endpoint, le='+Inf')}}} {h.n}")
                out.append(f"{name}_sum{{{_labels(endpoint=endpoint)}}} {h.total:.6f}")
                out.append(f"{name}_count{{{_labels(endpoint=endpoint)}}} {h.n}")
        head("modelnet_gateway_chunks_total", "counter", "Chunks received from the mesh, by endpoint.")
        for endpoint, n in sorted(self.chunks.items()):
            out.append(f"modelnet_gateway_chunks_total{{{_labels(endpoint=endpoint)}}} {n}")
        head("modelnet_gateway_failovers_total", "counter", "Requests moved to another provider.")
        out.append(f"modelnet_gateway_failovers_total {self.failovers}")
        head("modelnet_gateway_in_flight", "gauge", "Requests being answered now.")
        out.append(f"modelnet_gateway_in_flight {self.in_flight}")
        for name, (text, value) in gauges.items():
            head(name, "gauge", text)
            out.append(f"{name} {value:g}")
        return "\n".join(out) + "\n"

"""Load figures a record carries, where they come from, and when a change is worth publishing."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...proto.availability import MAX_COUNT, MAX_LATENCY_MS, MAX_TOKENS_PER_S

__all__ = ["InferenceLoad", "LoadProvider", "LoadSnapshot", "load_level", "record_figures"]


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """The load figures a record carries (see :meth:`AvailabilityService.report`)."""

    in_flight: int = 0
    queue: int = 0
    max_concurrency: int = 0
    latency_ms: float = 0.0
    tokens_per_s: float = 0.0


#: A callable the service polls for the current load (cheap and non-blocking).
LoadProvider = Callable[[], LoadSnapshot]


def load_level(load: LoadSnapshot) -> int:
    """Coarse load level; a change of level is a significant change worth publishing at once.

    0: idle; 1: busy, below half of ``max_concurrency`` (or no limit stated); 2: at least
    half; 3: at capacity.
    """
    busy = load.in_flight + load.queue
    if busy <= 0:
        return 0
    if load.max_concurrency <= 0:
        return 1
    u = busy / load.max_concurrency
    return 1 if u < 0.5 else 2 if u < 1.0 else 3


def _clamp_uint(value: float, limit: int) -> int:
    if not math.isfinite(value) or value <= 0:
        return 0
    return min(round(value), limit)


def record_figures(load: LoadSnapshot) -> dict[str, Any]:
    """The record fields for ``load``, clamped into the ranges the record format allows."""
    tps = float(load.tokens_per_s)
    return {
        "in_flight": _clamp_uint(load.in_flight, MAX_COUNT),
        "queue": _clamp_uint(load.queue, MAX_COUNT),
        "max_concurrency": _clamp_uint(load.max_concurrency, MAX_COUNT),
        "latency_ms": _clamp_uint(load.latency_ms, MAX_LATENCY_MS),
        "tokens_per_s": min(max(tps, 0.0), MAX_TOKENS_PER_S) if math.isfinite(tps) else 0.0,
    }


class InferenceLoad:
    """A load provider fed by an :class:`~modelnet_p2p.services.inference.server.InferenceServer`.

    ::

        load = InferenceLoad(peer.inference, peer.limits.max_concurrency)
        peer.inference.on_request_done = load.on_request_done
        service = await start_availability(..., load_provider=load.snapshot)

    Latency and throughput are exponentially weighted averages over finished
    requests (chunks per second stands in for tokens per second).
    """

    def __init__(self, server: Any, max_concurrency: int, alpha: float = 0.2) -> None:
        self._server = server
        self._max = max_concurrency
        self._alpha = alpha
        self.latency_ms = 0.0
        self.tokens_per_s = 0.0
        self.queue = 0

    def on_request_done(
        self, capability: str, remote: str, seconds: float, chunks: int, error: str | None
    ) -> None:
        if error is not None or seconds <= 0:
            return
        a = self._alpha
        ms = seconds * 1000
        self.latency_ms = ms if self.latency_ms == 0 else (1 - a) * self.latency_ms + a * ms
        rate = chunks / seconds
        self.tokens_per_s = rate if self.tokens_per_s == 0 else (1 - a) * self.tokens_per_s + a * rate

    def snapshot(self) -> LoadSnapshot:
        return LoadSnapshot(
            in_flight=int(getattr(self._server, "in_flight", 0)),
            queue=self.queue,
            max_concurrency=self._max,
            latency_ms=self.latency_ms,
            tokens_per_s=self.tokens_per_s,
        )

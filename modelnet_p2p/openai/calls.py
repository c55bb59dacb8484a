"""The gateway's mesh requests: one routed request, buffered or streamed.

(Interim: the provider choice below is replaced by the mesh's one client.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from ..errors import DeadlineExceededError, ModelNetError, NotFoundError, OverloadedError, UnavailableError
from ..mesh.routing import Candidate, Router
from .catalog import Catalog, ModelRoute, peer_of
from .errors import GatewayError
from .metrics import Metrics

if TYPE_CHECKING:
    from ..peer import InferenceStream, Peer

__all__ = ["Caller", "Outcome"]

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one routed request produced besides its chunks."""

    peer: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    first_chunk_at: float | None = None
    error: GatewayError | None = None


class _Reset:
    """Yielded by a buffered routed request when an attempt failed: drop the chunks so far."""


_RESET = _Reset()


def _retryable(exc: ModelNetError) -> bool:
    return exc.retryable or isinstance(exc, OverloadedError | NotFoundError)


class Caller:
    """Sends the gateway's requests into the mesh."""

    def __init__(
        self, peer: Peer, catalog: Catalog, metrics: Metrics, *, max_attempts: int, routing: str, policy: str
    ) -> None:
        self.peer = peer
        self.catalog = catalog
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.routing = routing
        self.router = Router(policy)

    def _use_mesh(self, route: ModelRoute) -> bool:
        if not route.providers:
            return True
        return route.discovered and self.routing == "mesh"

    def _candidate(self, route: ModelRoute, target: str) -> Candidate:
        pid = peer_of(target)
        cand = Candidate(
            peer_id=pid,
            addrs=[target],
            idempotent=route.idempotent,
            max_concurrency=route.max_concurrency or 0,
        )
        table = getattr(self.peer, "availability", None)
        entry = table.get(pid) if table is not None and hasattr(table, "get") else None
        record = getattr(entry, "record", None)
        if record is not None:
            cand.state = str(getattr(record, "state", "ready"))
            cand.in_flight = int(getattr(record, "in_flight", 0))
            cand.queue = int(getattr(record, "queue", 0))
            cand.max_concurrency = int(getattr(record, "max_concurrency", 0)) or cand.max_concurrency
        return cand

    async def _pick(self, route: ModelRoute, tried: set[str]) -> tuple[str | None, str | None] | None:
        if self._use_mesh(route):
            return None, None
        cands = [self._candidate(route, t) for t in route.providers]
        choice = self.router.choose(cands, exclude=tried)
        if choice is None:
            rest = [c for c in cands if c.peer_id not in tried]
            if not rest:
                return None
            choice = min(rest, key=lambda c: self.router.ban_remaining(c.peer_id))
        return choice.addrs[0], choice.peer_id

    async def _routed(
        self,
        endpoint: str,
        route: ModelRoute,
        input: Any,
        params: dict[str, Any],
        deadline: float,
        outcome: Outcome,
        *,
        buffered: bool,
    ) -> AsyncGenerator[Any, None]:
        sent_parts: list[str] = []
        sent_chars = 0
        sent_other = 0
        tried: set[str] = set()
        last: ModelNetError | None = None
        started = time.monotonic()
        for _ in range(self.max_attempts):
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise last or DeadlineExceededError("deadline exceeded before a provider answered")
            picked = await self._pick(route, tried)
            if picked is None:
                raise last or UnavailableError(f"no provider of {route.name} left to try")
            target, pid = picked
            avoid = tuple(tried) if target is None else ()
            stream: InferenceStream = self.peer.infer(
                target, route.name, input, timeout=remaining, avoid=avoid, **params
            )
            replay = "".join(sent_parts) if sent_chars else ""
            skip_other = sent_other
            pos = 0
            if pid is not None:
                self.router.started(pid)
            try:
                async with stream:
                    async for chunk in stream:
                        outcome.peer = stream.info.peer
                        if outcome.first_chunk_at is None:
                            outcome.first_chunk_at = time.monotonic()
                            self.metrics.first_chunk_after(endpoint, outcome.first_chunk_at - started)
                        self.metrics.chunks[endpoint] += 1
                        if isinstance(chunk, str) and pos < len(replay):
                            head = chunk[: len(replay) - pos]
                            if head != replay[pos : pos + len(head)]:
                                raise UnavailableError(
                                    "the provider that took over answered differently; cannot go on"
                                )
                            pos += len(head)
                            chunk = chunk[len(head) :]
                            if not chunk:
                                continue
                        elif not isinstance(chunk, str) and skip_other:
                            skip_other -= 1
                            continue
                        if not buffered:
                            if isinstance(chunk, str):
                                sent_parts.append(chunk)
                                sent_chars += len(chunk)
                                pos += len(chunk)
                            else:
                                sent_other += 1
                        outcome.chunks += 1
                        yield chunk
                info = stream.info
                outcome.peer = info.peer
                outcome.finish_reason = info.finish_reason
                outcome.usage = dict(info.usage)
                if pid is not None:
                    self.router.success(pid)
                    if info.first_chunk_at is not None:
                        self.router.observe_rtt(pid, (info.first_chunk_at - info.started) * 1000)
                else:
                    self.metrics.failovers += max(0, len(getattr(info, "attempts", ())) - 1)
                self.catalog.peers_seen.add(info.peer)
                return
            except ModelNetError as exc:
                if pid is not None:
                    if isinstance(exc, OverloadedError):
                        self.router.overloaded(pid)
                    elif _retryable(exc):
                        self.router.failure(pid)
                    tried.add(pid)
                    delivered = sent_chars or sent_other
                    retry = _retryable(exc) and not (delivered and not route.idempotent)
                else:
                    attempts = getattr(stream.info, "attempts", ())
                    tried.update(a["peer"] for a in attempts if a.get("peer"))
                    self.metrics.failovers += max(0, len(attempts) - 1)
                    retry = buffered and exc.retryable and exc.chunks_delivered > 0
                if not retry or isinstance(exc, DeadlineExceededError) or trio.current_time() >= deadline:
                    raise
                last = exc
                self.metrics.failovers += 1
                log.info("%s failed (%s); trying another provider", route.name, exc)
                if buffered and outcome.chunks:
                    outcome.chunks = 0
                    yield _RESET
            finally:
                if pid is not None:
                    self.router.finished(pid)
        assert last is not None
        raise last

    async def collect(
        self, endpoint: str, route: ModelRoute, input: Any, params: dict[str, Any], deadline: float
    ) -> tuple[list[Any], Outcome]:
        """The whole answer (retried from scratch on another provider if an attempt fails)."""
        outcome = Outcome()
        chunks: list[Any] = []
        gen = self._routed(endpoint, route, input, params, deadline, outcome, buffered=True)
        try:
            async for chunk in gen:
                if chunk is _RESET:
                    chunks.clear()
                else:
                    chunks.append(chunk)
        finally:
            await gen.aclose()
        return chunks, outcome

    async def start(
        self, endpoint: str, route: ModelRoute, input: Any, params: dict[str, Any], deadline: float
    ) -> tuple[AsyncGenerator[Any, None], Outcome, list[Any]]:
        """Start a streamed request and wait for its first chunk (so that early errors keep their status).

        Returns the rest of the chunks, the outcome, and the first chunk (none if the answer was empty).
        """
        outcome = Outcome()
        gen = self._routed(endpoint, route, input, params, deadline, outcome, buffered=False)
        first: list[Any] = []
        try:
            first.append(await gen.__anext__())
        except StopAsyncIteration:
            pass
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await gen.aclose()
            raise
        return gen, outcome, first

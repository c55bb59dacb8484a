"""The mesh client: the one place that chooses a provider, calls it, and fails over.

:class:`~modelnet_p2p.Peer`, the OpenAI gateway and the collaboration patterns all
send their requests through one :class:`MeshClient` (``peer.mesh_client``), so a
request is routed once, against one table of measurements and bans.

Interface (stable; everything else here is private)::

    client = peer.mesh_client

    stream = client.stream(
        capability, input,
        params={...},          # request parameters (default: none)
        timeout=30.0,          # seconds for the whole request, failovers included;
                               # None: the client's request_timeout (every call has a deadline)
        target=None,           # a multiaddr or peer id: call exactly that peer, no routing
        among=None,            # a static provider list (Candidate objects or targets): route among these
        avoid=(),              # peer ids routing must not choose
        replay=None,           # None: replay mid-stream failures iff the capability is idempotent
        trace=None,            # a TraceContext to extend (MeshContext passes the request's)
        policy=None,           # a routing policy for this request (default: the client's)
        max_attempts=None,     # providers tried (default: MAX_ROUTING_ATTEMPTS)
    )                          # -> InferenceStream
    async with stream:
        async for chunk in stream: ...
        # or: async for batch in stream.batches(): ...   (lists of chunks, one per read)
    stream.info                # ResponseInfo: peer, finish_reason, usage, first_chunk_at,
                               # attempts = [{"peer", "status", "chunks", "ms", "error"}, ...]

    response = await client.call(capability, input, ..., restart=False)   # -> Response
    cands = await client.providers(capability, timeout=5.0, refresh=False)  # -> list[Candidate]
    client.router              # the Router: measurements, bans (router.banned, router.snapshot())

Routing (``target`` is ``None``): candidates come from :class:`~.providers.Providers`
(cards joined with gossip) or from ``among``; the :class:`~.routing.Router` picks one.
A retryable failure before the first chunk is retried on another provider (the failed
one is banned with a doubling backoff, an ``overloaded`` one skipped briefly), up to
``max_attempts`` providers and never past the deadline. A failure that is the provider's
fault but not retryable (``internal``, a broken protocol, the provider's own
``deadline_exceeded``) bans it too, and is retried elsewhere before the first chunk when
the capability is idempotent (or ``replay=True``); otherwise it goes to the caller.

Deadlines and stalls: a request without a ``timeout`` gets the client's
``request_timeout`` (``PeerConfig.request_timeout``), so none waits forever. Once the first
chunk has arrived, a provider that sends nothing for ``stall_timeout`` seconds
(``PeerConfig.stall_timeout``, inside the deadline) has failed: the attempt ends with a
retryable ``StalledError``, the provider is banned, and the request fails over as below.
A routed attempt that may fail over (an idempotent capability, or ``replay=True``) and whose
provider sends no chunk at all within ``stall_timeout`` (at most half the time left) has
failed the same way, so that a provider cut off before it answered does not hold the call
until its deadline. (A non-idempotent request waits for its first chunk until the deadline:
the silent provider may be running it.)

Reputation: every outcome of every request, routed or targeted (a success, an error, a
timeout, a stall), goes to the router's :class:`~.reputation.Reputation`;
:meth:`MeshClient.report` takes the outcomes only a caller can judge (a verifier's
rejection, a lost vote). Routing weighs each provider's load by it. A failure after chunks went
out is replayed on another provider only if the capability is idempotent (or
``replay=True``); the chunks already delivered are skipped, so the consumer sees each
chunk once, in order. Otherwise the error (an :class:`UnavailableError`) carries
``chunks_delivered``. With ``among``, when every listed provider is banned the least
banned one is tried anyway (the caller asked for these), and a listed provider that
answers ``not_found`` (it no longer serves the capability) is passed over for the next.

``call(..., restart=True)`` collects the answer, so a provider that fails part-way may
be replaced by a fresh request to another provider (the partial answer discarded), even
for a capability that is not idempotent. The gateway uses it for non-streamed answers.

Load feedback: a provider carries its load back on the first chunk and on the final frame
(``load``, ``specs/inference.md``); every such hint, on a routed or a targeted request,
goes to the router (:meth:`~.routing.Router.observe_load`), so the next choice sees the
load of the providers this peer uses without waiting for their gossip. Every request,
routed or targeted, counts in the router's in-flight figures while it runs.

Errors (raised while iterating): :class:`NotFoundError` (no provider known),
:class:`OverloadedError` (every live provider at capacity), :class:`UnavailableError`,
:class:`DeadlineExceededError`, or the provider's own error when it is not retryable.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from ..errors import (
    BadRequestError,
    DeadlineExceededError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
)
from ..p2p.dialer import Target
from ..p2p.stream import Stream
from ..proto.infer import TraceContext
from ..proto.receipt import ChunkChain, Receipt, ReceiptCheck
from ..services.inference import ResponseInfo, StreamSource, request_batches_on_peer
from ..services.inference.client import StalledError
from .providers import PROVIDERS_TIMEOUT, Providers
from .routing import Candidate, Policy, Router

__all__ = [
    "MAX_ROUTING_ATTEMPTS",
    "Connector",
    "InferenceStream",
    "MeshClient",
    "Response",
    "StreamPool",
    "deadline_of",
    "remaining",
]

log = logging.getLogger(__name__)

#: Providers tried for one routed request before giving up.
MAX_ROUTING_ATTEMPTS = 4
#: Longest a provider lookup may take inside a routed request, in seconds. A provider's
#: card can take one RPC timeout (5 s) plus a DHT query to arrive.
MAX_LOOKUP_TIME = 10.0
#: Seconds a request may take when the caller gives no timeout (``PeerConfig.request_timeout``).
REQUEST_TIMEOUT = 300.0
#: Seconds without a chunk, mid-stream, after which a provider has failed (``PeerConfig.stall_timeout``).
STALL_TIMEOUT = 30.0


def outcome_of(exc: ModelNetError) -> str | None:
    """The reputation event a failed attempt counts as against its provider, or ``None`` if it
    was not the provider's fault (an ``overloaded`` answer is honest backpressure; a bad request,
    a capability not served or a refusal are the caller's)."""
    if isinstance(exc, StalledError):
        return "stall"
    if isinstance(exc, DeadlineExceededError):
        return "timeout"
    if isinstance(exc, (InternalError, ProtocolError, UnavailableError)):
        return "error"
    return None


class ReplayMismatchError(ProtocolError):
    """A replay's chunks differ from those an earlier provider already delivered (checked by
    their digests, ``specs/inference.md``, "Signed receipts"): the answer cannot be continued."""


class Connector(Protocol):
    """How the client reaches a peer (the dialer, with the inference protocol id bound)."""

    def peer_of(self, target: Target) -> str: ...

    async def open_stream(self, target: Target, deadline: float) -> Stream: ...


class StreamPool(Protocol):
    """Kept streams (``specs/inference.md``, "Stream reuse")."""

    def acquire(self, peer: str) -> Stream | None: ...

    def release_to(self, peer: str) -> Callable[[Stream], None]: ...


@dataclass
class Response:
    """A complete answer, as returned by :meth:`MeshClient.call` and ``Peer.call``.

    Attributes:
        chunks: every chunk, in order.
        peer: the peer id that answered.
        finish_reason: from the end frame (``"stop"``, ``"length"``, ...).
        usage: counters from the end frame.
        latency: seconds from sending the request to the end frame.
        attempts: with routing (no target): every provider tried, in order, and what happened.
    """

    chunks: list[Any]
    peer: str
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: The provider's receipt as received and checked (``receipt=True``; ``None`` if it sent none).
    receipt_check: ReceiptCheck | None = None

    @property
    def receipt(self) -> Receipt | None:
        """The provider's signed receipt, verified against :attr:`chunks` (``None``: none was
        sent); raises :class:`~modelnet_p2p.proto.receipt.ReceiptError` if it does not hold."""
        return None if self.receipt_check is None else self.receipt_check.verified()

    @property
    def text(self) -> str:
        """The chunks joined as text (non-text chunks are converted with ``str``)."""
        return "".join(c if isinstance(c, str) else str(c) for c in self.chunks)

    @property
    def value(self) -> Any:
        """The single chunk if there is exactly one, else the list of chunks."""
        return self.chunks[0] if len(self.chunks) == 1 else self.chunks


class InferenceStream:
    """An answer, chunk by chunk (from :meth:`MeshClient.stream` and ``Peer.infer``).

    Iterate it with ``async for``. Leaving the loop early cancels the remote
    handler; use ``async with ... as stream:`` (or call :meth:`aclose`) to make
    that happen at a known point rather than when the stream is garbage-collected.
    After the loop, :attr:`info` holds who answered, the finish reason, the usage
    counters and (with routing) every attempt.

    :meth:`batches` gives the rest of the answer as lists of chunks instead, as they come
    off the stream (one read holds many): the way to collect an answer, or to relay it,
    at a cost per read rather than per chunk. Both views may be mixed: each chunk is
    handed out once, in order.
    """

    def __init__(self, batches: AsyncIterator[list[Any]], info: ResponseInfo) -> None:
        self._batches = batches
        self._buffer: list[Any] = []
        self._pos = 0
        self.info = info

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> Any:
        pos = self._pos
        if pos < len(self._buffer):
            self._pos = pos + 1
            return self._buffer[pos]
        batch = await self._batches.__anext__()
        self._buffer, self._pos = batch, 1
        return batch[0]

    def batches(self) -> AsyncIterator[list[Any]]:
        """The rest of the answer as non-empty lists of chunks, in order (``async for``)."""
        return _Batches(self)

    async def next_batch(self) -> list[Any]:
        """The chunks of the current batch not handed out yet, else the next batch (never
        empty); raises :class:`StopAsyncIteration` at the end of the answer."""
        if self._pos < len(self._buffer):
            rest = self._buffer[self._pos :] if self._pos else self._buffer
            self._buffer, self._pos = [], 0
            return rest
        return await self._batches.__anext__()

    async def aclose(self) -> None:
        """Stop the request (resetting the stream if it has not finished)."""
        self._buffer, self._pos = [], 0
        await self._batches.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> InferenceStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _Batches:
    """:meth:`InferenceStream.batches`: what is left of the current batch, then each next one."""

    def __init__(self, stream: InferenceStream) -> None:
        self._stream = stream

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Any]:
        return await self._stream.next_batch()


def remaining(deadline: float) -> float | None:
    """Seconds left before ``deadline`` (trio time); ``None`` for no deadline."""
    return None if math.isinf(deadline) else max(0.001, deadline - trio.current_time())


def deadline_of(timeout: float | None) -> float:
    """The trio time ``timeout`` seconds from now; ``math.inf`` for no timeout."""
    return math.inf if timeout is None else trio.current_time() + timeout


def new_trace() -> TraceContext:
    ids = os.urandom(24)  # one system call for both
    return TraceContext(trace_id=ids[:16], span_id=ids[16:])


class MeshClient:
    """Chooses providers, calls them and fails over (see the module docstring).

    Args:
        connector: opens inference streams to a target.
        pool: kept streams, reused for the next request to the same peer.
        providers: candidates for routed requests.
        router: measurements, bans and the default policy.
        max_frame_size: largest frame sent or accepted.
        window: the flow-control window granted to providers, in bytes.
        max_attempts: providers tried for one routed request, by default.
        request_timeout: seconds for a request whose caller gives no timeout.
        stall_timeout: seconds without a chunk, once one has arrived, before the provider
            is taken to have failed (``None``: never).
    """

    def __init__(
        self,
        connector: Connector,
        pool: StreamPool,
        providers: Providers,
        router: Router,
        *,
        max_frame_size: int,
        window: int,
        max_attempts: int = MAX_ROUTING_ATTEMPTS,
        request_timeout: float = REQUEST_TIMEOUT,
        stall_timeout: float | None = STALL_TIMEOUT,
    ) -> None:
        self.connector = connector
        self.pool = pool
        self.provider_source = providers
        self.router = router
        self.max_frame_size = max_frame_size
        self.window = window
        self.max_attempts = max_attempts
        self.request_timeout = request_timeout
        self.stall_timeout = stall_timeout

    def report(self, peer_id: str, event: str) -> None:
        """Tell the reputation what only the caller can judge about a provider's answer:
        ``"rejected"`` (a verifier said no), ``"disagreed"`` (it lost a majority vote)."""
        self.router.report(peer_id, event)

    async def providers(
        self, capability: str, *, timeout: float = PROVIDERS_TIMEOUT, refresh: bool = False
    ) -> list[Candidate]:
        """Every known provider of ``capability`` (other than this peer), as routing candidates."""
        return await self.provider_source.candidates(capability, timeout=timeout, refresh=refresh)

    def stream(
        self,
        capability: str,
        input: Any = None,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        target: Target | None = None,
        among: Sequence[Candidate | str] | None = None,
        avoid: Collection[str] = (),
        replay: bool | None = None,
        trace: TraceContext | None = None,
        policy: str | Policy | None = None,
        max_attempts: int | None = None,
        receipt: bool = False,
    ) -> InferenceStream:
        """Stream the answer of a provider of ``capability`` to ``input`` (see the module docstring)."""
        if not capability:
            raise BadRequestError("capability is required")
        info = ResponseInfo()
        params = dict(params or {})
        timeout = self.request_timeout if timeout is None else timeout
        if target is not None:
            direct = self._direct(target, capability, input, params, timeout, trace, info, receipt=receipt)
            return InferenceStream(direct, info)
        plan = _Plan(
            capability=capability,
            input=input,
            params=params,
            deadline=deadline_of(timeout),
            trace=trace or new_trace(),
            replay=replay,
            avoid=set(avoid),
            among=None if among is None else [self._as_candidate(c) for c in among],
            policy=policy,
            max_attempts=max_attempts or self.max_attempts,
            receipt=receipt,
        )
        return InferenceStream(self._routed(plan, info), info)

    async def call(
        self,
        capability: str,
        input: Any = None,
        *,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        target: Target | None = None,
        among: Sequence[Candidate | str] | None = None,
        avoid: Collection[str] = (),
        replay: bool | None = None,
        trace: TraceContext | None = None,
        policy: str | Policy | None = None,
        max_attempts: int | None = None,
        restart: bool = False,
        receipt: bool = False,
    ) -> Response:
        """Like :meth:`stream`, but collect the whole answer into a :class:`Response`.

        With ``restart`` (and routing), a provider that fails after some chunks is
        replaced by a fresh request elsewhere even if the capability is not idempotent.
        """
        deadline = deadline_of(self.request_timeout if timeout is None else timeout)
        tried = set(avoid)
        attempts: list[dict[str, Any]] = []
        budget = max_attempts or self.max_attempts
        while True:
            stream = self.stream(
                capability,
                input,
                params=params,
                timeout=remaining(deadline),
                target=target,
                among=among,
                avoid=tried,
                replay=replay,
                trace=trace,
                policy=policy,
                max_attempts=max(1, budget - len(attempts)),
                receipt=receipt,
            )
            chunks: list[Any] = []
            try:
                async with stream:
                    async for batch in stream.batches():
                        chunks.extend(batch)
            except ModelNetError as exc:
                attempts.extend(stream.info.attempts)
                tried.update(a["peer"] for a in stream.info.attempts if a.get("peer"))
                again = (
                    restart
                    and target is None
                    and exc.retryable
                    and exc.chunks_delivered > 0
                    and not isinstance(exc, DeadlineExceededError)
                    and len(attempts) < budget
                    and trio.current_time() < deadline
                )
                if not again:
                    raise
                log.info("%r failed part-way (%s); starting over elsewhere", capability, exc.message)
                continue
            info = stream.info
            return Response(
                chunks=chunks,
                peer=info.peer,
                finish_reason=info.finish_reason,
                usage=info.usage,
                latency=(info.ended or info.started) - info.started,
                attempts=[*attempts, *info.attempts],
                receipt_check=info.receipt,
            )

    # -- one peer ------------------------------------------------------------------

    def _as_candidate(self, c: Candidate | str) -> Candidate:
        if isinstance(c, Candidate):
            return c
        return Candidate(peer_id=self.connector.peer_of(c), addrs=[c] if c.startswith("/") else [])

    async def _direct(
        self,
        target: Target,
        capability: str,
        input: Any,
        params: dict[str, Any],
        timeout: float | None,
        trace: TraceContext | None,
        info: ResponseInfo,
        record: bool = True,
        receipt: bool = False,
        first_chunk_timeout: float | None = None,
    ) -> AsyncIterator[list[Any]]:
        """One request to one peer, in batches of chunks. With ``record``, its outcome goes to
        the reputation (a routed attempt records its own, with the ban). ``first_chunk_timeout``: see
        :func:`~modelnet_p2p.services.inference.client.run_request`."""
        deadline = deadline_of(timeout)
        info.peer = self.connector.peer_of(target)
        source = StreamSource(
            self.pool.acquire,
            self.pool.release_to,
            lambda: self.connector.open_stream(target, deadline),
        )
        answer = request_batches_on_peer(
            source,
            info.peer,
            capability=capability,
            input=input,
            params=params,
            deadline=deadline,
            trace=trace or new_trace(),
            info=info,
            max_frame_size=self.max_frame_size,
            window=self.window,
            stall_timeout=self.stall_timeout,
            receipt=receipt,
            first_chunk_timeout=first_chunk_timeout,
        )
        seen = None
        self.router.started(info.peer)  # every request of this peer, routed or not
        try:
            async for batch in answer:
                if info.load is not seen:  # the first chunk's
                    seen = info.load
                    self._learn(info)
                yield batch
            if record:
                self.router.reputation.record(info.peer, "success")
        except ModelNetError as exc:
            event = outcome_of(exc)
            if record and event is not None:
                self.router.reputation.record(info.peer, event)
            raise
        finally:
            await answer.aclose()  # type: ignore[attr-defined]
            if info.load is not seen:  # the final frame's
                self._learn(info)
            self.router.finished(info.peer)

    def _learn(self, info: ResponseInfo) -> None:
        """Hand the load hint an answer carried to the router."""
        if info.load is not None and info.peer:
            self.router.observe_load(info.peer, info.load)

    # -- routing -------------------------------------------------------------------

    async def _candidates(self, plan: _Plan, lookup: float, refresh: bool) -> list[Candidate]:
        if plan.among is not None:
            return self.provider_source.among(plan.capability, plan.among)
        return await self.providers(plan.capability, timeout=lookup, refresh=refresh)

    async def _choose(self, plan: _Plan, tried: set[str], info: ResponseInfo) -> Candidate:
        """The next provider to try, or raise the error that says why there is none.

        A failover first tries the providers the last lookup found, however old: a lookup
        then (the cache expires after 10 s) can take seconds in a mesh where a peer was
        just cut off (measured across the simulated WAN: 8-10 s between two attempts).
        """
        if info.attempts and plan.among is None:
            known = self.provider_source.known(plan.capability)
            chosen = self.router.choose(known, exclude=tried, policy=plan.policy)
            if chosen is not None:
                return chosen
        lookup = max(0.05, min(MAX_LOOKUP_TIME, plan.deadline - trio.current_time()))
        if plan.among is not None:  # a given list: nothing to wait for, so no cancel scope
            cands = self.provider_source.among(plan.capability, plan.among)
        else:
            with trio.move_on_at(plan.deadline):
                cands = await self._candidates(plan, lookup, refresh=False)
        if trio.current_time() >= plan.deadline:
            raise DeadlineExceededError(
                f"deadline exceeded routing {plan.capability!r} after {len(info.attempts)} attempts",
                chunks_delivered=plan.delivered,
            )
        chosen = self.router.choose(cands, exclude=tried, policy=plan.policy)
        if chosen is None and not plan.refreshed and plan.among is None:
            plan.refreshed = True  # the cache may be stale: look again once
            cands = await self._candidates(plan, lookup, refresh=True)
            chosen = self.router.choose(cands, exclude=tried, policy=plan.policy)
        if chosen is None and plan.among is not None:
            lists = self.router.reputation.lists
            banned = [
                c
                for c in cands
                if c.peer_id not in tried and self.router.banned(c.peer_id) and lists.permits(c.peer_id)
            ]
            if banned:  # every listed provider is banned: try the one banned least long
                chosen = min(banned, key=lambda c: self.router.ban_remaining(c.peer_id))
        if chosen is not None:
            return chosen
        if plan.last_error is not None:
            plan.last_error.chunks_delivered = plan.delivered
            raise plan.last_error
        if not cands:
            raise NotFoundError(f"no provider of {plan.capability!r} found in the mesh")
        busy = [
            c
            for c in cands
            if c.peer_id not in tried
            and not self.router.banned(c.peer_id)
            and c.state in (None, "ready", "draining", "joining")
        ]
        if busy:
            raise OverloadedError(
                f"all {len(busy)} live providers of {plan.capability!r} are at capacity or draining",
                chunks_delivered=plan.delivered,
            )
        raise UnavailableError(
            f"none of the {len(cands)} known providers of {plan.capability!r} is available "
            "(left, failing or banned)",
            chunks_delivered=plan.delivered,
        )

    def _first_chunk_bound(self, deadline: float) -> float | None:
        # A routed attempt whose provider sends no chunk for stall_timeout (at most half the
        # time left) has failed, so that the call moves on while there is time to.
        left = remaining(deadline)
        if self.stall_timeout is None:
            return None
        return self.stall_timeout if left is None else min(self.stall_timeout, left / 2)

    async def _routed(self, plan: _Plan, info: ResponseInfo) -> AsyncIterator[list[Any]]:
        tried: set[str] = set(plan.avoid)
        while True:
            chosen = await self._choose(plan, tried, info)
            pid = chosen.peer_id
            tried.add(pid)
            target = chosen.addrs[0] if chosen.addrs else pid
            attempt: dict[str, Any] = {"peer": pid, "status": "running", "chunks": 0}
            info.attempts.append(attempt)
            sub = ResponseInfo()
            skip = plan.delivered
            # Digests of what is delivered (if a failure may be replayed) and of what a replay
            # resends, so that the skipped prefix is checked, not just counted.
            hashing = plan.replay if plan.replay is not None else chosen.idempotent
            replayed = ChunkChain(input_digest=b"")
            started = trio.current_time()
            direct = self._direct(
                target,
                chosen.name or plan.capability,
                plan.input,
                plan.params,
                remaining(plan.deadline),
                plan.trace,
                sub,
                record=False,
                receipt=plan.receipt,
                first_chunk_timeout=self._first_chunk_bound(plan.deadline) if hashing else None,
            )
            try:
                async for batch in direct:
                    if not attempt["chunks"]:
                        self.router.observe_rtt(pid, (trio.current_time() - started) * 1000)
                    attempt["chunks"] += len(batch)
                    if skip:
                        # delivered by an earlier provider
                        skipped, batch = batch[:skip], batch[skip:]
                        skip -= len(skipped)
                        for chunk in skipped:
                            replayed.add(chunk)
                        if not skip and replayed.head != plan.prefix.head:
                            raise ReplayMismatchError(
                                f"replay on {pid} differs from the {plan.delivered} chunks already delivered",
                                chunks_delivered=plan.delivered,
                            )
                        if not batch:
                            continue
                    if hashing:
                        for chunk in batch:
                            plan.prefix.add(chunk)
                    plan.delivered += len(batch)
                    info.peer, info.chunks = pid, plan.delivered
                    yield batch
                if skip:
                    raise ProtocolError(
                        f"replay on {pid} gave {attempt['chunks']} chunks, fewer than the "
                        f"{plan.delivered} already delivered",
                        chunks_delivered=plan.delivered,
                    )
            except ModelNetError as exc:
                self._failed(plan, chosen, attempt, exc, started, len(info.attempts))
                continue
            finally:
                await direct.aclose()  # type: ignore[attr-defined]  # at once, if the consumer stopped
            attempt.update(status="ok", ms=round((trio.current_time() - started) * 1000, 1))
            self.router.success(pid)
            info.peer = pid
            info.finish_reason, info.usage = sub.finish_reason, sub.usage
            info.started, info.first_chunk_at, info.ended = sub.started, sub.first_chunk_at, sub.ended
            info.received += sub.received
            info.receipt = sub.receipt
            return

    def _failed(
        self,
        plan: _Plan,
        chosen: Candidate,
        attempt: dict[str, Any],
        exc: ModelNetError,
        started: float,
        attempts: int,
    ) -> None:
        """Record a failed attempt; re-raise unless another provider may be tried."""
        pid = chosen.peer_id
        attempt.update(status="error", error=str(exc), ms=round((trio.current_time() - started) * 1000, 1))
        event = outcome_of(exc)
        if isinstance(exc, OverloadedError):
            self.router.overloaded(pid)
        elif event is not None:
            self.router.failure(pid, event)  # a ban, and a mark against its reputation
        exc.chunks_delivered = plan.delivered
        idempotent = plan.replay if plan.replay is not None else chosen.idempotent
        # A listed provider that does not serve the capability (the caller's list is stale):
        # the request never ran there, so the next one may be tried (without a ban).
        stale = plan.among is not None and isinstance(exc, NotFoundError) and not plan.delivered
        # The provider's fault, not retryable as such (an internal error, a broken protocol, its
        # own deadline): an idempotent request that has delivered nothing may run elsewhere.
        elsewhere = event is not None and idempotent and not plan.delivered
        if not (exc.retryable or stale or elsewhere) or trio.current_time() >= plan.deadline:
            raise exc
        if plan.delivered and not idempotent:
            raise UnavailableError(
                f"provider {pid} failed after {plan.delivered} chunks and {plan.capability!r} is not "
                f"idempotent, so the request was not replayed elsewhere: {exc.message}",
                chunks_delivered=plan.delivered,
            ) from None
        if attempts >= plan.max_attempts:
            raise exc
        plan.last_error = exc
        log.info("provider %s of %r failed (%s); trying another", pid, plan.capability, exc.message)


@dataclass
class _Plan:
    """One routed request and its progress over attempts."""

    capability: str
    input: Any
    params: dict[str, Any]
    deadline: float
    trace: TraceContext
    replay: bool | None
    avoid: set[str]
    among: list[Candidate] | None
    policy: str | Policy | None
    max_attempts: int
    delivered: int = 0
    refreshed: bool = False
    last_error: ModelNetError | None = None
    receipt: bool = False
    #: The running digest of the chunks delivered (``ChunkChain``), when a replay may need it.
    prefix: ChunkChain = field(default_factory=lambda: ChunkChain(input_digest=b""))

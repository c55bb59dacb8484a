"""The gateway's requests into the mesh, through the mesh's one client (``peer.mesh_client``).

The :class:`~modelnet_p2p.mesh.client.MeshClient` chooses every provider, fails
over before the first chunk, and keeps the one table of measurements and bans. A
route with providers of its own (configured, or found by the gateway's discovery
under ``routing="local"``) is routed *among* them, with the gateway's policy;
any other route is left to the mesh's provider lookup.

What stays here is what the gateway does after chunks went out, where an HTTP
answer needs more than the client gives:

* a buffered (non-streamed) answer that breaks part-way is started over on a
  provider not tried yet, whatever the capability (nothing was sent yet);
* a stream that breaks part-way is continued on another provider only for an
  idempotent capability, and only if the text the new provider answers starts
  with the text already sent (compared by characters, so providers may cut their
  chunks differently); only the rest is sent on.

So the client is asked never to replay (``replay=False``), and each later
attempt goes back through it with the providers tried so far to avoid and what
is left of the attempt budget and the deadline.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import trio

from ..errors import DeadlineExceededError, ModelNetError, UnavailableError
from ..mesh.routing import Candidate
from .catalog import Catalog, ModelRoute, peer_of
from .errors import GatewayError
from .metrics import Metrics

if TYPE_CHECKING:
    from ..mesh.client import MeshClient

__all__ = ["Caller", "Outcome"]

log = logging.getLogger(__name__)

#: Seconds allowed for stopping a mesh request once its answer is abandoned.
CLOSE_TIMEOUT = 2.0
#: Routes whose candidates are kept once made (past it the cache starts over: a catalog of
#: discovered routes remakes them as cards change).
AMONG_CACHE = 1024


@dataclass
class Outcome:
    """What one gateway request produced besides its chunks."""

    peer: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    chunks: int = 0
    first_chunk_at: float | None = None
    error: GatewayError | None = None


class _Reset:
    """Yielded by a buffered request when an attempt broke part-way: drop the chunks so far."""


_RESET = _Reset()


class _Sent:
    """What a stream has sent: its text, and how many chunks were not text.

    :meth:`resume` gives a filter for the chunks of a provider that takes over: it
    checks that the new answer repeats what was sent and passes on only the rest.
    """

    def __init__(self) -> None:
        self.text: list[str] = []
        self.chars = 0
        self.other = 0

    def __bool__(self) -> bool:
        return bool(self.chars or self.other)

    def add(self, chunk: Any) -> None:
        if isinstance(chunk, str):
            self.text.append(chunk)
            self.chars += len(chunk)
        else:
            self.other += 1

    def resume(self) -> _Resume:
        return _Resume("".join(self.text), self.other)


class _Diverged(UnavailableError):
    """The provider that took over a stream answered differently from the one before it."""


class _Resume:
    def __init__(self, sent: str, other: int) -> None:
        self.sent = sent
        self.pos = 0
        self.skip_other = other

    def rest(self, chunk: Any) -> Any | None:
        """The part of ``chunk`` not sent yet (``None``: nothing); raises if it contradicts what was."""
        if isinstance(chunk, str) and self.pos < len(self.sent):
            head = chunk[: len(self.sent) - self.pos]
            if head != self.sent[self.pos : self.pos + len(head)]:
                raise _Diverged("the provider that took over answered differently; cannot go on")
            self.pos += len(head)
            return chunk[len(head) :] or None
        if not isinstance(chunk, str) and self.skip_other:
            self.skip_other -= 1
            return None
        return chunk

    def check_complete(self) -> None:
        """At the end of the new answer: raises if it was shorter than what had been sent."""
        if self.pos < len(self.sent) or self.skip_other:
            raise _Diverged("the provider that took over answered less than was already sent; cannot go on")


class Caller:
    """Sends the gateway's requests through the mesh's client (see the module docstring).

    Args:
        client: the mesh client (``peer.mesh_client``).
        catalog: told of every provider that answers.
        metrics: first-chunk times, chunk counts and failovers are counted here.
        max_attempts: providers tried for one request, in all.
        routing: ``"mesh"`` or ``"local"``, for routes found by discovery.
        policy: the routing policy for routes with providers of their own.
    """

    def __init__(
        self,
        client: MeshClient,
        catalog: Catalog,
        metrics: Metrics,
        *,
        max_attempts: int,
        routing: str,
        policy: str,
    ) -> None:
        self.client = client
        self.catalog = catalog
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.routing = routing
        self.policy = policy
        #: Each route's candidates, made once (routing copies them before joining gossip in).
        self._among_of: dict[ModelRoute, list[Candidate] | None] = {}

    def _among(self, route: ModelRoute) -> list[Candidate] | None:
        """The providers to route among, or ``None``: the mesh looks them up."""
        if route in self._among_of:
            return self._among_of[route]
        among = None
        if route.providers and not (route.discovered and self.routing == "mesh"):
            among = [
                Candidate(
                    peer_id=peer_of(target),
                    addrs=[target],
                    idempotent=route.idempotent,
                    max_concurrency=route.max_concurrency or 0,
                )
                for target in route.providers
            ]
        if len(self._among_of) >= AMONG_CACHE:
            self._among_of.clear()
        self._among_of[route] = among
        return among

    async def _chunks(
        self,
        endpoint: str,
        route: ModelRoute,
        input: Any,
        params: dict[str, Any],
        deadline: float,
        outcome: Outcome,
        *,
        buffered: bool,
    ) -> AsyncGenerator[list[Any] | _Reset, None]:
        """The chunks of one request in batches (non-empty lists, as they come off the mesh
        stream); a buffered one yields :data:`_RESET` when it starts over."""
        among = self._among(route)
        policy = self.policy if among is not None else None
        sent = _Sent()
        # Only an idempotent stream may be taken over part-way: only its text is kept.
        keep_sent = not buffered and route.idempotent
        tried: set[str] = set()
        attempts = 0
        last: ModelNetError | None = None
        started = trio.current_time()
        try:
            while True:
                stream = self.client.stream(
                    route.name,
                    input,
                    params=params,
                    timeout=max(0.0, deadline - trio.current_time()),
                    among=among,
                    avoid=tried,
                    replay=False,
                    policy=policy,
                    max_attempts=self.max_attempts - attempts,
                )
                resume = sent.resume() if sent else None
                received = 0
                try:
                    async with stream:
                        async for batch in stream.batches():
                            # per batch: as little as can be (the first one does the bookkeeping)
                            if not received:
                                outcome.peer = stream.info.peer
                                if outcome.first_chunk_at is None:
                                    outcome.first_chunk_at = trio.current_time()
                                    self.metrics.first_chunk_after(endpoint, outcome.first_chunk_at - started)
                            received += len(batch)
                            if resume is not None:
                                batch = [rest for c in batch if (rest := resume.rest(c)) is not None]
                                if not batch:
                                    continue
                            if keep_sent:
                                for chunk in batch:
                                    sent.add(chunk)
                            outcome.chunks += len(batch)
                            yield batch
                        if resume is not None:
                            resume.check_complete()
                except ModelNetError as exc:
                    tries = stream.info.attempts
                    attempts += len(tries)
                    tried.update(a["peer"] for a in tries if a.get("peer"))
                    if isinstance(exc, _Diverged) and stream.info.peer:
                        self.client.router.failure(stream.info.peer)
                    progress = (outcome.chunks > 0) if buffered else (bool(sent) and route.idempotent)
                    again = (
                        bool(tries)
                        and progress
                        and exc.retryable
                        and not isinstance(exc, DeadlineExceededError)
                        and attempts < self.max_attempts
                        and trio.current_time() < deadline
                    )
                    if not again:
                        if not tries and last is not None:
                            raise last from None  # no provider left: say why the last one failed
                        raise
                    last = exc
                    log.info("%s broke part-way (%s); going on with another provider", route.name, exc)
                    if buffered:
                        outcome.chunks = 0
                        yield _RESET
                    continue
                finally:
                    self.metrics.chunks[endpoint] += received
                info = stream.info
                attempts += len(info.attempts)
                outcome.peer = info.peer
                outcome.finish_reason = info.finish_reason
                outcome.usage = dict(info.usage)
                self.catalog.peers_seen.add(info.peer)
                return
        finally:
            self.metrics.failovers += max(0, attempts - 1)

    async def collect(
        self, endpoint: str, route: ModelRoute, input: Any, params: dict[str, Any], deadline: float
    ) -> tuple[list[Any], Outcome]:
        """The whole answer (started over on another provider if an attempt breaks part-way)."""
        outcome = Outcome()
        chunks: list[Any] = []
        gen = self._chunks(endpoint, route, input, params, deadline, outcome, buffered=True)
        try:
            async for batch in gen:
                if isinstance(batch, _Reset):
                    chunks.clear()
                else:
                    chunks.extend(batch)
        finally:
            await gen.aclose()
        return chunks, outcome

    async def start(
        self, endpoint: str, route: ModelRoute, input: Any, params: dict[str, Any], deadline: float
    ) -> tuple[AsyncGenerator[list[Any], None], Outcome, list[Any]]:
        """Start a streamed request and wait for its first chunks (so that early errors keep their status).

        Returns the rest of the chunks in batches, the outcome, and the first batch (empty if the
        answer was).
        """
        outcome = Outcome()
        gen = self._chunks(endpoint, route, input, params, deadline, outcome, buffered=False)
        first: list[Any] = []
        try:
            batch = await gen.__anext__()
            assert not isinstance(batch, _Reset)  # only a buffered request starts over
            first = batch
        except StopAsyncIteration:
            pass
        except BaseException:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await gen.aclose()
            raise
        return cast(AsyncGenerator[list[Any], None], gen), outcome, first  # never a _Reset: not buffered

    async def collect_all(
        self,
        endpoint: str,
        route: ModelRoute,
        inputs: Sequence[Any],
        params: dict[str, Any],
        deadline: float,
        *,
        concurrency: int,
    ) -> list[tuple[list[Any], Outcome]]:
        """The whole answers to several inputs, in order, at most ``concurrency`` requests at once.

        If any fails, the others are cancelled and its error is raised.
        """
        results: list[tuple[list[Any], Outcome] | None] = [None] * len(inputs)
        limiter = trio.CapacityLimiter(concurrency)

        async def run(i: int) -> None:
            async with limiter:
                results[i] = await self.collect(endpoint, route, inputs[i], params, deadline)

        if len(inputs) == 1:
            await run(0)
        else:
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(len(inputs)):
                        nursery.start_soon(run, i)
            except BaseExceptionGroup as group:
                mesh = [e for e in _leaves(group) if isinstance(e, ModelNetError)]
                if mesh:
                    raise mesh[0] from None
                raise
        return [r for r in results if r is not None]


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out

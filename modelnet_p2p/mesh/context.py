"""The request context: ``request.mesh``, the mesh as seen from inside a handler.

Calls made through a :class:`MeshContext` go through the peer's one
:class:`~modelnet_p2p.mesh.client.MeshClient` and carry the request's pathway:

- its **deadline**: each nested call gets the request's remaining time (or less);
- its **cancellation**: nested calls run inside the handler, so cancelling the
  request (the caller resets, the deadline passes, the peer stops) cancels them,
  on every hop;
- its **trace**: the same trace id, ``hops + 1``, and this step (peer and
  capability) appended to the path of visited steps, which lets the next
  server refuse a loop or a pathway over the hop limit.

A context also satisfies the collaboration patterns' ``Mesh`` interface, so a
handler may run ``await pipeline(request.mesh, [...], input)`` as one step of a
larger pathway.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection
from typing import Any

import trio

from ..errors import DeadlineExceededError
from ..proto.infer import TraceContext
from ..services.inference.handlers import InferenceRequest
from ..services.inference.server import via_entry
from .client import InferenceStream, MeshClient
from .providers import LOOKUP_TIMEOUT

__all__ = ["MAX_VISITED", "MeshContext", "join_chunks"]

#: Path entries a trace carries; older ones are dropped first.
MAX_VISITED = 32


def join_chunks(chunks: list[Any]) -> Any:
    """An answer as one value: text chunks joined (and stripped), one chunk as itself, else the list."""
    if chunks and all(isinstance(c, str) for c in chunks):
        return "".join(chunks).strip()
    if len(chunks) == 1:
        return chunks[0]
    return chunks


class MeshContext:
    """``request.mesh`` (see the module docstring).

    Args:
        client: the peer's mesh client.
        local_peer: this peer's id (the step appended to the trace's path).
        request: the request being handled.
    """

    def __init__(self, client: MeshClient, local_peer: str, request: InferenceRequest) -> None:
        self.client = client
        self.local_peer = local_peer
        self.request = request

    def trace_context(self) -> TraceContext:
        """The trace a nested call carries: same trace id, one hop more, this step on the path."""
        tc = self.request.trace
        return TraceContext(
            trace_id=tc.trace_id or os.urandom(16),
            span_id=os.urandom(8),
            hops=tc.hops + 1,
            visited=(*tc.visited, via_entry(self.local_peer, self.request.capability.name))[-MAX_VISITED:],
        )

    def remaining(self) -> float | None:
        """Seconds left for nested calls (``None``: no deadline); raises once none is left."""
        left = self.request.deadline - trio.current_time()
        if math.isinf(left):
            return None
        if left <= 0:
            raise DeadlineExceededError("no time left for a nested call")
        return left

    def infer(
        self,
        target: Any = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        avoid: Collection[str] = (),
        replay: bool | None = None,
        receipt: bool = False,
        **params: Any,
    ) -> InferenceStream:
        """Stream a nested call (``target=None``: the mesh picks a provider), like ``Peer.infer``.

        ``timeout`` may shorten the request's remaining time, never extend it.
        """
        left = self.remaining()
        if timeout is not None:
            left = timeout if left is None else min(left, timeout)
        return self.client.stream(
            capability or "",
            input,
            params=params,
            timeout=left,
            target=target,
            avoid=avoid,
            replay=replay,
            receipt=receipt,
            trace=self.trace_context(),
        )

    async def call(
        self, target: Any = None, capability: str | None = None, input: Any = None, **params: Any
    ) -> Any:
        """Call a capability and return its answer (joined text, the single value, or the chunks)."""
        stream = self.infer(target, capability, input, **params)
        chunks: list[Any] = []
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        return join_chunks(chunks)

    def call_sync(
        self, target: Any = None, capability: str | None = None, input: Any = None, **params: Any
    ) -> Any:
        """:meth:`call` for sync handlers, which run in worker threads."""
        return trio.from_thread.run(lambda: self.call(target, capability, input, **params))

    async def find_providers(
        self, capability: str, *, timeout: float = LOOKUP_TIMEOUT, limit: int | None = None
    ) -> list[str]:
        """One target per known provider of ``capability`` (other than this peer)."""
        left = self.remaining()
        lookup = timeout if left is None else min(timeout, left)
        cands = await self.client.providers(capability, timeout=lookup)
        targets = [c.addrs[0] if c.addrs else c.peer_id for c in cands if c.peer_id != self.local_peer]
        return targets if limit is None else targets[:limit]

"""Handlers that call other models: deadlines, cancellation, hop limits and loops across hops."""

from __future__ import annotations

import pytest
import trio

from modelnet_p2p import BadRequestError, DeadlineExceededError
from modelnet_p2p.collab import Step, pipeline
from modelnet_p2p.testing import open_peers


async def test_handler_calls_another_model_and_trace_grows():
    seen = {}

    async def upper(request):
        seen["hops"] = request.trace.hops
        seen["via"] = request.trace.visited
        seen["tid"] = request.trace.trace_id
        return str(request.input).upper()

    async with open_peers(3) as (a, b, c):
        c.serve("upper", upper)

        async def shout(request):
            text = await request.mesh.call(c.addrs[0], "upper", request.input)
            return text + "!"

        b.serve("shout", shout)
        resp = await a.call(b.addrs[0], "shout", "hi")
        assert resp.value == "HI!"
        assert seen["hops"] == 1
        assert seen["via"] == (f"{b.peer_id}/shout",)
        assert len(seen["tid"]) == 16


async def test_loop_between_two_handlers_is_stopped():
    async with open_peers(3) as (a, b, c):

        async def ping(request):
            return await request.mesh.call(c.addrs[0], "pong", request.input)

        async def pong(request):
            return await request.mesh.call(b.addrs[0], "ping", request.input)

        b.serve("ping", ping)
        c.serve("pong", pong)
        with trio.fail_after(10):
            with pytest.raises(BadRequestError, match="loop detected"):
                await a.call(b.addrs[0], "ping", "x")


async def test_hop_limit():
    async with open_peers(3, max_hops=3) as (a, b, c):
        peers = [b, c]

        def make(i):
            async def step(request):
                nxt = peers[(i + 1) % 2]
                return await request.mesh.call(nxt.addrs[0], f"step{i + 1}", request.input)

            return step

        for i in range(8):
            peers[i % 2].serve(f"step{i}", make(i))
        with trio.fail_after(10):
            with pytest.raises(BadRequestError, match="hop limit exceeded"):
                await a.call(b.addrs[0], "step0", "x")


async def test_deadline_propagates_and_cancels_downstream():
    cancelled = trio.Event()
    started = trio.Event()

    async def slow(request):
        started.set()
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            cancelled.set()
            raise
        return "late"

    async with open_peers(3) as (a, b, c):
        c.serve("slow", slow)

        async def relay(request):
            return await request.mesh.call(c.addrs[0], "slow", request.input)

        b.serve("relay", relay)
        with pytest.raises(DeadlineExceededError):
            await a.call(b.addrs[0], "relay", "x", timeout=1.0)
        with trio.fail_after(5):
            await started.wait()
            await cancelled.wait()


async def test_client_cancel_reaches_the_second_hop():
    cancelled = trio.Event()

    async def endless(request):
        i = 0
        try:
            while True:
                yield i
                i += 1
                await trio.sleep(0.02)
        except trio.Cancelled:
            cancelled.set()
            raise

    async with open_peers(3) as (a, b, c):
        c.serve("endless", endless)

        async def relay(request):
            async with request.mesh.infer(c.addrs[0], "endless", None) as stream:
                async for chunk in stream:
                    yield chunk

        b.serve("relay", relay)
        async with a.infer(b.addrs[0], "relay", None) as stream:
            async for chunk in stream:
                if chunk == 3:
                    break
        with trio.fail_after(5):
            await cancelled.wait()


async def test_a_handler_runs_a_pattern_over_request_mesh():
    """``request.mesh`` is a collaboration ``Mesh``: a pattern inside a handler extends its pathway."""
    seen = []

    async def upper(request):
        seen.append((request.trace.hops, request.trace.visited))
        return str(request.input).upper()

    async def exclaim(request):
        seen.append((request.trace.hops, request.trace.visited))
        return f"{request.input}!"

    async with open_peers(3) as (a, b, c):
        c.serve("upper", upper)
        c.serve("exclaim", exclaim)
        await c.announce()

        async def both(request):
            result = await pipeline(
                request.mesh, ["upper", Step("exclaim", target=c.addrs[0])], request.input
            )
            return {"text": result.text, "peers": result.trace.peers()}

        b.serve("both", both)
        resp = await a.call(b.addrs[0], "both", "hi", timeout=20)
        assert resp.value == {"text": "HI!", "peers": [c.peer_id, c.peer_id]}
        assert seen == [(1, (f"{b.peer_id}/both",))] * 2

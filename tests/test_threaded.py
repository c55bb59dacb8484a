"""Peers on their own thread: used from plain sync code and from asyncio."""

from __future__ import annotations

import asyncio

import pytest

from modelnet_p2p import DeadlineExceededError, NotFoundError
from modelnet_p2p.threaded import AsyncioPeer, ThreadedPeer


def words(request):
    yield from str(request.input).split()


def test_threaded_peer_from_sync_code():
    with ThreadedPeer() as a, ThreadedPeer() as b:
        b.serve("words", words)
        b.serve("upper", lambda r: r.input.upper())
        assert a.call(b.addrs[0], "words", "one two three").chunks == ["one", "two", "three"]
        assert list(a.infer(b.addrs[0], "words", "x y")) == ["x", "y"]
        assert a.call(b.peer_id, "upper", "abc").value == "ABC"
        with pytest.raises(NotFoundError):
            a.call(b.addrs[0], "missing", None)


def test_threaded_early_close_cancels():
    import threading
    import time

    stopped = threading.Event()

    def endless(request):
        i = 0
        while not request.cancelled:
            yield i
            i += 1
            time.sleep(0.01)
        stopped.set()

    with ThreadedPeer() as a, ThreadedPeer() as b:
        b.serve("endless", endless)
        gen = a.infer(b.addrs[0], "endless", None)
        assert next(gen) == 0
        gen.close()
        assert stopped.wait(5)


def test_threaded_start_failure_raises():
    from modelnet_p2p import ConfigError

    with ThreadedPeer() as a:
        taken = a.addrs[0].split("/p2p/")[0]
        with pytest.raises(ConfigError):
            ThreadedPeer(listen=[taken]).start()


def test_asyncio_peer():
    async def main():
        async with AsyncioPeer() as a, AsyncioPeer() as b:

            async def tokens(request):
                for i in range(4):
                    await asyncio.sleep(0.001)
                    yield f"t{i}"

            async def double(request):
                await asyncio.sleep(0.001)
                return request.input * 2

            async def slow(request):
                await asyncio.sleep(10)
                return "late"

            b.serve("tokens", tokens)
            b.serve("double", double)
            b.serve("slow", slow)
            got = [c async for c in a.infer(b.addrs[0], "tokens", None)]
            assert got == ["t0", "t1", "t2", "t3"]
            assert (await a.call(b.addrs[0], "double", 21)).value == 42
            with pytest.raises(DeadlineExceededError):
                await a.call(b.addrs[0], "slow", None, timeout=0.3)
            # the asyncio loop stayed responsive throughout
            await asyncio.sleep(0)

    asyncio.run(main())

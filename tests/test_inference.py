"""The inference protocol between real peers on 127.0.0.1."""

from __future__ import annotations

import math

import pytest
import trio
from libp2p.custom_types import TProtocol

from modelnet_p2p import (
    BadRequestError,
    Capability,
    DeadlineExceededError,
    InternalError,
    NotFoundError,
    OverloadedError,
    Peer,
    ProtocolError,
    UnavailableError,
)
from modelnet_p2p.proto.framing import encode_varint, pack_frame
from modelnet_p2p.proto.infer import PROTOCOL_ID, Chunk, End
from modelnet_p2p.testing import open_peers

WORDS = "the quick brown fox jumps over the lazy dog".split()


async def words(request):
    for w in str(request.input).split():
        yield w + " "


async def test_streamed_request_two_peers():
    async with open_peers(2) as (a, b):
        b.serve(Capability(name="echo", task="text-generation"), words)
        got = []
        stream = a.infer(b.addrs[0], "echo", " ".join(WORDS))
        async for chunk in stream:
            got.append(chunk)
        assert got == [w + " " for w in WORDS]
        assert stream.info.peer == b.peer_id
        assert stream.info.finish_reason == "stop"
        assert stream.info.chunks == len(WORDS)


async def test_collected_request_and_keywords():
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        resp = await a.call(b.addrs[0], capability="echo", input="hello world")
        assert resp.chunks == ["hello ", "world "]
        assert resp.text == "hello world "
        assert resp.peer == b.peer_id
        # by peer id once the address is known
        resp2 = await a.call(target=b.peer_id, capability="echo", input="again")
        assert resp2.text == "again "


async def test_three_peers_concurrent():
    async with open_peers(3) as (a, b, c):

        async def upper(request):
            return str(request.input).upper()

        async def lower(request):
            return str(request.input).lower()

        b.serve("case", upper)
        c.serve("case", lower)
        results = {}

        async def ask(peer, key):
            results[key] = (await a.call(peer.addrs[0], "case", "MiXeD")).value

        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(ask, b, f"b{i}")
                n.start_soon(ask, c, f"c{i}")
        assert {results[f"b{i}"] for i in range(5)} == {"MIXED"}
        assert {results[f"c{i}"] for i in range(5)} == {"mixed"}


async def test_handler_kinds():
    def sync_gen(request):
        yield from ["a", "b", "c"]

    def sync_fn(request):
        return {"sum": sum(request.input)}

    async def async_fn(request):
        await trio.sleep(0)
        return request.params.get("x", 0) * 2

    async with open_peers(2) as (a, b):
        b.serve("sg", sync_gen)
        b.serve("sf", sync_fn)
        b.serve("af", async_fn)
        assert (await a.call(b.addrs[0], "sg", None)).chunks == ["a", "b", "c"]
        assert (await a.call(b.addrs[0], "sf", [1, 2, 3])).value == {"sum": 6}
        assert (await a.call(b.addrs[0], "af", None, x=21)).value == 42


async def test_unknown_capability():
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        with pytest.raises(NotFoundError) as info:
            await a.call(b.addrs[0], "nope", "x")
        assert not info.value.retryable
        assert "nope" in info.value.message


async def test_handler_raises_then_host_still_serves():
    async def broken(request):
        yield "partial"
        raise ValueError("model exploded")

    async def bad_input(request):
        raise BadRequestError("input must be text")

    async with open_peers(2) as (a, b):
        b.serve("broken", broken)
        b.serve("bad", bad_input)
        b.serve("echo", words)
        got = []
        with pytest.raises(InternalError) as info:
            async for chunk in a.infer(b.addrs[0], "broken", None):
                got.append(chunk)
        assert got == ["partial"]
        assert info.value.chunks_delivered == 1
        assert "model exploded" in info.value.message
        with pytest.raises(BadRequestError, match="input must be text"):
            await a.call(b.addrs[0], "bad", None)
        # the same host keeps serving, also to others
        assert (await a.call(b.addrs[0], "echo", "still here")).text == "still here "


async def test_deadline_runs_out_and_handler_is_cancelled():
    cancelled = trio.Event()

    async def slow(request):
        yield "first"
        try:
            await trio.sleep(30)
        except trio.Cancelled:
            cancelled.set()
            raise
        yield "never"

    async with open_peers(2) as (a, b):
        b.serve("slow", slow)
        got = []
        with pytest.raises(DeadlineExceededError) as info:
            async for chunk in a.infer(b.addrs[0], "slow", None, timeout=0.5):
                got.append(chunk)
        assert got == ["first"]
        assert info.value.chunks_delivered == 1
        with trio.fail_after(5):
            await cancelled.wait()


async def test_server_enforces_deadline_it_was_sent():
    async def sleeper(request):
        assert request.deadline < math.inf
        await trio.sleep(10)
        return "late"

    async with open_peers(2) as (a, b):
        b.serve("sleep", sleeper)
        with trio.fail_after(5):
            with pytest.raises(DeadlineExceededError):
                await a.call(b.addrs[0], "sleep", None, timeout=0.3)


async def test_client_cancel_mid_stream_cancels_handler():
    cancelled = trio.Event()
    produced = []

    async def endless(request):
        i = 0
        try:
            while True:
                produced.append(i)
                yield i
                i += 1
                await trio.sleep(0.01)
        except trio.Cancelled:
            cancelled.set()
            raise

    async with open_peers(2) as (a, b):
        b.serve("endless", endless)
        async with a.infer(b.addrs[0], "endless", None) as stream:
            async for chunk in stream:
                if chunk == 3:
                    break
        with trio.fail_after(5):
            await cancelled.wait()
            while b.inference.in_flight:
                await trio.sleep(0.01)
        # plain break without a context manager also cancels (via garbage collection)
        cancelled = trio.Event()
        async for chunk in a.infer(b.addrs[0], "endless", None):
            if chunk == 2:
                break
        with trio.fail_after(5):
            await cancelled.wait()


async def test_overloaded_global_and_per_peer():
    release = trio.Event()

    async def hold(request):
        await release.wait()
        return "done"

    async with open_peers(3, max_concurrency=2, max_concurrency_per_peer=1) as (a, b, c):
        for p in (a, b, c):
            p.serve("hold", hold)
        results: list[object] = []

        async def ask(src, dst):
            try:
                results.append((await src.call(dst.addrs[0], "hold", None)).value)
            except OverloadedError as exc:
                results.append(exc)

        async with trio.open_nursery() as n:
            n.start_soon(ask, a, b)
            await trio.sleep(0.3)
            # second request from the same peer: per-peer limit
            with pytest.raises(OverloadedError, match="your peer") as info:
                await a.call(b.addrs[0], "hold", None)
            assert info.value.retryable
            n.start_soon(ask, c, b)
            await trio.sleep(0.3)
            # a third caller hits the global limit of 2
            async with open_peers(1) as (d,):
                with pytest.raises(OverloadedError, match="concurrency limit"):
                    await d.call(b.addrs[0], "hold", None)
            release.set()
        assert results == ["done", "done"]


async def test_capability_concurrency_limit():
    release = trio.Event()

    async def hold(request):
        await release.wait()
        return "ok"

    async with open_peers(3) as (a, b, c):
        b.serve(Capability(name="one", max_concurrency=1), hold)
        async with trio.open_nursery() as n:
            n.start_soon(a.call, b.addrs[0], "one", None)
            await trio.sleep(0.3)
            with pytest.raises(OverloadedError):
                await c.call(b.addrs[0], "one", None)
            release.set()


async def test_slow_consumer_receives_everything():
    """8 MiB through a consumer that stalls for 6 s: yamux alone would reset the stream."""
    block = b"x" * (64 * 1024)

    async def bulk(request):
        for i in range(128):
            yield i.to_bytes(4, "big") + block

    async with open_peers(2) as (a, b):
        b.serve("bulk", bulk)
        seen = []
        async for chunk in a.infer(b.addrs[0], "bulk", None):
            seen.append(int.from_bytes(chunk[:4], "big"))
            assert len(chunk) == 4 + len(block)
            if len(seen) == 1:
                await trio.sleep(6)
        assert seen == list(range(128))


async def test_oversized_chunk_from_handler_is_internal_error():
    async def huge(request):
        yield "small"
        yield b"x" * (2 << 20)

    async with open_peers(2) as (a, b):
        b.serve("huge", huge)
        with pytest.raises(InternalError, match="too large"):
            await a.call(b.addrs[0], "huge", None)


async def test_request_too_large_is_bad_request():
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        with pytest.raises(BadRequestError, match="too large"):
            await a.call(b.addrs[0], "echo", "x" * (2 << 20))


async def test_unreachable_peer_is_unavailable():
    async with open_peers(2) as (_, b):
        dead = b.addrs[0]
    async with open_peers(1) as (c,):
        with pytest.raises(UnavailableError) as info:
            await c.call(dead, "echo", "x", timeout=5)
        assert info.value.retryable


async def test_unknown_peer_id_without_address():
    async with open_peers(1) as (a,):
        other = Peer()
        with pytest.raises(UnavailableError, match="no known address"):
            await a.call(other.peer_id, "echo", "x")


# -- misbehaving remotes ---------------------------------------------------------


async def _raw_request(a: Peer, b: Peer, payload: bytes) -> bytes:
    """Open a raw inference stream from a to b, send bytes, and read the reply until EOF."""
    await a.connect(b.addrs[0])
    stream = await a.host.new_stream(b.identity.peer_id, [TProtocol(PROTOCOL_ID)])
    await stream.write(payload)
    out = b""
    try:
        with trio.fail_after(5):
            while True:
                out += await stream.read(65536)
    except Exception:
        pass
    await stream.reset()
    return out


def _decode_all(data: bytes) -> list[dict]:
    from modelnet_p2p.proto.framing import FrameDecoder

    return FrameDecoder().feed(data)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (encode_varint(5 << 20) + b"\x80", "exceeds the limit"),
        (b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "too long"),
        (encode_varint(4) + b"\xc1\xc1\xc1\xc1", "malformed"),
        (pack_frame({"t": "chunk", "seq": 0, "d": 1}), "expected a request"),
        (pack_frame({"t": "credit", "b": 5}), "expected a request"),
        (pack_frame({"t": "cancel"}), "expected a request"),
        (
            pack_frame(
                {
                    "t": "req",
                    "v": 1,
                    "id": b"1",
                    "cap": "echo",
                    "in": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
                }
            ),
            "nesting",
        ),
        (pack_frame({"t": "req", "v": 9, "id": b"1", "cap": "x"}), "version"),
        (pack_frame({"hello": "world"}), "unknown frame type"),
    ],
)
async def test_server_answers_bad_frames_with_protocol_error(payload, reason):
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        reply = _decode_all(await _raw_request(a, b, payload))
        assert len(reply) == 1
        assert reply[0]["t"] == "err"
        assert reply[0]["code"] == "protocol_error"
        assert reason in reply[0]["msg"]
        # and keeps serving
        assert (await a.call(b.addrs[0], "echo", "ok")).text == "ok "


def _misbehaving_server(b: Peer, payload: bytes, *, close: bool = True):
    async def handler(stream):
        try:
            await stream.read(65536)
            await stream.write(payload)
            if close:
                await stream.close()
        except Exception:
            await stream.reset()

    b.host.set_stream_handler(TProtocol(PROTOCOL_ID), handler)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"garbage that is not a frame at all" * 3, "truncated"),
        (encode_varint(4) + b"\xc1\xc1\xc1\xc1", "malformed"),
        (pack_frame({"t": "chunk", "seq": "zero", "d": 1}), "non-negative integer"),
        (encode_varint(64 << 20), "exceeds the limit"),
        (pack_frame(Chunk(0, "a").to_wire()), "without an end frame"),
        (pack_frame(Chunk(0, "a").to_wire())[:-1], "truncated"),
        (pack_frame(Chunk(0, "a").to_wire()) + pack_frame(End(2).to_wire()), "says 2 chunks"),
        (pack_frame(Chunk(1, "a").to_wire()), "sequence 1"),
        (pack_frame({"t": "credit", "b": 5}), "unexpected Credit"),
        (pack_frame({"t": "err", "code": "teapot", "msg": "x"}), "unknown error code"),
    ],
)
async def test_client_rejects_bad_answers(payload, message):
    async with open_peers(2) as (a, b):
        _misbehaving_server(b, payload)
        with pytest.raises(ProtocolError, match=message):
            async for _ in a.infer(b.addrs[0], "x", None, timeout=5):
                pass


async def test_truncated_answer_by_reset_is_unavailable():
    async with open_peers(2) as (a, b):

        async def handler(stream):
            await stream.read(65536)
            await stream.write(pack_frame(Chunk(0, "a").to_wire()))
            await trio.sleep(0.1)
            await stream.reset()

        b.host.set_stream_handler(TProtocol(PROTOCOL_ID), handler)
        got = []
        # py-libp2p's yamux reports a remote reset to a reader as end of stream,
        # so this is either error, but never a silent end.
        with pytest.raises((UnavailableError, ProtocolError)) as info:
            async for chunk in a.infer(b.addrs[0], "x", None, timeout=5):
                got.append(chunk)
        assert got == ["a"]
        assert info.value.chunks_delivered == 1


async def test_errors_escape_the_peer_unwrapped():
    with pytest.raises(NotFoundError):
        async with open_peers(2) as (a, b):
            await a.call(b.addrs[0], "missing", None)


async def test_large_chunk_after_small_one_does_not_stall():
    async def mixed(request):
        yield "x" * 1000
        await trio.sleep(0.1)
        yield b"y" * 1_048_000

    async with open_peers(2) as (a, b):
        b.serve("mixed", mixed)
        resp = await a.call(b.addrs[0], "mixed", None, timeout=10)
        assert [len(c) for c in resp.chunks] == [1000, 1_048_000]


async def test_abandoning_cancels_a_handler_that_is_not_writing():
    stopped = trio.Event()

    async def compute(request):
        yield "started"
        try:
            await trio.sleep(60)  # long computation, nothing written meanwhile
        finally:
            stopped.set()

    async with open_peers(2) as (a, b):
        b.serve("compute", compute)
        async with a.infer(b.addrs[0], "compute", None) as stream:
            async for _ in stream:
                break
        with trio.fail_after(5):
            await stopped.wait()
            while b.inference.in_flight:
                await trio.sleep(0.01)


async def test_cancel_sent_in_the_same_write_as_the_request():
    from modelnet_p2p.proto.infer import Cancel, Request

    stopped = trio.Event()

    async def slow(request):
        try:
            await trio.sleep(60)
        finally:
            stopped.set()
        yield "never"

    async with open_peers(2) as (a, b):
        b.serve("slow", slow)
        req = Request(request_id=b"r1", capability="slow")
        payload = pack_frame(req.to_wire()) + pack_frame(Cancel("changed my mind").to_wire())
        reply = await _raw_request(a, b, payload)
        assert reply == b""  # cancelled: nothing is sent back
        with trio.fail_after(5):
            await stopped.wait()


async def test_sequential_requests_reuse_one_stream():
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        for i in range(5):
            assert (await a.call(b.addrs[0], "echo", f"n{i}")).text == f"n{i} "
            assert a.stream_pool.idle_count(b.peer_id) == 1
        # an error answer closes the stream instead of keeping it
        with pytest.raises(NotFoundError):
            await a.call(b.addrs[0], "missing", None)
        assert a.stream_pool.idle_count(b.peer_id) == 0
        # concurrent requests use several streams, all kept afterwards
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(a.call, b.addrs[0], "echo", "x")
        assert 1 <= a.stream_pool.idle_count(b.peer_id) <= 3


async def test_stale_kept_stream_is_retried_on_a_new_one():
    async with open_peers(2) as (a, b):
        b.limits.idle_stream_timeout = 0.2
        b.serve("echo", words)
        assert (await a.call(b.addrs[0], "echo", "one")).text == "one "
        assert a.stream_pool.idle_count(b.peer_id) == 1
        await trio.sleep(0.6)  # the server closes the idle stream
        assert (await a.call(b.addrs[0], "echo", "two")).text == "two "


async def test_pool_sweep_closes_idle_streams():
    async with open_peers(2) as (a, b):
        b.serve("echo", words)
        await a.call(b.addrs[0], "echo", "x")
        assert a.stream_pool.idle_count() == 1
        await a.stream_pool.sweep(max_idle=0)
        assert a.stream_pool.idle_count() == 0
        assert (await a.call(b.addrs[0], "echo", "y")).text == "y "


async def test_reset_kept_stream_is_not_resent():
    """A server that reset a kept stream after reading the request may have run it: no resend."""
    from modelnet_p2p.proto.framing import FrameDecoder

    seen: list[bytes] = []
    async with open_peers(2) as (a, b):

        async def handler(stream):
            decoder = FrameDecoder()
            try:
                while True:
                    for body in decoder.feed(await stream.read(65536)):
                        if body.get("t") != "req":
                            continue
                        seen.append(body["id"])
                        if len(seen) == 1:
                            await stream.write(pack_frame(End(0, keep=True).to_wire()))
                        else:
                            await stream.reset()
                            return
            except Exception:
                await stream.reset()

        b.host.set_stream_handler(TProtocol(PROTOCOL_ID), handler)
        await a.call(b.addrs[0], "x", None)
        assert a.stream_pool.idle_count(b.peer_id) == 1
        with pytest.raises(UnavailableError, match="reset"):
            await a.call(b.addrs[0], "x", None, timeout=5)
        assert len(seen) == 2
        assert a.stream_pool.idle_count(b.peer_id) == 0


async def test_failed_requests_never_return_their_stream_to_the_pool():
    async def slow(request):
        yield "a"
        await trio.sleep(30)

    async with open_peers(2) as (a, b):
        b.serve("slow", slow)
        b.serve("echo", words)
        with pytest.raises(DeadlineExceededError):
            await a.call(b.addrs[0], "slow", None, timeout=0.3)
        assert a.stream_pool.idle_count(b.peer_id) == 0
        async for _ in a.infer(b.addrs[0], "slow", None):
            break  # abandoned: the stream is reset, not kept
        assert a.stream_pool.idle_count(b.peer_id) == 0
        await a.call(b.addrs[0], "echo", "x")
        stats = a.stream_pool.stats()
        assert (stats.idle, stats.parked) == (1, 1)


async def test_capability_names_match_after_normalization():
    async with open_peers(2) as (a, b):
        b.serve("Echo", words)
        assert (await a.call(b.addrs[0], "echo", "hi")).text == "hi "
        assert (await a.call(b.addrs[0], " ECHO ", "hi")).text == "hi "
        from modelnet_p2p import ConfigError

        with pytest.raises(ConfigError, match="collides"):
            b.serve("echo", words)
        b.serve("Echo", words)  # the very same name replaces the handler
        assert [c.name for c in b.capabilities] == ["Echo"]


async def test_hop_limit_above_the_maximum_is_refused():
    from modelnet_p2p import ConfigError

    with pytest.raises(ConfigError, match="max_hops"):
        Peer(max_hops=33)


# -- the pool on a mock clock ------------------------------------------------------------------


class _FakeStream:
    def __init__(self) -> None:
        self.closed = False

    async def read(self, n=None):
        return b""

    async def write(self, data):
        pass

    async def close(self):
        self.closed = True

    async def reset(self):
        self.closed = True


async def test_pool_idle_timeout_and_per_peer_cap(mock_clock):
    from modelnet_p2p.p2p.pool import StreamPool

    mock_clock.autojump_threshold = 0
    pool = StreamPool(max_idle=20.0, per_peer=2)
    s1, s2, s3 = _FakeStream(), _FakeStream(), _FakeStream()
    release = pool.release_to("p")
    release(s1)
    await trio.sleep(5)
    release(s2)
    release(s3)  # one too many: the oldest goes
    assert pool.idle_count("p") == 2
    await pool.sweep()
    assert s1.closed and not s2.closed
    await trio.sleep(16)  # s2 is 16 s old, s3 too: both still usable
    assert pool.acquire("p") is s3
    await trio.sleep(5)  # s2 is now 21 s old
    assert pool.acquire("p") is None
    await pool.sweep()
    assert s2.closed
    assert pool.stats().reused == 1 and pool.stats().closed == 2


async def test_a_stream_taken_and_parked_per_request_does_not_wake_the_sweeper_each_time(mock_clock):
    """A busy caller parks its stream at the end of each request and takes it again at the
    next: the sweeper wakes once, not once a request (before: it woke at every park, found
    the stream taken and went back to waiting: a scheduler pass a request)."""
    from modelnet_p2p.p2p.pool import StreamPool

    mock_clock.autojump_threshold = 0
    pool = StreamPool(max_idle=20.0)
    stream = _FakeStream()

    class Steps(trio.abc.Instrument):
        steps = 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name.endswith("sweep_forever"):
                Steps.steps += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.sweep_forever)
        await trio.sleep(1)
        counter = Steps()
        trio.lowlevel.add_instrument(counter)
        try:
            for _ in range(50):
                pool.release("p", stream)
                assert pool.acquire("p") is stream
                await trio.sleep(0.01)
        finally:
            trio.lowlevel.remove_instrument(counter)
        nursery.cancel_scope.cancel()
    assert Steps.steps <= 3, Steps.steps
    assert not stream.closed


async def test_pool_sweeps_on_its_own(mock_clock):
    from modelnet_p2p.p2p.pool import StreamPool

    mock_clock.autojump_threshold = 0
    pool = StreamPool(max_idle=20.0)
    stream = _FakeStream()
    pool.release("p", stream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.sweep_forever)
        await trio.sleep(19)
        assert not stream.closed
        await trio.sleep(6)
        assert stream.closed and pool.idle_count() == 0
        nursery.cancel_scope.cancel()

"""The batch path of an answer: the client session hands every chunk one read brought as one
event (``ClientSession.next_batch``), the layers above pass lists of chunks on, and
``InferenceStream`` gives them out one by one or as batches (``stream.batches()``).

Between real peers on 127.0.0.1 where a network is involved; no timing assertions.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from modelnet_p2p import Capability, ProtocolError, UnavailableError
from modelnet_p2p.mesh.routing import Candidate
from modelnet_p2p.proto.framing import FrameDecoder, pack_frame
from modelnet_p2p.proto.infer import Chunk, ChunkBatch, End, ErrorFrame, Request
from modelnet_p2p.proto.limits import MAX_DEPTH
from modelnet_p2p.proto.packing import packb, unpackb
from modelnet_p2p.proto.session import (
    NEED_DATA,
    ChunksReceived,
    ClientSession,
    ClientState,
    ErrorReceived,
    Finished,
    Limits,
    ServerSession,
)
from modelnet_p2p.testing import open_peers

N = 300


def _client(batch: bool = True) -> ClientSession:
    session = ClientSession(Request(request_id=b"r", capability="x", batch=batch, keep=True))
    session.send_request(0.0)
    return session


def _frames(*msgs: Any) -> bytes:
    return b"".join(pack_frame(m.to_wire()) for m in msgs)


def test_next_batch_gives_every_buffered_chunk_as_one_event_then_the_end():
    s = _client()
    s.receive_data(
        _frames(Chunk(0, "a"), ChunkBatch(1, ("b", "c", "d")), Chunk(4, b"e"), Chunk(5, {"k": 1}), End(6))
    )
    first = s.next_batch()
    assert isinstance(first, ChunksReceived)
    assert first.seq == 0 and first.data == ["a", "b", "c", "d", b"e", {"k": 1}]
    assert s.chunks == 6
    end = s.next_batch()
    assert isinstance(end, Finished) and end.end.chunks == 6
    assert s.state is ClientState.DONE


def test_next_batch_gives_what_is_buffered_and_waits_for_the_rest():
    s = _client()
    data = _frames(Chunk(0, "a"), Chunk(1, "b"), Chunk(2, "c"), End(3))
    cut = len(_frames(Chunk(0, "a"), Chunk(1, "b"))) + 2  # inside the third frame
    s.receive_data(data[:cut])
    got = s.next_batch()
    assert isinstance(got, ChunksReceived) and got.data == ["a", "b"]
    assert s.next_batch() is NEED_DATA
    s.receive_data(data[cut:])
    got = s.next_batch()
    assert isinstance(got, ChunksReceived) and got.seq == 2 and got.data == ["c"]
    assert isinstance(s.next_batch(), Finished)


def test_an_error_after_chunks_comes_after_them_with_the_count():
    s = _client()
    s.receive_data(_frames(Chunk(0, "a"), Chunk(1, "b"), ErrorFrame("unavailable", "gone", True, 2)))
    got = s.next_batch()
    assert isinstance(got, ChunksReceived) and got.data == ["a", "b"]
    err = s.next_batch()
    assert isinstance(err, ErrorReceived)
    assert isinstance(err.error, UnavailableError) and err.error.chunks_delivered == 2


@pytest.mark.parametrize(
    "msgs",
    [
        (Chunk(0, "a"), Chunk(2, "b")),  # a gap
        (Chunk(0, "a"), ChunkBatch(0, ("b",))),  # a repeat
        (Chunk(0, "a"), End(5)),  # a count that disagrees
    ],
)
def test_breaches_behind_buffered_chunks_are_protocol_errors(msgs):
    s = _client()
    s.receive_data(_frames(*msgs))
    got = s.next_batch()  # the chunks before the breach come first, as the error counts them
    assert isinstance(got, ChunksReceived) and got.data == ["a"]
    with pytest.raises(ProtocolError) as exc:
        s.next_batch()
    assert exc.value.chunks_delivered == 1
    assert s.state is ClientState.FAILED


def test_a_batch_frame_to_a_client_that_did_not_ask_is_still_refused():
    s = _client(batch=False)
    s.receive_data(_frames(Chunk(0, "a"), ChunkBatch(1, ("b", "c"))))
    got = s.next_batch()
    assert isinstance(got, ChunksReceived) and got.data == ["a"]
    with pytest.raises(ProtocolError, match="unexpected ChunkBatch"):
        s.next_batch()


def test_the_server_counts_the_bytes_of_the_chunks_it_holds():
    s = ServerSession(0.0, Limits())
    s.receive_data(pack_frame(Request(request_id=b"r", capability="x", batch=True).to_wire()))
    s.next_event()
    s.accept(0.0)
    assert s.queued_bytes == 0
    for i in range(100):
        assert s.send_chunk(f"t{i}")
    assert s.queued_bytes >= 100 * 3  # every chunk counted
    s.send_end()
    out = s.data_to_send(0.0)
    assert out and s.queued_frames == 0 and s.queued_bytes == 0


async def tokens(request):
    for i in range(int(request.params.get("n", N))):
        yield f"tok{i} "


def _expected(n: int = N) -> list[str]:
    return [f"tok{i} " for i in range(n)]


async def test_batches_and_chunks_give_the_same_answer_between_peers():
    async with open_peers(2) as (a, b):
        b.serve("tokens", tokens)
        async with a.infer(b.addrs[0], "tokens", None) as stream:
            batches = [batch async for batch in stream.batches()]
        assert [c for batch in batches for c in batch] == _expected()
        assert all(batches) and len(batches) < N // 4, [len(x) for x in batches]  # per read, not per chunk
        assert stream.info.chunks == N and stream.info.finish_reason == "stop"

        async with a.infer(b.addrs[0], "tokens", None) as stream:
            assert [c async for c in stream] == _expected()

        # Mixed: a few chunks one by one, then the rest as batches; each chunk once, in order.
        async with a.infer(b.addrs[0], "tokens", None) as stream:
            head = [await stream.__anext__() for _ in range(3)]
            rest = [c async for batch in stream.batches() for c in batch]
        assert head + rest == _expected()

        resp = await a.call(b.addrs[0], "tokens", None)
        assert resp.chunks == _expected() and resp.text == "".join(_expected())


async def test_leaving_a_batch_early_stops_the_request_and_the_stream_is_usable_after():
    stopped = trio.Event()

    async def endless(request):
        try:
            i = 0
            while True:
                yield f"x{i}"
                i += 1
                if i % 100 == 0:
                    await trio.sleep(0)
        finally:
            stopped.set()

    async with open_peers(2) as (a, b):
        b.serve("endless", endless)
        b.serve("tokens", tokens)
        async with a.infer(b.addrs[0], "endless", None, timeout=20) as stream:
            async for batch in stream.batches():
                assert batch[0].startswith("x")
                break
        with trio.fail_after(10):
            await stopped.wait()  # the provider's handler was cancelled
        assert (await a.call(b.addrs[0], "tokens", None, n=5)).chunks == _expected(5)


async def test_a_failover_replay_skips_the_delivered_prefix_across_batches():
    """The first provider fails after 150 of 300 chunks (several batches); the second replays
    from the start: the consumer gets each chunk once, and the skipped prefix is checked."""

    def answer(fail_after: int | None) -> Any:
        async def handler(request):
            for i in range(N):
                if i == fail_after:
                    raise UnavailableError("GPU fell off the bus")
                yield f"tok{i} "
                if i % 50 == 49:
                    await trio.sleep(0)  # let some out: the failure comes after several batches

        return handler

    async with open_peers(3) as (client, bad, good):
        bad.serve(Capability(name="gen", idempotent=True), answer(150))
        good.serve(Capability(name="gen", idempotent=True), answer(None))

        def bad_first(pool, router):
            return next((c for c in pool if c.peer_id == bad.peer_id), pool[0])

        among = [Candidate(p.peer_id, addrs=[p.addrs[0]], idempotent=True) for p in (bad, good)]
        for by_batch in (True, False):
            client.router.success(bad.peer_id)  # forget the last ban
            stream = client.mesh_client.stream("gen", among=among, policy=bad_first, timeout=20)
            async with stream:
                if by_batch:
                    got = [c async for batch in stream.batches() for c in batch]
                else:
                    got = [c async for c in stream]
            assert got == _expected()
            attempts = stream.info.attempts
            assert [a["peer"] for a in attempts] == [bad.peer_id, good.peer_id]
            assert attempts[0]["chunks"] == 150 and attempts[1]["chunks"] == N
            assert stream.info.chunks == N


def test_offer_chunk_queues_only_what_may_go_at_once():
    s = ServerSession(0.0, Limits())
    s.receive_data(pack_frame(Request(request_id=b"r", capability="x", batch=True).to_wire()))
    s.next_event()
    s.accept(0.0)
    assert not s.offer_chunk("first", 64, 1024, 1 << 18)  # the first chunk goes alone: send_chunk
    assert s.send_chunk("first") and s.data_to_send(0.0)
    assert not s.offer_chunk({"not": "text"}, 64, 1024, 1 << 18)  # anything else: send_chunk
    assert s.offer_chunk("a", 64, 1024, 1 << 18) and s.offer_chunk(b"b", 64, 1024, 1 << 18)
    assert s.queued_frames == 2 and s.queued_bytes == 5  # msgpack: a1 61, c4 01 62
    assert not s.offer_chunk("c", 2, 2, 1 << 18)  # the queue is full
    assert s.offer_chunk("c", 2, 3, 1 << 18)  # ... unless small chunks may pile up
    assert not s.offer_chunk("d" * 100, 2, 1024, 100)  # within the byte budget only
    s.send_end()
    frames = FrameDecoder().feed(s.data_to_send(0.0))
    assert [f["t"] for f in frames] == ["chunks", "end"] and frames[0]["d"] == ["a", b"b", "c"]


def test_offer_chunk_does_nothing_for_a_client_that_did_not_ask_for_batches():
    s = ServerSession(0.0, Limits())
    s.receive_data(pack_frame(Request(request_id=b"r", capability="x").to_wire()))
    s.next_event()
    s.accept(0.0)
    assert s.send_chunk("first") and s.data_to_send(0.0)
    assert not s.offer_chunk("a", 64, 1024, 1 << 18) and s.queued_frames == 0


def _depth(obj: Any) -> int:
    if isinstance(obj, dict):
        return 1 + max((_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((_depth(v) for v in obj), default=0)
    return 0


_VALUES = st.recursive(
    st.text(max_size=4) | st.binary(max_size=4) | st.integers(-300, 300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner, max_size=3),
    max_leaves=60,
)


@settings(max_examples=300, deadline=None)
@given(value=_VALUES, extra=st.integers(0, 40))
def test_small_bodies_are_refused_exactly_when_too_deep(value: Any, extra: int):
    """The decoder skips its walk over a small body with few map or array header bytes: the
    depth limit holds all the same (each level needs one such byte)."""
    for _ in range(extra):
        value = [value]
    data = packb(value)
    if _depth(value) > MAX_DEPTH:
        with pytest.raises(ProtocolError, match="deeper"):
            unpackb(data)
    else:
        assert unpackb(data) == value

"""Load carried back on answers (``specs/inference.md``, "load"): the codec, and callers that
learn a provider's load from its answers, with no gossip, and route away from a busy one."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from strategies import any_values

from modelnet_p2p import Candidate, Capability, OverloadedError
from modelnet_p2p.errors import ProtocolError
from modelnet_p2p.p2p.resources import ResourceLimits
from modelnet_p2p.proto.availability import MAX_COUNT, MAX_LATENCY_MS, MAX_TOKENS_PER_S
from modelnet_p2p.proto.framing import FrameDecoder, pack_frame
from modelnet_p2p.proto.infer import Chunk, End, ErrorFrame, Load, parse_message
from modelnet_p2p.testing import open_peers

# -- codec -----------------------------------------------------------------------------------


def roundtrip(msg):
    (body,) = FrameDecoder().feed(pack_frame(msg.to_wire()))
    return parse_message(body)


def test_load_round_trips_on_chunk_end_and_err():
    load = Load(in_flight=3, queue=1, max_concurrency=8, latency_ms=850, tokens_per_s=41.5)
    for msg in (Chunk(0, "a", load), End(2, load=load), ErrorFrame("overloaded", "full", True, 0, load)):
        assert roundtrip(msg) == msg
        assert msg.to_wire()["load"] == {"inf": 3, "q": 1, "max": 8, "lat": 850, "tps": 41.5}
    assert Load(1, 0, 4).to_wire() == {"inf": 1, "q": 0, "max": 4}  # zero lat and tps are left out
    mine = Load(in_flight=3, own=1)
    assert mine.to_wire() == {"inf": 3, "q": 0, "max": 0, "own": 1}
    assert roundtrip(End(0, load=mine)).load == mine
    assert Load.from_wire({"inf": 2, "own": None}) == Load(2)  # nil: not stated


def test_old_style_frames_without_load_still_decode():
    for wire in (
        {"t": "chunk", "seq": 0, "d": "a"},
        {"t": "end", "n": 0},
        {"t": "end", "n": 1, "fin": "stop", "use": {}, "keep": True},
        {"t": "err", "code": "overloaded", "msg": "full", "rt": True, "n": 0},
        {"t": "end", "n": 0, "load": None},
    ):
        msg = parse_message(wire)
        assert msg.load is None  # type: ignore[union-attr]
        assert "load" not in msg.to_wire()


def test_load_bounds_are_the_availability_records():
    top = {"inf": MAX_COUNT, "q": MAX_COUNT, "max": MAX_COUNT, "lat": MAX_LATENCY_MS, "tps": MAX_TOKENS_PER_S}
    assert Load.from_wire(top) == Load(MAX_COUNT, MAX_COUNT, MAX_COUNT, MAX_LATENCY_MS, MAX_TOKENS_PER_S)
    for key, bad in (("inf", MAX_COUNT + 1), ("lat", MAX_LATENCY_MS + 1), ("q", -1), ("max", True)):
        with pytest.raises(ProtocolError, match=rf"load\.{key}"):
            Load.from_wire({key: bad})
    for bad_tps in (MAX_TOKENS_PER_S * 10, math.inf, math.nan, -0.5, 3):
        with pytest.raises(ProtocolError, match=r"load\.tps"):
            Load.from_wire({"tps": bad_tps})
    with pytest.raises(ProtocolError, match="'load' must be a map"):
        parse_message({"t": "end", "n": 0, "load": [1, 2]})
    with pytest.raises(ProtocolError, match=r"'load\.own' must not exceed 'load\.inf'"):
        Load.from_wire({"inf": 1, "own": 2})
    with pytest.raises(ProtocolError, match=r"load\.own"):
        Load.from_wire({"inf": 1, "own": 1.0})


def test_clamped_fits_any_figures_into_the_wire_ranges():
    assert Load.clamped(2.6, -1, math.nan, 1e20, math.inf) == Load(3, 0, 0, MAX_LATENCY_MS, 0.0)
    assert Load.clamped(1e12, 0, 4, 12.4, 1e15) == Load(MAX_COUNT, 0, 4, 12, MAX_TOKENS_PER_S)
    assert Load.clamped(2, own=5).own == 2  # own is part of in_flight


loads = st.builds(
    Load,
    st.integers(0, MAX_COUNT),
    st.integers(0, MAX_COUNT),
    st.integers(0, MAX_COUNT),
    st.integers(0, MAX_LATENCY_MS),
    st.floats(0.0, MAX_TOKENS_PER_S, allow_nan=False),
).flatmap(lambda load: st.sampled_from([None, 0, load.in_flight]).map(lambda own: replace(load, own=own)))
frames_with = st.sampled_from(
    [
        lambda load: Chunk(0, "x", load),
        lambda load: End(1, "stop", {"tokens": 1}, keep=True, load=load),
        lambda load: ErrorFrame("unavailable", "gone", True, 2, load),
    ]
)


@given(loads, frames_with)
def test_any_valid_load_round_trips_on_every_frame_that_carries_it(load, make):
    msg = make(load)
    assert roundtrip(msg) == msg
    # What an r3 peer reads: the same frame with the key it does not know taken out.
    wire = msg.to_wire()
    del wire["load"]
    assert parse_message(wire) == make(None)


LOAD_KEYS = ["inf", "q", "max", "own", "lat", "tps", "gpu"]


@given(st.dictionaries(st.sampled_from(LOAD_KEYS), any_values) | any_values)
def test_any_load_value_is_a_bounded_load_or_a_protocol_error(value):
    try:
        load = parse_message({"t": "end", "n": 0, "load": value}).load  # type: ignore[union-attr]
    except ProtocolError:
        return
    assert load is None or (
        0 <= load.in_flight <= MAX_COUNT
        and 0 <= load.queue <= MAX_COUNT
        and 0 <= load.max_concurrency <= MAX_COUNT
        and 0 <= load.latency_ms <= MAX_LATENCY_MS
        and 0.0 <= load.tokens_per_s <= MAX_TOKENS_PER_S
        and (load.own is None or 0 <= load.own <= load.in_flight)
    )


@given(st.floats(allow_nan=True), st.floats(allow_nan=True), st.floats(allow_nan=True))
def test_clamped_always_encodes(a, b, c):
    load = Load.clamped(a, b, c, a, c, own=b)
    assert Load.from_wire(load.to_wire()) == load


# -- on the network: three peers, no gossip ---------------------------------------------------


async def test_a_caller_learns_load_from_answers_and_routes_away_from_the_busy_provider():
    """Another peer keeps `busy` at 3 of 4; the caller, with no gossip, learns it from answers."""
    release = trio.Event()
    held = 0

    async def hold(request):
        nonlocal held
        held += 1
        await release.wait()
        return "held"

    async def work(request):
        return "done"

    async def stream(request):
        yield "first"
        await release.wait()
        yield "second"

    # fixed limits: a full provider refuses (by default the caller would take a slot of `other`)
    no_preempt = ResourceLimits(preempt=False)
    async with open_peers(4, gossip=False, max_concurrency=4, resource_limits=no_preempt) as (
        caller, other, busy, idle
    ):
        for p in (busy, idle):
            p.serve(Capability(name="work"), work)
            p.serve(Capability(name="stream"), stream)
        busy.serve(Capability(name="hold"), hold)
        mesh, router = caller.mesh_client, caller.router
        among = [Candidate(p.peer_id, addrs=[p.addrs[0]]) for p in (busy, idle)]
        assert caller.availability is None and router.load_hint(busy.peer_id) is None
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(other.call, busy.addrs[0], "hold", None)
            with trio.fail_after(20):
                while held < 3:
                    await trio.sleep(0.01)
            # Nothing tells the caller yet: both look idle (no gossip, no hint).
            assert router.load_of(among[0]) == router.load_of(among[1]) == (0, 0, 0, 0)
            # One answer from each provider, as any request the caller happens to send
            for p in (busy, idle):
                resp = await mesh.call("work", among=[c for c in among if c.peer_id == p.peer_id], timeout=20)
                assert resp.peer == p.peer_id
            hint = router.load_hint(busy.peer_id)
            assert hint is not None and (hint.in_flight, hint.own, hint.max_concurrency) == (3, 0, 4)
            assert router.load_of(among[0]) == (3, 0, 4, 0)  # three of another caller's
            assert router.load_of(among[1]) == (0, 0, 4, 0)
            router.rng = random.Random(11)
            for _ in range(12):
                resp = await mesh.call("work", among=among, timeout=20)
                assert resp.peer == idle.peer_id, resp.attempts
            # The first chunk of a streamed answer carries the load too, this request counted
            # (and counted as the caller's own).
            async with mesh.stream("stream", target=busy.addrs[0], timeout=20) as answer:
                assert await answer.__anext__() == "first"
                first = router.load_hint(busy.peer_id)
                assert first is not None and (first.in_flight, first.own) == (4, 1)
                assert router.load_of(among[0]) == (3, 0, 4, 1)  # full: 3 of the other's, 1 ours
                # Not even tried: routed to the other provider, or refused locally if it is avoided.
                resp = await mesh.call("work", among=among, timeout=20)
                assert resp.peer == idle.peer_id
                with pytest.raises(OverloadedError, match="at capacity"):
                    await mesh.call("work", among=among, avoid={idle.peer_id}, timeout=20)
                with pytest.raises(OverloadedError):  # sent anyway (targeted): refused there
                    await caller.call(busy.addrs[0], "work", None, timeout=20)
                refused = router.load_hint(busy.peer_id)
                assert refused is not None and (refused.in_flight, refused.own, refused.max_concurrency) == (
                    4,
                    1,
                    4,
                )
                release.set()
                assert [c async for c in answer] == ["second"]
        # Once the held requests are done, the next answer says so and `busy` is eligible again.
        await caller.call(busy.addrs[0], "work", None, timeout=20)
        after = router.load_hint(busy.peer_id)
        assert after is not None and (after.in_flight, after.own) == (0, 0)
        assert after.tokens_per_s > 0  # the Peer's load figures: throughput of finished requests
        resp = await mesh.call("work", among=among, avoid={idle.peer_id}, timeout=20)
        assert resp.peer == busy.peer_id
        assert router.snapshot()[busy.peer_id]["in_flight"] == 0  # every request counted, then done


async def test_a_server_that_sends_no_load_still_answers_and_gives_no_hint(caplog):
    """A provider whose load provider fails sends no ``load``, as every r3 peer: its answers are
    unchanged, and the caller's router has no hint for it."""

    def broken() -> Load:
        raise RuntimeError("no figures today")

    async def plain(request):
        return "ok"

    async with open_peers(2, gossip=False) as (caller, provider):
        provider.serve("plain", plain)
        provider.inference.load_provider = broken
        for _ in range(3):
            resp = await caller.mesh_client.call("plain", among=[provider.addrs[0]], timeout=20)
            assert resp.text == "ok"
        assert caller.router.load_hint(provider.peer_id) is None
        failed = [r for r in caplog.records if "load provider failed" in r.getMessage()]
        assert [r.levelname for r in failed].count("WARNING") == 1  # once, not on every answer

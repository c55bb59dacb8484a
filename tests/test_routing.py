"""Requests without a target: the mesh picks the provider, spreads load and fails over."""

from __future__ import annotations

import os
import random
import signal
from collections import Counter

import pytest
import trio
from cli_util import background, read_event

from modelnet_p2p import (
    BadRequestError,
    Candidate,
    Capability,
    Config,
    ConfigError,
    Identity,
    InternalError,
    NotFoundError,
    Peer,
    PeerConfig,
    PeerID,
    UnavailableError,
)
from modelnet_p2p.testing import open_peers


def counting(name: str, counts: Counter[str], delay: float = 0.0):
    async def handler(request):
        counts[name] += 1
        if delay:
            await trio.sleep(delay)
        return f"{request.input} from {name}"

    return handler


async def test_routed_call_without_target():
    counts: Counter[str] = Counter()
    async with open_peers(3) as (client, p1, p2):
        p1.serve(Capability(name="greet", task="chat"), counting("p1", counts))
        p2.serve(Capability(name="greet", task="chat"), counting("p2", counts))
        await p1.announce()
        await p2.announce()
        resp = await client.call(capability="greet", input="hi", timeout=20)
        assert resp.text in ("hi from p1", "hi from p2")
        assert resp.peer in (p1.peer_id, p2.peer_id)
        assert [a["status"] for a in resp.attempts] == ["ok"]
        with pytest.raises(NotFoundError, match="no provider"):
            await client.call(capability="nobody-serves-this", input="x", timeout=20)


async def test_sixty_concurrent_requests_spread_over_three_providers():
    counts: Counter[str] = Counter()
    async with open_peers(4) as (client, *providers):
        for i, p in enumerate(providers):
            p.serve(Capability(name="work", task="tool"), counting(f"p{i}", counts, delay=0.2))
            await p.announce()
        await client.providers("work", refresh=True)
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(client.call, None, "work", i)
        assert sum(counts.values()) == 60
        assert max(counts.values()) <= 30, counts
        assert len(counts) == 3


async def test_peer_at_capacity_gets_no_new_requests():
    release = trio.Event()
    counts: Counter[str] = Counter()

    async def hold(request):
        counts["busy"] += 1
        await release.wait()
        return "busy done"

    async with open_peers(3) as (client, busy, free):
        busy.serve(Capability(name="job", max_concurrency=1), hold)
        free.serve(Capability(name="job", max_concurrency=8), counting("free", counts))
        await busy.announce()
        await free.announce()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.call, busy.addrs[0], "job", "first")
            while not counts["busy"]:
                await trio.sleep(0.01)
            for i in range(10):
                resp = await client.call(capability="job", input=i, timeout=20)
                assert resp.peer == free.peer_id
            release.set()
        assert counts == {"busy": 1, "free": 10}


async def test_failover_before_first_chunk_and_trace():
    async def broken(request):
        raise UnavailableError("model weights not loaded")

    async def good(request):
        return "fine"

    async with open_peers(3) as (client, bad, ok):
        bad.serve(Capability(name="flaky"), broken)
        ok.serve(Capability(name="flaky"), good)
        await bad.announce()
        await ok.announce()
        client.router.rng = random.Random(7)
        client.router.observe_rtt(bad.peer_id, 0.1)  # make the broken one look best
        client.router.observe_rtt(ok.peer_id, 50.0)
        attempts = []
        for _ in range(10):
            resp = await client.call(capability="flaky", input=None, timeout=20)
            assert resp.value == "fine"  # every call succeeds
            attempts.extend(resp.attempts)
        # the broken provider was tried once, failed over, then banned
        tried_bad = [a for a in attempts if a["peer"] == bad.peer_id]
        assert len(tried_bad) == 1
        assert tried_bad[0]["status"] == "error" and "weights not loaded" in tried_bad[0]["error"]
        assert client.router.banned(bad.peer_id)


async def test_non_retryable_error_is_not_retried():
    async def failing(request):
        raise ValueError("bug in the model")

    async with open_peers(3) as (client, p1, p2):
        for p in (p1, p2):
            p.serve(Capability(name="buggy"), failing)
            await p.announce()
        stream = client.infer(capability="buggy", input=None, timeout=20)
        with pytest.raises(InternalError):
            async for _ in stream:
                pass
        assert len(stream.info.attempts) == 1


WORDS = [f"w{i}" for i in range(40)]


async def test_provider_killed_mid_stream_fails_over_with_identical_chunks(tmp_path):
    """Two provider processes; the one answering is SIGKILLed mid-stream."""
    async with open_peers(1) as (client,):
        boot = client.addrs[0]
        with (
            background(
                "serve", "modelnet_p2p.demo_models:echo", "--json", "--bootstrap", boot, cwd=tmp_path
            ) as a,
            background(
                "serve", "modelnet_p2p.demo_models:echo", "--json", "--bootstrap", boot, cwd=tmp_path
            ) as b,
        ):
            procs = {}
            for proc in (a, b):
                ready = await trio.to_thread.run_sync(read_event, proc)
                procs[ready["peer_id"]] = proc
            # "ready" comes before the cards are announced: wait until both can be found
            with trio.fail_after(30):
                while len(await client.providers("echo", refresh=True)) < 2:
                    await trio.sleep(0.2)
            # a clean run first
            clean = await client.call(capability="echo", input=" ".join(WORDS), timeout=30, delay=0.0)
            assert clean.chunks == [w + " " for w in WORDS]
            got = []
            killed = None
            stream = client.infer(capability="echo", input=" ".join(WORDS), timeout=60, delay=0.05)
            async with stream:
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 10 and killed is None:
                        killed = stream.info.peer
                        os.kill(procs[killed].pid, signal.SIGKILL)
            assert got == clean.chunks
            peers = [att["peer"] for att in stream.info.attempts]
            assert peers[0] == killed and peers[-1] != killed
            assert stream.info.attempts[0]["status"] == "error"
            assert stream.info.attempts[-1]["status"] == "ok"


async def test_not_idempotent_mid_stream_failure_reports_delivered_chunks():
    async def stream_then_die(request):
        for i in range(5):
            yield i
        raise UnavailableError("GPU fell off the bus")

    async with open_peers(3) as (client, p1, p2):
        for p in (p1, p2):
            p.serve(Capability(name="gen", idempotent=False), stream_then_die)
            await p.announce()
        got = []
        with pytest.raises(UnavailableError) as info:
            async for chunk in client.infer(capability="gen", input=None, timeout=20):
                got.append(chunk)
        assert got == [0, 1, 2, 3, 4]
        assert info.value.chunks_delivered == 5
        assert "not idempotent" in info.value.message


async def test_unreachable_providers_everywhere_is_a_typed_error():
    async with open_peers(2) as (client, provider):
        provider.serve(Capability(name="solo"), counting("solo", Counter()))
        await provider.announce()
        await client.providers("solo", refresh=True)
        await provider.__aexit__(None, None, None)  # the provider vanishes
        with pytest.raises((UnavailableError, NotFoundError)):
            await client.call(capability="solo", input=None, timeout=15)


def test_peer_signature_keeps_target_first():
    import inspect

    params = list(inspect.signature(Peer.infer).parameters)
    assert params[:4] == ["self", "target", "capability", "input"]


async def test_draining_peer_finishes_in_flight_and_takes_no_new_requests():
    release = trio.Event()
    counts: Counter[str] = Counter()

    async def slow(request):
        counts["draining"] += 1
        await release.wait()
        return "finished while draining"

    async with open_peers(3, publish_interval=1.0) as (client, leaving, staying):
        leaving.serve(Capability(name="task"), slow)
        staying.serve(Capability(name="task"), counting("staying", counts))
        await leaving.announce()
        await staying.announce()
        results: list[str] = []

        async def in_flight() -> None:
            results.append((await client.call(leaving.addrs[0], "task", None, timeout=30)).value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(in_flight)
            while not counts["draining"]:
                await trio.sleep(0.01)
            # a caller of "task" (it looks its providers up): it follows that capability's gossip
            await client.providers("task", refresh=True)
            drained = trio.Event()

            async def drain() -> None:
                assert await leaving.drain(timeout=30)
                drained.set()

            nursery.start_soon(drain)
            # the client hears "draining" through gossip
            with trio.fail_after(10):
                while (
                    client.availability_table().get(leaving.peer_id) is None
                    or str(client.availability_table()[leaving.peer_id].state) != "draining"
                ):
                    await trio.sleep(0.05)
            for i in range(5):
                resp = await client.call(capability="task", input=i, timeout=20)
                assert resp.peer == staying.peer_id
            # a request sent to it directly is refused, retryably
            with pytest.raises(UnavailableError, match="draining"):
                await client.call(leaving.addrs[0], "task", None, timeout=10)
            assert not drained.is_set()
            release.set()
            with trio.fail_after(10):
                await drained.wait()
        assert results == ["finished while draining"]
        assert counts == {"draining": 1, "staying": 5}


# -- the mesh client: a static provider list, restarts, one client per peer ----------------------


def part_then_fail(name: str, counts: Counter[str]):
    async def handler(request):
        counts[name] += 1
        yield "one "
        yield "two "
        raise UnavailableError(f"{name} lost its GPU")

    return handler


def whole(name: str, counts: Counter[str]):
    async def handler(request):
        counts[name] += 1
        for word in ("one ", "two ", "three"):
            yield word

    return handler


async def test_mesh_client_routes_among_a_static_list():
    counts: Counter[str] = Counter()
    async with open_peers(3) as (client, p1, p2):
        p1.serve("echo", counting("p1", counts))
        p2.serve("echo", counting("p2", counts))
        mesh = client.mesh_client
        assert mesh.router is client.router  # one table of measurements and bans per peer
        for _ in range(3):  # no announce needed: the caller names the providers
            resp = await mesh.call("echo", "hi", among=[p1.addrs[0]], timeout=20)
            assert resp.peer == p1.peer_id and resp.text == "hi from p1"
        among = [Candidate(p1.peer_id, addrs=[p1.addrs[0]]), Candidate(p2.peer_id, addrs=[p2.addrs[0]])]
        client.router.failure(p1.peer_id)
        resp = await mesh.call("echo", "hi", among=among, timeout=20)
        assert resp.peer == p2.peer_id
        client.router.failure(p2.peer_id)
        client.router.failure(p2.peer_id)  # banned longer than p1
        resp = await mesh.call("echo", "hi", among=among, timeout=20)
        assert resp.peer == p1.peer_id  # every listed provider banned: the least banned is tried
        assert counts == {"p1": 4, "p2": 1}


async def test_call_restart_starts_over_after_a_part_way_failure():
    counts: Counter[str] = Counter()
    async with open_peers(3) as (client, bad, good):
        bad.serve(Capability(name="story"), part_then_fail("bad", counts))  # not idempotent
        good.serve(Capability(name="story"), whole("good", counts))
        among = [Candidate(bad.peer_id, addrs=[bad.addrs[0]]), Candidate(good.peer_id, addrs=[good.addrs[0]])]
        mesh = client.mesh_client
        with pytest.raises(UnavailableError, match="not idempotent") as err:
            await mesh.call("story", among=among[:1], timeout=20)
        assert err.value.chunks_delivered == 2
        client.router.success(bad.peer_id)  # forget the ban

        def bad_first(pool, router):
            return next((c for c in pool if c.peer_id == bad.peer_id), pool[0])

        resp = await mesh.call("story", among=among, policy=bad_first, restart=True, timeout=20)
        assert resp.text == "one two three" and resp.peer == good.peer_id
        assert [(a["peer"], a["status"]) for a in resp.attempts] == [
            (bad.peer_id, "error"),
            (good.peer_id, "ok"),
        ]
        assert counts == {"bad": 2, "good": 1}


async def test_peer_settings_come_from_one_config():
    peer = Peer(config=PeerConfig(max_concurrency=3, window=4096), connect_timeout=2.5)
    assert peer.limits.max_concurrency == 3
    assert (peer.config.window, peer.config.connect_timeout) == (4096, 2.5)
    assert peer.config.max_frame_size == PeerConfig().max_frame_size
    assert Peer(None, ["/ip4/127.0.0.1/tcp/0"], []).config.bootstrap == []
    with pytest.raises(TypeError, match="max_concurency"):
        Peer(max_concurency=3)
    with pytest.raises(ConfigError, match="max_frame_size"):
        Peer(max_frame_size=10)
    with pytest.raises(ConfigError, match="routing policy"):
        Peer(routing_policy="fastest")
    with pytest.raises(RuntimeError, match="not running"):
        peer.mesh_client  # noqa: B018
    cfg = Config(max_concurrency=5)
    assert Peer(**cfg.peer_kwargs()).limits.max_concurrency == 5
    assert cfg.peer_config().max_concurrency == 5


async def test_dialer_targets_and_their_errors():
    """Every form of target the dialer takes, and the typed error for each bad one."""
    async with open_peers(2) as (a, b):
        b.serve("echo", counting("b", Counter()))
        dialer = a.dialer
        assert dialer.peer_of(b.addrs[0]) == b.peer_id
        relayed = f"{b.addrs[0]}/p2p-circuit/p2p/{a.peer_id}"
        assert dialer.peer_of(relayed) == a.peer_id  # the target, not the relay
        assert await a.connect(b.addrs[0]) == b.peer_id
        assert dialer.is_connected(b.peer_id)
        for target in (b.addrs[0], b.peer_id, PeerID.from_base58(b.peer_id)):  # a known peer by id too
            assert (await a.call(target, "echo", "x", timeout=10)).text == "x from b"
        with pytest.raises(ConfigError, match="neither a multiaddr nor a peer id"):
            dialer.peer_of("not a peer")
        with pytest.raises(ConfigError, match="no /p2p/"):
            await a.connect("/ip4/127.0.0.1/tcp/1")
        with pytest.raises(BadRequestError, match="itself"):
            await a.connect(a.addrs[0])
        stranger = Identity.generate(ephemeral=True).peer_id
        with pytest.raises(UnavailableError, match="no known address"):
            await a.call(str(stranger), "echo", "x", timeout=5)
        assert await a.ping(str(stranger), timeout=1) is None
        rtt = await a.ping(b.peer_id, timeout=5)
        assert rtt is not None and rtt >= 0


async def test_a_failed_start_leaves_nothing_running():
    nobody = Identity.generate(ephemeral=True).peer_id
    peer = Peer(bootstrap=[f"/ip4/127.0.0.1/tcp/1/p2p/{nobody}"], require_bootstrap=True)
    with pytest.raises(UnavailableError, match="no bootstrap peer reachable"):
        async with peer:
            pass  # pragma: no cover
    assert peer.addrs == [] and peer.availability is None
    with pytest.raises(RuntimeError, match="not running"):
        peer.mesh_client  # noqa: B018

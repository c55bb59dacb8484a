"""Hostile providers against a caller (issue 12, "Routing trusts providers"), on live peers.

Each test is one red-team finding: a provider that lies about its load and answers wrong, one
that fails with ``internal`` errors or runs out the deadline, one that stalls mid-stream. The
caller is the victim: its calls must still be answered, and its memory and descriptors stay
bounded while they are.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio

from modelnet_p2p import (
    Capability,
    DeadlineExceededError,
    InternalError,
    Peer,
    UnavailableError,
)
from modelnet_p2p.collab import draft_verify, ensemble
from modelnet_p2p.proto.infer import Load
from modelnet_p2p.services.inference.client import StalledError
from modelnet_p2p.testing import open_peers


@asynccontextmanager
async def caller_and_providers(
    settings: Sequence[dict[str, Any]], **client_settings: Any
) -> AsyncIterator[tuple[Peer, list[Peer]]]:
    """A caller (the DHT's bootstrap) and providers with their own settings; no gossip, so that
    routing sees only cards and the load hints answers carry (deterministic)."""
    async with open_peers(1, gossip=False, **client_settings) as (client,), AsyncExitStack() as stack:
        providers = [
            await stack.enter_async_context(Peer(bootstrap=[client.addrs[0]], gossip=False, **kw))
            for kw in settings
        ]
        yield client, providers


async def found(client: Peer, capability: str, n: int) -> None:
    with trio.fail_after(20):
        while len(await client.providers(capability, refresh=True)) < n:
            await trio.sleep(0.05)


async def warm_up(client: Peer, capability: str, providers: Sequence[Peer]) -> None:
    """One routed call to each provider, so that routing has measured them all (RTT, load hint)."""
    ids = [p.peer_id for p in providers]
    for pid in ids:
        resp = await client.call(capability=capability, avoid=[i for i in ids if i != pid], timeout=20)
        assert resp.peer == pid


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def test_a_provider_that_lies_about_its_load_and_answers_wrong_loses_the_calls():
    drafts: Counter[str] = Counter()

    async def right(request):
        drafts["honest"] += 1
        return "4"

    async def wrong(request):
        drafts["liar"] += 1
        return "5"

    async def check(request):
        return {"ok": request.input["answer"] == "4", "feedback": "2 + 2 is not that"}

    async with caller_and_providers([{"max_concurrency": 8}, {}]) as (client, (honest, liar)):
        honest.serve(Capability(name="answer"), right)
        honest.serve(Capability(name="check"), check)
        liar.serve(Capability(name="answer"), wrong)
        # The lie: always idle, with room for 128 (the honest provider says 8).
        liar.inference.load_provider = lambda: Load(in_flight=0, queue=0, max_concurrency=128)
        for p in (honest, liar):
            await p.announce()
        await found(client, "answer", 2)
        await warm_up(client, "answer", (honest, liar))
        first_drafts = Counter()
        for _ in range(12):
            before = drafts["liar"]
            result = await draft_verify(client, "answer", "check", "2 + 2?", rounds=3, timeout=20)
            assert result.trace.status == "ok" and result.output == "4"
            first_drafts["liar" if drafts["liar"] > before else "honest"] += 1
        # Before: the liar got the first draft of 12 of 12 requests.
        assert first_drafts["liar"] <= 2, first_drafts
        rep = client.reputation
        assert rep.counts(liar.peer_id)["rejected"] == first_drafts["liar"]
        assert rep.trust(liar.peer_id) < 0.5 < rep.trust(honest.peer_id) == 1.0


async def test_a_self_reported_idle_provider_that_is_slow_loses_to_measured_latency():
    async def slow(request):
        await trio.sleep(0.3)
        return "slow"

    async def fast(request):
        return "fast"

    async with caller_and_providers([{"max_concurrency": 8}, {}]) as (client, (honest, liar)):
        honest.serve(Capability(name="work"), fast)
        liar.serve(Capability(name="work"), slow)
        liar.inference.load_provider = lambda: Load(in_flight=0, queue=0, max_concurrency=128)
        for p in (honest, liar):
            await p.announce()
        await found(client, "work", 2)
        await warm_up(client, "work", (honest, liar))
        got = Counter([(await client.call(capability="work", timeout=20)).text for _ in range(12)])
        assert got["fast"] >= 9, got  # before: 12 of 12 to the slow one


async def test_internal_errors_ban_the_provider_and_idempotent_calls_fail_over():
    async def broken(request):
        raise ValueError("bug in the model")

    async def good(request):
        return "fine"

    async with caller_and_providers([{"max_concurrency": 8}, {}]) as (client, (ok, bad)):
        ok.serve(Capability(name="pure", idempotent=True), good)
        bad.serve(Capability(name="pure", idempotent=True), broken)
        bad.inference.load_provider = lambda: Load(in_flight=0, queue=0, max_concurrency=128)
        for p in (ok, bad):
            await p.announce()
        await found(client, "pure", 2)
        client.router.observe_rtt(bad.peer_id, 0.1)  # make the broken one look best
        client.router.observe_rtt(ok.peer_id, 50.0)
        attempts = []
        for _ in range(12):  # before: 6 of 12 failed with the provider's internal error
            resp = await client.call(capability="pure", timeout=20)
            assert resp.value == "fine"
            attempts.extend(resp.attempts)
        tried_bad = [a for a in attempts if a["peer"] == bad.peer_id]
        assert len(tried_bad) == 1 and "bug in the model" in tried_bad[0]["error"]
        assert client.router.banned(bad.peer_id)
        assert client.reputation.counts(bad.peer_id)["error"] == 1


async def test_an_internal_error_of_a_non_idempotent_capability_reaches_the_caller_and_bans():
    async def broken(request):
        raise ValueError("bug in the model")

    async def good(request):
        return "fine"

    async with caller_and_providers([{"max_concurrency": 8}, {}]) as (client, (ok, bad)):
        ok.serve(Capability(name="gen"), good)
        bad.serve(Capability(name="gen"), broken)
        for p in (ok, bad):
            await p.announce()
        await found(client, "gen", 2)
        client.router.observe_rtt(bad.peer_id, 0.1)
        client.router.observe_rtt(ok.peer_id, 50.0)
        with pytest.raises(InternalError):
            await client.call(capability="gen", timeout=20)
        assert client.router.banned(bad.peer_id)  # before: not banned, chosen again
        for _ in range(5):
            assert (await client.call(capability="gen", timeout=20)).value == "fine"


async def test_a_deadline_counts_against_the_provider_that_held_the_call():
    async def hang(request):
        await trio.sleep_forever()
        yield "never"

    async def good(request):
        return "fine"

    async with caller_and_providers([{"max_concurrency": 8}, {}]) as (client, (ok, slow)):
        ok.serve(Capability(name="job"), good)
        slow.serve(Capability(name="job"), hang)
        for p in (ok, slow):
            await p.announce()
        await found(client, "job", 2)
        client.router.observe_rtt(slow.peer_id, 0.1)
        client.router.observe_rtt(ok.peer_id, 50.0)
        with pytest.raises(DeadlineExceededError):
            await client.call(capability="job", timeout=0.5)
        assert client.router.banned(slow.peer_id)  # before: not banned
        assert client.reputation.counts(slow.peer_id)["timeout"] == 1
        assert (await client.call(capability="job", timeout=20)).value == "fine"


WORDS = [f"w{i} " for i in range(8)]


async def test_a_provider_that_stalls_mid_stream_is_failed_over_and_banned():
    async def stall(request):
        yield WORDS[0]
        await trio.sleep_forever()

    async def good(request):
        for w in WORDS:
            yield w

    settings = [{"max_concurrency": 8}, {}]
    async with caller_and_providers(settings, stall_timeout=0.3) as (client, (ok, staller)):
        ok.serve(Capability(name="echo8", idempotent=True), good)
        staller.serve(Capability(name="echo8", idempotent=True), stall)
        staller.inference.load_provider = lambda: Load(in_flight=0, queue=0, max_concurrency=128)
        for p in (ok, staller):
            await p.announce()
        await found(client, "echo8", 2)
        client.router.observe_rtt(staller.peer_id, 0.1)
        client.router.observe_rtt(ok.peer_id, 50.0)
        fd0, rss0 = fds(), rss_mib()
        with trio.fail_after(30):  # before: the first call never ended (no timeout given)
            for _ in range(12):
                resp = await client.call(capability="echo8")  # no timeout: the default applies
                assert resp.chunks == WORDS
        stalled = [a for r in [resp] for a in r.attempts if a["peer"] == staller.peer_id]
        assert not stalled  # the last call went straight to the good provider
        assert client.router.banned(staller.peer_id)
        assert client.reputation.counts(staller.peer_id)["stall"] == 1
        assert fds() - fd0 < 20 and rss_mib() - rss0 < 64


async def test_an_idempotent_call_fails_over_from_a_provider_silent_before_its_first_chunk():
    # A provider cut off (or hung) before it answered: the routed attempt fails after
    # stall_timeout (at most half the time left), not at the deadline, and the call moves on.
    async def hang(request):
        await trio.sleep_forever()
        yield "never"

    async def good(request):
        return "fine"

    async with caller_and_providers([{"max_concurrency": 8}, {}], stall_timeout=0.3) as (client, (ok, mute)):
        ok.serve(Capability(name="job2", idempotent=True), good)
        mute.serve(Capability(name="job2", idempotent=True), hang)
        for p in (ok, mute):
            await p.announce()
        await found(client, "job2", 2)
        client.router.observe_rtt(mute.peer_id, 0.1)
        client.router.observe_rtt(ok.peer_id, 50.0)
        with trio.fail_after(15):  # before: DeadlineExceededError after the whole 20 s
            resp = await client.call(capability="job2", timeout=20)
        assert resp.value == "fine"
        assert [a["peer"] for a in resp.attempts] == [mute.peer_id, ok.peer_id]
        assert client.router.banned(mute.peer_id)
        assert client.reputation.counts(mute.peer_id)["stall"] == 1


async def test_a_stall_of_a_non_idempotent_stream_ends_the_call_with_a_typed_error():
    async def stall(request):
        yield "one"
        await trio.sleep_forever()

    async with caller_and_providers([{}], stall_timeout=0.3) as (client, (staller,)):
        staller.serve(Capability(name="gen"), stall)
        await staller.announce()
        await found(client, "gen", 1)
        got = []
        with trio.fail_after(20), pytest.raises(UnavailableError) as info:
            async for chunk in client.infer(capability="gen"):
                got.append(chunk)
        assert got == ["one"] and info.value.chunks_delivered == 1
        assert isinstance(info.value.__cause__ or info.value, UnavailableError)
        assert client.router.banned(staller.peer_id)
        # a targeted call stalls the same way
        with trio.fail_after(20), pytest.raises(StalledError):
            await client.call(staller.addrs[0], "gen")


async def test_a_call_without_timeout_ends_at_the_default_deadline():
    async def mute(request):
        await trio.sleep_forever()
        yield "never"

    async with caller_and_providers([{}], request_timeout=0.5, stall_timeout=0.2) as (client, (p,)):
        p.serve(Capability(name="mute"), mute)
        await p.announce()
        await found(client, "mute", 1)
        with trio.fail_after(20), pytest.raises(DeadlineExceededError):  # before: never ended
            await client.call(capability="mute")
        with trio.fail_after(20), pytest.raises(DeadlineExceededError):
            await client.call(p.addrs[0], "mute")


async def test_a_slow_consumer_is_not_taken_for_a_stalled_provider():
    async def three(request):
        for i in range(3):
            yield i

    async with caller_and_providers([{}], stall_timeout=0.2) as (client, (p,)):
        p.serve(Capability(name="three"), three)
        await p.announce()
        await found(client, "three", 1)
        got = []
        async for chunk in client.infer(capability="three", timeout=20):
            got.append(chunk)
            await trio.sleep(0.4)  # the consumer, not the provider, is slow
        assert got == [0, 1, 2]
        assert not client.router.banned(p.peer_id)


async def test_an_ensemble_member_that_loses_the_vote_is_marked():
    def answering(text: str):
        async def handler(request):
            return text

        return handler

    async with caller_and_providers([{}, {}, {}]) as (client, providers):
        for p, text in zip(providers, ("blue", "blue", "green"), strict=True):
            p.serve(Capability(name="colour"), answering(text))
            await p.announce()
        await found(client, "colour", 3)
        result = await ensemble(client, "colour", "sky?", k=3, timeout=20)
        assert result.output == "blue"
        odd = providers[2].peer_id
        assert client.reputation.counts(odd).get("disagreed") == 1
        assert all("disagreed" not in client.reputation.counts(p.peer_id) for p in providers[:2])
        assert client.reputation.trust(odd) < client.reputation.trust(providers[0].peer_id)

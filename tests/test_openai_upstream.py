"""The OpenAI-compatible upstream adapter, against servers that answer like OpenAI and Ollama.

Every test runs real peers on 127.0.0.1 and a fake server (``tests/fake_openai.py``)
in the same trio run, under hypercorn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from fake_openai import FakeServer, embed_text, reply_tokens

from modelnet_p2p import (
    BadRequestError,
    ConfigError,
    InternalError,
    NotFoundError,
    OverloadedError,
    Peer,
    UnavailableError,
)
from modelnet_p2p.openai.conventions import error_param
from modelnet_p2p.openai.upstream import (
    OpenAIUpstream,
    guess_task,
    is_upstream_target,
    parse_model_spec,
    parse_upstream_target,
    serve_upstream,
    status_error,
)
from modelnet_p2p.services.availability.service import State
from modelnet_p2p.testing import open_peers

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "the quick brown fox"},
]


@asynccontextmanager
async def upstream_mesh(
    flavor: str, *, api_key: str | None = None, **options: Any
) -> AsyncIterator[tuple[FakeServer, Peer, Peer, OpenAIUpstream]]:
    """A fake server, a provider peer serving it, and a client peer."""
    async with trio.open_nursery() as nursery:
        fake = FakeServer(flavor, api_key=api_key)
        url = await fake.start(nursery)
        async with open_peers(2) as (client, provider):
            upstream = await serve_upstream(provider, url, api_key=api_key, **options)
            yield fake, client, provider, upstream
        nursery.cancel_scope.cancel()


# -- pure functions --------------------------------------------------------------------------


def test_targets_and_model_specs():
    assert is_upstream_target("openai+http://127.0.0.1:11434/v1")
    assert not is_upstream_target("modelnet_p2p.demo_models:echo")
    assert parse_upstream_target("openai+http://127.0.0.1:11434/v1/") == "http://127.0.0.1:11434/v1"
    assert parse_upstream_target("openai+https://api.example.test/v1") == "https://api.example.test/v1"
    for bad in ("http://127.0.0.1/v1", "openai+ftp://x/v1", "openai+http:///v1", "openai+http://h/v1?x=1"):
        with pytest.raises(ConfigError):
            parse_upstream_target(bad)
    assert parse_model_spec("llama3.2:latest") == ("llama3.2:latest", None)
    assert parse_model_spec("my-model=embedding") == ("my-model", "embedding")
    with pytest.raises(ConfigError):
        parse_model_spec("my-model=painting")
    for name in ("nomic-embed-text:latest", "all-minilm", "text-embedding-3-small", "bge-m3", "mxbai-embed"):
        assert guess_task(name) == "embedding", name
    for name in ("llama3.2:latest", "gpt-4o-mini", "qwen2.5-coder:7b", "gemma3:4b", "mistral"):
        assert guess_task(name) == "chat", name


def test_status_mapping():
    body = {"error": {"message": "bad temp", "type": "invalid_request_error", "param": "temperature"}}
    assert isinstance(status_error(429, {}), OverloadedError)
    assert isinstance(status_error(503, "busy"), OverloadedError)
    assert isinstance(status_error(408, ""), UnavailableError)
    assert isinstance(status_error(504, ""), UnavailableError)
    assert isinstance(status_error(500, ""), InternalError)
    err = status_error(400, body)
    assert isinstance(err, BadRequestError) and error_param(err) == "temperature"
    assert isinstance(status_error(422, {"detail": "nope"}), BadRequestError)
    assert isinstance(status_error(404, {"error": "model 'x' not found"}), NotFoundError)
    assert isinstance(status_error(401, {}), UnavailableError)  # the peer's own key, not the caller's fault


# -- serving ---------------------------------------------------------------------------------


async def test_openai_format_streams_chunks_as_they_arrive():
    async with upstream_mesh("openai", api_key="sk-test") as (fake, client, provider, _):
        caps = {c.name: c for c in provider.capabilities}
        assert set(caps) == {"gpt-4o-mini", "text-embedding-3-small", "gpt-3.5-turbo-instruct"}
        assert caps["gpt-4o-mini"].tasks == ("chat", "text-generation")
        assert caps["text-embedding-3-small"].tasks == ("embedding",)
        assert caps["text-embedding-3-small"].idempotent

        fake.control.token_delay = 0.15
        started = trio.current_time()
        arrivals = []
        stream = client.infer(
            provider.addrs[0], "gpt-4o-mini", MESSAGES, timeout=20, temperature=0.5, max_tokens=50, bogus=1
        )
        async with stream:
            async for chunk in stream:
                arrivals.append((trio.current_time() - started, chunk))
        expected = reply_tokens(MESSAGES)
        assert [c for _, c in arrivals] == expected
        # streamed, not buffered: the first token came long before the last
        assert arrivals[0][0] < arrivals[-1][0] - 0.3
        assert stream.info.finish_reason == "stop"
        assert stream.info.usage["completion_tokens"] == len(expected) == stream.info.usage["tokens"]
        assert stream.info.usage["prompt_tokens"] == 7
        sent = fake.control.bodies[-1]
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        assert sent["temperature"] == 0.5 and sent["max_tokens"] == 50 and "bogus" not in sent
        assert sent["messages"] == MESSAGES
        assert fake.control.auth[-1] == "Bearer sk-test"

        fake.control.token_delay = 0
        # a prompt (text) goes to /v1/completions; max_tokens cuts it with finish "length"
        answer = await client.call(provider.addrs[0], "gpt-3.5-turbo-instruct", "one two three", max_tokens=3)
        assert answer.chunks == reply_tokens("one two three")[:3]
        assert answer.finish_reason == "length"
        assert "prompt" in fake.control.bodies[-1]

        # embeddings pass through, one chunk per input
        texts = ["a cat sat", "a dog ran"]
        answer = await client.call(provider.addrs[0], "text-embedding-3-small", texts)
        assert answer.chunks == [pytest.approx(embed_text(t)) for t in texts]
        assert answer.usage["prompt_tokens"] == 6
        assert fake.control.bodies[-1]["encoding_format"] == "float"


async def test_ollama_format_and_model_choice():
    async with upstream_mesh("ollama", models=["llama3.2:latest", "nomic-embed-text:latest"]) as (
        fake,
        client,
        provider,
        _,
    ):
        caps = {c.name: c for c in provider.capabilities}
        assert caps["llama3.2:latest"].task == "chat"
        assert caps["nomic-embed-text:latest"].task == "embedding"
        answer = await client.call(provider.addrs[0], "llama3.2:latest", MESSAGES, timeout=20)
        assert answer.chunks == reply_tokens(MESSAGES)  # Ollama's empty last delta is not a chunk
        assert answer.usage["completion_tokens"] == len(answer.chunks)
        answer = await client.call(provider.addrs[0], "llama3.2:latest", "hello", timeout=20)
        assert answer.text == "You said: hello"
        answer = await client.call(provider.addrs[0], "nomic-embed-text:latest", "one text")
        assert answer.chunks == [pytest.approx(embed_text("one text"))]

    async with trio.open_nursery() as nursery:
        fake = FakeServer("ollama")
        url = await fake.start(nursery)
        async with open_peers(1) as (provider,):
            up = await serve_upstream(provider, url, models=["llama3.2:latest=text-generation"])
            assert [c.tasks for c in provider.capabilities] == [("text-generation",)]
            await up.aclose()
            with pytest.raises(ConfigError, match="does not list the model"):
                await serve_upstream(provider, url, models=["mistral:latest"])
            with pytest.raises(ConfigError, match="API base URL"):
                await serve_upstream(provider, url.removesuffix("/v1") + "/nope")
        nursery.cancel_scope.cancel()


async def test_upstream_errors_map_to_mesh_codes():
    async with upstream_mesh("openai", read_timeout=0.5) as (fake, client, provider, upstream):
        addr = provider.addrs[0]

        async def ask(**params: Any) -> Any:
            return await client.call(addr, "gpt-4o-mini", MESSAGES, timeout=10, **params)

        fake.control.fail = [429]
        with pytest.raises(OverloadedError):
            await ask()
        fake.control.fail = [503]
        with pytest.raises(OverloadedError):
            await ask()
        with pytest.raises(BadRequestError) as info:
            await ask(temperature=5)
        assert error_param(info.value) == "temperature"
        fake.control.fail = [404]
        with pytest.raises(NotFoundError):
            await ask()
        fake.control.fail = [500]
        with pytest.raises(InternalError):
            await ask()
        fake.control.hang = 2.0  # longer than read_timeout
        with pytest.raises(UnavailableError, match="timed out"):
            await ask()
        fake.control.drop_after = 2  # the stream ends without [DONE] or a finish reason
        with pytest.raises(UnavailableError, match="before it finished") as dropped:
            await ask()
        assert dropped.value.chunks_delivered == 2
        fake.control.error_event_after = 1
        with pytest.raises(InternalError, match="mid-answer"):
            await ask()
        with pytest.raises(BadRequestError) as info:
            await client.call(addr, "gpt-4o-mini", 42)  # neither messages nor a prompt
        assert error_param(info.value) == "messages"
        assert upstream.ready  # none of these made the upstream look down
        assert (await ask()).text == "You said: the quick brown fox"


async def test_leaving_the_stream_closes_the_upstream_request():
    async with upstream_mesh("openai") as (fake, client, provider, _):
        fake.control.token_delay = 0.05
        messages = [{"role": "user", "content": "a b c d e f g h"}]
        stream = client.infer(provider.addrs[0], "gpt-4o-mini", messages)
        async with stream:
            got = [await stream.__anext__(), await stream.__anext__()]
        assert got == ["You", " said:"]
        with trio.fail_after(5):
            while fake.control.streams_closed_early == 0:
                await trio.sleep(0.02)
        assert fake.control.streams_done == 0


async def test_upstream_down_turns_the_peer_not_ready_and_back():
    async with trio.open_nursery() as nursery:
        fake = FakeServer("ollama")
        url = await fake.start(nursery)
        async with open_peers(2, publish_interval=1.0) as (observer, provider):
            assert provider.availability is not None and observer.availability is not None
            upstream = await serve_upstream(provider, url, health_interval=0.2, retry_interval=0.2)
            pid = provider.peer_id
            seen = observer.availability
            seen.follow("llama3.2:latest")  # the observer cares (as routing would make it)

            def state_is(state: State) -> Any:
                return lambda e: e is not None and e.state is state

            await seen.wait_for(pid, state_is(State.READY), timeout=10)

            await fake.stop()
            with trio.fail_after(5):
                while upstream.ready:
                    await trio.sleep(0.05)
            assert provider.availability.state is State.JOINING
            started = trio.current_time()
            with pytest.raises(UnavailableError, match="down"):
                await observer.call(provider.addrs[0], "llama3.2:latest", MESSAGES, timeout=10)
            assert trio.current_time() - started < 2  # refused at once, not after a timeout
            await seen.wait_for(pid, state_is(State.JOINING), timeout=10)

            await fake.start(nursery)  # back on the same port
            with trio.fail_after(5):
                while not upstream.ready:
                    await trio.sleep(0.05)
            assert provider.availability.state is State.READY
            await seen.wait_for(pid, state_is(State.READY), timeout=10)
            answer = await observer.call(provider.addrs[0], "llama3.2:latest", MESSAGES, timeout=10)
            assert answer.text == "You said: the quick brown fox"

            provider.availability.set_state(State.DRAINING)  # a draining peer stays draining
            await fake.stop()
            with trio.fail_after(5):
                while upstream.ready:
                    await trio.sleep(0.05)
            assert provider.availability.state is State.DRAINING
        nursery.cancel_scope.cancel()


async def test_a_request_that_finds_the_upstream_gone_marks_it_down():
    async with upstream_mesh("openai", health_interval=60.0, retry_interval=0.2) as (
        fake,
        client,
        provider,
        upstream,
    ):
        await fake.stop()
        with pytest.raises(UnavailableError, match="unreachable"):
            await client.call(provider.addrs[0], "gpt-4o-mini", MESSAGES, timeout=10)
        assert not upstream.ready  # at once, without waiting for the next health check


async def test_startup_waits_for_the_upstream_then_gives_up():
    async with open_peers(1) as (provider,):
        with trio.socket.socket() as sock:  # a port with nothing listening
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        started = trio.current_time()
        with pytest.raises(UnavailableError, match="cannot list the models"):
            await serve_upstream(
                provider, f"http://127.0.0.1:{port}/v1", startup_timeout=1.0, retry_interval=0.2
            )
        assert 0.5 < trio.current_time() - started < 5
        assert provider.capabilities == []

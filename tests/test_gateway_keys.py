"""The gateway's API keys: each bearer key mapped to a mesh token and a rate limit.

Real peers on 127.0.0.1, the real HTTP gateway (hypercorn in the test's trio loop, as in
``test_gateway.py``), and the official ``openai`` client in a worker thread.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from modelnet_p2p import Capability, ConfigError, Identity, InferenceRequest, Peer
from modelnet_p2p.openai.app import Gateway, ModelRoute
from modelnet_p2p.openai.keys import GatewayKey, GatewayKeys, RateLimited, digest
from modelnet_p2p.proto.token import Caveats, issue_token

CHAT = Capability(name="toy-chat", task="chat", tasks=("chat", "text-generation"), idempotent=True)
MESSAGES = [{"role": "user", "content": "the quick brown fox"}]


def token_for(issuer: Identity, audience: str, caps: list[str], **caveats: Any) -> str:
    now = time.time()
    return issue_token(
        issuer.key_pair.private_key.to_bytes()[:32],
        audience=audience,
        capabilities=caps,
        not_before=now - 60,
        expires=now + 3600,
        caveats=Caveats(**caveats),
        nonce=secrets.token_bytes(16),
    )


def counting_chat(seen: list[str | None]) -> Callable[[InferenceRequest], AsyncIterator[str]]:
    async def chat(request: InferenceRequest) -> AsyncIterator[str]:
        seen.append("call")
        for word in ("You", " said", " hi"):
            yield word

    return chat


def client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)


def write_keys(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


async def test_bearer_keys_carry_their_tokens_and_rates(tmp_path: Path) -> None:
    issuer = Identity.generate()
    served: list[str | None] = []
    async with Peer(trust=[str(issuer.peer_id)], require_token=True) as provider, Peer() as gw_peer:
        provider.serve(CHAT, counting_chat(served))
        me = gw_peer.peer_id  # the provider sees the gateway's peer id: the tokens name it
        alice = token_for(issuer, me, ["toy-chat"])
        carol = token_for(issuer, me, ["toy-chat"], rate_per_minute=1)
        dave_sha = hashlib.sha256(b"sk-dave").hexdigest()
        keys = write_keys(
            tmp_path / "gateway-keys.toml",
            f"""
[[key]]
name = "alice"
key = "sk-alice"
token = "{alice}"
rate = 1
burst = 2

[[key]]
name = "bob"
key = "sk-bob"

[[key]]
name = "carol"
key = "sk-carol"
token = "{carol}"

[[key]]
name = "dave"
key_sha256 = "{dave_sha}"
token = "{alice}"
""",
        )
        route = ModelRoute(name="toy-chat", tasks=CHAT.tasks, providers=(provider.addrs[0],), idempotent=True)
        gw = Gateway(gw_peer, models=[route], keys=str(keys))
        binds = await gw_peer.nursery.start(gw.serve, "127.0.0.1:0")
        url = binds[0] + "/v1"

        def work() -> dict[str, Any]:
            out: dict[str, Any] = {}

            def attempt(name: str, key: str, fn: Callable[[openai.OpenAI], Any]) -> None:
                with client(url, key) as c:
                    try:
                        out[name] = fn(c)
                    except openai.APIStatusError as exc:
                        out[name] = exc

            def chat(c: openai.OpenAI) -> Any:
                return c.chat.completions.create(model="toy-chat", messages=MESSAGES)

            def stream(c: openai.OpenAI) -> Any:
                chunks = c.chat.completions.create(model="toy-chat", messages=MESSAGES, stream=True)
                return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

            attempt("alice1", "sk-alice", chat)
            attempt("alice2", "sk-alice", stream)
            out["served_before_limit"] = len(served)
            attempt("alice3", "sk-alice", chat)  # burst 2, then 1 per minute: over its rate
            out["served_after_limit"] = len(served)
            attempt("wrong", "sk-mallory", chat)
            out["no_header"] = httpx.get(url + "/models", timeout=10)
            attempt("bob", "sk-bob", chat)  # a valid key without a token: the provider refuses
            attempt("carol1", "sk-carol", chat)
            attempt("carol2", "sk-carol", chat)  # the token's own caveat: 1 per minute
            attempt("dave", "sk-dave", stream)
            return out

        out = await trio.to_thread.run_sync(work)
    assert out["alice1"].choices[0].message.content == "You said hi"
    assert out["alice2"] == "You said hi"
    # over the key's rate: 429, Retry-After, OpenAI's body, and the mesh was not called
    limited = out["alice3"]
    assert isinstance(limited, openai.RateLimitError)
    assert 1 <= int(limited.response.headers["retry-after"]) <= 60
    assert limited.response.headers["x-ratelimit-limit-requests"] == "1"
    assert limited.body["code"] == "rate_limit_exceeded" and "alice" in limited.body["message"]
    assert out["served_after_limit"] == out["served_before_limit"] == 2
    assert isinstance(out["wrong"], openai.AuthenticationError)
    assert out["wrong"].body["code"] == "invalid_api_key"
    assert out["no_header"].status_code == 401
    bob = out["bob"]
    assert isinstance(bob, openai.PermissionDeniedError) and bob.body["message"].startswith("no_token")
    assert out["carol1"].choices[0].message.content == "You said hi"
    # the provider's overloaded (the token's rate caveat) keeps its retry-after, in whole seconds
    carol2 = out["carol2"]
    assert isinstance(carol2, openai.RateLimitError) and carol2.body["code"] == "overloaded"
    assert 2 <= int(carol2.response.headers["retry-after"]) <= 60
    assert out["dave"] == "You said hi"
    assert gw.metrics.errors[("/v1/chat/completions", "rate_limit_exceeded")] == 1


async def test_api_key_and_key_file_together(tmp_path: Path) -> None:
    served: list[str | None] = []
    async with Peer() as provider, Peer() as gw_peer:
        provider.serve(CHAT, counting_chat(served))
        keys = write_keys(tmp_path / "k.toml", '[[key]]\nkey = "sk-file"\nrate = 1\n')
        route = ModelRoute(name="toy-chat", tasks=CHAT.tasks, providers=(provider.addrs[0],))
        gw = Gateway(gw_peer, models=[route], keys=keys, api_key="sk-env")
        binds = await gw_peer.nursery.start(gw.serve, "127.0.0.1:0")
        url = binds[0] + "/v1"

        def work() -> list[Any]:
            codes = []
            for key in ("sk-env", "sk-env", "sk-file", "sk-file", "nope"):
                r = httpx.post(
                    url + "/chat/completions",
                    json={"model": "toy-chat", "messages": MESSAGES},
                    headers={"authorization": f"Bearer {key}"},
                    timeout=20,
                )
                codes.append((r.status_code, r.headers.get("retry-after")))
            return codes

        codes = await trio.to_thread.run_sync(work)
    assert [c for c, _ in codes] == [200, 200, 200, 429, 401]  # the --api-key-env key has no rate
    assert codes[3][1] is not None and int(codes[3][1]) >= 1
    assert len(served) == 3


async def _provider(
    issuer: str, progress: dict[str, int], label: str, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """A ``--require-token`` provider that answers 20 words slowly, until its scope is cancelled."""

    async def chat(request: InferenceRequest) -> AsyncIterator[str]:
        for i in range(20):
            await trio.sleep(0.03)
            progress[label] = i + 1
            yield f"w{i} "

    with trio.CancelScope() as scope:
        async with Peer(trust=[issuer], require_token=True) as peer:
            peer.serve(CHAT, chat)
            task_status.started((peer, scope))
            await trio.sleep_forever()


async def test_a_stream_taken_over_part_way_still_carries_the_token(tmp_path: Path) -> None:
    issuer = Identity.generate()
    progress: dict[str, int] = {}
    async with trio.open_nursery() as nursery, Peer() as gw_peer:
        a, scope_a = await nursery.start(_provider, str(issuer.peer_id), progress, "a")
        b, scope_b = await nursery.start(_provider, str(issuer.peer_id), progress, "b")
        token = token_for(issuer, gw_peer.peer_id, ["toy-chat"])
        keys = GatewayKeys([GatewayKey(name="k", sha256=digest("sk-k"), token=token)])
        route = ModelRoute(
            name="toy-chat", tasks=CHAT.tasks, providers=(a.addrs[0], b.addrs[0]), idempotent=True
        )
        gw = Gateway(gw_peer, models=[route], keys=keys)
        url = (await gw_peer.nursery.start(gw.serve, "127.0.0.1:0"))[0] + "/v1"
        result: dict[str, Any] = {"text": ""}

        def stream() -> None:
            with client(url, "sk-k") as c:
                try:
                    for chunk in c.chat.completions.create(model="toy-chat", messages=MESSAGES, stream=True):
                        if chunk.choices and chunk.choices[0].delta.content:
                            result["text"] += chunk.choices[0].delta.content
                except openai.APIError as exc:
                    result["error"] = exc

        async with trio.open_nursery() as inner:
            inner.start_soon(trio.to_thread.run_sync, stream)
            with trio.fail_after(20):
                while max(progress.values(), default=0) < 5:
                    await trio.sleep(0.01)
            first = max(progress, key=lambda k: progress[k])
            (scope_a if first == "a" else scope_b).cancel()  # the answering provider dies
        nursery.cancel_scope.cancel()
    assert "error" not in result, result.get("error")
    assert result["text"] == "".join(f"w{i} " for i in range(20))
    assert progress["b" if first == "a" else "a"] == 20  # the other provider took the token
    assert gw.metrics.failovers == 1


# -- the key file, without a network -------------------------------------------------------------


def test_key_file_must_be_private_and_well_formed(tmp_path: Path) -> None:
    good = '[[key]]\nname = "a"\nkey = "sk-a"\ntoken = "T"\nrate = 30\n'
    for mode in (0o644, 0o640, 0o604):
        path = write_keys(tmp_path / f"open{mode:o}.toml", good, mode)
        with pytest.raises(ConfigError, match=r"accessible by other users \(mode 0\d+\); run: chmod 600"):
            GatewayKeys.load(path)
    keys = GatewayKeys.load(write_keys(tmp_path / "ok.toml", good))
    (key,) = keys.keys
    assert (key.name, key.token, key.rate, key.burst) == ("a", "T", 30, 30)
    assert "sk-a" not in repr(key) and "T" not in repr(key).replace("GatewayKey", "")
    with pytest.raises(ConfigError, match="cannot read"):
        GatewayKeys.load(tmp_path / "missing.toml")
    bad = {
        "not toml": "not valid TOML",
        "[[key]]\nname = 'x'\n": "exactly one of key and key_sha256",
        "[[key]]\nkey = 'a'\nkey_sha256 = '00'\n": "exactly one of key and key_sha256",
        "[[key]]\nkey_sha256 = 'abc'\n": "64 hex digits",
        "[[key]]\nkey = 'a'\nrate = 0\n": "rate must be",
        "[[key]]\nkey = 'a'\nrate = 1.5\n": "rate must be",
        "[[key]]\nkey = 'a'\nburst = 3\n": "burst needs a rate",
        "[[key]]\nkey = 'a'\nrte = 3\n": "unknown field",
        "[[key]]\nkey = 'a'\n[[key]]\nkey = 'a'\n": "listed twice",
        "[[key]]\nname = 'n'\nkey = 'a'\n[[key]]\nname = 'n'\nkey = 'b'\n": "unique",
        "keys = 1\n": "unknown top-level",
        "": "lists no",
    }
    for i, (text, message) in enumerate(bad.items()):
        with pytest.raises(ConfigError, match=message):
            GatewayKeys.load(write_keys(tmp_path / f"bad{i}.toml", text))


def test_lookup_and_bucket() -> None:
    now = [1000.0]
    keys = GatewayKeys(
        [
            GatewayKey(name="a", sha256=digest("sk-a"), rate=60, burst=2),
            GatewayKey(name="b", sha256=bytes.fromhex(hashlib.sha256(b"sk-b").hexdigest())),
        ],
        clock=lambda: now[0],
    )
    a, b = keys.keys
    assert keys.lookup("sk-a") is a and keys.lookup("sk-b") is b
    assert keys.lookup("sk-") is None and keys.lookup("") is None and keys.lookup("x" * 10_000) is None
    keys.take(a)
    keys.take(a)
    with pytest.raises(RateLimited) as caught:
        keys.take(a)
    assert caught.value.retry_after == 1  # 60/min: one more in a second
    now[0] += 0.5
    with pytest.raises(RateLimited):
        keys.take(a)
    now[0] += 0.6
    keys.take(a)  # refilled
    now[0] += 3600
    keys.take(a)
    keys.take(a)  # the bucket holds at most burst
    with pytest.raises(RateLimited):
        keys.take(a)
    for _ in range(1000):
        keys.take(b)  # no rate: no limit


def test_the_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    now = [0.0]
    path = write_keys(tmp_path / "keys.toml", '[[key]]\nname = "a"\nkey = "sk-a"\nrate = 1\n')
    keys = GatewayKeys.load(path, clock=lambda: now[0], reload_interval=5)
    keys.add(GatewayKey(name="api-key", sha256=digest("sk-env")))
    a = keys.lookup("sk-a")
    assert a is not None
    keys.take(a)
    # a is kept (with its used-up bucket), b is new; the added key stays
    write_keys(path, '[[key]]\nname = "a"\nkey = "sk-a"\nrate = 1\n[[key]]\nname = "b"\nkey = "sk-b"\n')
    assert keys.lookup("sk-b") is None  # not checked again yet
    now[0] += 6
    b, a2 = keys.lookup("sk-b"), keys.lookup("sk-a")
    assert b is not None and b.name == "b" and a2 is not None and a2 is not a
    with pytest.raises(RateLimited):
        keys.take(a2)
    assert keys.lookup("sk-env") is not None
    # a rewrite that fails the checks keeps the keys read before; a removed key is refused
    write_keys(path, '[[key]]\nname = "b"\nkey = "sk-b"\n', mode=0o644)
    now[0] += 6
    assert keys.lookup("sk-a") is a2
    path.chmod(0o600)  # the same content, now private: read
    now[0] += 6
    assert keys.lookup("sk-a") is None and keys.lookup("sk-b") is not None
    assert keys.lookup("sk-env") is not None and len(keys) == 2
    path.write_text("not toml")
    now[0] += 6
    assert keys.lookup("sk-b") is not None


def test_cli_refuses_an_open_key_file(tmp_path: Path) -> None:
    from cli_util import modelnet, one_line_error

    path = write_keys(tmp_path / "keys.toml", '[[key]]\nkey = "sk"\n', 0o644)
    boot = f"/ip4/127.0.0.1/tcp/9/p2p/{Identity.generate().peer_id}"
    line = one_line_error(modelnet("gateway", "--keys-file", str(path), "--bootstrap", boot, cwd=tmp_path))
    assert "accessible by other users" in line and "chmod 600" in line, line
    assert os.stat(path).st_mode & 0o777 == 0o644  # left as it was


def test_cli_gateway_with_a_key_file(tmp_path: Path) -> None:
    """``modelnet gateway --keys-file`` before a ``modelnet serve --require-token`` provider."""
    from cli_util import background, modelnet, read_event

    for name in ("issuer", "gw"):
        assert modelnet("id", "--identity", f"{name}.key", cwd=tmp_path).returncode == 0
    issuer, gw_id = (
        modelnet("id", "--identity", f"{name}.key", cwd=tmp_path).stdout.strip() for name in ("issuer", "gw")
    )
    issued = modelnet(
        "token", "issue", "-c", "parrot", "--to", gw_id, "--ttl", "10m", "-i", "issuer.key", cwd=tmp_path
    )
    assert issued.returncode == 0, issued.stderr
    card = tmp_path / "card.toml"
    card.write_text(
        '[capability]\nhandler = "modelnet_p2p.demo_models:echo"\nname = "parrot"\ntask = "text-generation"\n'
    )
    keys = write_keys(
        tmp_path / "keys.toml",
        f'[[key]]\nname = "poll"\nkey = "sk-poll"\n\n'
        f'[[key]]\nname = "app"\nkey = "sk-app"\ntoken = "{issued.stdout.strip()}"\nrate = 1\n\n'
        f'[[key]]\nname = "none"\nkey = "sk-none"\n',
    )
    serve = ("serve", str(card), "--json", "--require-token", "--trust", issuer)
    with background(*serve, cwd=tmp_path) as server:
        addr = read_event(server)["addrs"][0]
        gateway = ("gateway", "--keys-file", str(keys), "--bootstrap", addr, "--listen", "127.0.0.1:0")
        with background(*gateway, "--identity", "gw.key", "--json", cwd=tmp_path) as gw:
            url = read_event(gw, timeout=60)["url"] + "/v1"

            def post(key: str) -> httpx.Response:
                return httpx.post(
                    url + "/completions",
                    json={"model": "parrot", "prompt": "hi there"},
                    headers={"authorization": f"Bearer {key}"},
                    timeout=30,
                )

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # until the gateway's discovery finds the provider
                listed = httpx.get(url + "/models", headers={"authorization": "Bearer sk-poll"}, timeout=30)
                assert listed.status_code == 200, listed.text
                if any(m["id"] == "parrot" for m in listed.json()["data"]):
                    break
                time.sleep(0.5)
            ok, limited, refused = post("sk-app"), post("sk-app"), post("sk-none")
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["text"].split() == ["hi", "there"]
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.status_code == 403 and refused.json()["error"]["message"].startswith("no_token")

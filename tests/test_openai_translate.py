"""The gateway's pure parts, without HTTP or a mesh: request checks, answer shapes, errors, metrics."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelnet_p2p.errors import (
    BadRequestError,
    DeadlineExceededError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
)
from modelnet_p2p.openai.catalog import ModelRoute, agent_card, model_json, routes_from_cards
from modelnet_p2p.openai.conventions import EMBEDDING_BATCH, param_error
from modelnet_p2p.openai.errors import GatewayError, from_mesh_error
from modelnet_p2p.openai.metrics import Metrics
from modelnet_p2p.openai.translate import (
    DONE,
    EMBEDDING_BATCH_BYTES,
    Answer,
    ChatFrames,
    CompletionFrames,
    batch_texts,
    chat_response,
    embedding_vectors,
    embeddings_response,
    generation_params,
    parse_body,
    parse_chat,
    parse_completion,
    parse_embeddings,
    parse_timeout,
    sse_event,
    usage,
)

MESSAGES = [{"role": "user", "content": "hi"}]


def _param_of(fn: Any, *args: Any) -> tuple[int, str | None, str | None]:
    with pytest.raises(GatewayError) as caught:
        fn(*args)
    return caught.value.status, caught.value.param, caught.value.code


def test_bodies_and_headers_are_checked():
    assert parse_body(b'{"a": 1}') == {"a": 1}
    assert _param_of(parse_body, b"{nope")[2] == "invalid_json"
    assert _param_of(parse_body, b"[1]")[2] == "invalid_json"
    assert parse_timeout(None, 600.0) == 600.0
    assert parse_timeout("2.5", 600.0) == 2.5
    assert parse_timeout("900", 600.0) == 600.0  # a client may only shorten the deadline
    for bad in ("soon", "0", "-1", "inf", "nan"):
        assert _param_of(parse_timeout, bad, 600.0)[:2] == (400, "x-modelnet-timeout")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "invalid_type"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages", "invalid_value"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages", "invalid_type"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream", "invalid_type"),
        ({"messages": MESSAGES, "n": 2}, "n", "unsupported_value"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature", "invalid_type"),
        ({"messages": MESSAGES, "temperature": True}, "temperature", "invalid_type"),
        ({"messages": MESSAGES, "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"messages": MESSAGES, "max_completion_tokens": "9"}, "max_completion_tokens", "invalid_type"),
        ({"messages": MESSAGES, "stop": [1]}, "stop", "invalid_type"),
        ({"messages": MESSAGES, "logit_bias": []}, "logit_bias", "invalid_type"),
    ],
)
def test_bad_chat_requests_name_the_field(body: dict[str, Any], param: str, code: str):
    assert _param_of(parse_chat, body) == (400, param, code)


def test_chat_and_completion_requests():
    asked = parse_chat(
        {
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "unknown_field": 1,
        }
    )
    assert asked.stream and asked.include_usage
    assert asked.params == {"max_tokens": 7, "temperature": 0.5}
    assert asked.input_for(("chat",)) == MESSAGES
    assert asked.input_for(("text-generation",)) == "hi"
    done = parse_completion({"prompt": ["once"], "max_tokens": 3})
    assert (done.prompt, done.stream, done.params) == ("once", False, {"max_tokens": 3})
    assert done.input_for(("chat",)) == [{"role": "user", "content": "once"}]
    assert _param_of(parse_completion, {"prompt": [1, 2]})[1] == "prompt"
    assert _param_of(parse_completion, {})[2] == "missing_required_parameter"
    assert generation_params({"max_tokens": 5, "max_completion_tokens": 9}) == {"max_tokens": 5}


def test_embedding_requests_and_batches():
    asked = parse_embeddings({"input": "one", "encoding_format": "base64", "dimensions": 4, "user": "u"})
    assert (asked.texts, asked.encoding, asked.params) == (["one"], "base64", {"dimensions": 4, "user": "u"})
    for body, param in (
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [[1, 2]]}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "a", "dimensions": 0}, "dimensions"),
        ({"input": "a", "user": 5}, "user"),
    ):
        assert _param_of(parse_embeddings, body)[1] == param
    texts = [f"t{i}" for i in range(2 * EMBEDDING_BATCH + 3)]
    batches = batch_texts(texts)
    assert [len(b) for b in batches] == [EMBEDDING_BATCH, EMBEDDING_BATCH, 3]
    big = "x" * (EMBEDDING_BATCH_BYTES - 10)
    assert [len(b) for b in batch_texts([big, "yyyyyyyyyyyyyyyyyyyy", big])] == [1, 1, 1]


@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=300))
def test_batches_keep_every_text_in_order(texts: list[str]):
    batches = batch_texts(texts)
    assert [t for b in batches for t in b] == texts
    assert all(0 < len(b) <= EMBEDDING_BATCH for b in batches)


def test_answers_in_openai_shapes():
    answer = Answer(["You ", "said"], "length", {"prompt_tokens": 3, "tokens": 2})
    body = chat_response("chatcmpl-1", 10, "toy", answer)
    assert body["choices"][0]["message"]["content"] == "You said"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert usage({}, 4) == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}
    odd = chat_response("c", 1, "m", Answer([{"a": 1}], "weird", {}))
    assert odd["choices"][0]["message"]["content"] == '{"a": 1}'
    assert odd["choices"][0]["finish_reason"] == "stop"


def test_stream_frames():
    chat = ChatFrames("c", 1, "m", include_usage=True)
    assert chat.opening() == {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": None,
    }
    assert chat.delta(None, "stop")["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    last = chat.usage_frame({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    assert last is not None and last["choices"] == [] and last["usage"]["total_tokens"] == 3
    assert ChatFrames("c", 1, "m", include_usage=False).usage_frame({}) is None
    text = CompletionFrames("c", 1, "m", include_usage=False)
    assert text.opening() is None and text.delta("hi", None)["choices"][0]["text"] == "hi"
    assert sse_event({"a": [1, 2]}) == b'data: {"a":[1,2]}\n\n' and DONE == b"data: [DONE]\n\n"


_TEXTS = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ['"', "\\", "\x00", "\x00modelnet-text\x00", "</script>", "\u2028", "\U0001f600", "\ud800"]
)


@given(text=_TEXTS, model=_TEXTS, include_usage=st.booleans())
def test_text_events_are_the_encoded_delta(text: str, model: str, include_usage: bool):
    """The per-chunk template gives the same bytes as encoding the whole chunk object,
    whatever the text and the model name (which comes before the text) hold."""
    chat, text_completion = ChatFrames("c-1", 7, model, include_usage), CompletionFrames("c", 7, model, False)
    for frames in (chat, text_completion):
        assert frames.text_event(text) == sse_event(frames.delta(text, None))
        event = json.loads(frames.text_event(text)[len(b"data: ") : -2])
        assert event["model"] == model


def test_embedding_answers():
    assert embedding_vectors([[1, 2], [[3, 4], [5, 6]]], 3, "p") == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    with pytest.raises(ProtocolError, match="2 embeddings for 3"):
        embedding_vectors([[1, 2], [3, 4]], 3, "p")
    with pytest.raises(ProtocolError, match="bad embedding"):
        embedding_vectors(["nope"], 1, "p")
    out = embeddings_response(
        "e", "base64", [([[1.0, 2.0]], {"prompt_tokens": 2}), ([[3.0]], {"total_tokens": 1})]
    )
    assert [d["index"] for d in out["data"]] == [0, 1]
    assert struct.unpack("<2f", base64.b64decode(out["data"][0]["embedding"])) == (1.0, 2.0)
    assert out["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    plain = embeddings_response("e", "float", [([[0.5]], {})])
    assert plain["data"][0]["embedding"] == [0.5]


def test_mesh_errors_become_http_answers():
    cases = [
        (NotFoundError("x"), 404, "model_not_found"),
        (OverloadedError("x"), 429, "overloaded"),
        (UnavailableError("x"), 503, "unavailable"),
        (DeadlineExceededError("x"), 504, "deadline_exceeded"),
        (ProtocolError("x"), 502, "protocol_error"),
        (BadRequestError("x"), 400, "bad_request"),
    ]
    for exc, status, code in cases:
        err = from_mesh_error(exc)
        assert (err.status, err.code) == (status, code), exc
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert from_mesh_error(param_error("temperature", "too hot")).param == "temperature"
    assert from_mesh_error(OverloadedError("x")).headers == {"retry-after": "1"}
    assert from_mesh_error(DeadlineExceededError("x")).headers == {"x-should-retry": "false"}


def test_metrics_exposition():
    m = Metrics()
    m.done("/v1/chat/completions", 200, 0.02, None)
    m.done("/v1/models", 401, 0.001, "invalid_api_key")
    m.first_chunk_after("/v1/chat/completions", 0.004)
    m.chunks['/v1/x"y'] += 2
    text = m.render({"modelnet_gateway_models": ("Models known now.", 2.0)})
    lines = text.splitlines()  # prometheus_client writes labels sorted, values as floats
    assert 'modelnet_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in lines
    assert 'modelnet_gateway_errors_total{code="invalid_api_key",endpoint="/v1/models"} 1.0' in lines
    assert (
        'modelnet_gateway_first_chunk_seconds_bucket{endpoint="/v1/chat/completions",le="0.005"} 1.0' in lines
    )
    assert 'modelnet_gateway_request_duration_seconds_bucket{endpoint="/v1/models",le="+Inf"} 1.0' in lines
    assert 'modelnet_gateway_chunks_total{endpoint="/v1/x\\"y"} 2.0' in lines
    assert "# TYPE modelnet_gateway_models gauge" in lines and "modelnet_gateway_models 2.0" in lines
    assert text.endswith("\n")


def test_routes_from_cards_and_their_json():
    from modelnet_p2p import Capability
    from modelnet_p2p.proto.card import CapabilityCard

    def card(peer: str, *caps: Capability) -> CapabilityCard:
        return CapabilityCard(
            peer_id=peer, addrs=("/ip4/127.0.0.1/tcp/1",), seq=1, issued_at=0, expires_at=1, capabilities=caps
        )

    chat = Capability(name="Chat-A", task="chat", idempotent=True, tags=("x",))
    chat_b = Capability(name="chat-a", task="chat", idempotent=False, tags=("y",))
    other = Capability(name="topic", task="classification")
    cards = [card("peerB", chat_b), card("peerA", chat, other), card("self", chat)]
    routes = routes_from_cards(cards, own_peer_id="self")
    assert list(routes) == ["chat-a"]
    route = routes["chat-a"]
    assert route.name == "Chat-A" and route.discovered and not route.idempotent
    assert [p.rsplit("/", 1)[1] for p in route.providers] == ["peerA", "peerB"]
    assert route.tags == ("x", "y")
    as_json = model_json(route, 5)
    assert as_json["id"] == "Chat-A" and as_json["x-modelnet"]["providers"] == 2
    a2a = agent_card([route], base_url="http://h:1/", peer_id="self", network="n", bearer=True)
    assert a2a["url"] == "http://h:1/v1" and a2a["skills"][0]["id"] == "Chat-A"
    assert a2a["x-modelnet"]["providers"] == {"Chat-A": 2} and a2a["security"] == [{"bearer": []}]
    assert json.loads(json.dumps(a2a)) == a2a


def test_static_route_defaults():
    route = ModelRoute(name="m")
    assert route.tasks == ("chat", "text-generation") and not route.providers and not route.discovered


def test_the_name_openai_still_means_the_official_client():
    import openai

    import modelnet_p2p.openai as ours
    from modelnet_p2p.openai import app

    assert ours is not openai and ours.__name__ == "modelnet_p2p.openai"
    assert hasattr(openai, "OpenAI") and app.Gateway.__module__ == "modelnet_p2p.openai.app"

"""The inference session state machines, transition by transition, without sockets or clocks.

Every test feeds bytes (frames built with the codec) into a :class:`ServerSession` or a
:class:`ClientSession` and checks the events, the state and the bytes it hands back.
Times are plain numbers passed in.
"""

from __future__ import annotations

import math

import pytest

from modelnet_p2p.errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    InternalError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
)
from modelnet_p2p.proto.framing import FrameDecoder, encode_varint, pack_frame
from modelnet_p2p.proto.infer import (
    MAX_HOPS,
    Cancel,
    Chunk,
    Credit,
    End,
    ErrorFrame,
    Request,
    TraceContext,
    parse_message,
    via_entry,
)
from modelnet_p2p.proto.session import (
    CREDIT_FRACTION,
    NEED_DATA,
    PAUSED,
    CancelReceived,
    ChunkReceived,
    ClientClosed,
    ClientGone,
    ClientSession,
    ClientState,
    CreditReceived,
    ErrorReceived,
    Finished,
    Limits,
    ProtocolViolation,
    RequestReceived,
    RequestRejected,
    ServerSession,
    ServerState,
    SessionStateError,
    TimedOut,
)

ME = "12D3KooWServer"


def req(cap: str = "echo", **kw) -> Request:
    return Request(request_id=b"r1", capability=cap, **kw)


def frame(msg) -> bytes:
    return pack_frame(msg.to_wire())


def decode(data: bytes) -> list:
    return [parse_message(b) for b in FrameDecoder().feed(data)]


def server(now: float = 0.0, **limits) -> ServerSession:
    return ServerSession(now, Limits(**limits), local_peer=ME)


def events(s: ServerSession | ClientSession) -> list:
    out = []
    while (ev := s.next_event()) not in (NEED_DATA, PAUSED):
        out.append(ev)
    return out


def running(
    s: ServerSession | None = None, request: Request | None = None, now: float = 0.0
) -> ServerSession:
    s = s or server()
    s.receive_data(frame(request or req()))
    assert events(s) == [RequestReceived(request or req())]
    s.accept(now)
    return s


# -- server: the first frame -----------------------------------------------------


def test_new_stream_waits_for_a_request():
    s = server()
    assert s.state is ServerState.AWAIT_REQUEST
    assert s.next_event() is NEED_DATA
    assert s.data_to_send(0) == b""


def test_request_split_over_reads_then_admission_pauses_reading():
    s = server()
    data = frame(req())
    s.receive_data(data[:3])
    assert s.next_event() is NEED_DATA
    s.receive_data(data[3:] + frame(Cancel("x")))
    assert s.next_event() == RequestReceived(req())
    assert s.state is ServerState.ADMITTING
    assert s.next_event() is PAUSED  # the cancel waits until the request is admitted
    s.accept(0)
    assert s.next_event() == CancelReceived("x")
    assert s.state is ServerState.RESET
    assert s.data_to_send(0) == b""


@pytest.mark.parametrize("first", [Credit(5), Cancel("early")], ids=["credit", "cancel"])
def test_credit_or_cancel_as_the_first_frame_is_a_protocol_error(first):
    s = server()
    s.receive_data(frame(first))
    (ev,) = events(s)
    assert isinstance(ev, ProtocolViolation)
    assert "expected a request frame" in ev.error.message
    (err,) = decode(s.data_to_send(0))
    assert isinstance(err, ErrorFrame) and err.code == "protocol_error" and err.chunks == 0
    assert s.state is ServerState.CLOSED  # close (not reset) after err


@pytest.mark.parametrize(
    "msg", [Chunk(0, "x"), End(0), ErrorFrame("internal", "x")], ids=["chunk", "end", "err"]
)
def test_server_frames_from_the_client_are_a_protocol_error(msg):
    s = server()
    s.receive_data(frame(msg))
    assert isinstance(s.next_event(), ProtocolViolation)
    assert decode(s.data_to_send(0))[0].code == "protocol_error"


@pytest.mark.parametrize(
    "data",
    [encode_varint(5 << 20), b"\xff" * 11, encode_varint(3) + b"\xc1\xc1\xc1", pack_frame({"t": "nope"})],
    ids=["oversized", "varint", "msgpack", "unknown-type"],
)
def test_malformed_first_frame_is_answered_then_nothing_more_is_read(data):
    s = server()
    s.receive_data(data)
    assert isinstance(s.next_event(), ProtocolViolation)
    assert s.next_event() is PAUSED
    s.receive_data(frame(req()))  # ignored: the stream is given up
    assert s.next_event() is PAUSED
    assert decode(s.data_to_send(0))[0].code == "protocol_error"
    assert s.state is ServerState.CLOSED


def test_end_of_stream_before_a_request_resets():
    s = server()
    s.receive_data(frame(req())[:4])
    s.receive_eof()
    assert s.next_event() == ClientGone()
    assert s.state is ServerState.RESET
    s2 = server()
    s2.receive_eof()
    assert s2.next_event() == ClientGone()


def test_no_request_within_the_read_timeout_resets():
    s = server(now=100.0, request_read_timeout=10.0)
    assert s.timeout_at() == 110.0
    assert s.on_timeout(109.9) is None
    assert isinstance(s.on_timeout(110.0), TimedOut)
    assert s.state is ServerState.RESET


# -- server: hop limit and loops (before any capability lookup) -----------------------


def test_hop_limit_refused_before_admission():
    r = req(trace=TraceContext(hops=9))
    s = server(max_hops=8)
    s.receive_data(frame(r))
    (ev,) = events(s)
    assert isinstance(ev, RequestRejected) and isinstance(ev.error, BadRequestError)
    assert "hop limit" in ev.error.message
    (err,) = decode(s.data_to_send(0))
    assert err.code == "bad_request"
    assert s.state is ServerState.CLOSED
    s_ok = server(max_hops=9)
    s_ok.receive_data(frame(r))
    assert events(s_ok) == [RequestReceived(r)]


@pytest.mark.parametrize("served_as", ["echo", "Echo", " ECHO "])
def test_loop_detected_after_normalization(served_as):
    r = req("echo", trace=TraceContext(hops=1, visited=(via_entry(ME, served_as),)))
    s = server()
    s.receive_data(frame(r))
    (ev,) = events(s)
    assert isinstance(ev, RequestRejected) and "loop detected" in ev.error.message


def test_another_peer_on_the_path_is_no_loop():
    r = req("echo", trace=TraceContext(hops=1, visited=(via_entry("12D3KooWOther", "echo"), f"{ME}/other")))
    s = server()
    s.receive_data(frame(r))
    assert events(s) == [RequestReceived(r)]


@pytest.mark.parametrize("hops", [-1, MAX_HOPS + 1])
def test_limits_refuse_hop_limits_beyond_the_maximum(hops):
    with pytest.raises(ConfigError, match="max_hops"):
        Limits(max_hops=hops)
    assert Limits(max_hops=MAX_HOPS).max_hops == MAX_HOPS


# -- server: admission --------------------------------------------------------------


def test_reject_sends_err_and_closes():
    s = server()
    s.receive_data(frame(req()))
    events(s)
    s.reject(NotFoundError("nope"))
    assert s.state is ServerState.FINISHING
    (err,) = decode(s.data_to_send(0))
    assert (err.code, err.message, err.chunks) == ("not_found", "nope", 0)
    assert s.state is ServerState.CLOSED


def test_accept_sets_the_deadline_from_ttl_capped_by_max_request_time():
    assert running(request=req(timeout_ms=1500), now=10.0).deadline == pytest.approx(11.5)
    s = running(server(max_request_time=2.0), request=req(timeout_ms=60_000), now=10.0)
    assert s.deadline == pytest.approx(12.0)
    assert running(server(max_request_time=5.0), request=req(), now=1.0).deadline == pytest.approx(6.0)


@pytest.mark.parametrize("call", ["accept", "reject", "send_chunk", "send_end", "send_error"])
def test_misuse_raises_a_state_error(call):
    s = server()
    args = {
        "accept": (0,),
        "reject": (NotFoundError(),),
        "send_chunk": (1,),
        "send_end": (),
        "send_error": (InternalError(),),
    }
    with pytest.raises(SessionStateError):
        getattr(s, call)(*args[call])


# -- server: streaming and the window -------------------------------------------------


def test_chunks_then_end_coalesced_into_one_write():
    s = running()
    for i in range(3):
        assert s.send_chunk(f"c{i}")
    s.send_end("stop", {"tokens": 3, "bad": object()})
    out = decode(s.data_to_send(0))
    assert out == [Chunk(0, "c0"), Chunk(1, "c1"), Chunk(2, "c2"), End(3, "stop", {"tokens": 3})]
    assert s.state is ServerState.CLOSED
    assert s.final_code is None
    assert s.chunks_written == 3


def test_window_is_checked_per_frame_not_per_write():
    """Three 100 kB chunks against a 1 KiB window: one goes, the others wait for credit."""
    s = running(request=req(window=1024))
    for _ in range(3):
        s.send_chunk(b"x" * 100_000)
    first = s.data_to_send(0)
    assert len(decode(first)) == 1
    assert s.data_to_send(0) == b""  # 100 kB outstanding: no room
    s.receive_data(frame(Credit(len(first) - 300)))
    assert s.next_event() == CreditReceived(len(first) - 300)
    assert s.data_to_send(0) == b""  # 300 bytes outstanding: over a quarter window, and no room
    s.receive_data(frame(Credit(100)))  # 200 outstanding: under a quarter window
    events(s)
    assert len(decode(s.data_to_send(0))) == 1


def test_small_frames_fill_the_window_exactly():
    s = running(request=req(window=1024))
    for _ in range(20):
        s.send_chunk(b"y" * 90)  # 100-byte frames
    sent = s.data_to_send(0)
    assert len(sent) <= 1024
    assert s.outstanding == len(sent)
    assert s.data_to_send(0) == b""
    s.receive_data(frame(Credit(len(sent))))
    events(s)
    assert s.data_to_send(0) != b""


def test_quarter_window_rule_lets_a_large_frame_through():
    s = running(request=req(window=4096))
    s.send_chunk(b"a" * 900)  # ~ 910 bytes outstanding < 1024 = window / 4
    s.data_to_send(0)
    s.send_chunk(b"b" * 8000)
    assert len(decode(s.data_to_send(0))) == 1
    s.send_chunk(b"c")
    assert s.data_to_send(0) == b""  # now over a quarter and the frame does not fit


def test_credit_beyond_what_was_sent_is_ignored():
    s = running(request=req(window=1024))
    s.receive_data(frame(Credit(10**9)))
    events(s)
    assert s.outstanding == 0
    for _ in range(3):
        s.send_chunk(b"z" * 600)
    assert len(decode(s.data_to_send(0))) == 1  # the credit did not enlarge the window


def test_batches_are_bounded_by_max_bytes():
    s = running()
    for _ in range(10):
        s.send_chunk(b"q" * 1000)
    first = s.data_to_send(0, max_bytes=3000)
    assert len(decode(first)) == 2
    assert len(decode(s.data_to_send(0))) == 8


def test_final_frame_obeys_the_window():
    s = running(request=req(window=1024))
    s.send_chunk(b"x" * 2000)
    s.send_end()
    assert decode(s.data_to_send(0)) == [Chunk(0, b"x" * 2000)]
    assert s.state is ServerState.FINISHING
    assert s.data_to_send(0) == b""
    s.receive_data(frame(Credit(2100)))
    events(s)
    assert decode(s.data_to_send(0)) == [End(1)]


def test_handler_error_counts_the_queued_chunks_which_all_go_first():
    s = running()
    s.send_chunk("a")
    s.send_chunk("b")
    s.send_error(InternalError("boom"))
    assert decode(s.data_to_send(0)) == [
        Chunk(0, "a"),
        Chunk(1, "b"),
        ErrorFrame("internal", "boom", False, 2),
    ]
    assert s.final_code == "internal"


def test_unencodable_or_oversized_chunk_fails_the_request_as_internal():
    s = running()
    assert s.send_chunk("ok")
    assert not s.send_chunk(object())
    assert not s.running
    out = decode(s.data_to_send(0))
    assert out[0] == Chunk(0, "ok") and out[1].code == "internal" and out[1].chunks == 1
    s2 = running(server(max_frame_size=1024))
    assert not s2.send_chunk(b"x" * 2000)
    assert "too large" in decode(s2.data_to_send(0))[0].message


# -- server: err.n after an abort counts chunks written, not queued ------------------------


def test_deadline_past_grace_sends_err_regardless_of_window_counting_written_chunks():
    s = running(server(deadline_grace=1.0), request=req(window=1024, timeout_ms=2000), now=0.0)
    for _ in range(6):
        s.send_chunk(b"x" * 300)
    written = decode(s.data_to_send(0.1))
    assert len(written) == 3  # ~960 bytes: the fourth fits neither the window nor the quarter rule
    assert s.timeout_at() == pytest.approx(3.0)
    assert s.on_timeout(2.5) is None
    assert isinstance(s.on_timeout(3.0), TimedOut)
    (err,) = decode(s.data_to_send(3.0))
    assert (err.code, err.chunks) == ("deadline_exceeded", 3)
    assert s.state is ServerState.CLOSED


def test_protocol_error_mid_request_counts_written_chunks():
    s = running(request=req(window=1024))
    for _ in range(4):
        s.send_chunk(b"x" * 600)
    s.data_to_send(0)
    s.receive_data(frame(req()))  # a second request while one runs
    (ev,) = events(s)
    assert isinstance(ev, ProtocolViolation) and "unexpected Request" in ev.error.message
    (err,) = decode(s.data_to_send(0))
    assert (err.code, err.chunks) == ("protocol_error", 1)
    assert s.state is ServerState.CLOSED


def test_abort_by_the_server_itself():
    s = running()
    s.send_chunk("a")
    s.data_to_send(0)
    s.send_chunk("b")
    s.abort(UnavailableError("the provider is stopping"))
    (err,) = decode(s.data_to_send(0))
    assert (err.code, err.retryable, err.chunks) == ("unavailable", True, 1)
    s.abort(InternalError())  # after the end: nothing happens
    assert s.state is ServerState.CLOSED


# -- server: the client leaves -------------------------------------------------------------


def test_cancel_mid_request_resets_and_drops_queued_output():
    s = running()
    s.send_chunk("a")
    s.receive_data(frame(Cancel("bored")))
    assert s.next_event() == CancelReceived("bored")
    assert s.state is ServerState.RESET
    assert s.data_to_send(0) == b""
    assert s.final_code == "cancelled"
    with pytest.raises(SessionStateError):
        s.send_chunk("b")


@pytest.mark.parametrize("partial", [b"", frame(Credit(1))[:2]], ids=["between-frames", "inside-a-frame"])
def test_end_of_stream_mid_request_means_the_client_is_gone(partial):
    s = running()
    s.receive_data(partial)
    events(s)
    s.receive_eof()
    assert s.next_event() == ClientGone()
    assert s.state is ServerState.RESET
    assert s.final_code == "cancelled"


def test_connection_lost_mid_request():
    s = running()
    s.send_chunk("a")
    s.connection_lost()
    assert s.state is ServerState.RESET
    assert s.final_code == "unavailable"
    assert s.next_event() is PAUSED


# -- server: stream reuse --------------------------------------------------------------------


def kept() -> ServerSession:
    s = running(request=req(keep=True))
    s.send_chunk("a")
    s.send_end()
    out = decode(s.data_to_send(5.0))
    assert out[-1] == End(1, keep=True)
    assert s.state is ServerState.IDLE
    return s


def test_keep_is_granted_only_when_asked():
    s = running()
    s.send_end()
    assert decode(s.data_to_send(0)) == [End(0)]
    assert s.state is ServerState.CLOSED
    assert kept().requests_served == 1


def test_error_on_a_kept_request_closes():
    s = running(request=req(keep=True))
    s.send_error(InternalError("x"))
    s.data_to_send(0)
    assert s.state is ServerState.CLOSED


def test_leftover_credit_and_cancel_on_an_idle_stream_are_ignored():
    s = kept()
    s.receive_data(frame(Credit(100)) + frame(Cancel("late")) + frame(Credit(7)))
    assert s.next_event() is NEED_DATA
    assert s.state is ServerState.IDLE
    r2 = Request(request_id=b"r2", capability="echo", window=2048)
    s.receive_data(frame(r2))
    assert s.next_event() == RequestReceived(r2)
    s.accept(6.0)
    assert s.outstanding == 0 and s.chunks_written == 0
    s.send_chunk("fresh")
    assert decode(s.data_to_send(6.0)) == [Chunk(0, "fresh")]  # seq starts again at 0
    assert s.requests_served == 2


def test_other_frames_on_an_idle_stream_are_protocol_errors():
    s = kept()
    s.receive_data(frame(Chunk(0, "x")))
    assert isinstance(s.next_event(), ProtocolViolation)
    assert decode(s.data_to_send(0))[0].code == "protocol_error"


def test_idle_stream_closes_after_its_timeout():
    s = kept()  # went idle at t = 5
    assert s.timeout_at() == pytest.approx(5.0 + Limits().idle_stream_timeout)
    assert s.on_timeout(6.0) is None
    assert isinstance(s.on_timeout(5.0 + 60.0), TimedOut)
    assert s.state is ServerState.CLOSED


def test_end_of_stream_while_idle_closes_but_inside_a_frame_resets():
    s = kept()
    s.receive_eof()
    assert s.next_event() == ClientClosed()
    assert s.state is ServerState.CLOSED
    s2 = kept()
    s2.receive_data(frame(req())[:5])
    events(s2)
    s2.receive_eof()
    assert s2.next_event() == ClientGone()
    assert s2.state is ServerState.RESET


def test_many_leftover_frames_do_not_recurse_and_are_bounded():
    s = kept()
    s.receive_data(frame(Credit(1)) * 20)  # a few leftovers: ignored
    assert s.next_event() is NEED_DATA
    s = kept()
    s.receive_data(frame(Credit(1)) * 20_000)
    (event,) = events(s)
    assert isinstance(event, ProtocolViolation) and "control frames" in event.error.message
    assert s.state is ServerState.FINISHING


def test_control_frames_are_bounded_by_the_bytes_sent():
    from modelnet_p2p.proto.framing import BYTES_PER_CONTROL_FRAME, MAX_CONTROL_FRAMES

    s = running(request=req(window=1 << 20))
    for _ in range(40):
        s.send_chunk("x" * 1000)
    sent = len(s.data_to_send(1.0))
    allowed = MAX_CONTROL_FRAMES + sent // BYTES_PER_CONTROL_FRAME
    s.receive_data(frame(Credit(1)) * allowed)  # each acknowledges a byte: progress, counted
    assert len(events(s)) == allowed
    s.receive_data(frame(Credit(1)))
    (event,) = events(s)
    assert isinstance(event, ProtocolViolation) and "control frames" in event.error.message


def test_a_running_request_reads_only_small_control_frames():
    from modelnet_p2p.proto.framing import MAX_CONTROL_FRAME_SIZE, MAX_CONTROL_OBJECTS

    s = running()
    s.receive_data(pack_frame({"t": "credit", "b": 1, "junk": "j" * MAX_CONTROL_FRAME_SIZE}))
    (event,) = events(s)
    assert isinstance(event, ProtocolViolation) and "exceeds the limit" in event.error.message
    s = running()
    s.receive_data(pack_frame({"t": "credit", "b": 1, "junk": [0] * MAX_CONTROL_OBJECTS}))
    (event,) = events(s)
    assert isinstance(event, ProtocolViolation) and "values" in event.error.message
    s = running()  # a credit with a few unknown keys is fine
    s.receive_data(pack_frame({"t": "credit", "b": 1, "x": [1, 2, 3]}))
    assert events(s) == [CreditReceived(1)]


# -- client ------------------------------------------------------------------------------------


def client(**kw) -> ClientSession:
    request = kw.pop("request", req(window=kw.pop("window", 4096), keep=kw.pop("keep", False)))
    return ClientSession(request, **kw)


def test_client_request_carries_the_time_left():
    c = client(deadline=12.3456)
    (sent,) = decode(c.send_request(10.0))
    assert sent.timeout_ms == 2345
    assert c.state is ClientState.RECEIVING
    assert decode(client().send_request(0))[0].timeout_ms == 0  # no deadline
    assert decode(client(deadline=1.0).send_request(0.9999999))[0].timeout_ms == 1  # at least 1
    with pytest.raises(SessionStateError):
        c.send_request(10.0)


def test_the_request_frame_is_the_request_with_the_time_left_as_its_timeout():
    from dataclasses import replace

    from modelnet_p2p.proto.infer import TraceContext

    request = req(input=[{"role": "user", "content": "hi"}], params={"max_tokens": 4}, keep=True,
                  token="tok", batch=True, trace=TraceContext(b"t" * 16, b"s" * 8, 1, ("a",)))  # fmt: skip
    session = ClientSession(request, deadline=12.3456)
    assert session.send_request(10.0) == frame(replace(request, timeout_ms=2345))
    assert session.request is request


def test_client_refuses_to_send_late_or_too_large_requests():
    with pytest.raises(DeadlineExceededError):
        client(deadline=5.0).send_request(5.0)
    big = client(request=Request(b"r", "echo", input="x" * 5000), max_frame_size=1024)
    with pytest.raises(BadRequestError, match="too large"):
        big.send_request(0)
    with pytest.raises(BadRequestError, match="cannot be encoded"):
        client(request=Request(b"r", "echo", input=object())).send_request(0)


def test_client_chunks_then_end():
    c = client()
    c.send_request(0)
    assert c.next_event() is NEED_DATA
    c.receive_data(frame(Chunk(0, "a")) + frame(Chunk(1, "b"))[:3])
    assert c.next_event() == ChunkReceived(0, "a")
    assert c.next_event() is NEED_DATA
    c.receive_data(frame(Chunk(1, "b"))[3:] + frame(End(2, usage={"t": 1})))
    assert events(c) == [ChunkReceived(1, "b"), Finished(End(2, usage={"t": 1}))]
    assert c.state is ClientState.DONE
    assert not c.reusable  # the request did not ask to keep the stream


def test_client_error_frame_becomes_its_exception():
    c = client()
    c.send_request(0)
    c.receive_data(frame(Chunk(0, "a")) + frame(ErrorFrame("overloaded", "busy", True, 1)))
    (_, ev) = events(c)
    assert isinstance(ev, ErrorReceived)
    assert ev.error.code == "overloaded" and ev.error.retryable and ev.error.chunks_delivered == 1
    assert c.state is ClientState.FAILED
    assert c.cancel() == b""  # nothing to cancel any more


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (frame(Chunk(1, "a")), "sequence 1 where 0"),
        (frame(Chunk(0, "a")) + frame(Chunk(0, "a")), "sequence 0 where 1"),
        (frame(End(3)), "says 3 chunks but 0"),
        (frame(Credit(5)), "unexpected Credit"),
        (frame(Cancel()), "unexpected Cancel"),
        (frame(req()), "unexpected Request"),
        (encode_varint(2 << 20), "exceeds the limit"),
        (pack_frame({"t": "chunk", "seq": "0", "d": 1}), "non-negative integer"),
    ],
)
def test_client_protocol_errors(data, message):
    c = client()
    c.send_request(0)
    c.receive_data(data)
    with pytest.raises(ProtocolError, match=message) as info:
        events(c)
    assert c.state is ClientState.FAILED
    assert not info.value.retryable
    assert c.next_event() is PAUSED


def test_client_unknown_error_code_is_a_protocol_error():
    c = client()
    c.send_request(0)
    c.receive_data(frame(ErrorFrame("teapot", "short and stout")))
    (ev,) = events(c)
    assert isinstance(ev.error, ProtocolError) and "teapot" in ev.error.message


@pytest.mark.parametrize("partial", [b"", frame(Chunk(1, "b"))[:4]], ids=["between-frames", "inside-a-frame"])
def test_client_end_of_stream_before_the_final_frame_is_a_retryable_protocol_error(partial):
    c = client()
    c.send_request(0)
    c.receive_data(frame(Chunk(0, "a")) + partial)
    assert c.next_event() == ChunkReceived(0, "a")
    assert c.next_event() is NEED_DATA
    c.receive_eof()
    with pytest.raises(ProtocolError) as info:
        c.next_event()
    assert info.value.retryable and info.value.chunks_delivered == 1
    assert not c.closed_before_answer  # bytes had arrived


def test_client_credit_every_quarter_window():
    c = client(window=4096)
    c.send_request(0)
    c.receive_data(frame(Chunk(0, b"x" * 500)))
    assert c.data_to_send() == b""  # ~510 bytes < 1024
    c.receive_data(frame(Chunk(1, b"x" * 600)))
    (credit,) = decode(c.data_to_send())
    assert credit == Credit(len(frame(Chunk(0, b"x" * 500))) + len(frame(Chunk(1, b"x" * 600))))
    assert c.data_to_send() == b""
    assert c.bytes_received == credit.nbytes


def test_client_keeps_only_a_clean_kept_stream():
    c = client(keep=True)
    c.send_request(0)
    c.receive_data(frame(End(0, keep=True)))
    assert isinstance(c.next_event(), Finished)
    assert c.reusable
    # the server did not agree
    c2 = client(keep=True)
    c2.send_request(0)
    c2.receive_data(frame(End(0)))
    events(c2)
    assert not c2.reusable
    # bytes after the final frame: not reusable
    c3 = client(keep=True)
    c3.send_request(0)
    c3.receive_data(frame(End(0, keep=True)) + b"\x01")
    events(c3)
    assert not c3.reusable
    # an error, a deadline or a lost connection: never reusable
    for fail in ("err", "deadline", "lost"):
        c4 = client(keep=True)
        c4.send_request(0)
        if fail == "err":
            c4.receive_data(frame(ErrorFrame("internal", "x")))
            events(c4)
        elif fail == "deadline":
            assert isinstance(c4.deadline_exceeded(), DeadlineExceededError)
        else:
            assert isinstance(c4.connection_lost("gone"), UnavailableError)
        assert not c4.reusable


def test_client_kept_stream_closed_before_any_answer_is_stale():
    c = client(keep=True, reused=True)
    c.send_request(0)
    c.receive_eof()
    with pytest.raises(ProtocolError):
        c.next_event()
    assert c.closed_before_answer
    fresh = client(keep=True)
    fresh.send_request(0)
    fresh.receive_eof()
    with pytest.raises(ProtocolError):
        fresh.next_event()
    assert not fresh.closed_before_answer  # only a reused stream can be stale


def test_client_cancel_and_deadline():
    c = client()
    c.send_request(0)
    c.receive_data(frame(Chunk(0, "a")))
    events(c)
    (cancel,) = decode(c.cancel("enough"))
    assert cancel == Cancel("enough")
    assert c.state is ClientState.FAILED
    c2 = client(deadline=1.0)
    c2.send_request(0)
    err = c2.deadline_exceeded()
    assert err.chunks_delivered == 0 and not math.isinf(c2.deadline)
    with pytest.raises(SessionStateError):
        c2.receive_data(b"x")


# -- the two ends together -------------------------------------------------------------------


def test_client_and_server_sessions_talk_through_a_small_window():
    c = client(window=1024, keep=True)
    s = server()
    s.receive_data(c.send_request(0))
    assert isinstance(events(s)[0], RequestReceived)
    s.accept(0)
    payload = [bytes([i]) * 700 for i in range(12)]
    for p in payload:
        s.send_chunk(p)
    s.send_end()
    got: list[bytes] = []
    for _ in range(100):
        data = s.data_to_send(1)
        assert s.outstanding <= max(1024, 1024 // CREDIT_FRACTION + 1024)
        if data:
            c.receive_data(data)
            credit = c.data_to_send()
            if credit:
                s.receive_data(credit)
                events(s)
        for e in events(c):
            if isinstance(e, ChunkReceived):
                got.append(e.data)
            elif isinstance(e, Finished):
                assert got == payload
                assert c.reusable and s.state is ServerState.IDLE
                return
    raise AssertionError("the answer did not complete")


# -- properties -------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    window=st.integers(1024, 64 * 1024),
    sizes=st.lists(st.integers(0, 20_000), max_size=20),
    read_sizes=st.lists(st.integers(256, 70_000), min_size=1, max_size=10),
    batch=st.integers(1, 300_000),
)
def test_any_answer_arrives_whole_and_in_order_within_the_window(window, sizes, read_sizes, batch):
    """Whatever the window, chunk sizes, read sizes and batch sizes, every chunk arrives once,
    in order, and the server never has more out than the spec's bound."""
    c = client(window=window, keep=True)
    s = server()
    s.receive_data(c.send_request(0))
    assert isinstance(s.next_event(), RequestReceived)
    s.accept(0)
    payload = [b"p" * n for n in sizes]
    for p in payload:
        assert s.send_chunk(p)
    s.send_end()
    bound = max(window, window // CREDIT_FRACTION + max([0, *sizes]) + 32)
    wire = b""
    got: list[bytes] = []
    for step in range(10 + 2 * (sum(sizes) + 64 * len(sizes)) // 256):
        wire += s.data_to_send(1, max_bytes=batch)
        assert s.outstanding <= bound
        if wire:
            n = read_sizes[step % len(read_sizes)]
            c.receive_data(wire[:n])
            wire = wire[n:]
            credit = c.data_to_send()
            if credit:
                s.receive_data(credit)
                events(s)
        for e in events(c):
            if isinstance(e, ChunkReceived):
                got.append(e.data)
            elif isinstance(e, Finished):
                assert got == payload and e.end.chunks == len(payload)
                assert s.state is ServerState.IDLE
                return
    raise AssertionError("stalled")


# -- load carried back on answers (specs/inference.md, "load") -----------------------------------

from modelnet_p2p.proto.infer import Load  # noqa: E402


def loaded_server(figures: list[Load | None]) -> ServerSession:
    """A server whose load provider returns ``figures[0]`` (a list, so a test can change it)."""
    return ServerSession(0.0, Limits(), local_peer=ME, load=lambda: figures[0])


def test_load_on_the_first_chunk_counts_the_request_and_on_end_does_not():
    s = running(loaded_server([Load(3, 1, 8, 20, 5.0)]))
    s.send_chunk("a")
    s.send_chunk("b")
    s.send_end()
    first, second, end = decode(s.data_to_send(0))
    assert first == Chunk(0, "a", Load(3, 1, 8, 20, 5.0))  # this request among the 3
    assert second == Chunk(1, "b")  # only the first chunk carries it
    assert end == End(2, load=Load(2, 1, 8, 20, 5.0))  # once done, this request is not counted


def test_own_is_counted_like_in_flight():
    s = running(loaded_server([Load(3, 0, 8, own=2)]))  # this request and one more of the caller's
    s.send_chunk("a")
    s.send_end()
    first, end = decode(s.data_to_send(0))
    assert (first.load.in_flight, first.load.own) == (3, 2)
    assert (end.load.in_flight, end.load.own) == (2, 1)
    refused = loaded_server([Load(4, 0, 4, own=1)])
    refused.receive_data(frame(req()))
    events(refused)
    refused.reject(OverloadedError("full"))
    assert decode(refused.data_to_send(0))[0].load == Load(4, 0, 4, own=1)


def test_load_on_refusals_counts_nothing_to_remove():
    figures: list[Load | None] = [Load(4, 0, 4)]
    s = loaded_server(figures)
    s.receive_data(frame(req()))
    events(s)
    s.reject(OverloadedError("peer is at its concurrency limit"))
    (err,) = decode(s.data_to_send(0))
    assert err.code == "overloaded" and err.load == Load(4, 0, 4)  # never admitted: all 4 are others
    hop = loaded_server(figures)
    hop.receive_data(frame(req(trace=TraceContext(hops=9))))
    assert isinstance(events(hop)[0], RequestRejected)
    assert decode(hop.data_to_send(0))[0].load == Load(4, 0, 4)


def test_load_on_a_handler_error_a_deadline_and_a_kept_stream():
    figures: list[Load | None] = [Load(1, 0, 8)]
    s = running(loaded_server(figures))
    s.send_error(UnavailableError("GPU gone"))
    assert decode(s.data_to_send(0))[0].load == Load(0, 0, 8)
    late = running(loaded_server(figures), req(timeout_ms=1000))
    late.on_timeout(5.0)
    assert decode(late.data_to_send(5.0))[0].load == Load(0, 0, 8)
    kept = running(loaded_server(figures), req(keep=True))
    kept.send_end()
    assert decode(kept.data_to_send(0))[0] == End(0, keep=True, load=Load(0, 0, 8))
    figures[0] = Load(2, 0, 8)  # the next request on the kept stream reports afresh
    running(kept)
    kept.send_chunk("x")
    assert decode(kept.data_to_send(0))[0].load == Load(2, 0, 8)


def test_no_load_provider_or_none_means_no_load_key():
    for s in (running(), running(loaded_server([None]))):
        s.send_chunk("a")
        s.send_end()
        assert all("load" not in body for body in FrameDecoder().feed(s.data_to_send(0)))


def test_a_first_chunk_too_large_with_load_goes_without_it():
    load = Load(1, 2, 3, 4, 5.0)
    s = running(ServerSession(0.0, Limits(max_frame_size=1024), local_peer=ME, load=lambda: load))

    def fits(chunk: Chunk) -> bool:
        try:
            pack_frame(chunk.to_wire(), 1024)
        except ProtocolError:
            return False
        return True

    data = b"x" * max(n for n in range(1100) if fits(Chunk(0, b"x" * n)))
    assert not fits(Chunk(0, data, load))
    assert s.send_chunk(data)
    (chunk,) = decode(s.data_to_send(0))
    assert chunk == Chunk(0, data)  # sent, without the load that would not fit


def test_client_surfaces_the_load_of_chunk_end_and_err():
    c = client()
    c.send_request(0)
    c.receive_data(frame(Chunk(0, "a", Load(2, 0, 4))) + frame(End(1, load=Load(1, 0, 4))))
    first, done = events(c)
    assert first == ChunkReceived(0, "a", Load(2, 0, 4))
    assert done.end.load == Load(1, 0, 4)
    c = client()
    c.send_request(0)
    c.receive_data(frame(ErrorFrame("overloaded", "full", True, 0, Load(4, 0, 4))))
    (err,) = events(c)
    assert isinstance(err.error, OverloadedError) and err.load == Load(4, 0, 4)
    c = client()  # an old server: no load anywhere
    c.send_request(0)
    c.receive_data(frame(Chunk(0, "a")) + frame(End(1)))
    assert [getattr(e, "load", None) for e in events(c)] == [None, None]

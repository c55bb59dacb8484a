"""The stream helpers' guarantees: a write is never cut in half by the caller's cancellation,
and a write the peer never takes ends within its time limit (the stream reset)."""

from __future__ import annotations

import math

import pytest
import trio
from trio.testing import MockClock

from modelnet_p2p.errors import UnavailableError
from modelnet_p2p.p2p.stream import write_whole


class _Stream:
    """A stream whose writes take ``delay`` seconds each."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.written: list[bytes] = []
        self.resets = 0

    async def write(self, data: bytes) -> None:
        await trio.sleep(self.delay)
        self.written.append(data)

    async def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def autojump(mock_clock: MockClock) -> MockClock:
    mock_clock.autojump_threshold = 0
    return mock_clock


async def test_a_cancelled_caller_does_not_cut_the_write(autojump: MockClock) -> None:
    stream = _Stream(delay=1.0)
    with trio.move_on_after(0.5) as scope:
        await write_whole(stream, b"frame")
        await trio.sleep(1)  # the caller's cancellation arrives at its next checkpoint
    assert scope.cancelled_caught
    assert stream.written == [b"frame"] and stream.resets == 0
    assert trio.current_time() == pytest.approx(1.0)


async def test_a_write_the_peer_never_takes_resets_the_stream_at_its_limit(autojump: MockClock) -> None:
    stream = _Stream(delay=math.inf)
    with pytest.raises(UnavailableError, match="blocked for 5 s"):
        with trio.CancelScope(shield=True):  # shielded from the caller: the limit still holds
            await write_whole(stream, b"frame", timeout=5.0)
    assert stream.written == [] and stream.resets == 1
    assert trio.current_time() == pytest.approx(5.0)

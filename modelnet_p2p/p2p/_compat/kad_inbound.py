"""The inbound guard of the DHT server (py-libp2p 0.8.1 ``KadDHT.handle_stream``); used by :mod:`.kad`.

Upstream: ``handle_stream`` resets every stream past 12 and reads without a timeout (idle
streams block every lookup), and no request type but ADD_PROVIDER is rate-limited. Here
every inbound DHT stream is admitted, read and written within bounds
(:class:`InboundGuard`, :class:`GuardedStream`); the canaries are in
``tests/test_compat_kad.py``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import trio
from libp2p.abc import INetStream
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from ...proto.framing import decode_varint, encode_varint
from ...proto.kadcards import append_cards, cards_in, fit_cards

__all__ = [
    "MAX_BUCKETS",
    "GuardedStream",
    "InboundGuard",
    "InboundLimitError",
    "InboundLimits",
    "TokenBuckets",
]


class InboundLimitError(Exception):
    """An inbound DHT stream broke a limit (idle, too slow, too large, too many requests)."""


@dataclass(frozen=True)
class InboundLimits:
    """Bounds on inbound DHT streams and requests (``specs/capability.md``, Limits).

    ``rates`` maps a request class (``"provide"``: ADD_PROVIDER, ``"find"``: FIND_NODE,
    GET_PROVIDERS, GET_VALUE and PING, ``"put"``: PUT_VALUE) to ``(per second, burst)``
    of a token bucket per remote peer.
    """

    max_streams: int = 32
    max_streams_per_peer: int = 16
    first_message_timeout: float = 5.0
    idle_timeout: float = 30.0
    message_timeout: float = 5.0
    write_timeout: float = 5.0
    max_message_size: int = 32 * 1024
    #: Largest answer a server writes (a GET_PROVIDERS answer with its cards fits well within).
    max_answer_size: int = 1 << 20
    max_values_per_sender: int = 16
    ack_wait: float = 2.0
    rates: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {"provide": (25.6, 256.0), "find": (32.0, 128.0), "put": (1.0, 16.0)}
    )


_CLASSES = {  # the request class of each message type (see InboundLimits)
    Message.MessageType.ADD_PROVIDER: "provide",
    Message.MessageType.PUT_VALUE: "put",
}
#: Remote peers one token-bucket table remembers at most (full buckets are forgotten first).
MAX_BUCKETS = 4096


class TokenBuckets:
    """One token bucket per remote peer: ``rate`` tokens a second, up to ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str) -> bool:
        """Take one token for ``peer``; False if its bucket is empty."""
        now = self.clock()
        tokens, at = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self._buckets) >= MAX_BUCKETS:
            self._prune(now)
        if tokens < 1.0:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1.0, now)
        return True

    def _prune(self, now: float) -> None:
        for peer, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[peer]
        while len(self._buckets) >= MAX_BUCKETS:  # all busy: forget the least recent
            del self._buckets[next(iter(self._buckets))]


class _Inbound:
    __slots__ = ("ack", "idle_since", "kind", "messages", "peer", "stream")

    def __init__(self, peer: str, stream: INetStream, now: float) -> None:
        self.peer = peer
        self.stream = stream
        self.messages = 0
        #: The ADD_PROVIDER (key) whose echo waits for the record's check.
        self.ack: bytes | None = None
        #: The message type of the request being handled.
        self.kind: int | None = None
        #: When the stream started waiting for its next message (None while one is handled).
        self.idle_since: float | None = now


class InboundGuard:
    """Admission, read deadlines and request rates of the inbound DHT streams of one server.

    Upstream: ``handle_stream`` handles 12 streams at once and resets the rest, and reads
    with no timeout: 32 idle streams blocked every lookup (0 of 15 succeeded). Here reads
    and writes have deadlines and messages a size (:class:`InboundLimits`). A stream past
    its peer's bound is reset; past the total, the longest idle stream of the peer holding
    the most is reset for a peer that holds fewer. Requests are counted per peer in token
    buckets; one over its rate resets the stream.
    """

    def __init__(
        self,
        limits: InboundLimits,
        has_value: Callable[[bytes], bool],
        checked: Callable[[bytes, str, float], Awaitable[bool]] | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.limits = limits
        self.clock = clock
        self._has_value = has_value
        self._checked = checked
        self._streams: set[_Inbound] = set()
        self._per_peer: dict[str, set[_Inbound]] = {}
        self._buckets = {name: TokenBuckets(r, b, clock) for name, (r, b) in limits.rates.items()}
        #: Cards beside provider records (``specs/capability.md``): ``offered(key, provider,
        #: card)`` gets the card an ADD_PROVIDER carries; ``cards_for(providers)`` gives the
        #: cards to add to a GET_PROVIDERS answer listing those providers.
        self.offered: Callable[[bytes, str, bytes], None] | None = None
        self.cards_for: Callable[[list[str]], list[bytes]] | None = None
        self._sender_keys: OrderedDict[str, set[bytes]] = OrderedDict()
        #: Streams reset to make room, streams refused, and requests refused for their rate.
        self.evicted = 0
        self.refused = 0
        self.rate_limited = 0

    @property
    def active(self) -> int:
        return len(self._streams)

    async def handle(self, stream: INetStream, handler: Callable[[INetStream], Awaitable[None]]) -> None:
        """Run ``handler`` on ``stream`` (as a :class:`GuardedStream`) if it is admitted, else reset it."""
        peer = str(stream.muxed_conn.peer_id)
        entry, victims = self._admit(peer, stream)
        for victim in victims:
            await _reset(victim.stream)
        if entry is None:
            self.refused += 1
            await _reset(stream)
            return
        try:
            await handler(cast(INetStream, GuardedStream(stream, entry, self)))
        finally:
            self._release(entry)

    def _admit(self, peer: str, stream: INetStream) -> tuple[_Inbound | None, list[_Inbound]]:
        # No checkpoint from the checks to the registration: concurrent admissions see each other.
        mine = self._per_peer.get(peer, set())
        if len(mine) >= self.limits.max_streams_per_peer:
            return None, []
        victims: list[_Inbound] = []
        if len(self._streams) >= self.limits.max_streams:
            # Room is made at the expense of the peer holding the most streams, for a peer
            # that holds fewer: fair shares, and no churn among equals.
            heaviest = max(self._per_peer.values(), key=len)
            victim = _longest_idle(heaviest)
            if victim is None or len(mine) >= len(heaviest):
                return None, []
            victims.append(victim)
            self._release(victim)
            self.evicted += 1
        entry = _Inbound(peer, stream, self.clock())
        self._streams.add(entry)
        self._per_peer.setdefault(peer, set()).add(entry)
        return entry, victims

    def _release(self, entry: _Inbound) -> None:
        self._streams.discard(entry)
        mine = self._per_peer.get(entry.peer)
        if mine is not None:
            mine.discard(entry)
            if not mine:
                del self._per_peer[entry.peer]

    async def next_message(self, entry: _Inbound) -> bytes:
        """The next whole message of ``entry``'s stream with its length prefix, or ``b""`` at its end."""
        limits = self.limits
        stream = entry.stream
        wait = limits.first_message_timeout if entry.messages == 0 else limits.idle_timeout
        entry.idle_since = self.clock()
        try:
            with trio.move_on_after(wait) as idle:
                try:
                    first = await stream.read(1)
                except StreamEOF:
                    return b""
        finally:
            entry.idle_since = None
        if idle.cancelled_caught:
            raise InboundLimitError(f"idle for {wait} s")
        if not first:
            return b""
        with trio.fail_after(limits.message_timeout):
            prefix = bytearray(first)
            while prefix[-1] & 0x80:
                if len(prefix) >= 10:
                    raise InboundLimitError("bad length prefix")
                prefix += await stream.read(1)
            length = (decode_varint(bytes(prefix)) or (limits.max_message_size + 1, 0))[0]
            if length > limits.max_message_size:
                raise InboundLimitError(f"a {length}-byte message (at most {limits.max_message_size})")
            body = bytearray()
            while len(body) < length:
                body += await stream.read(length - len(body))
        entry.messages += 1
        self._admit_request(entry, bytes(body))
        return bytes(prefix) + bytes(body)

    async def before_answer(self, entry: _Inbound) -> None:
        """Hold the echo of an ADD_PROVIDER until its record has been checked (at most
        ``ack_wait`` s), so that an acknowledged record is one the server keeps; a record
        that failed its check gets no echo (the stream is reset). The stream counts as
        idle meanwhile: it may be reset to make room."""
        key, entry.ack = entry.ack, None
        if key is None or self._checked is None:
            return
        entry.idle_since = self.clock()
        try:
            kept = await self._checked(key, entry.peer, self.limits.ack_wait)
        finally:
            entry.idle_since = None
        if not kept:
            raise InboundLimitError("the provider record points to no card that lists its key")

    def _admit_request(self, entry: _Inbound, body: bytes) -> None:
        peer = entry.peer
        msg = Message()
        try:
            msg.ParseFromString(body)
        except Exception:
            return  # upstream rejects it
        bucket = self._buckets.get(_CLASSES.get(msg.type, "find"))
        if bucket is not None and not bucket.take(peer):
            self.rate_limited += 1
            raise InboundLimitError(f"over the rate of message type {msg.type}")
        entry.kind = msg.type
        if msg.type == Message.MessageType.ADD_PROVIDER and self.offered is not None:
            self._offer(msg, body)
        if msg.type == Message.MessageType.PUT_VALUE:
            self._charge_put(peer, bytes(msg.record.key or msg.key))
        elif msg.type == Message.MessageType.ADD_PROVIDER:
            entry.ack = bytes(msg.key)

    def _offer(self, msg: Message, body: bytes) -> None:
        assert self.offered is not None
        try:
            cards = cards_in(body, limit=1)
            provider = str(ID(msg.providerPeers[0].id)) if msg.providerPeers else None
        except Exception:
            return  # no card, or no provider: the record is checked as usual
        if cards and provider is not None:
            self.offered(bytes(msg.key), provider, cards[0])

    def answer_cards(self, frame: bytes) -> bytes:
        """``frame`` (a length-prefixed GET_PROVIDERS answer) with the cards of its providers."""
        decoded = decode_varint(frame)
        if self.cards_for is None or decoded is None:
            return frame
        length, start = decoded
        body = frame[start : start + length]
        msg = Message()
        try:
            msg.ParseFromString(body)
            providers = [str(ID(p.id)) for p in msg.providerPeers]
        except Exception:
            return frame
        cards = fit_cards(self.cards_for(providers)) if providers else []
        if not cards:
            return frame
        body = append_cards(body, cards)
        return encode_varint(len(body)) + body + frame[start + length :]

    def _charge_put(self, peer: str, key: bytes) -> None:
        keys = self._sender_keys.pop(peer, set())
        keys = {k for k in keys if self._has_value(k)}
        if key not in keys and len(keys) >= self.limits.max_values_per_sender:
            self._sender_keys[peer] = keys
            raise InboundLimitError(f"{len(keys)} values stored for this sender already")
        keys.add(key)
        self._sender_keys[peer] = keys
        while len(self._sender_keys) > MAX_BUCKETS:
            self._sender_keys.popitem(last=False)


def _longest_idle(entries: set[_Inbound]) -> _Inbound | None:
    idle = [e for e in entries if e.idle_since is not None]
    return min(idle, key=lambda e: e.idle_since or 0.0) if idle else None


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1.0):
        try:
            await stream.reset()
        except Exception:
            pass


class GuardedStream:
    """An inbound DHT stream as ``KadDHT``'s handler reads it: whole messages, within
    the :class:`InboundGuard`'s deadlines and rates (an :class:`InboundLimitError` makes
    the handler reset the stream), and writes within ``write_timeout``."""

    def __init__(self, stream: INetStream, entry: _Inbound, guard: InboundGuard) -> None:
        self._stream = stream
        self._entry = entry
        self._guard = guard
        self._buffer = b""
        self._out = b""  # an answer that is still being written (prefix and body come apart)

    async def read(self, n: int | None = None) -> bytes:
        if not self._buffer:
            self._buffer = await self._guard.next_message(self._entry)
            if not self._buffer:
                return b""
        size = len(self._buffer) if n is None or n < 0 else n
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    async def write(self, data: bytes) -> None:
        if self._entry.ack is not None:
            await self._guard.before_answer(self._entry)
        if self._entry.kind == Message.MessageType.GET_PROVIDERS and self._guard.cards_for is not None:
            # Upstream writes the length prefix and the body apart: hold them until the
            # answer is whole, then add the providers' cards.
            self._out += data
            decoded = decode_varint(self._out)
            if decoded is None or len(self._out) < decoded[1] + decoded[0]:
                if len(self._out) > 2 * self._guard.limits.max_answer_size:
                    raise InboundLimitError("a DHT answer larger than the limit")
                return
            data, self._out = self._guard.answer_cards(self._out), b""
        with trio.fail_after(self._guard.limits.write_timeout):
            await self._stream.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

"""Corrections to py-libp2p 0.8.1's circuit relay v2 (``libp2p.relay.circuit_v2``), the relay side.

:class:`CircuitRelay` subclasses ``CircuitV2Protocol``; :func:`relay_limits` builds its limits.
Each correction names the upstream behaviour; the canaries in ``tests/test_compat_relay.py``
fail once upstream changes it:

- **Concurrent circuits to one peer close each other.** The stock code files each circuit's
  streams under the peer id of one end (``protocol.py`` 672, 722, 925-932), so when one of two
  circuits to a target ends, its clean-up closes the other. Here each direction of each
  circuit has a key of its own.
- **The per-peer circuit limit is checked before an await and counted after it.** The stock
  CONNECT handler checks ``active_connections < max_circuit_conns``, then opens the STOP stream
  to the target and waits for its answer, and only then counts the circuit: concurrent
  CONNECTs all get past the check (80 accepted against a limit of 64). Here a slot is taken
  from a :class:`CircuitLimiter` in one step, before the first await, and given back when the
  circuit ends.
- **RESERVE trusts the peer id named in the message.** Anyone could fill the relay's slots in
  other peers' names (and make circuits to a peer that never reserved). Here a reservation is
  always for the peer that asks.
- **Any peer may take the last reservation.** The stock relay hands out reservations first
  come, first served, so 262 identities took every one and a newcomer got none. Here a
  ``policy`` (``services/relay.py``) decides, knowing each holder's IP address and age, and
  may name a holder to evict: its reservation is dropped and its connection closed (so that
  it notices and reserves again).
- **Reservations of disconnected peers keep their slots until they expire.** They are void
  (a reservation holds only while its peer is connected), but still count against
  ``max_reservations``. Here they are dropped when the holder's last connection closes (a
  network notifee: the closed connection, with its Noise and yamux objects, is not kept
  either), and, for a close the swarm never reported, before a new one is counted.
- **Every RESERVE is answered from scratch**: the relay's addresses parsed again, a voucher
  signed, then a 0.1 s wait, however recently the peer reserved. Holders refreshing every
  second (262 Sybils) made that most of a relay's work. Here a refresh within
  :data:`MIN_REFRESH` seconds of the peer's last answered RESERVE gets that answer again (the
  same reservation and voucher, which stay valid: the expiry is at most that much older).
  That answer, and a refusal repeated to a peer refused before while the table is unchanged,
  is sent :data:`EARLY_ANSWER_DELAY` seconds late: a client that asks again at once (a Sybil
  refreshing every second) then asks a third as often. One such late answer waits per peer
  (a second request of that peer meanwhile is reset), :data:`MAX_LATE_ANSWERS` in all (past
  that, they are sent at once). A client refreshing as the protocol has it, at half its
  reservation's lifetime, is never delayed.
- **A hop stream is read again after its request is answered.** The stock handler loops on
  the stream: after the answer it waits up to 30 s for another message, and when the client
  closes its end it writes a MALFORMED_MESSAGE status to it and sleeps 0.5 s. Every RESERVE
  thus cost a second write and a stream held for 0.5-30 s (262 Sybils reserving every second
  made the relay's streams a fifth of its work). Here a hop stream carries one request, as
  the protocol has it (a CONNECT's stream becomes the circuit), and is closed after it.
- **A data limit of 0 means "nothing may pass"**, not "no limit" (the stock code falls back to
  a per-reservation budget of 0 bytes). :func:`relay_limits` passes a practically infinite one.
- **Stopping the service removes its stream handlers**, which races with multistream-select
  (see :func:`~modelnet_p2p.p2p._compat.host.retire_stream_handler`). Here the handlers are
  retired, and the open circuits are reset (the stock code closes them one by one, unshielded).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, STREAM_READ_TIMEOUT, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol import _is_relayed_stream as is_relayed_stream
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import maybe_consume_signed_record, read_delimited_msg

from ..notify import connected, on_disconnect
from ..resources import conn_ip
from ..stream import close_quietly
from .host import guard_handler, retire_stream_handler

__all__ = ["NO_DATA_LIMIT", "CircuitLimiter", "CircuitRelay", "ReservationDecider", "relay_limits"]

log = logging.getLogger(__name__)

#: ``(peer, ip, holders: {peer: (ip, since)})`` -> ``""`` accept, a holder to evict, ``None`` refuse.
ReservationDecider = Callable[[str, "str | None", "dict[str, tuple[str | None, float]]"], "str | None"]

#: Seconds between two prunings of gone reservations while the table is not full.
PRUNE_INTERVAL = 1.0
#: Seconds after an answered RESERVE during which a refresh by the same peer gets the same
#: answer (a client refreshes at half its reservation's lifetime: every 30 min by default).
MIN_REFRESH = 30.0

#: Refused peers remembered (to refuse them again cheaply while the table is unchanged).
MAX_REFUSALS = 4096
#: Seconds a repeated answer (a refresh within MIN_REFRESH, a repeated refusal) waits before
#: it is sent. With 262 Sybils refreshing as soon as answered, 2 s cut their requests 3x.
EARLY_ANSWER_DELAY = 2.0
#: Repeated answers waiting at once (a parked task and an open stream each); past it, the
#: answers are sent at once.
MAX_LATE_ANSWERS = 1024
#: Seconds a hop stream may take to send its request (the stock handler's allowance).
HOP_READ_TIMEOUT = STREAM_READ_TIMEOUT * 2

#: What "no data limit" has to be written as (py-libp2p reads 0 as "nothing may pass").
NO_DATA_LIMIT = 2**62


class CircuitLimiter(Protocol):
    """Counts the circuits open to each reserving peer (see ``services/relay.py``)."""

    def acquire(self, peer: str) -> bool:
        """Take a circuit slot for ``peer`` if one is free (checked and counted at once)."""
        ...

    def release(self, peer: str) -> None:
        """Give back a slot taken by :meth:`acquire`."""
        ...


def relay_limits(
    *,
    max_reservations: int,
    max_circuits_per_peer: int,
    reservation_ttl: int,
    max_circuit_duration: int | None,
    max_circuit_bytes: int | None,
) -> RelayLimits:
    """py-libp2p's limits for these settings (``None``: no limit)."""
    return RelayLimits(
        duration=max_circuit_duration or 0,  # 0: no deadline (that one py-libp2p reads right)
        data=max_circuit_bytes or NO_DATA_LIMIT,
        max_circuit_conns=max_circuits_per_peer,
        max_reservations=max_reservations,
        reservation_ttl=reservation_ttl,
    )


@dataclass(frozen=True)
class _Circuit:
    """Key of one direction of one circuit in ``CircuitV2Protocol._active_relays``."""

    peer: ID
    number: int

    def __str__(self) -> str:
        return f"{self.peer}#{self.number}"


class _Recording:
    """A stream whose writes are also kept (the answer to a RESERVE, to send again)."""

    def __init__(self, stream: INetStream, on_written: Callable[[_Recording], None]) -> None:
        self._stream = stream
        self._on_written = on_written
        self.written = bytearray()
        self.overflowed = False

    async def write(self, data: bytes) -> None:
        if len(self.written) + len(data) <= 4096:
            self.written += data
        else:
            self.overflowed = True
        await self._stream.write(data)
        self._on_written(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _live_muxer(host: IHost, peer: ID) -> Any | None:
    """The muxed connection of one of ``peer``'s open connections, or ``None``."""
    for conn in host.get_network().get_connections(peer):
        if not conn.is_closed:
            return conn.muxed_conn
    return None


class CircuitRelay(CircuitV2Protocol):
    """py-libp2p's circuit relay v2 protocol with the corrections listed in the module docstring.

    Run it with ``background_trio_service``; ``event_started`` is set once its handlers are in
    place.
    """

    _numbers = itertools.count()

    def __init__(
        self,
        host: IHost,
        limits: RelayLimits,
        *,
        hop: bool,
        limiter: CircuitLimiter,
        policy: ReservationDecider | None = None,
        limit_loopback: bool = False,
    ) -> None:
        super().__init__(host, limits=limits, allow_hop=hop)
        self.limiter = limiter
        self.policy = policy
        self.limit_loopback = limit_loopback
        #: The IP address (key) and trio time of each reservation made here.
        self._holders: dict[ID, tuple[str | None, float]] = {}
        self._next_prune = -math.inf
        #: The last answer to each holder's RESERVE, and when it was sent (trio time).
        self._answers: dict[ID, tuple[float, bytes]] = {}
        #: A muxed connection of each holder (the one it reserved over, while it is open): a
        #: full table checks these, one attribute each, for holders that left. A holder whose
        #: last connection closes leaves at once (:meth:`_closed`).
        self._conn_of: dict[ID, Any] = {}
        #: Reservations made here so far; with the table's size, it tells whether the table
        #: changed since a peer was refused (then the policy is asked again).
        self._added = 0
        #: Peers refused while the table was full: (table size, ``_added``, their IP key) then.
        self._refusals: dict[ID, tuple[int, int, str | None]] = {}
        #: Seconds a repeated answer waits (:data:`EARLY_ANSWER_DELAY`; settable).
        self.early_delay = EARLY_ANSWER_DELAY
        #: Peers whose repeated answer is waiting now.
        self._late: set[ID] = set()
        #: Repeated answers sent late, and requests reset because their peer had one waiting.
        self.late_answers = 0
        self.late_resets = 0

    # -- what the adapter reads --------------------------------------------------------

    def held_reservations(self) -> int:
        """Reservations that are unexpired and whose peer is connected."""
        return sum(
            1
            for peer, r in list(self.resource_manager._reservations.items())
            if not r.is_expired() and connected(self.host, peer)
        )

    def reserving_peers(self) -> list[str]:
        """Ids of the connected peers holding an unexpired reservation here."""
        return [
            str(peer)
            for peer, r in list(self.resource_manager._reservations.items())
            if not r.is_expired() and connected(self.host, peer)
        ]

    def tracked_connections(self) -> int:
        """Holders' connections this relay keeps a reference to (one per holder at most)."""
        return len(self._conn_of)

    def open_circuits(self) -> int:
        """Circuits being forwarded now (each has two directions)."""
        return sum(1 for key in list(self._active_relays) if isinstance(key, _Circuit)) // 2

    # -- the corrections ----------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.allow_hop:
            self.host.set_stream_handler(HOP_PROTOCOL_ID, guard_handler(self._handle_hop_stream, "hop"))
        self.host.set_stream_handler(STOP_PROTOCOL_ID, guard_handler(self._handle_stop_stream, "stop"))
        stop_watching = on_disconnect(self.host, self._closed)
        self.event_started.set()
        task_status.started()
        try:
            await self.manager.wait_finished()
        finally:
            stop_watching()
            if self.allow_hop:
                retire_stream_handler(self.host, HOP_PROTOCOL_ID)
            retire_stream_handler(self.host, STOP_PROTOCOL_ID)
            streams = {s for pair in self._active_relays.values() for s in pair if s is not None}
            self._active_relays.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for stream in streams:
                    try:
                        await stream.reset()
                    except Exception:
                        pass

    async def _handle_hop_stream(self, stream: INetStream) -> None:
        # One request per stream, then the stream is closed (the stock handler reads again).
        if is_relayed_stream(stream):
            await super()._handle_hop_stream(stream)  # the stock refusal (PERMISSION_DENIED)
            return
        try:
            try:
                with trio.fail_after(HOP_READ_TIMEOUT):
                    msg = await read_delimited_msg(stream, HopMessage)
            except Exception:  # silent, gone or malformed: nobody to answer
                await stream.reset()
                return
            if msg.HasField("senderRecord") and not maybe_consume_signed_record(
                msg, self.host, stream.muxed_conn.peer_id
            ):
                await stream.reset()
                return
            if msg.type == HopMessage.RESERVE:
                await self._handle_reserve(stream, msg)
            elif msg.type == HopMessage.CONNECT:
                await self._handle_connect(stream, msg)  # returns when the circuit has ended
            else:
                await self._send_status(
                    stream, StatusCode.MALFORMED_MESSAGE, f"invalid message type {msg.type}"
                )
        finally:
            await close_quietly(stream, 1.0)

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        peer = stream.muxed_conn.peer_id
        msg.peer.id = peer.to_bytes()
        reservations = self.resource_manager._reservations
        now = trio.current_time()
        if now >= self._next_prune:
            # Expired reservations and gone holders, with a swarm lookup each: once a second
            # (262 Sybils refreshing every second made it most of a relay's work).
            self._next_prune = now + PRUNE_INTERVAL
            host = self.host
            gone_peers = [p for p, r in reservations.items() if r.is_expired() or not connected(host, p)]
            for gone in gone_peers:
                del reservations[gone]
            for table in (self._holders, self._answers, self._conn_of):
                for gone in [p for p in table if p not in reservations]:
                    del table[gone]
        elif len(reservations) >= self.resource_manager.limits.max_reservations:
            # Full: the policy needs the live holders. A holder whose connection closed is
            # looked up in the swarm (it may have another); the others cost one attribute.
            self._drop_departed(reservations)
        cached = self._answers.get(peer)
        if cached is not None and peer in reservations and now - cached[0] < self._refresh_window():
            if not await self._wait_late(peer, stream):
                return
            if peer in reservations:  # not evicted, nor gone, while the answer waited
                await stream.write(cached[1])
                return
        held = peer in reservations
        if self.policy is not None and not held:
            ip = conn_ip(stream.muxed_conn, limit_loopback=self.limit_loopback)
            state = (len(reservations), self._added, ip)
            # The same peer refused before, and the table has not changed since: the same
            # verdict, without asking the policy (O(reservations)) again.
            repeated = self._refusals.get(peer) == state
            verdict = None if repeated else self._decide(peer, ip, reservations)
            if verdict is None:
                if repeated and not await self._wait_late(peer, stream):
                    return
                if len(self._refusals) >= MAX_REFUSALS:
                    self._refusals.clear()
                self._refusals[peer] = state
                await self._send_status(
                    stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "no reservation left for your address"
                )
                return
            self._refusals.pop(peer, None)
            if verdict:
                await self._evict(ID.from_base58(verdict))
            self._holders[peer] = (ip, trio.current_time())
        def answered(recorder: _Recording) -> None:
            # As soon as the answer is out (the stock handler then waits 0.1 s): a refresh
            # arriving meanwhile is a repeated one too.
            if peer in reservations and not recorder.overflowed:
                self._answers[peer] = (now, bytes(recorder.written))

        await super()._handle_reserve(cast(INetStream, _Recording(stream, answered)), msg)
        if peer in reservations:
            if not held:
                self._added += 1
            self._conn_of[peer] = stream.muxed_conn

    def _refresh_window(self) -> float:
        """Seconds after an answered RESERVE within which a refresh is repeated the answer (late):
        :data:`MIN_REFRESH`, or an eighth of the reservation lifetime if that is shorter (a
        client refreshes at half of it)."""
        return min(MIN_REFRESH, self.resource_manager.limits.reservation_ttl / 8)

    async def _wait_late(self, peer: ID, stream: INetStream) -> bool:
        """Wait :attr:`early_delay` before a repeated answer to ``peer``; ``False`` (the stream
        was reset) if ``peer`` already has one waiting."""
        if self.early_delay <= 0:
            return True
        if peer in self._late:
            self.late_resets += 1
            await stream.reset()
            return False
        if len(self._late) >= MAX_LATE_ANSWERS:
            return True
        self._late.add(peer)
        try:
            await trio.sleep(self.early_delay)
        finally:
            self._late.discard(peer)
        self.late_answers += 1
        return True

    def _decide(self, peer: ID, ip: str | None, reservations: dict[ID, Any]) -> str | None:
        assert self.policy is not None
        holders = {str(p): self._holders.get(p, (None, 0.0)) for p in reservations}
        return self.policy(str(peer), ip, holders)

    def _drop_departed(self, reservations: dict[ID, Any]) -> None:
        """Drop the reservations of holders no longer connected (expiry: once a second)."""
        host, departed = self.host, []
        for peer, muxer in self._conn_of.items():
            if muxer.is_closed:
                live = _live_muxer(host, peer)
                if live is None:
                    departed.append(peer)
                else:
                    self._conn_of[peer] = live  # the same key: the dict does not change size
        if len(reservations) != len(self._conn_of):  # a reservation not tracked (none normally)
            departed += [p for p in reservations if p not in self._conn_of and not connected(host, p)]
        for peer in departed:
            self._forget(peer)

    def _closed(self, _peer: str, muxer: Any) -> None:
        """A connection closed: if a holder reserved over it, rebind the holder to another open
        connection of its own, or drop its reservation (void without a connection)."""
        peer = muxer.peer_id
        if self._conn_of.get(peer) is not muxer:
            return
        live = _live_muxer(self.host, peer)
        if live is not None:
            self._conn_of[peer] = live
        else:
            self._forget(peer)

    def _forget(self, peer: ID) -> None:
        self.resource_manager._reservations.pop(peer, None)
        self._holders.pop(peer, None)
        self._answers.pop(peer, None)
        self._conn_of.pop(peer, None)

    async def _evict(self, peer: ID) -> None:
        """Drop ``peer``'s reservation and close its connections (it reserves again if it can)."""
        self._forget(peer)
        log.info("relay reservation of %s evicted for a newcomer", peer)
        for conn in list(self.host.get_network().get_connections(peer)):
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await conn.close()
                except Exception:
                    pass

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        slot: str | None = None
        try:
            target = ID(msg.peer.id)
        except Exception:
            target = None
        if target is not None and self.resource_manager.get_reservation(target) is not None:
            # Checked and counted in one step, before anything awaits.
            if not self.limiter.acquire(str(target)):
                await self._send_status(
                    stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "too many circuits to this peer"
                )
                await self._close_stream(stream)
                return
            slot = str(target)
        try:
            await super()._handle_connect(stream, msg)
        finally:
            if slot is not None:
                self.limiter.release(slot)
            # The stock code's own entries for this circuit (keyed by peer id) are left behind.
            for key, (src, _dst) in list(self._active_relays.items()):
                if src is stream:
                    del self._active_relays[key]

    async def _relay_data(
        self,
        src_stream: INetStream,
        dst_stream: INetStream,
        peer_id: ID,
        deadline: float | None = None,
        circuit_data_limit: list[int] | None = None,
    ) -> None:
        # One key per direction of each circuit: the stock clean-up then closes this circuit's
        # two streams, not whichever circuit to ``peer_id`` happened to be filed last.
        key = cast(ID, _Circuit(peer_id, next(self._numbers)))
        self._active_relays[key] = (src_stream, dst_stream)
        try:
            await super()._relay_data(src_stream, dst_stream, key, deadline, circuit_data_limit)
        finally:
            self._active_relays.pop(key, None)

"""Circuit relay v2: peers that cannot be dialed take part through a relay.

See ``specs/network.md`` ("Peers that cannot be dialed"). Three roles:

- **Relay (hop):** a bootstrap node runs :class:`RelayService` with
  ``hop=True``. It grants reservations and forwards circuits between a dialer
  and a peer holding a reservation. The forwarded bytes are the two ends' own
  Noise session, so the relay sees neither requests nor answers.
- **Target:** a peer behind NAT runs :class:`RelayService` with ``hop=False``
  (it accepts relayed connections), reserves a slot with :func:`reserve` or
  keeps one with :func:`keep_reservation`, and announces the address they return,
  ``<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<own id>``.
- **Dialer:** any peer calls :func:`dial_via_relay` with that address; afterwards
  ``host.new_stream(target_id, ...)`` works as over a direct connection.

Built on py-libp2p 0.8.1's ``libp2p.relay.circuit_v2``, with these corrections
(all in :class:`_CircuitRelay`, the relay side):

- concurrent circuits to one peer no longer close each other: the stock code
  files each circuit under the peer id of one end (``protocol.py`` 672, 722,
  925-932), so when one of two circuits to a target ended, it closed the other;
- a reservation is made for the peer that asks, never for the peer id it names
  in the message (the stock code trusts that field, so anyone could fill the
  relay's slots in other peers' names);
- reservations of peers that have disconnected are dropped before a new one is
  counted: they are void anyway (a reservation holds only while its peer is
  connected) but the stock code keeps them, slot and all, until they expire;
- stopping the service leaves a handler that resets new relay streams instead
  of removing the handlers (removing one races with multistream-select and can
  stop the host, see :meth:`Discovery.stop <modelnet_p2p.services.discovery.service.Discovery.stop>`).

The client side (RESERVE, CONNECT) is written here directly on the hop
protocol rather than through py-libp2p's ``CircuitV2Transport``, which reserves
on every dial, first retries every relayed address it has ever stored for the
target (with a practically infinite TTL), and tracks state this module does not need.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, cast

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as _HOP_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID as _STOP_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service.trio_manager import TrioManager
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr.protocols import P_P2P

from ..errors import ConfigError, UnavailableError
from ..p2p.host import parse_multiaddr

__all__ = [
    "DEFAULT_MAX_CIRCUITS_PER_PEER",
    "DEFAULT_MAX_RESERVATIONS",
    "DEFAULT_RESERVATION_TTL",
    "HOP_PROTOCOL_ID",
    "STOP_PROTOCOL_ID",
    "circuit_addr_for",
    "Reachability",
    "RelayReservation",
    "RelayService",
    "dial_via_relay",
    "is_circuit_addr",
    "keep_reservation",
    "needs_relay",
    "parse_circuit_addr",
    "publicly_dialable",
    "reserve",
]

log = logging.getLogger(__name__)

#: The relay asks ``/libp2p/circuit/relay/0.2.0/hop``; the relay tells the target on ``.../stop``.
HOP_PROTOCOL_ID = _HOP_ID
STOP_PROTOCOL_ID = _STOP_ID

#: Seconds a reservation lasts unless refreshed (the spec's usual value).
DEFAULT_RESERVATION_TTL = 3600
#: Peers that may hold a reservation at once (py-libp2p's default is 4).
DEFAULT_MAX_RESERVATIONS = 256
#: Circuits open at once to one reserving peer (py-libp2p's default is 8).
DEFAULT_MAX_CIRCUITS_PER_PEER = 64
#: py-libp2p reads a data limit of 0 as "nothing may pass", not "no limit".
_NO_DATA_LIMIT = 2**62

#: Refresh a reservation once this fraction of its remaining lifetime has passed.
REFRESH_FRACTION = 0.5
#: Bounds on the wait between refreshes (the relay's clock may differ from ours).
MIN_REFRESH_DELAY = 1.0
MAX_REFRESH_DELAY = 1800.0
#: How often a kept reservation checks that the connection to its relay is still up.
CONNECTION_POLL_INTERVAL = 0.5

Reachability = Literal["auto", "public", "private"]


# -- the relay (hop) and target (stop) side ---------------------------------------


@dataclass(frozen=True)
class _Circuit:
    """Key of one direction of one circuit in ``CircuitV2Protocol._active_relays``."""

    peer: ID
    number: int

    def __str__(self) -> str:
        return f"{self.peer}#{self.number}"


async def _refuse(stream: INetStream) -> None:
    await stream.reset()


class _CircuitRelay(CircuitV2Protocol):
    """py-libp2p's circuit relay v2 protocol with the corrections listed in the module docstring."""

    _numbers = itertools.count()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self.allow_hop:
            self.host.set_stream_handler(HOP_PROTOCOL_ID, self._handle_hop_stream)
        self.host.set_stream_handler(STOP_PROTOCOL_ID, self._handle_stop_stream)
        self.event_started.set()
        task_status.started()
        try:
            await self.manager.wait_finished()
        finally:
            if self.allow_hop:
                self.host.set_stream_handler(HOP_PROTOCOL_ID, _refuse)
            self.host.set_stream_handler(STOP_PROTOCOL_ID, _refuse)
            streams = {s for pair in self._active_relays.values() for s in pair if s is not None}
            self._active_relays.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for stream in streams:
                    try:
                        await stream.reset()
                    except Exception:
                        pass

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        msg.peer.id = stream.muxed_conn.peer_id.to_bytes()
        reservations = self.resource_manager._reservations
        for peer in [p for p in reservations if not _connected(self.host, p)]:
            del reservations[peer]
        await super()._handle_reserve(stream, msg)

    async def _handle_connect(self, stream: INetStream, msg: HopMessage) -> None:
        try:
            await super()._handle_connect(stream, msg)
        finally:
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


class RelayService:
    """Circuit relay v2 on a host: accept relayed connections, and relay for others if ``hop``.

    Every peer that is reached through a relay runs one (``hop=False``); a
    bootstrap node runs one with ``hop=True``. A host has at most one.

    Args:
        host: the libp2p host.
        hop: relay circuits for peers that hold a reservation here.
        max_reservations: peers that may hold a reservation at once.
        max_circuits_per_peer: circuits open at once to one reserving peer.
        reservation_ttl: seconds a reservation lasts unless refreshed.
        max_circuit_duration: seconds a circuit may last; ``None``: no limit.
        max_circuit_bytes: bytes a circuit may carry (both ways); ``None``: no limit.
    """

    def __init__(
        self,
        host: IHost,
        *,
        hop: bool,
        max_reservations: int = DEFAULT_MAX_RESERVATIONS,
        max_circuits_per_peer: int = DEFAULT_MAX_CIRCUITS_PER_PEER,
        reservation_ttl: int = DEFAULT_RESERVATION_TTL,
        max_circuit_duration: int | None = None,
        max_circuit_bytes: int | None = None,
    ) -> None:
        if max_reservations < 1 or max_circuits_per_peer < 1:
            raise ConfigError("relay limits must be at least 1")
        if reservation_ttl < 1:
            raise ConfigError("reservation_ttl must be at least 1 second")
        if (max_circuit_duration is not None and max_circuit_duration < 1) or (
            max_circuit_bytes is not None and max_circuit_bytes < 1
        ):
            raise ConfigError("circuit limits must be positive (or None for no limit)")
        self.host = host
        self.hop = hop
        self.limits = RelayLimits(
            duration=max_circuit_duration or 0,  # 0: no deadline
            data=max_circuit_bytes or _NO_DATA_LIMIT,
            max_circuit_conns=max_circuits_per_peer,
            max_reservations=max_reservations,
            reservation_ttl=reservation_ttl,
        )
        self.protocol = _CircuitRelay(host, limits=self.limits, allow_hop=hop)
        self._manager: TrioManager | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Register the protocol handlers and run the service in ``nursery`` (the peer's)."""
        if self._manager is not None:
            raise RuntimeError("relay service already started")
        self._manager = TrioManager(self.protocol)
        self.protocol._manager = self._manager
        nursery.start_soon(self._run, self._manager)
        with trio.fail_after(10):
            # Wait for the handlers, not just for the manager: it reports "started"
            # before the service's run() has registered anything.
            await self.protocol.event_started.wait()
        log.debug("circuit relay started (%s)", "hop and stop" if self.hop else "stop")

    async def _run(self, manager: TrioManager) -> None:
        try:
            await manager.run()
        except Exception as exc:  # the relay failing must not take the peer down
            log.warning("the circuit relay service stopped: %r", exc)

    def stop(self) -> None:
        """Stop relaying and accepting relayed connections; open circuits are reset."""
        if self._manager is not None and self._manager.is_running:
            self._manager.cancel()

    @property
    def reservations(self) -> int:
        """Reservations currently held by connected peers (relays only)."""
        return sum(
            1
            for peer, r in list(self.protocol.resource_manager._reservations.items())
            if not r.is_expired() and _connected(self.host, peer)
        )

    @property
    def circuits(self) -> int:
        """Circuits this relay is forwarding now."""
        return sum(1 for key in list(self.protocol._active_relays) if isinstance(key, _Circuit)) // 2


# -- reserving (the target side) ---------------------------------------------------


def _connected(host: IHost, peer: ID) -> bool:
    return any(not conn.is_closed for conn in host.get_network().get_connections(peer))


def _relay_info(relay_addr: str | multiaddr.Multiaddr) -> tuple[str, PeerInfo]:
    """The normalised relay address and its peer info (transport address only)."""
    maddr = parse_multiaddr(relay_addr)
    if is_circuit_addr(maddr):
        raise ConfigError(f"relay address {relay_addr} is itself a relayed address")
    peer = maddr.get_peer_id()
    if not peer:
        raise ConfigError(f"relay address {relay_addr} has no /p2p/<peer id> part")
    try:
        peer_id = ID.from_base58(str(peer))
    except Exception:
        raise ConfigError(f"relay address {relay_addr} has an invalid peer id") from None
    transport = maddr.decapsulate_code(P_P2P)
    addrs = [transport] if str(transport) not in ("", "/") else []
    return str(maddr), PeerInfo(peer_id, addrs)


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def _close(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:
            pass


async def _hop_exchange(host: IHost, relay: PeerInfo, request: HopMessage) -> tuple[HopMessage, INetStream]:
    """Connect to the relay if needed, open a hop stream, send ``request``, read the answer."""
    if not _connected(host, relay.peer_id):
        # py-libp2p refuses, for 60 s, to dial a peer whose addresses all failed once: a
        # restarted relay would stay out of reach. Callers here bound their own retries.
        unblock = getattr(host.get_network(), "unblock_peer", None)
        if unblock is not None:
            unblock(relay.peer_id)
        await host.connect(relay)
    stream = await host.new_stream(relay.peer_id, [HOP_PROTOCOL_ID])
    try:
        await write_delimited_msg(stream, request)
        answer = await read_delimited_msg(stream, HopMessage)
    except BaseException:
        await _close(stream)
        raise
    return answer, stream


def _status(answer: HopMessage) -> StatusCode:
    if answer.type != HopMessage.STATUS:
        return StatusCode.UNEXPECTED_MESSAGE
    try:
        return StatusCode(answer.status)
    except ValueError:
        return StatusCode.MALFORMED_MESSAGE


async def _reserve(host: IHost, relay: PeerInfo, timeout: float) -> float:
    """Make or refresh a reservation; returns its expiry (Unix time, the relay's clock)."""
    answer: HopMessage | None = None
    with trio.move_on_after(timeout):
        try:
            answer, stream = await _hop_exchange(host, relay, HopMessage(type=HopMessage.RESERVE))
        except Exception as exc:
            raise UnavailableError(f"cannot reserve a slot on relay {relay.peer_id}: {_why(exc)}") from None
        await _close(stream)
    if answer is None:
        raise UnavailableError(f"timed out reserving a slot on relay {relay.peer_id}")
    status = _status(answer)
    if status != StatusCode.OK or not answer.HasField("reservation"):
        raise UnavailableError(f"relay {relay.peer_id} refused the reservation: {status.name}")
    return float(answer.reservation.expire)


def circuit_addr_for(host: IHost, relay_addr: str | multiaddr.Multiaddr) -> str:
    """The address others dial to reach ``host`` through ``relay_addr``."""
    relay, _ = _relay_info(relay_addr)
    return f"{relay}/p2p-circuit/p2p/{host.get_id()}"


async def reserve(host: IHost, relay_addr: str, *, timeout: float = 10.0) -> str:
    """Reserve a slot on the relay at ``relay_addr`` (with ``/p2p/``) and return the address to announce.

    Connects to the relay first if needed. The reservation lasts the relay's
    TTL, and only while this host stays connected to the relay; call again to
    refresh it, or use :func:`keep_reservation`. The host must run a
    :class:`RelayService` to accept the relayed connections. Raises
    :class:`UnavailableError` if the relay cannot be reached, refuses, or does
    not answer within ``timeout`` seconds.
    """
    relay, info = _relay_info(relay_addr)
    await _reserve(host, info, timeout)
    return f"{relay}/p2p-circuit/p2p/{host.get_id()}"


class RelayReservation:
    """A reservation kept on one relay by :func:`keep_reservation`.

    Attributes:
        relay_addr: the relay's address, with ``/p2p/``.
        circuit_addr: the address to announce while the reservation holds, else ``None``.
        expires_at: when the current reservation ends (Unix time, relay's clock), else ``None``.
        refreshes: reservations made so far (the first one included).
    """

    def __init__(
        self,
        host: IHost,
        relay_addr: str,
        on_change: Callable[[str | None], None] | None,
        *,
        timeout: float,
        refresh_fraction: float,
        max_backoff: float,
        max_failures: int | None,
    ) -> None:
        self.relay_addr, self._relay = _relay_info(relay_addr)
        self._host = host
        self._on_change = on_change
        self._timeout = timeout
        self._refresh_fraction = refresh_fraction
        self._max_backoff = max_backoff
        self._max_failures = max_failures
        self.circuit_addr: str | None = None
        self.expires_at: float | None = None
        self.refreshes = 0
        self._scope = trio.CancelScope()
        self._changed = trio.Event()
        self._finished = False

    @property
    def running(self) -> bool:
        """Whether the task keeping the reservation still runs."""
        return not self._finished

    def cancel(self) -> None:
        """Stop keeping the reservation (it lapses at the relay by itself)."""
        self._scope.cancel()

    async def wait(self, timeout: float) -> str:
        """Wait until the reservation holds and return the circuit address.

        Raises :class:`UnavailableError` if it does not hold within ``timeout``
        seconds or the task has given up.
        """
        with trio.move_on_after(timeout):
            while self.circuit_addr is None:
                if self._finished:
                    raise UnavailableError(f"gave up reserving a slot on relay {self.relay_addr}")
                await self._changed.wait()
            return self.circuit_addr
        raise UnavailableError(f"no reservation on relay {self.relay_addr} within {timeout:g} s")

    def _set(self, circuit_addr: str | None, expires_at: float | None) -> None:
        self.expires_at = expires_at
        if circuit_addr == self.circuit_addr:
            return
        self.circuit_addr = circuit_addr
        if circuit_addr is None:
            log.info("lost the reservation on relay %s", self.relay_addr)
        else:
            log.info("reserved a slot on relay %s; reachable at %s", self.relay_addr, circuit_addr)
        self._changed.set()
        self._changed = trio.Event()
        if self._on_change is not None:
            try:
                self._on_change(circuit_addr)
            except Exception:
                log.exception("relay reservation callback failed")

    def _refresh_delay(self) -> float:
        remaining = (self.expires_at or 0.0) - time.time()
        return min(max(remaining * self._refresh_fraction, MIN_REFRESH_DELAY), MAX_REFRESH_DELAY)

    async def _connection_holds(self, seconds: float) -> bool:
        """Sleep ``seconds``; return ``False`` as soon as the connection to the relay is gone."""
        with trio.move_on_after(seconds):
            while _connected(self._host, self._relay.peer_id):
                await trio.sleep(CONNECTION_POLL_INTERVAL)
            return False
        return True

    async def run(self) -> None:
        """Reserve, refresh at ``refresh_fraction`` of the lifetime, and re-reserve after a loss."""
        circuit = f"{self.relay_addr}/p2p-circuit/p2p/{self._host.get_id()}"
        backoff = min(1.0, self._max_backoff)
        failures = 0
        try:
            with self._scope:
                while True:
                    try:
                        expires_at = await _reserve(self._host, self._relay, self._timeout)
                    except UnavailableError as exc:
                        failures += 1
                        lost = self.expires_at is None or time.time() >= self.expires_at
                        if lost or not _connected(self._host, self._relay.peer_id):
                            self._set(None, None)
                        if self._max_failures is not None and failures >= self._max_failures:
                            log.warning("giving up on relay %s after %d attempts: %s",
                                        self.relay_addr, failures, exc.message)
                            return
                        log.log(logging.INFO if failures == 1 else logging.DEBUG,
                                "%s; retrying in %.0f s", exc.message, backoff)
                        await trio.sleep(backoff)
                        backoff = min(backoff * 2, self._max_backoff)
                        continue
                    failures = 0
                    backoff = min(1.0, self._max_backoff)
                    self.refreshes += 1
                    self._set(circuit, expires_at)
                    log.debug("reservation on relay %s valid for %.0f s",
                              self.relay_addr, expires_at - time.time())
                    if not await self._connection_holds(self._refresh_delay()):
                        # The relay forgets a reservation once its holder disconnects.
                        log.info("connection to relay %s lost; reserving again", self.relay_addr)
                        self._set(None, None)
        finally:
            self._finished = True
            self._changed.set()


def keep_reservation(
    host: IHost,
    relay_addr: str,
    nursery: trio.Nursery,
    on_change: Callable[[str | None], None] | None = None,
    *,
    timeout: float = 10.0,
    refresh_fraction: float = REFRESH_FRACTION,
    max_backoff: float = 60.0,
    max_failures: int | None = None,
) -> RelayReservation:
    """Keep a reservation on the relay at ``relay_addr`` for as long as ``nursery`` runs.

    Starts a task in ``nursery`` that reserves a slot, refreshes it when
    ``refresh_fraction`` of its remaining lifetime has passed, and, when the
    connection to the relay drops (the relay restarted, the network changed),
    reconnects and reserves again. Failed attempts are retried after 1 s, 2 s,
    4 s ... up to ``max_backoff`` seconds; after ``max_failures`` failures in a
    row (``None``: never) the task gives up. Each attempt is bounded by ``timeout``.

    ``on_change`` is called with the address to announce when a reservation is
    made (first, or again after a loss) and with ``None`` when it is lost;
    refreshes that keep it do not call it. Returns the :class:`RelayReservation`
    handle at once; ``await handle.wait(timeout)`` waits for the first reservation.
    """
    if not 0.0 < refresh_fraction < 1.0:
        raise ConfigError("refresh_fraction must be between 0 and 1")
    keeper = RelayReservation(
        host,
        relay_addr,
        on_change,
        timeout=timeout,
        refresh_fraction=refresh_fraction,
        max_backoff=max_backoff,
        max_failures=max_failures,
    )
    nursery.start_soon(keeper.run)
    return keeper


# -- dialing (the client side) ------------------------------------------------------


def is_circuit_addr(addr: str | multiaddr.Multiaddr) -> bool:
    """Whether ``addr`` is a relayed (``/p2p-circuit``) address; ``False`` if it is not a multiaddr."""
    try:
        maddr = addr if isinstance(addr, multiaddr.Multiaddr) else multiaddr.Multiaddr(addr)
        return any(p.name == "p2p-circuit" for p in maddr.protocols())
    except Exception:
        return False


def parse_circuit_addr(addr: str | multiaddr.Multiaddr) -> tuple[str, str]:
    """Split ``<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<target id>`` into (relay addr, target id).

    Raises :class:`ConfigError` if ``addr`` is not such an address.
    """
    text = str(parse_multiaddr(addr))
    relay, sep, tail = text.partition("/p2p-circuit")
    target = tail.removeprefix("/p2p/")
    if not sep or not relay or "/p2p-circuit" in tail or target == tail or "/" in target:
        raise ConfigError(
            f"{addr} is not a relayed address (<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>)"
        )
    try:
        ID.from_base58(target)
    except Exception:
        raise ConfigError(f"relayed address {addr} has an invalid target peer id") from None
    _relay_info(relay)  # checks the relay part
    return relay, target


async def dial_via_relay(host: IHost, circuit_addr: str, timeout: float = 10.0) -> None:
    """Connect to the peer at ``circuit_addr`` through its relay.

    Afterwards ``host.new_stream(target_id, ...)`` works as over a direct
    connection: the relayed connection is secured end to end with Noise
    (authenticating the target's peer id) and multiplexed with yamux. Does
    nothing if already connected to the target. Connects to the relay first if
    needed. Raises :class:`ConfigError` for a malformed address and
    :class:`UnavailableError` if the relay or the target cannot be reached (for
    example ``NO_RESERVATION`` when the target holds no slot there) or the
    whole dial takes longer than ``timeout`` seconds.
    """
    relay_addr, target_text = parse_circuit_addr(circuit_addr)
    _, relay = _relay_info(relay_addr)
    target = ID.from_base58(target_text)
    if target == host.get_id():
        raise ConfigError("cannot dial this peer itself")
    if relay.peer_id == target:
        raise ConfigError(f"{circuit_addr} relays a peer through itself")
    if _connected(host, target):
        return
    with trio.move_on_after(timeout):
        try:
            request = HopMessage(type=HopMessage.CONNECT, peer=CircuitPeerId(id=target.to_bytes()))
            answer, stream = await _hop_exchange(host, relay, request)
        except Exception as exc:
            raise UnavailableError(f"cannot reach relay {relay.peer_id}: {_why(exc)}") from None
        status = _status(answer)
        if status != StatusCode.OK:
            await _close(stream)
            raise UnavailableError(f"relay {relay.peer_id} cannot reach peer {target}: {status.name}")
        raw = RawConnection(
            stream=stream,
            initiator=True,
            connection_type=ConnectionType.RELAYED,
            addresses=[parse_multiaddr(circuit_addr)],
        )
        try:
            await host.upgrade_outbound_connection(raw, target)
        except Exception as exc:
            await _close(stream)
            raise UnavailableError(f"cannot secure the relayed connection to {target}: {_why(exc)}") from None
        log.debug("connected to %s via relay %s", target, relay.peer_id)
        return
    raise UnavailableError(f"timed out dialing peer {target} via relay {relay.peer_id}")


# -- reachability ---------------------------------------------------------------------

_LOOPBACK, _PRIVATE, _PUBLIC = 0, 1, 2


def _scope(addr: multiaddr.Multiaddr) -> int | None:
    """How far an address reaches: this machine, a private network, or the internet."""
    names = {p.name for p in addr.protocols()}
    if "p2p-circuit" in names:
        return None
    for proto in ("ip4", "ip6"):
        if proto in names:
            ip = ipaddress.ip_address(addr.value_for_protocol(proto))
            if ip.is_loopback:
                return _LOOPBACK
            return _PUBLIC if ip.is_global else _PRIVATE
    if names & {"dns", "dns4", "dns6", "dnsaddr"}:
        return _PUBLIC
    return None


def _expand(addr: multiaddr.Multiaddr) -> list[multiaddr.Multiaddr]:
    """A wildcard (``0.0.0.0``, ``::``) stands for the machine's interface addresses."""
    for proto in ("ip4", "ip6"):
        try:
            ip = addr.value_for_protocol(proto)
        except Exception:
            continue
        if ip in ("0.0.0.0", "::"):
            try:
                return list(expand_wildcard_address(addr))
            except Exception:
                return [addr]
    return [addr]


def _scopes(addrs: Iterable[str | multiaddr.Multiaddr]) -> list[int]:
    out = []
    for a in addrs:
        for expanded in _expand(parse_multiaddr(a)):
            scope = _scope(expanded)
            if scope is not None:
                out.append(scope)
    return out


def publicly_dialable(
    listen_addrs: Iterable[str | multiaddr.Multiaddr],
    bootstrap: Iterable[str | multiaddr.Multiaddr] = (),
) -> bool:
    """Whether the peers of the mesh can presumably dial a peer listening on ``listen_addrs``.

    The rule, kept simple on purpose (no dial-back test):

    1. No listen address (relayed ones do not count): ``False``.
    2. Each address reaches as far as its IP: loopback (this machine), private
       (RFC 1918, CGNAT, link-local, ULA ...) or public (a globally routable IP,
       or a DNS name). A wildcard (``0.0.0.0``, ``::``) counts as the
       machine's interface addresses.
    3. The peer is dialable if its widest address reaches at least as far as
       the widest bootstrap address: a loopback or LAN mesh (or no bootstrap
       peers at all) can dial private addresses; a peer with only private
       addresses joining through public bootstrap peers is taken to be behind
       NAT, and ``False`` is returned.

    A peer behind a port-forwarding NAT, or on a cloud machine whose public IP is
    not on an interface, is misjudged as not dialable; it still works (through a
    relay), and ``reachability="public"`` says otherwise.
    """
    own = _scopes(listen_addrs)
    if not own:
        return False
    return max(own) >= max(_scopes(bootstrap), default=_LOOPBACK)


def needs_relay(
    reachability: Reachability,
    listen_addrs: Iterable[str | multiaddr.Multiaddr],
    bootstrap: Iterable[str | multiaddr.Multiaddr] = (),
) -> bool:
    """Whether a peer should reserve slots on its bootstrap relays.

    ``"private"``: always; ``"public"``: never; ``"auto"``: if it is not
    :func:`publicly_dialable` from the mesh it joins.
    """
    if reachability == "private":
        return True
    if reachability == "public":
        return False
    if reachability != "auto":
        raise ConfigError(f"reachability must be 'auto', 'public' or 'private', not {reachability!r}")
    return not publicly_dialable(listen_addrs, bootstrap)

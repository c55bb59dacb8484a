"""Circuit relay v2 on a libp2p host: the relay node, and the client side (RESERVE, CONNECT).

The protocol and service logic (settings, limits, keeping a reservation) lives in
:mod:`modelnet_p2p.services.relay`; this module is what touches libp2p:

- :class:`RelayNode` runs the hop and stop protocols (py-libp2p's ``CircuitV2Protocol``, with
  the corrections of :mod:`modelnet_p2p.p2p._compat.relay`) on a host;
- :func:`reserve_slot` makes or refreshes a reservation and :func:`dial_via_relay` connects
  to a peer through its relay, both written directly on the hop protocol;
- :class:`RelayLink` is one host's link to one relay, as :class:`RelayReservation
  <modelnet_p2p.services.relay.RelayReservation>` uses it.

The client side does not use py-libp2p's ``CircuitV2Transport``, which reserves on every dial,
first retries every relayed address it has ever stored for the target (with a practically
infinite TTL), and tracks state this module does not need.
"""

from __future__ import annotations

import logging
from typing import Any

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
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from libp2p.tools.anyio_service import background_trio_service

from ..errors import ConfigError, UnavailableError
from ._compat.pnet import protect_outbound
from ._compat.relay import CircuitLimiter, CircuitRelay, ReservationDecider, relay_limits
from .addresses import circuit_addr, parse_circuit_addr, parse_multiaddr, parse_peer_addr
from .notify import connected

__all__ = [
    "HOP_PROTOCOL_ID",
    "STOP_PROTOCOL_ID",
    "CircuitLimiter",
    "RelayLink",
    "RelayNode",
    "connected",
    "dial_via_relay",
    "reserve_slot",
]

log = logging.getLogger(__name__)

#: The relay asks ``/libp2p/circuit/relay/0.2.0/hop``; the relay tells the target on ``.../stop``.
HOP_PROTOCOL_ID = _HOP_ID
STOP_PROTOCOL_ID = _STOP_ID

#: Seconds to wait for the relay's handlers to be registered.
START_TIMEOUT = 10.0


# -- the relay (hop) and target (stop) side ---------------------------------------


class RelayNode:
    """The circuit relay v2 protocols on ``host``: stop always, hop if ``hop``.

    ``limiter`` counts the circuits open to each reserving peer and ``policy`` decides who may
    hold a reservation (``services/relay.py``); the other limits are py-libp2p's (``None``: no
    limit).
    """

    def __init__(
        self,
        host: IHost,
        *,
        hop: bool,
        limiter: CircuitLimiter,
        policy: ReservationDecider | None = None,
        limit_loopback: bool = False,
        max_reservations: int,
        max_circuits_per_peer: int,
        reservation_ttl: int,
        max_circuit_duration: int | None,
        max_circuit_bytes: int | None,
    ) -> None:
        self.host = host
        self.hop = hop
        limits = relay_limits(
            max_reservations=max_reservations,
            max_circuits_per_peer=max_circuits_per_peer,
            reservation_ttl=reservation_ttl,
            max_circuit_duration=max_circuit_duration,
            max_circuit_bytes=max_circuit_bytes,
        )
        self.protocol = CircuitRelay(
            host, limits, hop=hop, limiter=limiter, policy=policy, limit_loopback=limit_loopback
        )

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ``task_status.started()`` once the handlers are registered.

        On the way out the handlers are retired (new relay streams are reset) and the open
        circuits reset.
        """
        async with background_trio_service(self.protocol) as manager:
            with trio.fail_after(START_TIMEOUT):
                # The manager reports "started" before the service's run() has registered anything.
                await self.protocol.event_started.wait()
            task_status.started()
            await manager.wait_finished()

    @property
    def reservations(self) -> int:
        """Reservations currently held by connected peers (relays only)."""
        return self.protocol.held_reservations()

    @property
    def circuits(self) -> int:
        """Circuits this relay is forwarding now."""
        return self.protocol.open_circuits()

    def reserving_peers(self) -> list[str]:
        """Ids of the connected peers holding a reservation here (relays only)."""
        return self.protocol.reserving_peers()

    @property
    def holder_connections(self) -> int:
        """Holders' connections the relay keeps a reference to, one per holder at most (for
        tests and status: a holder's goes when its last connection closes)."""
        return self.protocol.tracked_connections()


# -- the client side --------------------------------------------------------------


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
    if not connected(host, relay.peer_id):
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


async def reserve_slot(host: IHost, relay: PeerInfo, timeout: float) -> float:
    """Make or refresh a reservation on ``relay``; returns its expiry (Unix time, the relay's clock).

    Raises :class:`UnavailableError` if the relay cannot be reached, refuses, or does not
    answer within ``timeout`` seconds.
    """
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


class RelayLink:
    """One host's link to one relay: reserve there, and tell whether the connection holds."""

    def __init__(self, host: IHost, relay_addr: str | multiaddr.Multiaddr) -> None:
        self.relay_addr, self._relay = parse_peer_addr(relay_addr)
        self._host = host
        #: The address others dial to reach the host through this relay.
        self.circuit_addr = circuit_addr(self.relay_addr, host.get_id())

    async def reserve(self, timeout: float) -> float:
        """Make or refresh the reservation; returns its expiry (Unix time, the relay's clock)."""
        return await reserve_slot(self._host, self._relay, timeout)

    def connected(self) -> bool:
        """Whether the host is connected to the relay (a reservation holds only while it is)."""
        return connected(self._host, self._relay.peer_id)


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
    _, relay = parse_peer_addr(relay_addr)
    target = ID.from_base58(target_text)
    if target == host.get_id():
        raise ConfigError("cannot dial this peer itself")
    if relay.peer_id == target:
        raise ConfigError(f"{circuit_addr} relays a peer through itself")
    if connected(host, target):
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
            # upstream protects inbound relayed connections of a private mesh, not outbound ones
            await host.upgrade_outbound_connection(protect_outbound(host, raw), target)
        except Exception as exc:
            await _close(stream)
            raise UnavailableError(f"cannot secure the relayed connection to {target}: {_why(exc)}") from None
        log.debug("connected to %s via relay %s", target, relay.peer_id)
        return
    raise UnavailableError(f"timed out dialing peer {target} via relay {relay.peer_id}")

"""The dialer: the one place that dials other peers and opens streams to them.

A target is a multiaddr ending in ``/p2p/<peer id>`` (possibly relayed:
``<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>``), a base58 peer id
this host already knows addresses for, or a libp2p peer id object. For a peer id
the peerstore holds no address for (it forgets idle strangers), :attr:`Dialer.locate`
is asked, within the dial's time (the peer sets it to look the peer's card up in
the DHT).

Every dial is bounded twice: by the request's own deadline (trio time) and by
``connect_timeout``. Failures are typed: :class:`UnavailableError` (the peer
cannot be reached, or does not speak the protocol), :class:`DeadlineExceededError`
(the request's deadline passed first), :class:`ConfigError` (a malformed target)
and :class:`BadRequestError` (dialing this peer itself).

Relayed addresses are dialed through their relay (:func:`.relay.dial_via_relay`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from ..errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    ModelNetError,
    UnavailableError,
)
from .addresses import is_circuit_addr, parse_circuit_addr, parse_multiaddr
from .notify import connected
from .relay import dial_via_relay

__all__ = [
    "CircuitDial",
    "Dialer",
    "Locate",
    "PeerID",
    "ProtocolConnector",
    "Target",
    "parse_peer_id",
]

log = logging.getLogger(__name__)

#: libp2p's peer id type, for callers that must not import libp2p.
PeerID = ID
#: Whatever names a peer to call: a multiaddr with ``/p2p/<id>`` (text or parsed), or a peer id.
Target: TypeAlias = str | multiaddr.Multiaddr | ID
#: ``dial(circuit_addr, timeout)``: connect through a relay (raises a :class:`ModelNetError`).
CircuitDial = Callable[[str, float], Awaitable[None]]
#: ``locate(peer id)``: addresses (with ``/p2p/<id>``, possibly relayed) found elsewhere for a
#: peer this host knows none for, e.g. in its card in the DHT; empty if none.
Locate = Callable[[str], Awaitable[Sequence[str]]]


#: Text targets whose peer id :meth:`Dialer.peer_of` remembers (then it starts over).
PEER_OF_CACHE = 1024
#: Seconds a peer whose dial failed is not dialed again, doubled with each failure in a row up
#: to ``MAX_DIAL_BACKOFF``. This replaces py-libp2p's swarm rule (no dial for 60 s after one
#: failure): a caller whose connection to a busy peer was closed, and whose one redial failed,
#: had every call fail at once for the next 60 s (2,194 of 2,466 calls in the hostile
#: benchmark's relay-reservations window).
DIAL_BACKOFF = 0.25
MAX_DIAL_BACKOFF = 30.0


def parse_peer_id(text: str) -> ID | None:
    """A base58 peer id, or ``None`` if ``text`` is not one.

    Any base58 text decodes to bytes; a peer id must also be a well-formed
    multihash: identity (0x00) or sha2-256 (0x12), with a matching length.
    """
    try:
        pid = ID.from_base58(text)
    except Exception:
        return None
    raw = pid.to_bytes()
    if len(raw) < 2 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2:
        return None
    return pid


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class Dialer:
    """Dials peers of one running host and opens streams to them.

    Args:
        host: the running libp2p host.
        connect_timeout: seconds allowed for one dial, within any request deadline.
        dial_circuit: how to dial a relayed address (default: through its relay).
    """

    def __init__(
        self, host: IHost, *, connect_timeout: float, dial_circuit: CircuitDial | None = None
    ) -> None:
        self.host = host
        self.connect_timeout = connect_timeout
        self._peer_of: dict[str, str] = {}
        #: peer -> (dials failed in a row, trio time before which it is not dialed again)
        self._backoff: dict[ID, tuple[int, float]] = {}
        self._dial_circuit: CircuitDial = dial_circuit or (
            lambda addr, timeout: dial_via_relay(host, addr, timeout=timeout)
        )
        #: Where to look for the addresses of a peer named by its id alone when the peerstore
        #: holds none (it forgets idle strangers): ``None``, nowhere.
        self.locate: Locate | None = None

    @property
    def local_peer(self) -> str:
        return str(self.host.get_id())

    def for_protocol(self, protocol: str) -> ProtocolConnector:
        """This dialer with ``protocol`` bound: what the mesh client opens streams with."""
        return ProtocolConnector(self, protocol)

    # -- targets ---------------------------------------------------------------

    def resolve(self, target: Target) -> PeerInfo:
        """The peer id and addresses named by ``target`` (raises :class:`ConfigError`)."""
        if isinstance(target, ID):
            return PeerInfo(target, [])
        if isinstance(target, multiaddr.Multiaddr) or str(target).startswith("/"):
            maddr = parse_multiaddr(target)
            if is_circuit_addr(maddr):  # the target is the last /p2p/<id>, not the relay
                return PeerInfo(ID.from_base58(parse_circuit_addr(maddr)[1]), [])
            try:
                return info_from_p2p_addr(maddr)
            except Exception:
                raise ConfigError(f"target {target} has no /p2p/<peer id> part") from None
        pid = parse_peer_id(str(target))
        if pid is None:
            raise ConfigError(f"target {target!r} is neither a multiaddr nor a peer id")
        return PeerInfo(pid, [])

    def peer_of(self, target: Target) -> str:
        """The base58 peer id that ``target`` names (text targets are remembered, at most
        :data:`PEER_OF_CACHE`: a multiaddr parse cost ~0.12 ms, once per request)."""
        if not isinstance(target, str):
            return str(self.resolve(target).peer_id)
        known = self._peer_of.get(target)
        if known is None:
            known = str(self.resolve(target).peer_id)
            if len(self._peer_of) >= PEER_OF_CACHE:
                self._peer_of.clear()
            self._peer_of[target] = known
        return known

    def is_connected(self, peer: str | ID) -> bool:
        """Whether an open connection to ``peer`` exists (a closed one may linger in the swarm)."""
        pid = peer if isinstance(peer, ID) else parse_peer_id(peer)
        return pid is not None and connected(self.host, pid)

    def known_addrs(self, pid: ID) -> list[multiaddr.Multiaddr]:
        try:
            return list(self.host.get_peerstore().addrs(pid))
        except Exception:  # PeerStoreError: never heard of it
            return []

    # -- dialing -----------------------------------------------------------------

    async def connect(self, addr: str | multiaddr.Multiaddr) -> str:
        """Dial a peer by multiaddr (with ``/p2p/``, possibly relayed); returns its peer id."""
        maddr = parse_multiaddr(addr)
        deadline = trio.current_time() + self.connect_timeout
        if is_circuit_addr(maddr):
            info = self.resolve(maddr)
            await self._circuit(str(maddr), info.peer_id, deadline)
            return str(info.peer_id)
        try:
            info = info_from_p2p_addr(maddr)
        except Exception:
            raise ConfigError(f"address {addr} has no /p2p/<peer id> part") from None
        await self._dial(info, deadline)
        return str(info.peer_id)

    async def ensure_connected(self, target: Target, deadline: float = math.inf) -> PeerInfo:
        """Make sure a connection to ``target`` exists (dialing it if needed); return its peer info."""
        info = self.resolve(target)
        if not isinstance(target, ID) and is_circuit_addr(target):
            await self._circuit(str(target), info.peer_id, deadline)
            return info
        if not self.is_connected(info.peer_id):
            if not info.addrs and not self.known_addrs(info.peer_id):
                found = await self._located(info.peer_id, deadline)
                if found is None:
                    raise UnavailableError(f"no known address for peer {info.peer_id}")
                if isinstance(found, str):
                    await self._circuit(found, info.peer_id, deadline)
                    return info
                info = found
            await self._dial(info, deadline)
        return info

    async def _located(self, pid: ID, deadline: float) -> PeerInfo | str | None:
        """What :attr:`locate` finds for ``pid`` within one dial's time: its direct addresses,
        else its first relayed address, else ``None``."""
        if self.locate is None:
            return None
        with trio.move_on_at(min(deadline, trio.current_time() + self.connect_timeout)):
            try:
                found = [parse_multiaddr(a) for a in await self.locate(str(pid))]
            except Exception as exc:  # nothing found is the answer; the dial error says so
                log.debug("looking up the addresses of %s failed: %r", pid, exc)
                return None
            direct: list[multiaddr.Multiaddr] = []
            relayed: list[str] = []
            for maddr in found:
                try:
                    if is_circuit_addr(maddr):
                        if parse_circuit_addr(maddr)[1] == str(pid):
                            relayed.append(str(maddr))
                    elif (located := info_from_p2p_addr(maddr)).peer_id == pid:
                        direct.extend(located.addrs)
                except Exception:  # not an address of that peer
                    continue
            if direct:
                return PeerInfo(pid, direct)
            return relayed[0] if relayed else None
        return None

    async def open_stream(self, target: Target, protocol: str, deadline: float = math.inf) -> INetStream:
        """A new stream to ``target`` speaking ``protocol``, dialing first if needed."""
        info = await self.ensure_connected(target, deadline)
        pid = info.peer_id
        with trio.move_on_at(deadline) as scope:
            try:
                return await self.host.new_stream(pid, [TProtocol(protocol)])
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                raise UnavailableError(f"peer {pid} does not accept {protocol}: {_why(exc)}") from None
        assert scope.cancelled_caught
        raise DeadlineExceededError(f"deadline exceeded opening a stream to {pid}")

    async def _circuit(self, addr: str, pid: ID, deadline: float) -> None:
        if self.host.get_network().get_connections(pid):
            return
        timeout = max(0.05, min(self.connect_timeout, deadline - trio.current_time()))
        await self._dial_circuit(addr, timeout)

    async def _dial(self, info: PeerInfo, deadline: float) -> None:
        if info.peer_id == self.host.get_id():
            raise BadRequestError("cannot dial this peer itself")
        failures, until = self._backoff.get(info.peer_id, (0, -math.inf))
        if trio.current_time() < until:
            raise UnavailableError(f"cannot reach peer {info.peer_id}: {failures} dials in a row failed")
        unblock = getattr(self.host.get_network(), "unblock_peer", None)  # see DIAL_BACKOFF
        if unblock is not None:
            unblock(info.peer_id)
        with trio.move_on_at(min(deadline, trio.current_time() + self.connect_timeout)) as scope:
            try:
                await self.host.connect(info)
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                self._failed_dial(info.peer_id, failures)
                raise UnavailableError(f"cannot reach peer {info.peer_id}: {_why(exc)}") from None
            self._backoff.pop(info.peer_id, None)
        if scope.cancelled_caught:
            self._failed_dial(info.peer_id, failures)
            if deadline <= trio.current_time():
                raise DeadlineExceededError(f"deadline exceeded while dialing {info.peer_id}")
            raise UnavailableError(f"timed out dialing peer {info.peer_id}")

    def _failed_dial(self, peer: ID, failures: int) -> None:
        if len(self._backoff) >= PEER_OF_CACHE:
            self._backoff.clear()
        backoff = min(MAX_DIAL_BACKOFF, DIAL_BACKOFF * 2**failures)
        self._backoff[peer] = (failures + 1, trio.current_time() + backoff)

    # -- bootstrap and liveness ------------------------------------------------------

    async def connect_bootstrap(self, addrs: Sequence[multiaddr.Multiaddr], *, required: bool) -> int:
        """Dial every bootstrap address; return how many answered.

        With ``required``, raise :class:`UnavailableError` if none did; otherwise warn.
        """
        if not addrs:
            return 0
        ok = 0
        for addr in addrs:
            try:
                await self.connect(addr)
                ok += 1
            except ModelNetError as exc:
                # With ``required`` the failure is raised below; do not say it twice.
                level = logging.INFO if required else logging.WARNING
                log.log(level, "bootstrap peer %s unreachable: %s", addr, exc.message)
        if ok == 0:
            if required:
                raise UnavailableError("no bootstrap peer reachable: " + ", ".join(str(a) for a in addrs))
            log.warning("no bootstrap peer reachable; running alone")
        return ok

    def connected_among(self, addrs: Sequence[multiaddr.Multiaddr]) -> list[ID]:
        """The peer ids of ``addrs`` this host is connected to."""
        out = []
        for addr in addrs:
            try:
                pid = info_from_p2p_addr(addr).peer_id
            except Exception:
                continue
            if self.host.get_network().get_connections(pid):
                out.append(pid)
        return out

    def unblock(self, addrs: Sequence[multiaddr.Multiaddr]) -> None:
        """Let the peers of ``addrs`` be dialed at once again: py-libp2p's swarm refuses, for
        60 s, every dial of a peer whose addresses all failed once (its negative cache)."""
        network: Any = self.host.get_network()  # the Swarm: ``unblock_peer`` is not in its interface
        for addr in addrs:
            try:
                network.unblock_peer(info_from_p2p_addr(addr).peer_id)
            except Exception:
                continue

    async def ping(self, peer_id: str, *, timeout: float = 5.0) -> float | None:
        """Round-trip time to ``peer_id`` in milliseconds (libp2p ping), or ``None``."""
        from libp2p.host.ping import PingService

        pid = parse_peer_id(peer_id)
        if pid is None or pid == self.host.get_id():
            return None
        with trio.move_on_after(timeout):
            try:
                if not self.host.get_network().get_connections(pid):
                    await self._dial(PeerInfo(pid, self.known_addrs(pid)), trio.current_time() + timeout)
                started = trio.current_time()
                await PingService(self.host).ping(pid, 1)
                return (trio.current_time() - started) * 1000
            except Exception as exc:
                log.debug("ping %s failed: %r", peer_id, exc)
        return None


class ProtocolConnector:
    """A :class:`Dialer` that opens streams of one protocol (``peer_of`` and ``open_stream``)."""

    def __init__(self, dialer: Dialer, protocol: str) -> None:
        self.dialer = dialer
        self.protocol = protocol

    def peer_of(self, target: Target) -> str:
        return self.dialer.peer_of(target)

    async def open_stream(self, target: Target, deadline: float = math.inf) -> INetStream:
        return await self.dialer.open_stream(target, self.protocol, deadline)

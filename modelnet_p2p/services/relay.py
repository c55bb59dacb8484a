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

This module holds the service logic: settings and their checks, the per-peer circuit count
(:class:`CircuitSlots`), who may hold a reservation (:class:`ReservationPolicy`), and keeping
a reservation alive (:class:`RelayReservation`). What
touches libp2p is in :mod:`modelnet_p2p.p2p.relay` (the protocols, RESERVE and CONNECT) and
:mod:`modelnet_p2p.p2p.addresses` (relayed addresses, reachability); their names are
re-exported here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Protocol

import trio

from ..errors import ConfigError, ModelNetError, UnavailableError
from ..p2p.addresses import (
    Reachability,
    circuit_addr,
    is_circuit_addr,
    needs_relay,
    parse_circuit_addr,
    publicly_dialable,
)
from ..p2p.host import Host
from ..p2p.relay import HOP_PROTOCOL_ID, STOP_PROTOCOL_ID, RelayLink, RelayNode, dial_via_relay
from ..p2p.resources import ResourceLimits

__all__ = [
    "DEFAULT_MAX_CIRCUITS_PER_PEER",
    "DEFAULT_MAX_RESERVATIONS",
    "DEFAULT_RESERVATION_TTL",
    "HOP_PROTOCOL_ID",
    "STOP_PROTOCOL_ID",
    "CircuitSlots",
    "Reachability",
    "RelayReservation",
    "RelayService",
    "ReservationPolicy",
    "ReservationLink",
    "circuit_addr_for",
    "dial_via_relay",
    "is_circuit_addr",
    "keep_reservation",
    "keep_reservations",
    "needs_relay",
    "parse_circuit_addr",
    "publicly_dialable",
    "reserve",
]

log = logging.getLogger(__name__)

#: Seconds a reservation lasts unless refreshed (the spec's usual value).
DEFAULT_RESERVATION_TTL = ResourceLimits.relay_reservation_ttl
#: Peers that may hold a reservation at once (py-libp2p's default is 4).
DEFAULT_MAX_RESERVATIONS = ResourceLimits.relay_max_reservations
#: Circuits open at once to one reserving peer (py-libp2p's default is 8).
DEFAULT_MAX_CIRCUITS_PER_PEER = ResourceLimits.relay_max_circuits_per_peer

#: Refresh a reservation once this fraction of its remaining lifetime has passed.
REFRESH_FRACTION = 0.5
#: Bounds on the wait between refreshes (the relay's clock may differ from ours).
MIN_REFRESH_DELAY = 1.0
MAX_REFRESH_DELAY = 1800.0
#: How often a kept reservation checks that the connection to its relay is still up.
CONNECTION_POLL_INTERVAL = 0.5
#: Seconds one reservation attempt may take, and the longest wait between failed attempts.
DEFAULT_RESERVE_TIMEOUT = 10.0
DEFAULT_MAX_BACKOFF = 60.0


# -- the relay (hop) and target (stop) side ---------------------------------------


class CircuitSlots:
    """The circuits open at once to each reserving peer, at most ``limit`` each.

    :meth:`acquire` checks and counts in one step (no await in between), so concurrent
    CONNECT requests cannot all get past the check before any is counted.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ConfigError("relay limits must be at least 1")
        self.limit = limit
        self._open: dict[str, int] = {}

    def acquire(self, peer: str) -> bool:
        """Take a slot for a circuit to ``peer``; ``False`` if all ``limit`` are taken."""
        n = self._open.get(peer, 0)
        if n >= self.limit:
            return False
        self._open[peer] = n + 1
        return True

    def release(self, peer: str) -> None:
        """Give back a slot taken by :meth:`acquire` (extra releases are ignored)."""
        n = self._open.get(peer, 0)
        if n <= 1:
            self._open.pop(peer, None)
        else:
            self._open[peer] = n - 1

    def open(self, peer: str) -> int:
        """Slots taken for ``peer`` now."""
        return self._open.get(peer, 0)

    @property
    def total(self) -> int:
        """Slots taken for all peers."""
        return sum(self._open.values())


class ReservationPolicy:
    """Who may hold one of a relay's reservations (``specs/network.md``, "Resource limits").

    - A peer holds at most one (a second RESERVE refreshes it).
    - The peers of one IP address hold at most ``max_per_ip``, so that the Sybil identities
      of one host share one budget (262 identities took every reservation of a relay).
    - When all ``max_reservations`` are taken, a peer from an address holding ``k`` of them
      takes the oldest reservation of the address holding the most, if that address holds
      more than ``k + 1``; else it is refused. The table thus tends to an equal share per
      address, and a newcomer from a new address always gets in while some address holds two.

    Holders without an address (``None``: loopback peers unless limited, see
    :func:`~modelnet_p2p.p2p.resources.ip_key`) count as one address each.
    """

    def __init__(self, max_reservations: int, max_per_ip: int) -> None:
        if max_reservations < 1 or max_per_ip < 1:
            raise ConfigError("relay limits must be at least 1")
        self.max_reservations = max_reservations
        self.max_per_ip = max_per_ip

    def decide(self, peer: str, ip: str | None, holders: dict[str, tuple[str | None, float]]) -> str | None:
        """Whether ``peer`` (from ``ip``) may reserve, given ``holders`` (peer: (ip, since)).

        Returns ``""`` to accept, a holder's peer id to accept after evicting that holder,
        or ``None`` to refuse.
        """
        if peer in holders:
            return ""
        mine = 0 if ip is None else sum(1 for other, _ in holders.values() if other == ip)
        if mine >= self.max_per_ip:
            return None
        if len(holders) < self.max_reservations:
            return ""
        groups: dict[str, list[tuple[float, str]]] = {}
        for holder, (addr, since) in holders.items():
            groups.setdefault(addr if addr is not None else f"peer:{holder}", []).append((since, holder))
        biggest = max(groups.values(), key=len)
        if len(biggest) <= mine + 1:
            return None
        return min(biggest)[1]


class RelayService:
    """Circuit relay v2 on a host: accept relayed connections, and relay for others if ``hop``.

    Every peer that is reached through a relay runs one (``hop=False``); a
    bootstrap node runs one with ``hop=True``. A host has at most one.

    Args:
        host: the libp2p host.
        hop: relay circuits for peers that hold a reservation here.
        limits: the defaults of the settings below (``relay_*`` and ``limit_loopback``).
        max_reservations: peers that may hold a reservation at once.
        max_reservations_per_ip: of those, peers of one IP address (see :class:`ReservationPolicy`).
        max_circuits_per_peer: circuits open at once to one reserving peer.
        reservation_ttl: seconds a reservation lasts unless refreshed.
        max_circuit_duration: seconds a circuit may last; ``0``: no limit.
        max_circuit_bytes: bytes a circuit may carry (both ways); ``0``: no limit.
    """

    def __init__(
        self,
        host: Host,
        *,
        hop: bool,
        limits: ResourceLimits | None = None,
        max_reservations: int | None = None,
        max_reservations_per_ip: int | None = None,
        max_circuits_per_peer: int | None = None,
        reservation_ttl: int | None = None,
        max_circuit_duration: int | None = None,
        max_circuit_bytes: int | None = None,
    ) -> None:
        lim = limits or ResourceLimits()
        max_reservations = _or(max_reservations, lim.relay_max_reservations)
        max_circuits_per_peer = _or(max_circuits_per_peer, lim.relay_max_circuits_per_peer)
        reservation_ttl = _or(reservation_ttl, lim.relay_reservation_ttl)
        duration = _or(max_circuit_duration, lim.relay_max_circuit_duration)
        data = _or(max_circuit_bytes, lim.relay_max_circuit_bytes)
        if max_reservations < 1 or max_circuits_per_peer < 1:
            raise ConfigError("relay limits must be at least 1")
        if reservation_ttl < 1:
            raise ConfigError("reservation_ttl must be at least 1 second")
        if duration < 0 or data < 0:
            raise ConfigError("circuit limits must be positive (or 0 for no limit)")
        self.host = host
        self.hop = hop
        #: Seconds and bytes (both ways) a circuit may last and carry (``0``: no limit).
        self.max_circuit_duration, self.max_circuit_bytes = duration, data
        #: Circuits open to each reserving peer (relays only).
        self.slots = CircuitSlots(max_circuits_per_peer)
        #: Who may hold a reservation (relays only).
        per_ip = _or(max_reservations_per_ip, lim.relay_max_reservations_per_ip)
        self.policy = ReservationPolicy(max_reservations, per_ip)
        self._node = RelayNode(
            host,
            hop=hop,
            limiter=self.slots,
            policy=self.policy.decide,
            limit_loopback=lim.limit_loopback,
            max_reservations=max_reservations,
            max_circuits_per_peer=max_circuits_per_peer,
            reservation_ttl=reservation_ttl,
            max_circuit_duration=duration or None,
            max_circuit_bytes=data or None,
        )
        self._scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Register the protocol handlers and run the service in ``nursery`` (the peer's)."""
        if self._scope is not None:
            raise RuntimeError("relay service already started")
        self._scope = trio.CancelScope()
        await nursery.start(self._run, self._scope)
        log.debug("circuit relay started (%s)", "hop and stop" if self.hop else "stop")

    async def _run(self, scope: trio.CancelScope, *, task_status: Any) -> None:
        with scope:
            try:
                await self._node.serve(task_status=task_status)
            except Exception as exc:  # the relay failing must not take the peer down
                log.warning("the circuit relay service stopped: %r", exc)

    def stop(self) -> None:
        """Stop relaying and accepting relayed connections; open circuits are reset."""
        if self._scope is not None:
            self._scope.cancel()

    @property
    def reservations(self) -> int:
        """Reservations currently held by connected peers (relays only)."""
        return self._node.reservations

    @property
    def circuits(self) -> int:
        """Circuits this relay is forwarding now."""
        return self._node.circuits

    def reserving_peers(self) -> list[str]:
        """Ids of the connected peers holding a reservation here (relays only)."""
        return self._node.reserving_peers()

    @property
    def holder_connections(self) -> int:
        """Holders' connections the relay keeps a reference to, one per holder at most (for
        tests and status: a holder's goes when its last connection closes)."""
        return self._node.holder_connections


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


# -- reserving (the target side) ---------------------------------------------------


def circuit_addr_for(host: Host, relay_addr: str) -> str:
    """The address others dial to reach ``host`` through ``relay_addr``."""
    return circuit_addr(relay_addr, host.get_id())


async def reserve(host: Host, relay_addr: str, *, timeout: float = DEFAULT_RESERVE_TIMEOUT) -> str:
    """Reserve a slot on the relay at ``relay_addr`` (with ``/p2p/``) and return the address to announce.

    Connects to the relay first if needed. The reservation lasts the relay's
    TTL, and only while this host stays connected to the relay; call again to
    refresh it, or use :func:`keep_reservation`. The host must run a
    :class:`RelayService` to accept the relayed connections. Raises
    :class:`UnavailableError` if the relay cannot be reached, refuses, or does
    not answer within ``timeout`` seconds.
    """
    link = RelayLink(host, relay_addr)
    await link.reserve(timeout)
    return link.circuit_addr


class ReservationLink(Protocol):
    """What :class:`RelayReservation` needs of its relay (:class:`~modelnet_p2p.p2p.relay.RelayLink`)."""

    relay_addr: str
    circuit_addr: str

    async def reserve(self, timeout: float) -> float:
        """Make or refresh the reservation; returns its expiry (Unix time, the relay's clock)."""
        ...

    def connected(self) -> bool:
        """Whether the connection to the relay is up."""
        ...


class RelayReservation:
    """A reservation kept on one relay by :func:`keep_reservation`.

    Times are kept on trio's clock (``trio.current_time()``): the relay's expiry, a Unix
    time, is turned into a remaining lifetime with ``wall_clock`` when it arrives.

    Attributes:
        relay_addr: the relay's address, with ``/p2p/``.
        circuit_addr: the address to announce while the reservation holds, else ``None``.
        expires_at: when the current reservation ends (Unix time, relay's clock), else ``None``.
        refreshes: reservations made so far (the first one included).
    """

    def __init__(
        self,
        link: ReservationLink,
        on_change: Callable[[str | None], None] | None = None,
        *,
        timeout: float = DEFAULT_RESERVE_TIMEOUT,
        refresh_fraction: float = REFRESH_FRACTION,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        max_failures: int | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 < refresh_fraction < 1.0:
            raise ConfigError("refresh_fraction must be between 0 and 1")
        self.relay_addr = link.relay_addr
        self._link = link
        self._on_change = on_change
        self._timeout = timeout
        self._refresh_fraction = refresh_fraction
        self._max_backoff = max_backoff
        self._max_failures = max_failures
        self._wall_clock = wall_clock
        self.circuit_addr: str | None = None
        self.expires_at: float | None = None
        self._deadline: float | None = None  # expires_at on trio's clock
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
        self._deadline = (
            None if expires_at is None else trio.current_time() + (expires_at - self._wall_clock())
        )
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

    def _remaining(self) -> float:
        return 0.0 if self._deadline is None else self._deadline - trio.current_time()

    def _refresh_delay(self) -> float:
        delay = self._remaining() * self._refresh_fraction
        return min(max(delay, MIN_REFRESH_DELAY), MAX_REFRESH_DELAY)

    async def _connection_holds(self, seconds: float) -> bool:
        """Sleep ``seconds``; return ``False`` as soon as the connection to the relay is gone."""
        with trio.move_on_after(seconds):
            while self._link.connected():
                await trio.sleep(CONNECTION_POLL_INTERVAL)
            return False
        return True

    async def run(self) -> None:
        """Reserve, refresh at ``refresh_fraction`` of the lifetime, and re-reserve after a loss."""
        circuit = self._link.circuit_addr
        backoff = min(1.0, self._max_backoff)
        failures = 0
        try:
            with self._scope:
                while True:
                    try:
                        expires_at = await self._link.reserve(self._timeout)
                    except UnavailableError as exc:
                        failures += 1
                        if self._remaining() <= 0 or not self._link.connected():
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
                    log.debug("reservation on relay %s valid for %.0f s", self.relay_addr, self._remaining())
                    if not await self._connection_holds(self._refresh_delay()):
                        # The relay forgets a reservation once its holder disconnects.
                        log.info("connection to relay %s lost; reserving again", self.relay_addr)
                        self._set(None, None)
        finally:
            self._finished = True
            self._changed.set()


def keep_reservation(
    host: Host,
    relay_addr: str,
    nursery: trio.Nursery,
    on_change: Callable[[str | None], None] | None = None,
    *,
    timeout: float = DEFAULT_RESERVE_TIMEOUT,
    refresh_fraction: float = REFRESH_FRACTION,
    max_backoff: float = DEFAULT_MAX_BACKOFF,
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
    keeper = RelayReservation(
        RelayLink(host, relay_addr),
        on_change,
        timeout=timeout,
        refresh_fraction=refresh_fraction,
        max_backoff=max_backoff,
        max_failures=max_failures,
    )
    nursery.start_soon(keeper.run)
    return keeper


async def keep_reservations(
    host: Host,
    relay_addrs: Sequence[str],
    nursery: trio.Nursery,
    on_addrs: Callable[[list[str]], None],
    *,
    timeout: float = DEFAULT_RESERVE_TIMEOUT,
) -> dict[str, str]:
    """:func:`keep_reservation` on every relay of ``relay_addrs``; wait up to ``timeout`` for them.

    ``on_addrs`` gets every relayed address to announce each time the set changes. Returns
    the live map of relay address to relayed address (kept up to date as slots come and go).
    """
    circuits: dict[str, str] = {}

    def changed(relay_addr: str, circuit: str | None) -> None:
        if circuit is None:
            circuits.pop(relay_addr, None)
        else:
            circuits[relay_addr] = circuit
        on_addrs(list(circuits.values()))

    keepers = [
        keep_reservation(host, addr, nursery, partial(changed, addr), timeout=timeout) for addr in relay_addrs
    ]
    with trio.move_on_after(timeout):
        for keeper in keepers:
            try:
                await keeper.wait(timeout)
            except ModelNetError as exc:
                log.warning("no relay slot on %s: %s", keeper.relay_addr, exc.message)
    if not circuits:
        log.warning("this peer cannot be dialed and holds no relay slot; others cannot reach it")
    return circuits

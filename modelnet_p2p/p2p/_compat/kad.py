"""Workarounds of py-libp2p 0.8.1 Kademlia (``libp2p.kad_dht``) behaviour; used only by :mod:`..kad`.

Each shim corrects one upstream behaviour, and ``tests/test_compat_kad.py`` holds a canary
per shim that fails once upstream changes that behaviour:

- :class:`KadHostView` / :class:`_PeerstoreView`: ``KadDHT`` ignores ``protocol_prefix`` and
  always speaks ``/ipfs/kad/1.0.0`` (the public IPFS DHT's protocol id, copied into five
  modules at import time); its routing table admits a peer only if identify listed
  ``/ipfs/kad/1.0.0`` for it. The view maps that id to ours wherever it meets the host.
  Its inbound handler is guarded (:func:`.host.guard_handler`).
- :class:`MeshProviderStore`: ``ProviderStore`` keeps provider records 48 h (a module
  constant), ignores any new provider once 20 are stored for a key, and believes every
  record (made-up providers fill a key); here records are checked and ranked.
- :class:`MeshValueStore`: ``ValueStore`` keeps 50 000 remote values of up to 1 MiB.
- :func:`drop_default_validators`: ``KadDHT`` always validates (and so stores) ``/pk/``
  and ``/ipns/`` values, even with ``strict_validation``.
- :class:`InboundGuard` / :class:`GuardedStream` (in :mod:`.kad_inbound`): ``handle_stream``
  resets every stream past 12 and reads without a timeout (idle streams block every
  lookup), and no request type but ADD_PROVIDER is rate-limited.
- :class:`MeshKadDHT`: ``KadDHT`` adds the sender of every inbound DHT stream to its routing
  table unchecked (client-mode peers end up handed out as "closer peers"); its routing-table
  refresh runs a lookup per non-empty bucket; the ADD_PROVIDER rate limit (10 per 10 s) is
  a private attribute with no constructor parameter.
- :func:`store_value`: ``ValueStore.put`` marks every local put for py-libp2p's own 22-hour
  republish, which would re-send a card after we stopped announcing it.
- :func:`refuse_streams`: the DHT's stream handler stays registered after the service
  stops, and removing a handler races multistream-select (``KeyError`` inside the swarm).
- :meth:`KadHostView.new_stream` waits out a connection the swarm is still closing: while
  ``SwarmConn.close()`` runs (after a dial was cancelled half-way, for one), the closed
  connection stays registered, and ``Swarm.new_stream`` fails at once with "No valid
  connections available" instead of dialing again, so a live peer looks unreachable.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as IPFS_KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import NamespacedValidator

from .host import guard_handler, retire_stream_handler
from .kad_inbound import (
    GuardedStream,
    InboundGuard,
    InboundLimitError,
    InboundLimits,
    TokenBuckets,
)
from .multistream import open_optimistic

__all__ = [
    "CLOSING_WAIT",
    "IPFS_KAD_PROTOCOL_ID",
    "GuardedStream",
    "InboundGuard",
    "InboundLimitError",
    "InboundLimits",
    "KadHostView",
    "MeshKadDHT",
    "MeshProviderStore",
    "MeshValueStore",
    "TokenBuckets",
    "Verdict",
    "closing_only",
    "drop_default_validators",
    "refuse_streams",
    "store_value",
    "wait_out_closing",
]

log = logging.getLogger("modelnet_p2p.p2p.kad")


class _PeerstoreView:
    """The host's peerstore, except that ``get_protocols`` reports our DHT as ``/ipfs/kad/1.0.0``.

    Upstream: ``RoutingTable.add_peer`` admits a peer only if identify listed
    ``/ipfs/kad/1.0.0`` for it (it re-imports the constant). A peer serving only the real
    ``/ipfs/kad/1.0.0`` is not one of ours, so that id is removed from the answer.
    """

    def __init__(self, peerstore: Any, protocol: str) -> None:
        self._ps = peerstore
        self._protocol = protocol

    def get_protocols(self, peer_id: ID) -> list[str]:
        protocols = [str(p) for p in self._ps.get_protocols(peer_id)]
        out = [p for p in protocols if p != IPFS_KAD_PROTOCOL_ID]
        if self._protocol in protocols:
            out.append(str(IPFS_KAD_PROTOCOL_ID))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ps, name)


class KadHostView:
    """A view of a host through which a ``KadDHT`` speaks ``protocol`` instead of ``/ipfs/kad/1.0.0``.

    Upstream: ``KadDHT`` stores ``protocol_prefix`` but never uses it; every module of
    ``libp2p.kad_dht`` passes the constant ``/ipfs/kad/1.0.0`` to the host. Each use goes
    through the host, so this view rewrites it there: handler registration, outbound
    streams, and the routing table's identify check. It counts outbound DHT streams
    (:attr:`requests`) and guards the inbound handler (:func:`.host.guard_handler`).
    """

    def __init__(self, host: IHost, protocol: str) -> None:
        self._host = host
        self.protocol = TProtocol(protocol)
        self._peerstore = _PeerstoreView(host.get_peerstore(), protocol)
        #: Outbound DHT streams opened so far (one per request).
        self.requests = 0

    def _map(self, protocol: TProtocol) -> TProtocol:
        return self.protocol if protocol == IPFS_KAD_PROTOCOL_ID else protocol

    async def new_stream(self, peer_id: ID, protocol_ids: Sequence[TProtocol]) -> INetStream:
        mapped = [self._map(p) for p in protocol_ids]
        if self.protocol in mapped:
            self.requests += 1
        await wait_out_closing(self._host, peer_id)
        return await self._host.new_stream(peer_id, mapped)

    async def new_request_stream(self, peer_id: ID) -> INetStream:
        """A stream for one request of ours, its protocol proposed without waiting
        (:mod:`.multistream`: the first read checks the answer)."""
        self.requests += 1
        await wait_out_closing(self._host, peer_id)
        return await open_optimistic(self._host, peer_id, self.protocol)

    def set_stream_handler(
        self, protocol_id: TProtocol, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        self._host.set_stream_handler(self._map(protocol_id), guard_handler(handler, "DHT handler"))

    def retire_stream_handler(self) -> None:
        """Reset every further stream on our DHT protocol (see :func:`refuse_streams`)."""
        retire_stream_handler(self._host, self.protocol)

    def remove_stream_handler(self, protocol_id: TProtocol) -> None:
        self._host.remove_stream_handler(self._map(protocol_id))

    def get_peerstore(self) -> Any:
        return self._peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


#: Seconds a stream waits for the swarm to finish closing a peer's connections, at most.
CLOSING_WAIT = 2.0
#: Seconds between two looks at a closing connection.
CLOSING_POLL = 0.01


def closing_only(host: IHost, peer_id: ID) -> bool:
    """True if the swarm holds connections to ``peer_id`` and every one of them is closed."""
    conns = host.get_network().get_connections(peer_id)
    return bool(conns) and all(c.is_closed for c in conns)


async def wait_out_closing(host: IHost, peer_id: ID, limit: float = CLOSING_WAIT) -> None:
    """Wait (at most ``limit`` seconds) until the swarm no longer holds only closed
    connections to ``peer_id``, so that ``new_stream`` dials again.

    Upstream: ``SwarmConn.close()`` marks the connection closed first and removes it from
    the swarm only after the muxer has closed (about 0.1 s on loopback, longer on a busy
    machine); meanwhile ``Swarm.new_stream`` raises "No valid connections available".
    """
    with trio.move_on_after(limit):
        while closing_only(host, peer_id):
            await trio.sleep(CLOSING_POLL)


#: Provider records waiting for verification, at most (the oldest queued are forgotten).
VERIFY_QUEUE = 1024
#: Unchecked records one answer lists at most (the newest), and only this many s after they arrived.
MAX_PENDING_ANSWERED, PENDING_ANSWERED = 4, 5.0
#: A record's check: True (its card verifies and lists the key), False (refuted), None (no verdict).
Verdict = bool | None


class MeshProviderStore(ProviderStore):
    """``ProviderStore`` with a per-instance record TTL, a per-key cap that prefers verified
    providers, and an injected wall clock.

    Upstream: records live ``PROVIDER_RECORD_EXPIRATION_INTERVAL`` (48 h, a module constant),
    and ``add_provider`` ignores every new provider of a key once ``BUCKET_SIZE`` (20) are
    stored, so the first providers of a key (real or made up) keep it. Here a full key
    first drops its expired records, then evicts its oldest refuted record, then its
    oldest unverified one; verified records are never evicted for unverified ones.

    With a ``verifier`` (:meth:`start_verifying`), every record that arrives from the network
    is checked, newest first, ``concurrency`` at a time (so a flood of fake records neither
    delays a new real one nor evicts it before it is checked; records being checked are
    never evicted). Answers (:meth:`get_providers`) list the verified records first, then a
    few new unchecked ones, then those checked without a verdict (newest first); refuted
    ones never. A record sent again is checked again; local ones (:meth:`add_verified`) not.
    """

    def __init__(
        self,
        host: Any,
        peer_routing: Any,
        ttl: float,
        max_per_key: int,
        wall_clock: Callable[[], float],
    ) -> None:
        super().__init__(host=host, peer_routing=peer_routing)
        self.ttl = ttl
        self.max_per_key = max_per_key
        self.wall_clock = wall_clock
        #: Per key, the verdict of each provider's record that has been checked.
        self.verdicts: dict[bytes, dict[str, Verdict]] = {}
        self.verifier: Callable[[bytes, PeerInfo], Awaitable[Verdict]] | None = None
        self._queue: deque[tuple[bytes, str]] = deque(maxlen=VERIFY_QUEUE)
        self._checking: set[tuple[bytes, str]] = set()
        self._ready = trio.Event()
        self._waiters: dict[tuple[bytes, str], trio.Event] = {}
        #: Records refuted, and records evicted for newer ones.
        self.rejected = 0
        self.evicted = 0

    def start_verifying(
        self,
        nursery: trio.Nursery,
        verifier: Callable[[bytes, PeerInfo], Awaitable[Verdict]],
        concurrency: int,
    ) -> None:
        """Check every record that arrives from now on with ``verifier``."""
        self.verifier = verifier
        for _ in range(concurrency):
            nursery.start_soon(self._verify_loop)

    def verdict(self, key: bytes, pid: str) -> Verdict:
        return self.verdicts.get(key, {}).get(pid)

    def is_verified(self, key: bytes, pid: str) -> bool:
        return self.verdict(key, pid) is True

    async def wait_checked(self, key: bytes, pid: str, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) for the check of ``pid``'s record of ``key``; False if
        refuted, or if the store did not keep it (a full key)."""
        if pid not in self.providers.get(key, {}):
            return False
        checked = pid in self.verdicts.get(key, {})
        if self.verifier is not None and not checked and len(self._waiters) < VERIFY_QUEUE:
            event = self._waiters.setdefault((key, pid), trio.Event())
            with trio.move_on_after(timeout):
                await event.wait()
        return self.verdict(key, pid) is not False

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        """A record from the network: checked (verified at once if there is no verifier)."""
        pid = str(provider.peer_id)
        if not self._store(key, provider):
            return
        if self.verifier is None:
            self.verdicts.setdefault(key, {})[pid] = True
        elif not self.is_verified(key, pid):
            self.verdicts.get(key, {}).pop(pid, None)  # sent again: checked again
            self._queue.append((key, pid))
            self._ready.set()

    def add_verified(self, key: bytes, provider: PeerInfo) -> None:
        """A record this peer vouches for itself (its own, or one it checked)."""
        if self._store(key, provider):
            self.verdicts.setdefault(key, {})[str(provider.peer_id)] = True

    def _store(self, key: bytes, provider: PeerInfo) -> bool:
        records = self.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in records and len(records) >= self.max_per_key:
            self._drop_expired(key)
            records = self.providers.setdefault(key, {})
            if len(records) >= self.max_per_key:
                victim = self._evictable(key, records)
                if victim is None:
                    return False
                del records[victim]
                self.verdicts.get(key, {}).pop(victim, None)
                self.evicted += 1
        records[pid] = ProviderRecord(provider_info=provider, timestamp=self.wall_clock())
        return True

    def _evictable(self, key: bytes, records: dict[str, ProviderRecord]) -> str | None:
        """The oldest refuted record of ``key``, else its oldest unverified one not being checked."""
        verdicts = self.verdicts.get(key, {})
        candidates = [
            (verdicts.get(p) is not False, r.timestamp, p)
            for p, r in records.items()
            if verdicts.get(p) is not True and (key, p) not in self._checking
        ]
        return min(candidates)[2] if candidates else None

    async def _verify_loop(self) -> None:
        while True:
            while not self._queue:
                if self._ready.is_set():
                    self._ready = trio.Event()
                await self._ready.wait()
            key, pid = self._queue.pop()  # newest first
            record = self.providers.get(key, {}).get(pid)
            if record is None or pid in self.verdicts.get(key, {}) or (key, pid) in self._checking:
                continue
            assert self.verifier is not None
            self._checking.add((key, pid))
            verdict: Verdict = None
            try:
                verdict = await self.verifier(key, record.provider_info)
            except Exception as exc:  # a verifier bug must not stop verifying
                log.debug("verifying provider %s failed: %r", pid, exc)
            finally:
                self._checking.discard((key, pid))
            if pid in self.providers.get(key, {}):
                self.verdicts.setdefault(key, {})[pid] = verdict
                self.rejected += verdict is False
            waiter = self._waiters.pop((key, pid), None)
            if waiter is not None:
                waiter.set()

    def _drop_expired(self, key: bytes) -> None:
        records = self.providers.get(key, {})
        cutoff = self.wall_clock() - self.ttl
        for pid in [p for p, r in records.items() if r.timestamp < cutoff]:
            del records[pid]
        verdicts = self.verdicts.get(key, {})
        for pid in [p for p in verdicts if p not in records]:
            del verdicts[pid]
        if not records:
            self.providers.pop(key, None)
            self.verdicts.pop(key, None)

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        """The providers of ``key`` answered: verified ones, then those checked without a verdict
        (newest first); never refuted ones."""
        self._drop_expired(key)
        records = self.providers.get(key, {})
        verdicts = self.verdicts.get(key, {})
        verified = [r for p, r in records.items() if verdicts.get(p) is True]
        young = self.wall_clock() - PENDING_ANSWERED  # unchecked: a few, while they are new
        pending = [r for p, r in records.items() if p not in verdicts and r.timestamp >= young]
        verified += sorted(pending, key=lambda r: -r.timestamp)[:MAX_PENDING_ANSWERED]
        unsure = sorted(
            (r for p, r in records.items() if p in verdicts and verdicts[p] is None),
            key=lambda r: -r.timestamp,
        )
        return [PeerInfo(r.peer_id, r.addresses) for r in [*verified, *unsure]]

    def cleanup_expired(self) -> None:
        for key in list(self.providers):
            self._drop_expired(key)

    def clear(self) -> None:
        self.providers.clear()
        self.verdicts.clear()
        self._queue.clear()


class MeshValueStore(ValueStore):
    """``ValueStore`` with a total budget.

    Upstream: a remote ``PUT_VALUE`` is stored for 24 h up to ``MAX_VALUE_STORE_SIZE``
    (50 000) entries of up to ``MAX_RECORD_SIZE`` (1 MiB) each, and the oldest entry is
    evicted for a new one. Here a new key is refused (the PUT is reset) once ``max_values``
    values or ``max_bytes`` bytes of values are stored; local puts are not limited.
    """

    def __init__(self, host: Any, local_peer_id: ID, *, max_values: int, max_bytes: int) -> None:
        super().__init__(host=host, local_peer_id=local_peer_id)
        self.max_values = max_values
        self.max_bytes = max_bytes
        #: Remote PUT_VALUEs refused for the budget.
        self.refused = 0

    def stored_bytes(self) -> int:
        return sum(len(record.value) for record, _validity in self.store.values())

    def put_record(self, key: bytes, record: Record) -> None:
        if key not in self.store and (
            len(self.store) >= self.max_values or self.stored_bytes() + len(record.value) > self.max_bytes
        ):
            self.refused += 1
            raise ValueError("the DHT value store is full")
        super().put_record(key, record)


class MeshKadDHT(KadDHT):
    """``KadDHT`` with our stores, our inbound guard, our refresh, and identify-checked routing.

    Upstream: ``_do_handle_stream`` calls ``add_peer(sender, skip_server_mode_check=True)``
    for every inbound stream, so client-mode peers end up in routing tables and every
    lookup that reaches them fails with "protocol not supported". ``refresh_routing_table``
    runs a lookup of up to 20 rounds per non-empty bucket (tens of seconds of CPU in a
    fresh mesh of 20). ``_provider_rate_max`` (10 ADD_PROVIDER per 10 s, no parameter)
    drops most of a card's up to 64 provider records.
    """

    def __init__(
        self,
        view: KadHostView,
        server: bool,
        *,
        deferred: trio.Nursery,
        provider_ttl: float,
        max_providers_per_key: int,
        add_provider_rate: int,
        inbound: InboundLimits,
        max_values: int,
        max_value_bytes: int,
        identify_wait: float,
        wall_clock: Callable[[], float],
    ) -> None:
        # strict_validation: a value in a namespace without a validator is refused (py-libp2p's
        # default stores any such value for 24 h).
        mode = DHTMode.SERVER if server else DHTMode.CLIENT
        super().__init__(cast(IHost, view), mode, strict_validation=True)
        drop_default_validators(self)
        self.providers = MeshProviderStore(
            view, self.peer_routing, provider_ttl, max_providers_per_key, wall_clock
        )
        self.values = MeshValueStore(
            view, self.local_peer_id, max_values=max_values, max_bytes=max_value_bytes
        )
        self.provider_store = self.providers
        self.value_store = self.values
        self._provider_rate_max = add_provider_rate
        self.guard = InboundGuard(inbound, lambda key: key in self.values.store, self.providers.wait_checked)
        self.deferred = deferred
        self.identify_wait = identify_wait
        self.pending: set[ID] = set()
        #: Replaces py-libp2p's routing-table refresh (None: py-libp2p's own).
        self.refresher: Callable[[], Awaitable[None]] | None = None

    async def handle_stream(self, stream: INetStream) -> None:
        """Upstream's handler behind :class:`InboundGuard` (deadlines, per-peer bounds, rates)."""
        if self.mode == DHTMode.CLIENT:
            await stream.close()
            return
        await self.guard.handle(stream, self._do_handle_stream)

    async def refresh_routing_table(self) -> None:
        if self.refresher is not None:
            await self.refresher()
        else:
            await super().refresh_routing_table()

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if not skip_server_mode_check:
            return await super().add_peer(peer_id)
        serves = self.serves_dht(peer_id)
        if serves:
            return await super().add_peer(peer_id, skip_server_mode_check=True)
        if serves is None and peer_id not in self.pending:
            self.pending.add(peer_id)
            self.deferred.start_soon(self._add_after_identify, peer_id)
        return False

    def serves_dht(self, peer_id: ID) -> bool | None:
        """True/False once identify has listed the peer's protocols, None before."""
        try:
            protocols = self.host.get_peerstore().get_protocols(peer_id)
        except Exception:
            return None
        if not protocols:
            return None
        return str(IPFS_KAD_PROTOCOL_ID) in protocols  # the view reports ours under this id

    async def _add_after_identify(self, peer_id: ID) -> None:
        try:
            with trio.move_on_after(self.identify_wait):
                while (serves := self.serves_dht(peer_id)) is None:
                    await trio.sleep(0.05)
                if serves:
                    await super().add_peer(peer_id, skip_server_mode_check=True)
        except Exception as exc:  # never let the routing table crash the peer
            log.debug("adding %s to the routing table failed: %r", peer_id, exc)
        finally:
            self.pending.discard(peer_id)


#: The namespaces py-libp2p validates (and so stores) by default besides ours.
DEFAULT_NAMESPACES = ("pk", "ipns")


def drop_default_validators(dht: KadDHT) -> None:
    """Store values of registered namespaces only.

    Upstream: ``KadDHT`` registers validators for ``/pk/`` and ``/ipns/`` whatever the
    caller asks, so even with ``strict_validation`` a ``/pk/`` value (a public key in a
    protobuf that may carry any unknown field) is stored for 24 h: 200 values of 900 kB
    added 208 MB to a server.
    """
    validator = dht.validator
    if isinstance(validator, NamespacedValidator):
        for ns in DEFAULT_NAMESPACES:
            validator._validators.pop(ns, None)
    dht.validator_changed = True  # apply_fallbacks() must not put them back


def store_value(dht: KadDHT, key: bytes, value: bytes, validity: float) -> None:
    """Store ``value`` in the local value store without py-libp2p's republish.

    Upstream: ``ValueStore.put`` adds every key it stores to ``local_keys``, which the
    maintenance loop republishes every 22 h; we re-announce on our own schedule, and a
    card we stopped announcing must not be sent again.
    """
    dht.value_store.put(key, value, validity=validity)
    dht.value_store.local_keys.discard(key)


def refuse_streams(view: KadHostView) -> None:
    """Make a stopped DHT answer nothing: every further stream on its protocol is reset.

    Upstream: ``KadDHT`` leaves its stream handler registered after the service stops, so
    a stopped peer would go on answering. Removing the handler is not safe either (see
    :func:`.host.retire_stream_handler`); the host's close removes the refusing handler.
    """
    view.retire_stream_handler()

"""Workarounds of py-libp2p 0.8.1 Kademlia (``libp2p.kad_dht``) behaviour; used only by :mod:`..kad`.

Each shim corrects one upstream behaviour, and ``tests/test_compat_kad.py`` holds a canary
per shim that fails once upstream changes that behaviour:

- :class:`KadHostView` / :class:`_PeerstoreView`: ``KadDHT`` ignores ``protocol_prefix`` and
  always speaks ``/ipfs/kad/1.0.0`` (the public IPFS DHT's protocol id, copied into five
  modules at import time); its routing table admits a peer only if identify listed
  ``/ipfs/kad/1.0.0`` for it. The view maps that id to ours wherever it meets the host.
  Its inbound handler is guarded (:func:`.host.guard_handler`).
- :class:`MeshProviderStore`: ``ProviderStore`` keeps provider records 48 h (a module
  constant) and ignores any new provider once 20 are stored for a key.
- :class:`MeshKadDHT`: ``KadDHT`` adds the sender of every inbound DHT stream to its routing
  table unchecked (client-mode peers end up handed out as "closer peers"); its routing-table
  refresh runs a lookup per non-empty bucket; the ADD_PROVIDER rate limit (10 per 10 s) and
  the inbound stream cap (12) are private attributes with no constructor parameter.
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
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as IPFS_KAD_PROTOCOL_ID
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from .host import guard_handler, retire_stream_handler

__all__ = [
    "CLOSING_WAIT",
    "IPFS_KAD_PROTOCOL_ID",
    "KadHostView",
    "MeshKadDHT",
    "MeshProviderStore",
    "closing_only",
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


class MeshProviderStore(ProviderStore):
    """``ProviderStore`` with a per-instance record TTL, a per-key cap, and an injected wall clock.

    Upstream: records live ``PROVIDER_RECORD_EXPIRATION_INTERVAL`` (48 h, a module constant),
    and ``add_provider`` ignores every new provider of a key once ``BUCKET_SIZE`` (20) are
    stored, so a popular task would keep its first 20 providers and lose the rest. Here a
    full key first drops its expired records.
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

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        records = self.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in records and len(records) >= self.max_per_key:
            self._drop_expired(key)
            records = self.providers.setdefault(key, {})
            if len(records) >= self.max_per_key:
                return
        records[pid] = ProviderRecord(provider_info=provider, timestamp=self.wall_clock())

    def _drop_expired(self, key: bytes) -> None:
        records = self.providers.get(key, {})
        cutoff = self.wall_clock() - self.ttl
        for pid in [p for p, r in records.items() if r.timestamp < cutoff]:
            del records[pid]
        if not records:
            self.providers.pop(key, None)

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        self._drop_expired(key)
        return [PeerInfo(r.peer_id, r.addresses) for r in self.providers.get(key, {}).values()]

    def cleanup_expired(self) -> None:
        for key in list(self.providers):
            self._drop_expired(key)


class MeshKadDHT(KadDHT):
    """``KadDHT`` that admits an inbound sender to its routing table only once identify shows
    that the sender serves the DHT, whose routing-table refresh is ours, and whose private
    limits are set from parameters.

    Upstream: ``_do_handle_stream`` calls ``add_peer(sender, skip_server_mode_check=True)``
    for every inbound stream, so client-mode peers end up in routing tables, are handed out
    as "closer peers", and every lookup that reaches them fails with "protocol not
    supported". ``refresh_routing_table`` runs a lookup of up to 20 rounds per non-empty
    bucket (a fresh mesh of 20 spent tens of seconds of CPU at start). The ADD_PROVIDER
    rate limit (``_provider_rate_max`` = 10 per 10 s) drops most of a card's up to 64
    provider records, and the inbound stream cap (``_inbound_limiter``, 12) resets the
    streams of a mesh bootstrapping from one peer; neither has a constructor parameter.
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
        max_inbound_streams: int,
        identify_wait: float,
        wall_clock: Callable[[], float],
    ) -> None:
        # strict_validation: a value in a namespace without a validator is refused (py-libp2p's
        # default stores any such value for 24 h).
        mode = DHTMode.SERVER if server else DHTMode.CLIENT
        super().__init__(cast(IHost, view), mode, strict_validation=True)
        self.provider_store = MeshProviderStore(
            view, self.peer_routing, provider_ttl, max_providers_per_key, wall_clock
        )
        self._provider_rate_max = add_provider_rate
        self._inbound_limiter = trio.CapacityLimiter(max_inbound_streams)
        self.deferred = deferred
        self.identify_wait = identify_wait
        self.pending: set[ID] = set()
        #: Replaces py-libp2p's routing-table refresh (None: py-libp2p's own).
        self.refresher: Callable[[], Awaitable[None]] | None = None

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

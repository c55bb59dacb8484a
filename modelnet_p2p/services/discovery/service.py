"""Capability discovery over a Kademlia DHT of our own (see ``specs/capability.md``).

A peer announces a signed :class:`~modelnet_p2p.proto.card.CapabilityCard`:
the card itself is stored as a DHT value under ``/modelnet-card/<peer id>``,
and provider records point from a key per task, model, model+version and tag
to the peer. Another peer finds the providers of a key with an iterative
GET_PROVIDERS lookup, then fetches and verifies each provider's card.

py-libp2p 0.8.1's ``KadDHT`` serves the protocol (routing table, record
stores, the inbound handler); the lookups and announcements are done here,
because the library's own

- always speak ``/ipfs/kad/1.0.0`` (``protocol_prefix`` is ignored), which
  would write our records into the public IPFS DHT;
- return early from the local store (``find_providers``, ``get_value``),
  return duplicates, and treat a provider list as complete once ``count``
  entries (duplicates included) have arrived;
- look up value keys with FIND_NODE, which py-libp2p servers reject for keys
  that are not multihashes and longer than 50 bytes (ours are ~67 bytes);
- keep provider records for 48 h and values for 24 h (module constants).

So this module talks to the DHT through :class:`KadHostView`, a per-instance
view of the host that maps the hard-coded protocol id to ours, replaces the
provider store with one whose TTL and per-key cap are per instance, only lets
peers that serve the DHT into the routing table, and does every lookup itself
against the network (never the local store), de-duplicating by peer id.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.common import PROTOCOL_ID as IPFS_KAD_PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.kad_dht.provider_store import ProviderRecord, ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service.trio_manager import TrioManager
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from ...errors import ConfigError, ProtocolError
from ...p2p.identity import Identity
from ...proto.capability import Capability
from ...proto.card import (
    MIN_TTL_MS,
    VALUE_NAMESPACE,
    CapabilityCard,
    card_keys,
    model_key,
    model_version_key,
    open_card,
    peer_of_value_key,
    seal,
    select_card,
    tag_key,
    task_key,
    value_key,
)
from ...proto.framing import encode_varint

__all__ = [
    "DEFAULT_ANNOUNCE_INTERVAL",
    "DEFAULT_CARD_TTL",
    "DHT_PROTOCOL_ID",
    "CardValidator",
    "Discovery",
    "KadHostView",
    "Query",
]

log = logging.getLogger(__name__)

#: The mesh's own Kademlia protocol id: same wire format as ``/ipfs/kad/1.0.0``,
#: but peers of the public IPFS DHT neither answer nor store our records.
DHT_PROTOCOL_ID = "/modelnet/kad/1.0.0"
#: Seconds a card stays valid. Models come and go in minutes, not days (IPFS:
#: 48 h provider records); a departed peer vanishes from discovery this long
#: after its last announce at the latest.
DEFAULT_CARD_TTL = 300.0
#: Seconds between re-announces. Less than half the TTL, so one failed
#: announce does not let a live peer's card expire.
DEFAULT_ANNOUNCE_INTERVAL = 120.0
#: Kademlia's k: records are stored on, and lookups converge to, the k closest peers.
K = 20
#: Requests in flight per lookup (the libp2p spec's alpha is 3; py-libp2p uses 10,
#: and on a LAN or loopback mesh more parallelism is mostly free).
ALPHA = 10
#: Seconds allowed for one DHT request, dial included.
RPC_TIMEOUT = 5.0
#: Largest DHT response read, in bytes: a GET_PROVIDERS answer lists at most
#: MAX_PROVIDERS_PER_KEY providers and k closer peers; a GET_VALUE answer holds one card.
MAX_RESPONSE_SIZE = 1 << 20
#: Providers a server keeps per key. py-libp2p keeps 20 (k) and ignores any
#: newer provider once 20 are stored, so a popular task would lose providers.
MAX_PROVIDERS_PER_KEY = 256
#: ADD_PROVIDER messages a server accepts per sender per 10 s. A card derives
#: up to MAX_PROVIDER_KEYS (64) keys; py-libp2p's default of 10 drops most of them.
ADD_PROVIDER_RATE = 256
#: Inbound DHT streams a server handles at once (py-libp2p: 12, and it resets
#: the rest). Peers of a fresh mesh bootstrapping from one peer exceed 12.
MAX_INBOUND_STREAMS = 32
#: Seconds a peer that opened a DHT stream to us may take to complete identify
#: before we decide whether it serves the DHT (and belongs in the routing table).
IDENTIFY_WAIT = 5.0
#: Card fetches in flight during one discovery.
CARD_FETCH_CONCURRENCY = 16
#: Providers one discovery fetches cards of, at most: bounds what answers that
#: list made-up providers can make a discoverer do.
MAX_PROVIDERS_PER_LOOKUP = 1024
#: Seconds that addresses learned from DHT answers stay in the peerstore.
ADDR_TTL = 600

DhtModeName = Literal["auto", "server", "client"]


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- the DHT on our own protocol id -----------------------------------------------


class _PeerstoreView:
    """The host's peerstore, except that ``get_protocols`` reports our DHT as ``/ipfs/kad``.

    py-libp2p's routing table admits a peer only if identify listed
    ``/ipfs/kad/1.0.0`` for it (``routing_table.add_peer`` re-imports the
    constant). A peer serving only the real ``/ipfs/kad`` is not one of ours,
    so that id is removed from the answer.
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

    py-libp2p copies its protocol id into five modules at import time, so it
    cannot be changed per instance; every use goes through the host, though,
    and this view rewrites it there (handler registration, outbound streams,
    the routing table's identify check). It also counts outbound DHT requests
    (:attr:`requests`) and guards the inbound handler so that no exception from
    remote input reaches the host (which would stop it).
    """

    def __init__(self, host: IHost, protocol: str = DHT_PROTOCOL_ID) -> None:
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
        return await self._host.new_stream(peer_id, mapped)

    def set_stream_handler(
        self, protocol_id: TProtocol, handler: Callable[[INetStream], Awaitable[None]]
    ) -> None:
        async def guarded(stream: INetStream) -> None:
            try:
                await handler(stream)
            except Exception as exc:
                log.debug("DHT handler failed on input from %s: %r", _remote(stream), exc)
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await stream.reset()
                    except Exception:
                        pass

        self._host.set_stream_handler(self._map(protocol_id), guarded)

    def remove_stream_handler(self, protocol_id: TProtocol) -> None:
        self._host.remove_stream_handler(self._map(protocol_id))

    def get_peerstore(self) -> Any:
        return self._peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)


def _remote(stream: INetStream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except Exception:
        return "?"


class _ProviderStore(ProviderStore):
    """py-libp2p's provider store with a per-instance record TTL and per-key cap."""

    def __init__(self, host: Any, peer_routing: Any, ttl: float, max_per_key: int) -> None:
        super().__init__(host=host, peer_routing=peer_routing)
        self.ttl = ttl
        self.max_per_key = max_per_key

    def add_provider(self, key: bytes, provider: PeerInfo) -> None:
        records = self.providers.setdefault(key, {})
        pid = str(provider.peer_id)
        if pid not in records and len(records) >= self.max_per_key:
            self._drop_expired(key)
            if len(records) >= self.max_per_key:
                return
        records[pid] = ProviderRecord(provider_info=provider, timestamp=time.time())

    def _drop_expired(self, key: bytes) -> None:
        records = self.providers.get(key, {})
        cutoff = time.time() - self.ttl
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


class _MeshKadDHT(KadDHT):
    """``KadDHT`` that adds the sender of an inbound DHT stream to its routing
    table only once identify shows that the sender serves the DHT itself, and
    whose routing-table refresh is a single lookup of its own id.

    py-libp2p adds every inbound sender unchecked, so client-mode peers end up
    in routing tables, are handed out as "closer peers", and every lookup that
    reaches them fails with "protocol not supported".
    """

    deferred: trio.Nursery | None = None
    _pending: set[ID]
    #: Replaces py-libp2p's routing-table refresh (see :meth:`Discovery.refresh`).
    refresher: Callable[[], Awaitable[None]] | None = None

    async def refresh_routing_table(self) -> None:
        if self.refresher is not None:
            await self.refresher()
        else:
            await super().refresh_routing_table()

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        if not skip_server_mode_check:
            return await super().add_peer(peer_id)
        serves = self._serves_dht(peer_id)
        if serves:
            return await super().add_peer(peer_id, skip_server_mode_check=True)
        if serves is None and self.deferred is not None and peer_id not in self._pending:
            self._pending.add(peer_id)
            self.deferred.start_soon(self._add_after_identify, peer_id)
        return False

    def _serves_dht(self, peer_id: ID) -> bool | None:
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
            with trio.move_on_after(IDENTIFY_WAIT):
                while (serves := self._serves_dht(peer_id)) is None:
                    await trio.sleep(0.05)
                if serves:
                    await super().add_peer(peer_id, skip_server_mode_check=True)
        except Exception as exc:  # never let the routing table crash the peer
            log.debug("adding %s to the routing table failed: %r", peer_id, exc)
        finally:
            self._pending.discard(peer_id)


class CardValidator(Validator):
    """DHT validator of the ``modelnet-card`` namespace.

    ``validate`` accepts only a card that is well formed, signed by the peer
    its key names, within the size limits, and not expired. ``select`` returns
    the index of the best card by :func:`~modelnet_p2p.proto.card.select_card`
    (highest ``seq``). py-libp2p calls ``select(key, [new, old])`` on a local
    put and ``select(key, [existing, new])`` on a remote PUT, so only a choice
    that depends on the values and not on their positions is right on both paths.
    """

    def validate(self, key: str, value: bytes) -> None:
        try:
            owner = peer_of_value_key(key)
            card = open_card(value, now_ms=_now_ms())
            if card.peer_id != owner:
                raise ProtocolError(f"card of {card.peer_id} stored under the key of {owner}")
        except ProtocolError as exc:
            log.info("rejected card for %s: %s", key[:80], exc.message)
            raise ValueError(f"invalid capability card: {exc.message}") from None

    def select(self, key: str, values: list[bytes]) -> int:
        return select_card(values, _now_ms())


# -- queries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """What :meth:`Discovery.find` looks for; every given criterion must match one capability."""

    task: str | None = None
    model: str | None = None
    version: str | None = None
    tags: tuple[str, ...] = ()

    def key(self) -> tuple[str, bytes]:
        """The one provider key looked up: the most specific criterion given."""
        if self.model is not None and self.version is not None:
            return f"model-version:{self.model}@{self.version}", model_version_key(self.model, self.version)
        if self.model is not None:
            return f"model:{self.model}", model_key(self.model)
        if self.task is not None:
            return f"task:{self.task}", task_key(self.task)
        if self.tags:
            return f"tag:{self.tags[0]}", tag_key(self.tags[0])
        raise ValueError("give at least one of task, model or tags")

    def matches(self, card: CapabilityCard) -> bool:
        return bool(card.matching(task=self.task, model=self.model, version=self.version, tags=self.tags))


@dataclass
class AnnounceResult:
    """What one announce did: the card, and how many DHT servers were sent what."""

    card: CapabilityCard
    value_stored: int = 0
    provider_keys: int = 0
    provider_sends: int = 0


# -- the service -----------------------------------------------------------------------


class Discovery:
    """The discovery service of one peer: runs the DHT, announces the card, finds others.

    Args:
        identity: signs the card.
        capabilities: returns what the peer serves now (the card lists these).
        protocol: the DHT protocol id.
        mode: ``"server"`` answers DHT requests and stores records; ``"client"``
            only asks. ``"auto"``: server if the host listens on an address,
            else client.
        card_ttl: seconds a card (and a provider record on this server) stays valid.
        announce_interval: seconds between re-announces; less than ``card_ttl``.
        rpc_timeout: seconds allowed for one DHT request.
    """

    def __init__(
        self,
        identity: Identity,
        capabilities: Callable[[], list[Capability]],
        *,
        protocol: str = DHT_PROTOCOL_ID,
        mode: DhtModeName = "auto",
        card_ttl: float = DEFAULT_CARD_TTL,
        announce_interval: float = DEFAULT_ANNOUNCE_INTERVAL,
        rpc_timeout: float = RPC_TIMEOUT,
    ) -> None:
        if mode not in ("auto", "server", "client"):
            raise ValueError(f"dht_mode must be 'auto', 'server' or 'client', not {mode!r}")
        if not 1.0 <= card_ttl <= 86_400.0:
            raise ValueError("card_ttl must be between 1 s and 24 h")
        if not 0 < announce_interval < card_ttl:
            raise ValueError("announce_interval must be positive and shorter than card_ttl")
        self.identity = identity
        self._capabilities = capabilities
        self.protocol = protocol
        self.requested_mode: DhtModeName = mode
        #: Announce only the extra (relayed) addresses once there are any (private peers).
        self.relayed_only = False
        self.card_ttl = card_ttl
        self.announce_interval = announce_interval
        self.rpc_timeout = rpc_timeout
        #: Refresh the routing table right after bootstrapping (benchmarks turn it off).
        self.refresh_on_start = True
        #: Set once the first routing-table refresh after bootstrap is done.
        self.bootstrapped = trio.Event()
        self.mode: Literal["server", "client"] = "client"
        self.card: CapabilityCard | None = None
        self._host: IHost | None = None
        self._view: KadHostView | None = None
        self._dht: _MeshKadDHT | None = None
        self._manager: TrioManager | None = None
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._generation = 0  # bumped by changed()
        self._announced_generation = -1  # the generation the last card covered
        self._announce_lock = trio.Lock()
        self._seq = 0
        self._extra_addrs: list[str] = []

    # -- lifecycle ---------------------------------------------------------------

    @property
    def dht(self) -> KadDHT:
        """The py-libp2p DHT instance (only while running)."""
        if self._dht is None:
            raise RuntimeError("discovery is not running")
        return self._dht

    @property
    def view(self) -> KadHostView:
        if self._view is None:
            raise RuntimeError("discovery is not running")
        return self._view

    @property
    def requests_sent(self) -> int:
        """DHT requests this peer has sent (outbound streams on the DHT protocol)."""
        return self._view.requests if self._view is not None else 0

    async def start(self, host: IHost, nursery: trio.Nursery) -> None:
        """Create the DHT on ``host`` and run it in ``nursery``.

        Call before dialing anyone: identify tells each new contact which
        protocols we serve, and the DHT must be among them from the first connection.
        """
        server = self.requested_mode == "server" or (self.requested_mode == "auto" and bool(host.get_addrs()))
        self.mode = "server" if server else "client"
        view = KadHostView(host, self.protocol)
        dht = _MeshKadDHT(cast(IHost, view), DHTMode.SERVER if server else DHTMode.CLIENT)
        dht._pending = set()
        dht.deferred = nursery
        dht.refresher = self._periodic_refresh
        dht.provider_store = _ProviderStore(view, dht.peer_routing, self.card_ttl, MAX_PROVIDERS_PER_KEY)
        dht.register_validator(VALUE_NAMESPACE, CardValidator())
        dht._provider_rate_max = ADD_PROVIDER_RATE
        dht._inbound_limiter = trio.CapacityLimiter(MAX_INBOUND_STREAMS)
        self._host, self._view, self._dht, self._nursery = host, view, dht, nursery
        self._manager = TrioManager(dht)
        dht._manager = self._manager
        nursery.start_soon(self._run_dht)
        with trio.fail_after(10):
            await self._manager.wait_started()
        log.debug("DHT on %s in %s mode", self.protocol, self.mode)

    async def _run_dht(self) -> None:
        assert self._manager is not None
        try:
            await self._manager.run()
        except Exception as exc:  # the DHT failing must not take the peer down
            log.warning("the DHT service stopped: %r", exc)

    async def bootstrap(self, peer_ids: Sequence[ID]) -> None:
        """Add the connected bootstrap peers to the routing table, then start the
        background work: a routing-table refresh, the announcer, housekeeping."""
        dht = self.dht
        assert self._nursery is not None
        for pid in peer_ids:
            await dht.add_peer(pid)
        if self.refresh_on_start and peer_ids:
            self._nursery.start_soon(self._refresh)
        else:
            self.bootstrapped.set()
        self._nursery.start_soon(self._announcer)
        self._nursery.start_soon(self._housekeeping)

    async def _refresh(self) -> None:
        try:
            with trio.move_on_after(30):
                await self.refresh()
        except Exception as exc:
            log.debug("routing table refresh failed: %r", exc)
        finally:
            self.bootstrapped.set()

    async def _periodic_refresh(self) -> None:
        # py-libp2p's maintenance loop refreshes at start and every 10 minutes;
        # the join after bootstrapping (bootstrap()) is the first refresh.
        if self.bootstrapped.is_set():
            await self.refresh()

    async def refresh(self) -> None:
        """Fill the routing table with a lookup of this peer's own id (Kademlia's join).

        py-libp2p's refresh adds a lookup per non-empty bucket, each of up to
        20 rounds; with every new peer of a mesh doing that against the same
        bootstrap peer, a mesh of 20 peers spent tens of seconds of CPU at start.
        Lookups for other keys fill the far buckets as they happen.
        """
        await self._lookup(self.identity.peer_id.to_bytes(), Message.MessageType.FIND_NODE)

    def stop(self) -> None:
        """Stop answering DHT requests; the peer's nursery cancels the rest.

        py-libp2p leaves the DHT's stream handler registered after the service
        stops, so a stopped peer would go on answering. Removing the handler is
        not safe either: multistream-select checks that a protocol has a
        handler, awaits a write, then looks the handler up again, and a handler
        removed in between raises ``KeyError`` inside the swarm, which stops the
        host. So the handler is replaced by one that resets every stream; the
        host's close removes it with everything else.
        """
        if self._view is not None and self.mode == "server":
            self._view.set_stream_handler(IPFS_KAD_PROTOCOL_ID, _refuse)
        if self._manager is not None and self._manager.is_running:
            self._manager.cancel()

    # -- announcing ------------------------------------------------------------

    def changed(self) -> None:
        """The served capabilities changed: announce the new card soon."""
        self._generation += 1
        self._changed.set()

    async def _announcer(self) -> None:
        """Announce soon after each change, and every ``announce_interval``.

        An announce that reached no other peer (a peer alone, or its contacts
        not up yet) is retried after 1, 2, 4, ... seconds, up to the interval.
        A peer that stops serving everything announces one empty card, which
        replaces its last one everywhere, and then stays quiet.
        """
        next_due = trio.current_time() + self.announce_interval
        backoff = 1.0
        while True:
            with trio.move_on_at(next_due):
                await self._changed.wait()
            await trio.sleep(0.05)  # let a burst of serve() calls settle into one card
            self._changed = trio.Event()
            if trio.current_time() < next_due and self._announced_generation == self._generation:
                continue  # an explicit announce() already published this change
            interval = self.announce_interval
            if self._capabilities() or (self.card is not None and self.card.capabilities):
                try:
                    result = await self.announce()
                except Exception as exc:
                    log.warning("announcing the capability card failed: %r", exc)
                    result = None
                if result is not None and result.value_stored == 0 and result.provider_sends == 0:
                    interval, backoff = min(backoff, interval), min(backoff * 2, interval)
                else:
                    backoff = 1.0
            next_due = trio.current_time() + interval

    def set_extra_addrs(self, addrs: Sequence[str]) -> None:
        """Announce these addresses besides the listen addresses (and re-announce soon).

        For example the relayed address of a peer that cannot be dialed,
        ``<relay addr>/p2p/<relay id>/p2p-circuit`` (see ``specs/network.md``);
        a trailing ``/p2p/<own id>`` is dropped.
        """
        suffix = f"/p2p/{self.identity.peer_id}"
        self._extra_addrs = [str(a).removesuffix(suffix) for a in addrs]
        self.changed()

    def _own_addrs(self) -> list[str]:
        assert self._host is not None
        suffix = f"/p2p/{self.identity.peer_id}"
        listen = [str(a).removesuffix(suffix) for a in self._host.get_addrs()]
        if self.relayed_only and self._extra_addrs:
            # A peer others cannot dial announces only its relayed addresses:
            # its direct ones would make callers wait on dials that cannot succeed.
            listen = []
        return list(dict.fromkeys([*listen, *self._extra_addrs]))

    def check_capabilities(self, capabilities: Sequence[Capability]) -> None:
        """Raise :class:`ConfigError` if a card listing ``capabilities`` breaks a card limit."""
        draft = CapabilityCard(str(self.identity.peer_id), (), 0, 0, MIN_TTL_MS, tuple(capabilities))
        if len({c.name for c in capabilities}) != len(capabilities):
            raise ConfigError("two capabilities have the same name")
        try:
            seal(draft, self.identity)
        except ProtocolError as exc:
            raise ConfigError(f"cannot announce these capabilities: {exc.message}") from None

    def make_card(self) -> CapabilityCard:
        """A new signed card of what the peer serves now, with a higher ``seq``."""
        now = time.time()
        self._seq = max(self._seq + 1, int(now * 1_000_000))
        issued = int(now * 1000)
        card = CapabilityCard(
            peer_id=str(self.identity.peer_id),
            addrs=tuple(self._own_addrs()),
            seq=self._seq,
            issued_at=issued,
            expires_at=issued + int(self.card_ttl * 1000),
            capabilities=tuple(self._capabilities()),
        )
        return seal(card, self.identity)

    async def announce(self) -> AnnounceResult | None:
        """Publish a fresh card now: store it at the k closest peers and send provider records.

        Returns ``None`` (and announces nothing) if the peer has no address
        others could dial.
        """
        async with self._announce_lock:
            if not self._own_addrs():
                log.info("not announcing capabilities: this peer has no address others can dial")
                return None
            generation = self._generation
            card = self.make_card()
            self.card = card
            self._announced_generation = generation
            result = AnnounceResult(card)
            dht = self.dht
            vkey = value_key(card.peer_id).encode()
            dht.value_store.put(vkey, card.envelope, validity=card.expires_at / 1000)
            dht.value_store.local_keys.discard(vkey)  # we re-announce; py-libp2p must not republish
            me = PeerInfo(self.identity.peer_id, [multiaddr.Multiaddr(a) for a in card.addrs])
            keys = card_keys(card.capabilities)
            result.provider_keys = len(keys)
            for _label, key in keys:
                dht.provider_store.add_provider(key, me)

            async def put_card() -> None:
                msg = Message(type=Message.MessageType.PUT_VALUE, key=vkey)
                msg.record.key = vkey
                msg.record.value = card.envelope
                closest = await self._lookup(vkey, Message.MessageType.GET_VALUE)

                async def put(pid: ID) -> None:
                    if await self._request(pid, msg) is not None:
                        result.value_stored += 1

                async with trio.open_nursery() as n:
                    for pid in closest:
                        n.start_soon(put, pid)

            async def provide(key: bytes, limiter: trio.CapacityLimiter) -> None:
                async with limiter:
                    closest = await self._lookup(key, Message.MessageType.FIND_NODE)
                msg = Message(type=Message.MessageType.ADD_PROVIDER, key=key)
                peer = msg.providerPeers.add()
                peer.id = self.identity.peer_id.to_bytes()
                peer.addrs.extend(a.to_bytes() for a in me.addrs)

                async def send(pid: ID) -> None:
                    if await self._send(pid, msg):
                        result.provider_sends += 1

                async with trio.open_nursery() as n:
                    for pid in closest:
                        n.start_soon(send, pid)

            limiter = trio.CapacityLimiter(4)
            async with trio.open_nursery() as n:
                n.start_soon(put_card)
                for _label, key in keys:
                    n.start_soon(provide, key, limiter)
            log.debug(
                "announced card seq %d: stored at %d peers, %d keys, %d provider records sent",
                card.seq,
                result.value_stored,
                result.provider_keys,
                result.provider_sends,
            )
            return result

    async def _housekeeping(self) -> None:
        """Drop expired provider records and cards from this server's stores."""
        while True:
            await trio.sleep(min(self.announce_interval, 30.0))
            dht = self._dht
            if dht is None:
                return
            dht.provider_store.cleanup_expired()
            now = _now_ms()
            prefix = f"/{VALUE_NAMESPACE}/".encode()
            for key, (record, _validity) in list(dht.value_store.store.items()):
                if key.startswith(prefix):
                    try:
                        expired = open_card(record.value, verify=False).expired(now)
                    except ProtocolError:
                        expired = True
                    if expired:
                        dht.value_store.remove(key)

    # -- finding ---------------------------------------------------------------

    async def find(
        self,
        query: Query,
        send: trio.MemorySendChannel[CapabilityCard],
        *,
        limit: int | None = None,
    ) -> None:
        """Send every verified card matching ``query`` to ``send``, each peer once.

        The provider records come from the network only (never this peer's own
        store); each provider's card is asked of the provider itself first, then
        of the DHT. Stops after ``limit`` cards; the caller bounds the time.
        """
        label, key = query.key()
        seen: set[ID] = set()
        sent = 0
        me = self.identity.peer_id
        limiter = trio.CapacityLimiter(CARD_FETCH_CONCURRENCY)

        async with trio.open_nursery() as nursery:

            def deliver(card: CapabilityCard | None) -> None:
                nonlocal sent
                if card is None or not query.matches(card) or (limit is not None and sent >= limit):
                    return
                try:
                    send.send_nowait(card)  # the channel is unbounded: no checkpoint between check and count
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                    nursery.cancel_scope.cancel()  # nobody is listening any more
                    return
                sent += 1
                if limit is not None and sent >= limit:
                    nursery.cancel_scope.cancel()

            async def fetch(pid: ID, addrs: list[multiaddr.Multiaddr]) -> None:
                async with limiter:
                    card = await self.fetch_card(pid, addrs)
                deliver(card)

            def on_response(_peer: ID, resp: Message) -> None:
                for prov in resp.providerPeers[:MAX_PROVIDERS_PER_KEY]:
                    if len(seen) >= MAX_PROVIDERS_PER_LOOKUP:
                        return
                    try:
                        pid = ID(prov.id)
                        addrs = [multiaddr.Multiaddr(a) for a in prov.addrs]
                    except Exception:
                        continue
                    if pid in seen:
                        continue
                    seen.add(pid)
                    own = self.card
                    if pid != me:
                        nursery.start_soon(fetch, pid, addrs)
                    elif own is not None and not own.expired(_now_ms()):
                        deliver(own)

            await self._lookup(key, Message.MessageType.GET_PROVIDERS, on_response)
            log.debug("lookup of %s found %d providers", label, len(seen))

    async def fetch_card(self, pid: ID, addrs: Sequence[multiaddr.Multiaddr] = ()) -> CapabilityCard | None:
        """The newest valid card of ``pid``: from the peer itself, else from the DHT."""
        vkey = value_key(str(pid)).encode()
        if addrs:
            self.view.get_peerstore().add_addrs(pid, list(addrs), ADDR_TTL)
        rejected: list[str] = []
        request = Message(type=Message.MessageType.GET_VALUE, key=vkey)
        card = self._card_in(await self._request(pid, request), pid, rejected)
        if card is None:
            best: list[CapabilityCard] = []

            def on_response(peer: ID, resp: Message) -> None:
                found = self._card_in(resp, pid, rejected)
                if found is not None and (not best or found.seq > best[0].seq):
                    best[:] = [found]

            await self._lookup(vkey, Message.MessageType.GET_VALUE, on_response)
            card = best[0] if best else None
        if card is None and rejected:
            log.info("rejected every card of %s found (%d): %s", pid, len(rejected), "; ".join(set(rejected)))
        return card

    @staticmethod
    def _card_in(resp: Message | None, pid: ID, rejected: list[str]) -> CapabilityCard | None:
        """The valid card of ``pid`` in a GET_VALUE answer, if there is one."""
        if resp is None or not resp.HasField("record") or not resp.record.value:
            return None
        try:
            card = open_card(resp.record.value, now_ms=_now_ms())
            if card.peer_id != str(pid):
                raise ProtocolError(f"card names {card.peer_id}, not {pid}")
        except ProtocolError as exc:
            rejected.append(exc.message)
            return None
        return card

    # -- the Kademlia client side -------------------------------------------------

    async def _lookup(
        self,
        key: bytes,
        kind: Message.MessageType,
        on_response: Callable[[ID, Message], None] | None = None,
    ) -> list[ID]:
        """Iterative lookup of ``key`` with requests of ``kind``; returns the k closest peers that answered.

        Up to ALPHA requests are in flight; it ends when the k closest peers
        known (answered or not yet asked, failures excluded) have all been
        asked. Each answer's closer peers join the candidates, and the answer
        goes to ``on_response``. A peer whose stream broke after opening is
        asked once more (busy py-libp2p servers reset excess streams).
        """
        dht = self.dht
        me = self.identity.peer_id
        target = int.from_bytes(hashlib.sha256(key).digest())
        distance: dict[ID, int] = {}

        def learn(pid: ID) -> None:
            if pid != me and pid not in distance:
                distance[pid] = int.from_bytes(hashlib.sha256(pid.to_bytes()).digest()) ^ target

        for pid in dht.routing_table.find_local_closest_peers(key, K):
            learn(pid)
        if len(distance) < K:  # a fresh peer: its bootstrap peers may not be in the table yet
            for pid in self.view.get_connected_peers():
                learn(pid)
        asked: set[ID] = set()
        answered: set[ID] = set()
        failed: set[ID] = set()
        retried: set[ID] = set()
        request = Message(type=kind, key=key)
        send_done, recv_done = trio.open_memory_channel[None](float("inf"))
        in_flight = 0

        async def ask(pid: ID) -> None:
            resp, opened = await self._request_ex(pid, request)
            if resp is None:
                if opened and pid not in retried:
                    retried.add(pid)
                    asked.discard(pid)
                    await trio.sleep(0.05)
                else:
                    failed.add(pid)
                    if not opened:  # unreachable: stop handing it out (as py-libp2p does)
                        dht.routing_table.remove_peer(pid)
            else:
                answered.add(pid)
                for peer in resp.closerPeers[:K]:  # an honest server sends at most k
                    self._learn_peer(peer, learn)
                if on_response is not None:
                    try:
                        on_response(pid, resp)
                    except Exception as exc:
                        log.debug("bad DHT answer from %s: %r", pid, exc)
                with trio.move_on_after(1):
                    await dht.add_peer(pid)  # it answered: it serves the DHT
            send_done.send_nowait(None)

        async with trio.open_nursery() as nursery:
            while True:
                closest = sorted((p for p in distance if p not in failed), key=distance.__getitem__)[:K]
                todo = [p for p in closest if p not in asked]
                for pid in todo[: ALPHA - in_flight]:
                    asked.add(pid)
                    in_flight += 1
                    nursery.start_soon(ask, pid)
                if in_flight == 0:
                    break
                await recv_done.receive()
                in_flight -= 1
        return [p for p in sorted(answered, key=distance.__getitem__)][:K]

    def _learn_peer(self, peer: Message.Peer, learn: Callable[[ID], None]) -> None:
        try:
            pid = ID(peer.id)
            addrs = [multiaddr.Multiaddr(a) for a in peer.addrs]
        except Exception:
            return
        if addrs:
            self.view.get_peerstore().add_addrs(pid, addrs, ADDR_TTL)
            learn(pid)

    async def _request(self, pid: ID, msg: Message) -> Message | None:
        return (await self._request_ex(pid, msg))[0]

    async def _request_ex(self, pid: ID, msg: Message) -> tuple[Message | None, bool]:
        """Send one request and read one answer; ``(None, opened)`` on any failure."""
        stream: INetStream | None = None
        data = msg.SerializeToString()
        ok = False
        try:
            with trio.move_on_after(self.rpc_timeout):
                stream = await self.view.new_stream(pid, [IPFS_KAD_PROTOCOL_ID])
                await stream.write(encode_varint(len(data)) + data)
                raw = await read_varint_prefixed_bytes_limited(stream, MAX_RESPONSE_SIZE)
                resp = Message()
                resp.ParseFromString(raw)
                ok = True
                return resp, True
        except Exception as exc:
            log.debug("DHT request to %s failed: %r", pid, exc)
        finally:
            if stream is not None:
                await _finish(stream, ok)
        return None, stream is not None

    async def _send(self, pid: ID, msg: Message) -> bool:
        """Send one message that gets no answer we wait for (ADD_PROVIDER)."""
        stream: INetStream | None = None
        data = msg.SerializeToString()
        ok = False
        try:
            with trio.move_on_after(self.rpc_timeout):
                stream = await self.view.new_stream(pid, [IPFS_KAD_PROTOCOL_ID])
                await stream.write(encode_varint(len(data)) + data)
                ok = True
        except Exception as exc:
            log.debug("DHT message to %s failed: %r", pid, exc)
        finally:
            if stream is not None:
                await _finish(stream, ok)
        return ok


async def _refuse(stream: INetStream) -> None:
    """The DHT handler of a stopped peer."""
    await _finish(stream, False)


async def _finish(stream: INetStream, ok: bool) -> None:
    """Close (or, after a failure, reset) a stream, even while being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            if ok:
                await stream.close()
            else:
                await stream.reset()
        except Exception:
            pass

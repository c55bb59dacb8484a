"""Capability discovery over a Kademlia DHT of our own (see ``specs/capability.md``).

A peer announces a signed :class:`~modelnet_p2p.proto.card.CapabilityCard`: the card itself
is stored as a DHT value under ``/modelnet-card/<peer id>``, and provider records point from
a key per task, model, model+version and tag to the peer. Another peer finds the providers
of a key with an iterative GET_PROVIDERS lookup, then fetches and verifies each provider's
card (:mod:`.lookup`).

The DHT runs on our own protocol id (``/modelnet/kad/1.0.0``), never on the public IPFS
DHT's; :class:`~modelnet_p2p.p2p.kad.KadNode` holds py-libp2p's ``KadDHT`` and checks that
at start. Records expire with the card (minutes, not py-libp2p's 48 h), and a peer
re-announces every ``announce_interval``.

Monotonic time (the announce loop, housekeeping) is trio's clock, so tests may run it on
:class:`trio.testing.MockClock`; wall time (card issue and expiry) comes from ``wall_clock``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Literal

import trio

from ...config import PeerConfig
from ...errors import ConfigError, ProtocolError
from ...p2p.identity import Identity
from ...p2p.kad import Host, InboundLimits, KadKind, KadNode, KadPeer, KadRequest, KadResponse, peer_id_bytes
from ...proto.capability import Capability, capability_key
from ...proto.card import (
    MIN_TTL_MS,
    VALUE_NAMESPACE,
    CapabilityCard,
    open_card,
    seal,
    value_key,
)
from .announce import AnnounceResult, publish
from .index import announced_keys
from .lookup import MAX_PROVIDERS_PER_KEY, MAX_RESPONSE_SIZE, RPC_TIMEOUT, K, Lookups
from .query import Query
from .records import CardValidator
from .verify import VERIFY_CONCURRENCY, ProviderCheck

__all__ = [
    "DEFAULT_ANNOUNCE_INTERVAL",
    "DEFAULT_CARD_TTL",
    "DHT_PROTOCOL_ID",
    "AnnounceResult",
    "CardValidator",
    "Discovery",
    "DhtModeName",
    "Query",
]

log = logging.getLogger(__name__)

#: The mesh's own Kademlia protocol id: same wire format as ``/ipfs/kad/1.0.0``,
#: but peers of the public IPFS DHT neither answer nor store our records.
DHT_PROTOCOL_ID = "/modelnet/kad/1.0.0"
#: Seconds a card stays valid. Models come and go in minutes, not days (IPFS:
#: 48 h provider records); a departed peer vanishes from discovery this long
#: after its last announce at the latest.
DEFAULT_CARD_TTL = PeerConfig.card_ttl
#: Seconds between re-announces. Less than half the TTL, so one failed
#: announce does not let a live peer's card expire.
DEFAULT_ANNOUNCE_INTERVAL = PeerConfig.announce_interval
#: ADD_PROVIDER messages a server accepts per sender per 10 s. A card derives
#: up to MAX_PROVIDER_KEYS (64) keys; py-libp2p's default of 10 drops most of them.
ADD_PROVIDER_RATE = 256
#: Inbound DHT streams a server handles at once (py-libp2p: 12, and it resets
#: the rest). Peers of a fresh mesh bootstrapping from one peer exceed 12. Past it, the
#: stream idle longest is reset for a new one.
MAX_INBOUND_STREAMS = 32
#: Inbound DHT streams one remote peer may hold at once (a lookup sends one request per
#: server; an announce a few at once).
MAX_INBOUND_STREAMS_PER_PEER = 16
#: Requests per remote peer: (per second, burst) of a token bucket per request class.
#: ADD_PROVIDER: one announce sends up to 64 keys plus the index; 256 per 10 s as before.
#: FIND_NODE / GET_PROVIDERS / GET_VALUE (and PING): a lookup asks each server once, a
#: discovery fetches each provider's card once. PUT_VALUE: one card per announce.
REQUEST_RATES = {"provide": (25.6, 256.0), "find": (32.0, 128.0), "put": (1.0, 16.0)}
#: Values (cards of others) a server stores at most, in number and in bytes, and per sender.
MAX_STORED_VALUES = 4096
MAX_STORED_VALUE_BYTES = 16 << 20
MAX_VALUES_PER_SENDER = 16
#: Largest inbound DHT message: a PUT_VALUE of the largest card (16 KiB) with room to spare.
MAX_INBOUND_MESSAGE = 32 << 10
#: The inbound DHT limits of a server (``specs/capability.md``, Limits).
INBOUND_LIMITS = InboundLimits(
    max_streams=MAX_INBOUND_STREAMS,
    max_streams_per_peer=MAX_INBOUND_STREAMS_PER_PEER,
    max_message_size=MAX_INBOUND_MESSAGE,
    max_values_per_sender=MAX_VALUES_PER_SENDER,
    rates=REQUEST_RATES,
)
#: Seconds a peer that opened a DHT stream to us may take to complete identify
#: before we decide whether it serves the DHT (and belongs in the routing table).
IDENTIFY_WAIT = 5.0
#: Servers that must acknowledge each record of an announce (fewer if fewer are found).
ANNOUNCE_REPLICATION = 5
#: Seconds an announce keeps retrying records short of acknowledgements (at most half
#: the announce interval).
ANNOUNCE_RETRY_WINDOW = 10.0
#: Seconds one announce may take in all, first placement and retries (at most half the
#: announce interval); on a busy machine it ends with what was acknowledged by then.
ANNOUNCE_BUDGET = 20.0
#: Seconds a lookup keeps for itself when it waits for a fresh peer's join: the wait ends
#: this long before the lookup's deadline, or at half the time left, whichever is later.
LOOKUP_RESERVE = 3.0
#: Seconds a burst of serve() calls may take to settle into one card.
SETTLE = 0.05
#: Longest pause between housekeeping rounds, in seconds.
HOUSEKEEPING_INTERVAL = 30.0
#: Seconds the first routing-table refresh after bootstrap may take.
JOIN_TIMEOUT = 30.0

DhtModeName = Literal["auto", "server", "client"]


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
        replication: servers that must acknowledge each record of an announce.
        announce_retry_window: seconds an announce retries records short of that.
        wall_clock: seconds since the epoch, for card issue and expiry times.
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
        replication: int = ANNOUNCE_REPLICATION,
        announce_retry_window: float = ANNOUNCE_RETRY_WINDOW,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in ("auto", "server", "client"):
            raise ValueError(f"dht_mode must be 'auto', 'server' or 'client', not {mode!r}")
        if not 1.0 <= card_ttl <= 86_400.0:
            raise ValueError("card_ttl must be between 1 s and 24 h")
        if not 0 < announce_interval < card_ttl:
            raise ValueError("announce_interval must be positive and shorter than card_ttl")
        if not 1 <= replication <= K:
            raise ValueError(f"replication must be between 1 and {K}")
        if announce_retry_window < 0:
            raise ValueError("announce_retry_window must not be negative")
        self.identity = identity
        self.peer_id = str(identity.peer_id)
        self._capabilities = capabilities
        self.protocol = protocol
        self.requested_mode: DhtModeName = mode
        #: Announce only the extra (relayed) addresses once there are any (private peers).
        self.relayed_only = False
        self.card_ttl = card_ttl
        self.announce_interval = announce_interval
        self.rpc_timeout = rpc_timeout
        self.replication = replication
        self.announce_retry_window = announce_retry_window
        self.wall_clock = wall_clock
        #: Refresh the routing table right after bootstrapping (benchmarks turn it off).
        self.refresh_on_start = True
        #: Set once the first routing-table refresh after bootstrap is done.
        self.bootstrapped = trio.Event()
        self.mode: Literal["server", "client"] = "client"
        self.card: CapabilityCard | None = None
        self._host: Host | None = None
        self._kad: KadNode | None = None
        self._lookups: Lookups | None = None
        self._nursery: trio.Nursery | None = None
        self._changed = trio.Event()
        self._generation = 0  # bumped by changed()
        self._announced_generation = -1  # the generation the last card covered
        self._placed_generation = -1  # the generation whose announce has ended
        self._announce_ended = trio.Event()
        self._announce_lock = trio.Lock()
        self._seq = 0
        self._extra_addrs: list[str] = []
        #: Announces made so far (explicit and by the announce loop).
        self.announces = 0
        #: Provider keys acknowledged by some server since the last full announce.
        self._placed: set[bytes] = set()
        self._whole = False  # the last announce placed every record of its card
        #: The addresses the placed provider records carry.
        self._placed_addrs: tuple[str, ...] = ()
        #: Capability lookups made (:meth:`find`) and their seconds in all, for metrics.
        self.lookups_done = 0
        self.lookup_seconds = 0.0
        #: What the latest announce achieved (acknowledgements per record), once there was one.
        self.last_announce: AnnounceResult | None = None

    def _now_ms(self) -> int:
        return int(self.wall_clock() * 1000)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def kad(self) -> KadNode:
        """The DHT node: routing table, local stores, requests (only while running)."""
        if self._kad is None:
            raise RuntimeError("discovery is not running")
        return self._kad

    @property
    def lookups(self) -> Lookups:
        """Network-complete lookups and card fetches (only while running)."""
        if self._lookups is None:
            raise RuntimeError("discovery is not running")
        return self._lookups

    @property
    def requests_sent(self) -> int:
        """DHT requests this peer has sent (outbound streams on the DHT protocol)."""
        return self._kad.requests if self._kad is not None else 0

    async def start(self, host: Host, nursery: trio.Nursery) -> None:
        """Create the DHT on ``host`` and run it in ``nursery``.

        Call before dialing anyone: identify tells each new contact which
        protocols we serve, and the DHT must be among them from the first connection.
        Raises :class:`~modelnet_p2p.p2p.kad.PrivateProtocolError` if the DHT would
        speak the public IPFS DHT's protocol id.
        """
        server = self.requested_mode == "server" or (self.requested_mode == "auto" and bool(host.get_addrs()))
        self.mode = "server" if server else "client"
        kad = KadNode(
            host,
            self.protocol,
            server=server,
            provider_ttl=self.card_ttl,
            max_providers_per_key=MAX_PROVIDERS_PER_KEY,
            add_provider_rate=ADD_PROVIDER_RATE,
            inbound=INBOUND_LIMITS,
            max_values=MAX_STORED_VALUES,
            max_value_bytes=MAX_STORED_VALUE_BYTES,
            identify_wait=IDENTIFY_WAIT,
            max_response_size=MAX_RESPONSE_SIZE,
            max_closer=K,
            max_providers=MAX_PROVIDERS_PER_KEY,
            wall_clock=self.wall_clock,
        )
        self._host, self._kad, self._nursery = host, kad, nursery
        self._lookups = Lookups(kad, rpc_timeout=self.rpc_timeout, wall_clock=self.wall_clock)
        with trio.fail_after(10):
            await kad.start(nursery, self._periodic_refresh)
        kad.register_validator(VALUE_NAMESPACE, CardValidator(self.wall_clock))
        if server:
            #: Checks the provider records this server is sent (only verified ones are answered).
            self.provider_check = ProviderCheck(
                self._lookups,
                self.wall_clock,
                keys_of=lambda card: (key for _label, key in announced_keys(card.capabilities)),
                own_card=lambda: self.card,
            )
            kad.verify_providers(self.provider_check, VERIFY_CONCURRENCY)
            kad.carry_cards(self.provider_check.offer, self.provider_check.cards_for)
        log.debug("DHT on %s in %s mode", self.protocol, self.mode)

    async def bootstrap(self, peer_ids: Sequence[object]) -> None:
        """Add the connected bootstrap peers to the routing table, then start the
        background work: a routing-table refresh, the announcer, housekeeping."""
        kad = self.kad
        assert self._nursery is not None
        for pid in peer_ids:
            await kad.add_to_routing_table(str(pid))
        if self.refresh_on_start and peer_ids:
            self._nursery.start_soon(self._refresh)
        else:
            self.bootstrapped.set()
        self._nursery.start_soon(self._announcer)
        self._nursery.start_soon(self._housekeeping)

    async def rejoin(self, peer_ids: Sequence[object]) -> None:
        """Join again through ``peer_ids`` (connected bootstrap peers) after this peer was left
        with no connection: add them to the routing table, refresh it, and announce (the
        servers that held this peer's records may have forgotten them)."""
        for pid in peer_ids:
            await self.kad.add_to_routing_table(str(pid))
        with trio.move_on_after(JOIN_TIMEOUT):
            await self.refresh()
        self.bootstrapped.set()
        if self.card is not None and self.card.capabilities:
            await self.announce()

    async def _refresh(self) -> None:
        try:
            with trio.move_on_after(JOIN_TIMEOUT):
                await self.refresh()
        except Exception as exc:
            log.debug("routing table refresh failed: %r", exc)
        finally:
            self.bootstrapped.set()

    async def joined(self) -> bool:
        """Wait until the first routing-table fill after bootstrap is done; False if the wait ran out.

        The wait ends early enough for the caller's own work: at the deadline of the
        enclosing cancel scope minus :const:`LOOKUP_RESERVE` (or minus half the time
        left, if that is later), and after ``JOIN_TIMEOUT`` seconds without a deadline.
        """
        if self.bootstrapped.is_set():
            return True
        now = trio.current_time()
        deadline = trio.current_effective_deadline()
        if deadline == float("inf"):
            until = now + JOIN_TIMEOUT
        else:
            left = deadline - now
            until = max(deadline - LOOKUP_RESERVE, now + left / 2)
        with trio.move_on_at(until):
            await self.bootstrapped.wait()
        return self.bootstrapped.is_set()

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
        await self.lookups.closest(peer_id_bytes(self.peer_id), KadKind.FIND_NODE)

    def stop(self) -> None:
        """Stop answering DHT requests; the peer's nursery cancels the rest."""
        if self._kad is not None:
            self._kad.stop()

    # -- requests (tests and tools speak the DHT through these) ---------------------

    async def request(self, peer_id: str, req: KadRequest) -> KadResponse | None:
        """Send one DHT request to ``peer_id`` and return its answer (``None`` on any failure)."""
        return await self.lookups.request(str(peer_id), req)

    async def fetch_card(self, peer_id: str, addrs: Sequence[str] = ()) -> CapabilityCard | None:
        """The newest valid card of ``peer_id``: from the peer itself, else from the DHT."""
        return await self.lookups.fetch_card(str(peer_id), [str(a) for a in addrs])

    async def card_addrs(self, peer_id: str) -> list[str]:
        """The addresses of ``peer_id``'s newest valid card in the DHT, with ``/p2p/<id>``
        (to dial a peer named by its id alone that this peer no longer knows); [] if none."""
        card = await self.lookups.fetch_from_dht(str(peer_id))
        return [] if card is None else card.dial_addrs

    # -- announcing ------------------------------------------------------------

    def changed(self) -> None:
        """The served capabilities changed: announce the new card soon."""
        self._generation += 1
        self._changed.set()

    async def announced(self) -> None:
        """Return once the announce of the current capabilities has ended (placed, or given
        up for now), for work that should not compete with it for the peer's CPU."""
        while self._placed_generation < self._generation:
            await self._announce_ended.wait()

    def _ended(self, generation: int) -> None:
        self._placed_generation = max(self._placed_generation, generation)
        self._announce_ended.set()
        self._announce_ended = trio.Event()

    async def _announcer(self) -> None:
        """Announce soon after each change, and every ``announce_interval``.

        An announce with a record that no server acknowledged (a peer alone, its
        contacts not up yet, or too busy to answer in time) is made again after 1, 2,
        4, ... seconds, up to the interval.
        A peer that stops serving everything announces one empty card, which
        replaces its last one everywhere, and then stays quiet.
        """
        next_full = trio.current_time() + self.announce_interval
        next_due = next_full
        backoff = 1.0
        while True:
            with trio.move_on_at(next_due):
                await self._changed.wait()
            await trio.sleep(SETTLE)
            self._changed = trio.Event()
            now = trio.current_time()
            if now < next_due and self._announced_generation == self._generation:
                continue  # an explicit announce() already published this change
            full = now >= next_full  # else a change: only records not yet placed
            interval = self.announce_interval
            whole = full
            if self._capabilities() or (self.card is not None and self.card.capabilities):
                try:
                    result = await self.announce(full=full)
                    whole = full or self._whole
                except Exception as exc:
                    log.warning("announcing the capability card failed: %r", exc)
                    result = None
                if result is not None and result.min_acks == 0:  # a record reached nobody
                    next_full = next_due = trio.current_time() + min(backoff, interval)
                    backoff = min(backoff * 2, interval)
                    continue
                backoff = 1.0
            if whole:  # every record was just placed: the next full announce is an interval away
                next_full = trio.current_time() + interval
            next_due = next_full

    def set_extra_addrs(self, addrs: Sequence[str]) -> None:
        """Announce these addresses besides the listen addresses (and re-announce soon).

        For example the relayed address of a peer that cannot be dialed,
        ``<relay addr>/p2p/<relay id>/p2p-circuit`` (see ``specs/network.md``);
        a trailing ``/p2p/<own id>`` is dropped.
        """
        suffix = f"/p2p/{self.peer_id}"
        self._extra_addrs = [str(a).removesuffix(suffix) for a in addrs]
        self.changed()

    def own_addrs(self) -> list[str]:
        """The addresses this peer's card lists (without ``/p2p/<own id>``)."""
        assert self._host is not None
        suffix = f"/p2p/{self.peer_id}"
        listen = [str(a).removesuffix(suffix) for a in self._host.get_addrs()]
        if self.relayed_only and self._extra_addrs:
            # A peer others cannot dial announces only its relayed addresses:
            # its direct ones would make callers wait on dials that cannot succeed.
            listen = []
        return list(dict.fromkeys([*listen, *self._extra_addrs]))

    def check_capabilities(self, capabilities: Sequence[Capability]) -> None:
        """Raise :class:`ConfigError` if a card listing ``capabilities`` breaks a card limit."""
        draft = CapabilityCard(self.peer_id, (), 0, 0, MIN_TTL_MS, tuple(capabilities))
        if len({capability_key(c.name) for c in capabilities}) != len(capabilities):
            raise ConfigError("two capabilities have the same name (names are compared case-insensitively)")
        try:
            seal(draft, self.identity)
        except ProtocolError as exc:
            raise ConfigError(f"cannot announce these capabilities: {exc.message}") from None

    def make_card(self) -> CapabilityCard:
        """A new signed card of what the peer serves now, with a higher ``seq``."""
        now = self.wall_clock()
        self._seq = max(self._seq + 1, int(now * 1_000_000))
        issued = int(now * 1000)
        card = CapabilityCard(
            peer_id=self.peer_id,
            addrs=tuple(self.own_addrs()),
            seq=self._seq,
            issued_at=issued,
            expires_at=issued + int(self.card_ttl * 1000),
            capabilities=tuple(self._capabilities()),
        )
        return seal(card, self.identity)

    async def announce(self, *, full: bool = True) -> AnnounceResult | None:
        """Publish a fresh card now: store it at the closest peers and send provider records.

        ``full=False`` (an announce after a change) places the card and only the provider
        records not acknowledged since the last full announce, for example those of a
        capability just served: the others are still held, and the next full announce
        (every ``announce_interval``) refreshes them all. An announce whose card lists other
        addresses than the records placed before is full: those records carry the old ones.

        Each record goes to the closest peers its lookup finds (its reach: ``2 *
        replication``, at most k), each as it answers while among them, and is retried
        until ``min(replication, peers found)`` servers have acknowledged it
        (:mod:`.announce`), for at most ``announce_retry_window`` seconds and only while no
        newer change is pending. The result counts the acknowledgements (also kept as :attr:`last_announce`).
        Returns ``None`` (and announces nothing) if the peer has no address
        others could dial.
        """
        async with self._announce_lock:
            generation = self._generation
            try:
                return await self._announce(generation, full)
            finally:
                self._ended(generation)

    async def _announce(self, generation: int, full: bool) -> AnnounceResult | None:
        if not self.own_addrs():
            log.info("not announcing capabilities: this peer has no address others can dial")
            return None
        card = self.make_card()
        self.card = card
        self._announced_generation = generation
        self.announces += 1
        kad = self.kad
        vkey = value_key(card.peer_id).encode()
        kad.store_value(vkey, card.envelope, card.expires_at / 1000)
        me = KadPeer(self.peer_id, card.addrs)
        keys = announced_keys(card.capabilities)
        for _label, key in keys:
            kad.add_local_provider(key, me)
        current = {key for _label, key in keys}
        if card.addrs != self._placed_addrs:
            full = True  # the records placed carry the old addresses: place them all again
        self._placed = {k for k in self._placed if k in current and not full}
        # An announce that places every record (full, or the first of these keys: a peer
        # that just began serving) refreshes them all, like a full one.
        self._whole = not self._placed
        result = await publish(
            card,
            self.lookups,
            replication=self.replication,
            retry_window=min(self.announce_retry_window, self.announce_interval / 2),
            budget=min(ANNOUNCE_BUDGET, self.announce_interval / 2),
            still_current=lambda: self._generation == generation,
            keys=[(label, key) for label, key in keys if key not in self._placed],
        )
        self._placed |= {key for label, key in keys if result.acks.get(label, 0) > 0}
        self._placed_addrs = card.addrs
        self.last_announce = result
        return result

    async def _housekeeping(self) -> None:
        """Drop expired provider records and cards from this server's stores."""
        while True:
            await trio.sleep(min(self.announce_interval, HOUSEKEEPING_INTERVAL))
            if self._kad is None:
                return
            self.expire_records()

    def expire_records(self) -> int:
        """Drop expired provider records, and cards expired at ``wall_clock()``; return the cards dropped."""
        kad = self.kad
        kad.drop_expired_providers()
        now = self._now_ms()
        dropped = 0
        for key, value in kad.local_values(f"/{VALUE_NAMESPACE}/".encode()):
            try:
                expired = open_card(value, verify=False).expired(now)
            except ProtocolError:
                expired = True
            if expired:
                kad.drop_value(key)
                dropped += 1
        return dropped

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

        A peer that has not finished joining (its first routing-table fill after
        bootstrap) does not wait for it: the lookup starts at once from the peers it is
        connected to (its bootstrap peers) and learns the rest as it goes, while the
        join runs beside it. Once the join is done (within :meth:`joined`'s bound), a
        second pass starts, whether or not the first is over, and sends only cards not
        sent yet: in a mesh that is starting too, records placed meanwhile are found.
        (Waiting for the join first made a fresh peer's first lookup two lookups long;
        on a busy machine each round of requests takes seconds.)
        """
        started = trio.current_time()
        own = lambda: self.card  # noqa: E731
        try:
            if self.bootstrapped.is_set():
                await self.lookups.find(query, send, limit=limit, own_card=own)
                return
            delivered: set[str] = set()

            async def second_pass() -> None:
                if await self.joined():
                    await self.lookups.find(query, send, limit=limit, own_card=own, delivered=delivered)

            async with trio.open_nursery() as passes:
                passes.start_soon(second_pass)
                await self.lookups.find(query, send, limit=limit, own_card=own, delivered=delivered)
                if limit is not None and len(delivered) >= limit:
                    passes.cancel_scope.cancel()
        finally:
            self.lookups_done += 1
            self.lookup_seconds += trio.current_time() - started

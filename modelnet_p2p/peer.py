"""The :class:`Peer`: one libp2p host, one nursery, and the services composed on it.

A thin façade: :mod:`.p2p.dialer` dials, :mod:`.services` serve the protocols,
:mod:`.mesh.client` routes, calls and fails over (``peer.mesh_client``, shared with
the gateway and the collaboration patterns), :mod:`.mesh.context` is ``request.mesh``.
Every setting and its default is in :class:`~modelnet_p2p.config.PeerConfig`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from contextlib import AsyncExitStack, contextmanager, suppress
from typing import Any, TypeVar

import multiaddr
import trio

from .config import PeerConfig
from .errors import BadRequestError, ConfigError, UnavailableError
from .log import quiet_libp2p
from .mesh.client import InferenceStream, MeshClient, Response
from .mesh.collab.trace import TraceLog
from .mesh.context import MeshContext
from .mesh.interest import Interest
from .mesh.providers import (
    LOOKUP_TIMEOUT,
    PROVIDERS_TIMEOUT,
    Providers,
    card_targets,
    mesh_rows,
    search_cards,
)
from .mesh.reputation import PeerLists, Reputation, reputation_path
from .mesh.routing import Candidate, Router
from .mesh.shared_reputation import SharedReputation, share_reputation
from .p2p.addresses import parse_multiaddr
from .p2p.connmgr import ConnManager, PeerstoreSweeper
from .p2p.dialer import Dialer, Target
from .p2p.gctune import freeze_startup
from .p2p.host import Host, build_host, running_host
from .p2p.identity import Identity
from .p2p.network import get_network, protocol_id, topic
from .p2p.pool import StreamPool
from .p2p.resolve import resolve_addrs
from .proto.availability import LEGACY_TOPIC, TOPIC_PREFIX
from .proto.capability import Capability
from .proto.card import CapabilityCard
from .proto.infer import PROTOCOL_ID as INFER_PROTOCOL_ID
from .proto.infer import TraceContext
from .proto.reputation import TOPIC as REPUTATION_TOPIC
from .services.access import AccessControl
from .services.availability import (
    AvailabilityConfig,
    AvailabilityService,
    InferenceLoad,
    MeshViewRow,
    start_availability,
)
from .services.discovery import DHT_PROTOCOL_ID, Discovery
from .services.discovery.index import find_or_browse
from .services.discovery.rejoin import keep_joined
from .services.inference.admission import Admission, AdmissionLimits
from .services.inference.handlers import Handler, InferenceRequest
from .services.inference.server import InferenceServer, Limits
from .services.relay import RelayService, keep_reservations
from .services.revocation import PROTOCOL_ID as REVOCATION_PROTOCOL_ID
from .services.revocation import RevocationService

__all__ = ["InferenceStream", "Peer", "PeerConfig", "Response"]

log = logging.getLogger(__name__)

_UNSET: Any = object()
_T = TypeVar("_T")


@contextmanager
def _as_config_error() -> Iterator[None]:
    """A setting a service refuses (``ValueError``) is a :class:`ConfigError`."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _running(part: _T | None) -> _T:
    if part is None:
        raise RuntimeError("peer is not running; use 'async with Peer(...)'")
    return part


class Peer:
    """A modelnet peer: a libp2p host (TCP, Noise, yamux) plus the modelnet services.

    Use it as an async context manager under trio::

        async with Peer(identity="peer.key") as peer:
            peer.serve(Capability(name="echo"), echo_handler)
            async for chunk in peer.infer(other_addr, "echo", "hello"):
                print(chunk)

    Every background task runs in the peer's own nursery; leaving the ``async
    with`` block cancels them, closes the listener and all connections.

    Settings come from ``config`` (a :class:`~modelnet_p2p.config.PeerConfig`, which
    lists every setting and its default), overridden by keyword arguments of the same
    names: ``Peer(identity=..., listen=[...], bootstrap=[...], connect_timeout=5, ...)``.
    """

    def __init__(
        self,
        identity: str | os.PathLike[str] | Identity | None = _UNSET,
        listen: Sequence[str] = _UNSET,
        bootstrap: Sequence[str] = _UNSET,
        *,
        config: PeerConfig | None = None,
        **overrides: Any,
    ) -> None:
        given = {"identity": identity, "listen": listen, "bootstrap": bootstrap}
        overrides.update({k: v for k, v in given.items() if v is not _UNSET})
        cfg = (config or PeerConfig()).with_overrides(**overrides)
        cfg.check()
        quiet_libp2p()
        #: The settings this peer runs with.
        self.config = cfg
        #: The mesh this peer belongs to; it is part of every protocol id (specs/network.md).
        self.network = get_network(cfg.network).name
        self.infer_protocol = protocol_id(INFER_PROTOCOL_ID, self.network)
        self.identity = cfg.load_identity()
        self._listen = [parse_multiaddr(a) for a in cfg.listen]
        self._bootstrap = [parse_multiaddr(a) for a in cfg.bootstrap]
        #: Reserve slots on the bootstrap peers' relays and announce relayed
        #: addresses (a peer that others cannot dial; see ``specs/network.md``).
        self.needs_relay = cfg.needs_relay()
        dht_mode = "client" if self.needs_relay and cfg.dht_mode == "auto" else cfg.dht_mode
        self.relay: RelayService | None = None
        self._circuit_addrs: dict[str, str] = {}
        #: Availability gossip (``specs/availability.md``); ``None`` while stopped or if disabled.
        self.availability: AvailabilityService | None = None
        #: Scores shared over gossip (``PeerConfig.share_reputation``), else ``None``.
        self.shared_reputation: SharedReputation | None = None
        self._availability_config = AvailabilityConfig(
            publish_interval=cfg.publish_interval,
            topic_prefix=topic(TOPIC_PREFIX, self.network),
            legacy_topic=topic(LEGACY_TOPIC, self.network),
        )
        self.limits = Limits(**cfg.server_limits())
        self._host: Host | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._client: MeshClient | None = None
        self._dialer: Dialer | None = None
        #: The last collaborations this peer ran (``mesh/collab/trace.py``), for the dashboard.
        self.trace_log = TraceLog()
        #: Kept inference streams, reused for the next request to the same peer.
        self.stream_pool = StreamPool()
        #: Trims idle connections (specs/network.md, "Connection management"); counts: ``stats()``.
        self.connmgr = ConnManager(**cfg.connmgr_settings())
        self.connmgr.protect_addrs(cfg.bootstrap, "bootstrap")
        self.peerstore = PeerstoreSweeper()  #: forgets idle peers (p2p/_compat/peerstore.py)
        #: Picks providers for requests without a target (see :mod:`modelnet_p2p.mesh.routing`).
        #: This peer's scores of the providers it uses, and the operator's lists (mesh/reputation.py).
        self.reputation = Reputation(
            reputation_path(cfg.identity) if cfg.reputation else None,
            lists=PeerLists.of(cfg.pin_peers, cfg.allow_peers, cfg.block_peers),
        )
        with _as_config_error():
            self.router = Router(cfg.routing_policy, reputation=self.reputation)
        self.inference = InferenceServer(str(self.identity.peer_id), self.limits)
        self.inference.access = AccessControl(
            trusted=cfg.trust, require_token=cfg.require_token, revocation_files=cfg.revocations
        )
        #: Revocation lists from files, gossip and polls (``services/revocation.py``, specs/token.md).
        self.revocation = RevocationService(
            self.inference.access, cfg.revocations, network_topic=lambda t: topic(t, self.network)
        )
        self.inference.mesh_factory = self._mesh_context
        self.inference.signer, self.inference.always_sign = self.identity, cfg.sign_receipts  # receipts
        self._load = InferenceLoad(self.inference, cfg.max_concurrency)
        self.inference.on_request_done = self._load.on_request_done
        self.inference.load_provider = self._load.snapshot  # answers carry it back (specs/inference.md)
        self.inference.admission = Admission(AdmissionLimits.of(self.limits, cfg.resource_limits))
        with _as_config_error():
            #: Capability discovery: the DHT, this peer's card, lookups (specs/capability.md).
            self.discovery = Discovery(
                self.identity,
                self.inference.capabilities,
                protocol=protocol_id(DHT_PROTOCOL_ID, self.network),
                mode=dht_mode,
                card_ttl=cfg.card_ttl,
                announce_interval=cfg.announce_interval,
            )
        #: Follows the gossip of the capabilities routing looks up (``mesh/interest.py``).
        self.interest = Interest(
            lambda: self.availability, lambda p: self.dialer.is_connected(p), self.connect,
            lambda: self.nursery, self.peer_id, lambda name: self._providers.candidates(name),
            before_meet=self.discovery.announced,
        )  # fmt: skip
        self._providers = Providers(
            lambda capability, timeout: self.discover(model=capability, timeout=timeout),
            lambda: self.availability.table() if self.availability is not None else {},
            self.peer_id,
            interest=self.interest.note,
            gossip_entry=lambda pid: self.availability.get(pid) if self.availability is not None else None,
        )

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Peer:
        cfg = self.config
        if self.identity.ephemeral:
            log.info("no identity configured; using ephemeral peer id %s", self.identity.peer_id)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            host = build_host(self.identity, dial_timeout=cfg.connect_timeout, psk=cfg.load_psk(),
                              limits=cfg.resource_limits)
            await stack.enter_async_context(running_host(host, self._listen))
            self._host = host
            self._dialer = Dialer(host, connect_timeout=cfg.connect_timeout)
            self._client = MeshClient(
                self._dialer.for_protocol(self.infer_protocol),
                self.stream_pool,
                self._providers,
                self.router,
                max_frame_size=self.limits.max_frame_size,
                window=cfg.window,
                request_timeout=cfg.request_timeout,
                stall_timeout=cfg.stall_timeout,
            )
            stack.callback(self.reputation.save_if_dirty)  # once the nursery has stopped
            self._nursery = nursery = await stack.enter_async_context(trio.open_nursery())
            self.inference.bind(nursery)
            nursery.start_soon(self.stream_pool.sweep_forever)
            nursery.start_soon(self.reputation.save_forever)
            await self.connmgr.start(host, nursery)
            host.set_stream_handler(self.infer_protocol, self.inference.handle_stream)  # type: ignore[arg-type]
            # The DHT handler must be registered before the first connection: identify
            # tells each contact then whether this peer serves the DHT.
            await self.discovery.start(host, nursery)
            self.discovery.kad.closed_here = self.connmgr.closed_here  # those peers did not leave
            self._dialer.locate = self.discovery.card_addrs  # a peer id the peerstore forgot
            stack.callback(self.discovery.stop)  # before the nursery and the host close
            kept = [self.connmgr.protected_peers, self.discovery.kad.table_peers, self.availability_table]
            self.peerstore.start(host, nursery, kept)
            self.relay = RelayService(host, hop=cfg.relay_hop, limits=cfg.resource_limits)
            await self.relay.start(nursery)
            self.connmgr.keep(self.relay.reserving_peers)  # a relay keeps its reserving peers
            stack.callback(self.relay.stop)
            if cfg.gossip:
                # Started before the bootstrap connections, so that pubsub sees them.
                self.availability = await start_availability(
                    host,
                    self.identity,
                    nursery,
                    self._availability_config,
                    load_provider=self._load.snapshot,
                    capabilities=self.inference.capabilities(),
                )
                self.connmgr.keep(self.availability.gossip.mesh_peers)
                if cfg.share_reputation:  # specs/reputation.md
                    gossip, where = self.availability.gossip, topic(REPUTATION_TOPIC, self.network)
                    shared = share_reputation(self.reputation, self.peer_id, gossip, where, nursery)
                    self.shared_reputation = shared
            rev = protocol_id(REVOCATION_PROTOCOL_ID, self.network)
            host.set_stream_handler(rev, self.revocation.handle_stream)  # type: ignore[arg-type]
            heard = self.availability.gossip if self.availability is not None else None
            poll = self._dialer.for_protocol(rev).open_stream
            nursery.start_soon(self.revocation.run, heard, poll, self._dialer.is_connected)
            self._bootstrap = await resolve_addrs(self._bootstrap)  # /dns4/, /dns6/ names to IPs
            await self._dialer.connect_bootstrap(self._bootstrap, required=cfg.require_bootstrap)
            await self.discovery.bootstrap(self._dialer.connected_among(self._bootstrap))
            if self._bootstrap:  # left with no connection: dial the bootstrap peers again
                nursery.start_soon(keep_joined, lambda: not host.get_connected_peers(), self._join_again)
            if self.needs_relay:  # announce only relayed addresses: the direct ones are unreachable
                self.discovery.relayed_only = True
                relays = [str(a) for a in self._bootstrap]
                self._circuit_addrs = await keep_reservations(
                    host, relays, nursery, self.discovery.set_extra_addrs, timeout=cfg.connect_timeout
                )
        except BaseException:
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            self._host = self._nursery = self._client = self._dialer = None
            self.availability = None
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        freeze_startup()  # shorter full collections from now on (once per process: p2p/gctune.py)
        log.info("peer %s listening on %s", self.peer_id, ", ".join(self.addrs))
        return self

    async def _join_again(self) -> bool:
        assert self._dialer is not None
        self._dialer.unblock(self._bootstrap)  # a bootstrap peer that was down may be up now
        with suppress(UnavailableError):  # said at info level; tried again later
            await self._dialer.connect_bootstrap(self._bootstrap, required=True)
        connected = self._dialer.connected_among(self._bootstrap)
        if connected:
            await self.discovery.rejoin(connected)
        return bool(connected)

    async def __aexit__(self, *exc_info: Any) -> None:
        # Shut down as if the body had ended normally, then let the body's own exception
        # propagate as it is (through the nurseries, it would become an exception group).
        if self.availability is not None and self.inference.capabilities():
            # Say goodbye first: routers stop choosing this peer now, not after the TTL.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.availability.leave()
                except Exception as exc:
                    log.debug("could not publish 'leaving': %r", exc)
        self.availability = None
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        self._host = self._nursery = self._client = self._dialer = None
        await self.stream_pool.close_all()
        if stack is not None:
            await stack.__aexit__(None, None, None)

    # -- identity, addresses and parts ---------------------------------------------

    @property
    def host(self) -> Host:
        """The underlying libp2p host (only while the peer runs)."""
        return _running(self._host)

    @property
    def nursery(self) -> trio.Nursery:
        """The peer's nursery: tasks started here stop when the peer stops."""
        return _running(self._nursery)

    @property
    def dialer(self) -> Dialer:
        """Dials peers and opens streams (only while the peer runs)."""
        return _running(self._dialer)

    @property
    def mesh_client(self) -> MeshClient:
        """The one client that routes, calls and fails over (only while the peer runs).

        The gateway and the collaboration patterns share it, and so its measurements
        and bans. See :mod:`modelnet_p2p.mesh.client` for its interface.
        """
        return _running(self._client)

    @property
    def peer_id(self) -> str:
        """This peer's id, base58 text."""
        return str(self.identity.peer_id)

    @property
    def addrs(self) -> list[str]:
        """Listen addresses as multiaddr strings ending in ``/p2p/<peer id>``."""
        if self._host is None:
            return []
        suffix = f"/p2p/{self.peer_id}"
        out = []
        for a in self._host.get_addrs():
            s = str(a)
            out.append(s if s.endswith(suffix) else s + suffix)
        return out + list(self._circuit_addrs.values())

    def _mesh_context(self, request: InferenceRequest) -> MeshContext:
        return MeshContext(self.mesh_client, self.peer_id, request)

    # -- serving ---------------------------------------------------------------

    def serve(self, capability: Capability | str, handler: Handler) -> Capability:
        """Serve ``capability`` with ``handler`` (replacing any handler of the same name).

        ``handler(request)`` gets an :class:`~modelnet_p2p.InferenceRequest` and may be
        an async generator (a chunk per item), an async function (one chunk), a
        sync generator or a sync function (run in a worker thread, so the event
        loop never blocks). An exception becomes an ``internal`` error for that
        request only; raise a :class:`ModelNetError` subclass to send another code.
        """
        cap = Capability(name=capability) if isinstance(capability, str) else capability
        self.inference.check(cap)  # no two names equal after normalize()
        others = [c for c in self.inference.capabilities() if c.name != cap.name]
        self.discovery.check_capabilities([*others, cap])
        if self.availability is not None:
            self.availability.set_capabilities([*others, cap])
            self.interest.meet(cap.name)  # link with the other providers' gossip
        self.inference.add(cap, handler)
        self.discovery.changed()  # announce the new card soon
        return cap

    def unserve(self, name: str) -> None:
        """Stop serving a capability; requests already running finish."""
        self.inference.remove(name)
        self.discovery.changed()
        if self.availability is not None:
            self.availability.set_capabilities(self.inference.capabilities())

    @property
    def capabilities(self) -> list[Capability]:
        return self.inference.capabilities()

    async def drain(self, timeout: float | None = 30.0) -> bool:
        """Stop taking new requests, announce ``draining``, and wait for in-flight ones to finish.

        Returns ``True`` if every request finished within ``timeout``.
        """
        self.inference.draining = True
        if self.availability is not None:
            self.availability.set_state("draining")
        with trio.move_on_after(math.inf if timeout is None else timeout):
            await self.inference.wait_idle()
            return True
        return False

    # -- discovering -------------------------------------------------------------

    async def announce(self) -> CapabilityCard | None:
        """Announce this peer's capability card now and return it (``None``: no dialable address).

        :meth:`serve` and :meth:`unserve` announce on their own soon after each change,
        and the card is re-announced every ``announce_interval``.
        """
        result = await self.discovery.announce()
        return None if result is None else result.card

    async def discover(
        self,
        task: str | None = None,
        *,
        model: str | None = None,
        version: str | None = None,
        tags: Sequence[str] | str = (),
        limit: int | None = None,
        timeout: float = LOOKUP_TIMEOUT,
    ) -> list[CapabilityCard]:
        """The verified capability cards of every peer serving what is asked.

        Every criterion given must hold for one capability of a card: ``task`` among
        its tasks, ``model`` its name, ``version`` its version (with ``model``), every
        one of ``tags`` among its tags (compared case-insensitively). The lookup goes
        to the network, each card is checked (signature, expiry, limits) and each peer
        appears once. Returns when ``limit`` cards are found or after ``timeout`` s.
        With no criterion at all, every capability of the mesh (specs/capability.md, "Browse index").
        """
        found = self.discover_iter(
            task, model=model, version=version, tags=tags, limit=limit, timeout=timeout
        )
        return [card async for card in found]

    async def find_providers(
        self, capability: str, *, timeout: float = LOOKUP_TIMEOUT, limit: int | None = None
    ) -> list[str]:
        """One target (a multiaddr ending in ``/p2p/<id>``) per other peer serving ``capability``.

        Found with ``discover(model=capability)``; ready for :meth:`infer` and :meth:`call`.
        """
        return card_targets(await self.discover(model=capability, limit=limit, timeout=timeout), self.peer_id)

    def discover_iter(
        self,
        task: str | None = None,
        *,
        model: str | None = None,
        version: str | None = None,
        tags: Sequence[str] | str = (),
        limit: int | None = None,
        timeout: float = LOOKUP_TIMEOUT,
    ) -> AsyncIterator[CapabilityCard]:
        """Like :meth:`discover`, but yields each card as soon as it is verified.

        Leaving the loop early stops the search.
        """
        return search_cards(
            find_or_browse(self.discovery),  # no criteria: every card (browse index)
            self.nursery,
            task=task,
            model=model,
            version=version,
            tags=tags,
            limit=limit,
            timeout=timeout,
        )

    # -- the mesh ----------------------------------------------------------------

    async def connect(self, addr: str | multiaddr.Multiaddr) -> str:
        """Dial a peer by multiaddr (with ``/p2p/``, possibly relayed); returns its peer id."""
        return await self.dialer.connect(addr)

    async def ping(self, peer_id: str, *, timeout: float = 5.0) -> float | None:
        """Round-trip time to a connected or known peer in milliseconds (libp2p ping), or ``None``."""
        return await self.dialer.ping(peer_id, timeout=timeout)

    def availability_table(self) -> dict[str, Any]:
        """Live availability entries by peer id (this peer's own included), from gossip."""
        return self.availability.table() if self.availability is not None else {}

    async def mesh_view(
        self, *, timeout: float = PROVIDERS_TIMEOUT, discover_task: str | None = None
    ) -> list[MeshViewRow]:
        """The mesh as this peer sees it: one row per peer, its gossip (state, load) joined with
        the verified cards of what it serves (see :func:`~modelnet_p2p.mesh.providers.mesh_rows`)."""
        return await mesh_rows(
            self.discover, self.availability_table, timeout=timeout, discover_task=discover_task
        )

    async def providers(
        self, capability: str, *, timeout: float = PROVIDERS_TIMEOUT, refresh: bool = False
    ) -> list[Candidate]:
        """Every known provider of ``capability`` (other than this peer), as routing candidates.

        Cards from discovery (cached briefly) joined with availability gossip (state, load).
        """
        return await self._providers.candidates(capability, timeout=timeout, refresh=refresh)

    def infer(
        self,
        target: Target | None = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        trace: TraceContext | None = None,
        replay: bool | None = None,
        avoid: Collection[str] = (),
        receipt: bool = False,
        **params: Any,
    ) -> InferenceStream:
        """Stream the answer of ``target``'s ``capability`` to ``input``, chunk by chunk.

        ``target``: a multiaddr ending in ``/p2p/<id>``, a known peer's id, or ``None``: the
        mesh picks a provider (load-aware routing) and fails over, mid-stream only if the
        capability is idempotent (or ``replay=True``). ``avoid``: peer ids not to choose.
        ``timeout``: the whole request's deadline, failovers included, sent to the provider
        (``None``: ``request_timeout``; a provider silent ``stall_timeout`` s mid-stream has failed).
        ``receipt``: ask for a signed receipt (``info.receipt``). Other keyword arguments are
        request parameters. See :mod:`modelnet_p2p.mesh.client`.
        Raises (while iterating) a :class:`ModelNetError` subclass; never ends silently.
        """
        if capability is None:
            raise BadRequestError("capability is required")
        return self.mesh_client.stream(
            capability, input, params=params, timeout=timeout, target=target, trace=trace, replay=replay,
            avoid=avoid, receipt=receipt,
        )  # fmt: skip

    async def call(
        self,
        target: Target | None = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        trace: TraceContext | None = None,
        replay: bool | None = None,
        avoid: Collection[str] = (),
        receipt: bool = False,
        **params: Any,
    ) -> Response:
        """Like :meth:`infer`, but collect the whole answer into a :class:`Response`."""
        if capability is None:
            raise BadRequestError("capability is required")
        return await self.mesh_client.call(
            capability, input, params=params, timeout=timeout, target=target, trace=trace, replay=replay,
            avoid=avoid, receipt=receipt,
        )  # fmt: skip

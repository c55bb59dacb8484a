"""The :class:`Peer`: one libp2p host, one nursery, and the services composed on it."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from .errors import (
    BadRequestError,
    ConfigError,
    DeadlineExceededError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnavailableError,
)
from .log import quiet_libp2p
from .mesh.routing import Candidate, Policy, Router
from .p2p.host import build_host, parse_multiaddr, running_host
from .p2p.identity import Identity
from .p2p.network import get_network, protocol_id, topic
from .p2p.pool import StreamPool
from .proto.availability import TOPIC as AVAILABILITY_TOPIC
from .proto.capability import Capability
from .proto.card import CapabilityCard
from .proto.framing import DEFAULT_MAX_FRAME_SIZE
from .proto.infer import PROTOCOL_ID as INFER_PROTOCOL_ID
from .proto.infer import TraceContext
from .services.availability.service import (
    AvailabilityConfig,
    AvailabilityService,
    InferenceLoad,
    mesh_view,
    start_availability,
)
from .services.discovery.service import (
    DEFAULT_ANNOUNCE_INTERVAL,
    DEFAULT_CARD_TTL,
    DHT_PROTOCOL_ID,
    DhtModeName,
    Discovery,
    Query,
)
from .services.inference.handlers import Handler
from .services.inference.server import (
    DEFAULT_WINDOW,
    InferenceServer,
    Limits,
    ResponseInfo,
    new_request_id,
    run_request,
)
from .services.relay import (
    Reachability,
    RelayService,
    dial_via_relay,
    is_circuit_addr,
    keep_reservation,
    needs_relay,
    parse_circuit_addr,
)

__all__ = ["InferenceStream", "Peer", "Response"]

log = logging.getLogger(__name__)

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)
#: Seconds a capability's provider list (from the DHT) is reused before looking again.
PROVIDER_CACHE_TTL = 10.0
#: Providers tried for one routed request before giving up.
MAX_ROUTING_ATTEMPTS = 4
#: Seconds allowed for dialing a peer, within the request's own deadline.
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass
class Response:
    """A complete answer, as returned by :meth:`Peer.call`.

    Attributes:
        chunks: every chunk, in order.
        peer: the peer id that answered.
        finish_reason: from the end frame (``"stop"``, ``"length"``, ...).
        usage: counters from the end frame.
        latency: seconds from sending the request to the end frame.
    """

    chunks: list[Any]
    peer: str
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    latency: float = 0.0
    #: With routing (no target): every provider tried, in order, and what happened.
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The chunks joined as text (non-text chunks are converted with ``str``)."""
        return "".join(c if isinstance(c, str) else str(c) for c in self.chunks)

    @property
    def value(self) -> Any:
        """The single chunk if there is exactly one, else the list of chunks."""
        return self.chunks[0] if len(self.chunks) == 1 else self.chunks


class InferenceStream:
    """The answer to :meth:`Peer.infer`, chunk by chunk.

    Iterate it with ``async for``. Leaving the loop early cancels the remote
    handler; use ``async with peer.infer(...) as stream:`` (or call
    :meth:`aclose`) to make that happen at a known point rather than when the
    stream is garbage-collected. After the loop, :attr:`info` holds who answered,
    the finish reason and the usage counters.
    """

    def __init__(self, agen: AsyncIterator[Any], info: ResponseInfo) -> None:
        self._agen = agen
        self.info = info

    def __aiter__(self) -> InferenceStream:
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop the request (resetting the stream if it has not finished)."""
        await self._agen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> InferenceStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class Peer:
    """A modelnet peer: a libp2p host (TCP, Noise, yamux) plus the modelnet services.

    Use it as an async context manager under trio::

        async with Peer(identity="peer.key") as peer:
            peer.serve(Capability(name="echo"), echo_handler)
            async for chunk in peer.infer(other_addr, "echo", "hello"):
                print(chunk)

    Every background task runs in the peer's own nursery; leaving the ``async
    with`` block cancels them, closes the listener and all connections.

    Args:
        identity: a key file path (created if missing), an :class:`Identity`, or
            ``None`` for an ephemeral key (logged, since the peer id changes each run).
        listen: multiaddrs to listen on.
        bootstrap: multiaddrs (with ``/p2p/``) of peers to connect to at start.
        passphrase: for an encrypted key file.
        max_frame_size: largest frame accepted or sent, in bytes.
        max_concurrency: requests served at once, over all callers.
        max_concurrency_per_peer: requests served at once for one caller.
        connect_timeout: seconds allowed to dial a peer.
        network: the mesh to join (see :mod:`modelnet_p2p.p2p.network`); peers of
            different networks do not understand each other's protocols.
        dht_mode: ``"server"`` (answer DHT requests and store records),
            ``"client"`` (only ask), or ``"auto"``: server if the peer listens on
            an address, client if it has none (see ``specs/capability.md``).
        announce_interval: seconds between re-announces of the capability card.
        card_ttl: seconds a capability card stays valid after each announce.
        routing_policy: how requests without a target pick a provider:
            ``"p2c"`` (default), ``"least-loaded"``, ``"lowest-latency"`` or a
            function (see :mod:`modelnet_p2p.mesh.routing`).
        reachability: ``"auto"``, ``"public"`` or ``"private"``: whether others
            can dial this peer. A private peer runs the DHT as a client,
            reserves a circuit relay slot on its bootstrap peers and announces
            the relayed address (``specs/network.md``).
        relay_hop: relay circuits for private peers (bootstrap nodes do).
    """

    def __init__(
        self,
        identity: str | os.PathLike[str] | Identity | None = None,
        listen: Sequence[str] = DEFAULT_LISTEN,
        bootstrap: Sequence[str] = (),
        *,
        passphrase: bytes | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_concurrency: int = 128,
        max_concurrency_per_peer: int = 64,
        max_request_time: float = 600.0,
        max_hops: int = 8,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        window: int = DEFAULT_WINDOW,
        network: str = "local",
        require_bootstrap: bool = False,
        dht_mode: DhtModeName = "auto",
        announce_interval: float = DEFAULT_ANNOUNCE_INTERVAL,
        card_ttl: float = DEFAULT_CARD_TTL,
        routing_policy: str | Policy = "p2c",
        reachability: Reachability = "auto",
        relay_hop: bool = False,
        publish_interval: float = 2.0,
        gossip: bool = True,
    ) -> None:
        quiet_libp2p()
        #: The mesh this peer belongs to; it is part of every protocol id (specs/network.md).
        self.network = get_network(network).name
        self.infer_protocol = TProtocol(protocol_id(INFER_PROTOCOL_ID, self.network))
        if identity is None:
            self.identity = Identity.generate(ephemeral=True)
        elif isinstance(identity, Identity):
            self.identity = identity
        else:
            self.identity = Identity.load_or_create(Path(identity), passphrase)
        if max_frame_size < 1024:
            raise ConfigError("max_frame_size must be at least 1024 bytes")
        if max_concurrency < 1 or max_concurrency_per_peer < 1:
            raise ConfigError("concurrency limits must be at least 1")
        self._listen = [parse_multiaddr(a) for a in listen]
        self._bootstrap = [parse_multiaddr(a) for a in bootstrap]
        #: Relay circuits for peers that cannot be dialed (bootstrap nodes do).
        self.relay_hop = relay_hop
        #: Reserve slots on the bootstrap peers' relays and announce relayed
        #: addresses (a peer that others cannot dial; see ``specs/network.md``).
        # A peer with no listen address is a pure client in "auto": it only
        # calls out, so nobody needs to reach it and it reserves no slot.
        self.needs_relay = (reachability != "auto" or bool(self._listen)) and needs_relay(
            reachability, self._listen, self._bootstrap
        )
        if self.needs_relay and dht_mode == "auto":
            dht_mode = "client"  # nobody can dial us to ask
        self.relay: RelayService | None = None
        self._circuit_addrs: dict[str, str] = {}
        #: Availability gossip (``specs/availability.md``); ``None`` while stopped or if disabled.
        self.availability: AvailabilityService | None = None
        self._gossip = gossip
        try:
            self._availability_config = AvailabilityConfig(
                publish_interval=publish_interval, topic=topic(AVAILABILITY_TOPIC, self.network)
            )
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.limits = Limits(
            max_frame_size=max_frame_size,
            max_concurrency=max_concurrency,
            max_concurrency_per_peer=max_concurrency_per_peer,
            max_request_time=max_request_time,
            max_hops=max_hops,
        )
        self.connect_timeout = connect_timeout
        #: Fail at start (``UnavailableError``) if no bootstrap peer can be reached.
        self.require_bootstrap = require_bootstrap
        self.window = window
        self._host: IHost | None = None
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        self._streams = StreamPool()
        #: Picks providers for requests without a target (see :mod:`modelnet_p2p.mesh.routing`).
        self.router = Router(routing_policy)
        self._provider_cache: dict[str, tuple[float, list[CapabilityCard]]] = {}
        self.inference = InferenceServer(str(self.identity.peer_id), self.limits)
        self.inference.mesh_factory = self._mesh_context
        self._load = InferenceLoad(self.inference, max_concurrency)
        self.inference.on_request_done = self._load.on_request_done
        try:
            #: Capability discovery: the DHT, this peer's card, lookups (specs/capability.md).
            self.discovery = Discovery(
                self.identity,
                self.inference.capabilities,
                protocol=protocol_id(DHT_PROTOCOL_ID, self.network),
                mode=dht_mode,
                card_ttl=card_ttl,
                announce_interval=announce_interval,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Peer:
        if self.identity.ephemeral:
            log.info("no identity configured; using ephemeral peer id %s", self.identity.peer_id)
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            host = build_host(self.identity, dial_timeout=self.connect_timeout)
            await stack.enter_async_context(running_host(host, self._listen))
            self._host = host
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self.inference.bind(self._nursery)
            self._nursery.start_soon(self._streams.sweep_forever)
            host.set_stream_handler(self.infer_protocol, self.inference.handle_stream)
            # The DHT handler must be registered before the first connection: identify
            # tells each contact then whether this peer serves the DHT.
            await self.discovery.start(host, self._nursery)
            stack.callback(self.discovery.stop)  # before the nursery and the host close
            self.relay = RelayService(host, hop=self.relay_hop)
            await self.relay.start(self._nursery)
            stack.callback(self.relay.stop)
            if self._gossip:
                # Started before the bootstrap connections, so that pubsub sees them.
                self.availability = await start_availability(
                    host,
                    self.identity,
                    self._nursery,
                    self._availability_config,
                    load_provider=self._load.snapshot,
                    capabilities=self.inference.capabilities(),
                )
            await self._connect_bootstrap()
            await self.discovery.bootstrap(self._connected_bootstrap_peers())
            if self.needs_relay:
                await self._reserve_relays()
        except BaseException:
            self._host = None
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        log.info("peer %s listening on %s", self.peer_id, ", ".join(self.addrs))
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        # Shut down as if the body had ended normally, then let the body's own
        # exception (if any) propagate as it is: passing it through the
        # nurseries below would wrap it in an exception group, and callers
        # could no longer write ``except NotFoundError``.
        if self.availability is not None and self.inference.capabilities():
            # Say goodbye first, so that routers stop choosing this peer at once
            # rather than after the availability TTL.
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.availability.leave()
                except Exception as exc:
                    log.debug("could not publish 'leaving': %r", exc)
        self.availability = None
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        stack, self._stack = self._stack, None
        self._host = None
        self._nursery = None
        await self._streams.close_all()
        if stack is not None:
            await stack.__aexit__(None, None, None)

    async def _connect_bootstrap(self) -> None:
        if not self._bootstrap:
            return
        ok = 0
        for addr in self._bootstrap:
            try:
                await self.connect(addr)
                ok += 1
            except ModelNetError as exc:
                # With require_bootstrap the failure is raised below; do not say it twice.
                level = logging.INFO if self.require_bootstrap else logging.WARNING
                log.log(level, "bootstrap peer %s unreachable: %s", addr, exc.message)
        if ok == 0:
            if self.require_bootstrap:
                raise UnavailableError(
                    "no bootstrap peer reachable: " + ", ".join(str(a) for a in self._bootstrap)
                )
            log.warning("no bootstrap peer reachable; running alone")

    async def _reserve_relays(self) -> None:
        """Hold a relay slot on every reachable bootstrap peer; announce the relayed addresses."""
        self.discovery.relayed_only = True
        reservations = []
        for addr in self._bootstrap:
            relay_addr = str(addr)

            def changed(circuit: str | None, relay_addr: str = relay_addr) -> None:
                if circuit is None:
                    self._circuit_addrs.pop(relay_addr, None)
                else:
                    self._circuit_addrs[relay_addr] = circuit
                self.discovery.set_extra_addrs(list(self._circuit_addrs.values()))

            reservations.append(keep_reservation(self.host, relay_addr, self.nursery, changed))
        with trio.move_on_after(self.connect_timeout):
            for reservation in reservations:
                try:
                    await reservation.wait(self.connect_timeout)
                except ModelNetError as exc:
                    log.warning("no relay slot on %s: %s", reservation.relay_addr, exc.message)
        if not self._circuit_addrs:
            log.warning("this peer cannot be dialed and holds no relay slot; others cannot reach it")

    def _connected_bootstrap_peers(self) -> list[ID]:
        out = []
        for addr in self._bootstrap:
            try:
                pid = info_from_p2p_addr(addr).peer_id
            except Exception:
                continue
            if self.host.get_network().get_connections(pid):
                out.append(pid)
        return out

    # -- identity and addresses -------------------------------------------------

    @property
    def host(self) -> IHost:
        """The underlying libp2p host (only while the peer runs)."""
        if self._host is None:
            raise RuntimeError("peer is not running; use 'async with Peer(...)'")
        return self._host

    @property
    def nursery(self) -> trio.Nursery:
        """The peer's nursery: tasks started here stop when the peer stops."""
        if self._nursery is None:
            raise RuntimeError("peer is not running")
        return self._nursery

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

    def _mesh_context(self, request: Any) -> Any:
        from .mesh.collab import MeshContext

        return MeshContext(self, request)

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
        others = [c for c in self.inference.capabilities() if c.name != cap.name]
        self.discovery.check_capabilities([*others, cap])
        if self.availability is not None:
            self.availability.set_capabilities([*others, cap])
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

    # -- discovering -------------------------------------------------------------

    async def announce(self) -> CapabilityCard | None:
        """Announce this peer's capability card now and return it.

        :meth:`serve` and :meth:`unserve` announce on their own, soon after each
        change, and the card is re-announced every ``announce_interval``. Returns
        ``None`` if the peer has no address others could dial.
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
        timeout: float = 10.0,
    ) -> list[CapabilityCard]:
        """The verified capability cards of every peer serving what is asked.

        Every criterion given must hold for one capability of a card: ``task``
        among its tasks, ``model`` its name, ``version`` its version (with
        ``model``), every one of ``tags`` among its tags. Names, tasks and tags
        compare case-insensitively. The lookup goes to the network (not to
        records this peer happens to hold), each card is checked (signature,
        expiry, limits) and each peer appears once. Returns what was found when
        ``limit`` cards are found or ``timeout`` seconds have passed.
        """
        return [
            card
            async for card in self.discover_iter(
                task, model=model, version=version, tags=tags, limit=limit, timeout=timeout
            )
        ]

    async def find_providers(
        self, capability: str, *, timeout: float = 10.0, limit: int | None = None
    ) -> list[str]:
        """Where to call the capability named ``capability``: one target per other peer serving it.

        Each target is a multiaddr ending in ``/p2p/<id>`` (a direct address if
        the card has one), ready for :meth:`infer` and :meth:`call`. This peer is
        left out. Found with ``discover(model=capability)``.
        """
        targets = []
        for card in await self.discover(model=capability, limit=limit, timeout=timeout):
            if card.peer_id == self.peer_id:
                continue
            addrs = sorted(card.dial_addrs, key=lambda a: "/p2p-circuit" not in a)
            targets.append(addrs[0] if addrs else card.peer_id)
        return targets

    async def discover_iter(
        self,
        task: str | None = None,
        *,
        model: str | None = None,
        version: str | None = None,
        tags: Sequence[str] | str = (),
        limit: int | None = None,
        timeout: float = 10.0,
    ) -> AsyncIterator[CapabilityCard]:
        """Like :meth:`discover`, but yields each card as soon as it is verified.

        Leaving the loop early stops the search.
        """
        tag_list = (tags,) if isinstance(tags, str) else tuple(tags)
        if version is not None and model is None:
            raise BadRequestError("version needs model")
        if task is None and model is None and not tag_list:
            raise BadRequestError("give at least one of task, model or tags")
        if limit is not None and limit < 1:
            raise BadRequestError("limit must be at least 1")
        query = Query(task=task, model=model, version=version, tags=tag_list)
        send, recv = trio.open_memory_channel[CapabilityCard](math.inf)
        scope = trio.CancelScope()

        async def search() -> None:
            async with send:
                with scope, trio.move_on_after(timeout):
                    try:
                        await self.discovery.find(query, send, limit=limit)
                    except Exception as exc:  # never let a lookup take the peer down
                        log.warning("discovery of %s failed: %r", query, exc)

        self.nursery.start_soon(search)
        try:
            async with recv:
                async for card in recv:
                    yield card
        finally:
            scope.cancel()

    # -- connecting --------------------------------------------------------------

    async def connect(self, addr: str | multiaddr.Multiaddr) -> str:
        """Dial a peer by multiaddr (with ``/p2p/``, possibly relayed); returns its peer id."""
        maddr = parse_multiaddr(addr)
        if is_circuit_addr(maddr):
            await self._dial_circuit(str(maddr), trio.current_time() + self.connect_timeout)
            return parse_circuit_addr(maddr)[1]
        try:
            info = info_from_p2p_addr(maddr)
        except Exception:
            raise ConfigError(f"address {addr} has no /p2p/<peer id> part") from None
        await self._dial(info, trio.current_time() + self.connect_timeout)
        return str(info.peer_id)

    async def _dial_circuit(self, addr: str, deadline: float) -> None:
        """Connect through a relay (``.../p2p/<relay>/p2p-circuit/p2p/<target>``) unless connected."""
        _, target = parse_circuit_addr(addr)
        pid = parse_peer_id(target)
        if pid is not None and self.host.get_network().get_connections(pid):
            return
        timeout = max(0.05, min(self.connect_timeout, deadline - trio.current_time()))
        await dial_via_relay(self.host, addr, timeout=timeout)

    async def _dial(self, info: PeerInfo, deadline: float) -> None:
        host = self.host
        if info.peer_id == self.identity.peer_id:
            raise BadRequestError("cannot dial this peer itself")
        with trio.move_on_at(min(deadline, trio.current_time() + self.connect_timeout)) as scope:
            try:
                await host.connect(info)
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                raise UnavailableError(f"cannot reach peer {info.peer_id}: {_why(exc)}") from None
        if scope.cancelled_caught:
            if deadline <= trio.current_time():
                raise DeadlineExceededError(f"deadline exceeded while dialing {info.peer_id}")
            raise UnavailableError(f"timed out dialing peer {info.peer_id}")

    def _resolve_target(self, target: str | multiaddr.Multiaddr | ID) -> PeerInfo:
        if isinstance(target, ID):
            return PeerInfo(target, [])
        if isinstance(target, multiaddr.Multiaddr) or str(target).startswith("/"):
            maddr = parse_multiaddr(target)
            try:
                return info_from_p2p_addr(maddr)
            except Exception:
                raise ConfigError(f"target {target} has no /p2p/<peer id> part") from None
        pid = parse_peer_id(str(target))
        if pid is None:
            raise ConfigError(f"target {target!r} is neither a multiaddr nor a peer id")
        return PeerInfo(pid, [])

    async def _open_stream(self, info: PeerInfo, deadline: float) -> INetStream:
        host = self.host
        pid = info.peer_id
        if not host.get_network().get_connections(pid):
            if not info.addrs and not _known_addrs(host, pid):
                raise UnavailableError(f"no known address for peer {pid}")
            await self._dial(info, deadline)
        with trio.move_on_at(deadline) as scope:
            try:
                return await host.new_stream(pid, [self.infer_protocol])
            except (BaseLibp2pError, OSError, trio.BrokenResourceError) as exc:
                raise UnavailableError(
                    f"peer {pid} does not accept {self.infer_protocol}: {_why(exc)}"
                ) from None
        assert scope.cancelled_caught
        raise DeadlineExceededError(f"deadline exceeded opening a stream to {pid}")

    # -- calling ---------------------------------------------------------------

    def infer(
        self,
        target: str | multiaddr.Multiaddr | ID | None = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        trace: TraceContext | None = None,
        replay: bool | None = None,
        avoid: Collection[str] = (),
        **params: Any,
    ) -> InferenceStream:
        """Stream the answer of ``target``'s ``capability`` to ``input``, chunk by chunk.

        ``target`` is a multiaddr ending in ``/p2p/<id>``, or the id of a peer this
        peer already knows, or ``None``: then the mesh picks a provider of
        ``capability`` (discovery plus availability gossip, load-aware routing)
        and fails over to another one if it fails. A provider that fails
        mid-stream is replaced only if the capability is idempotent (or
        ``replay=True``): the request is replayed elsewhere and the chunks already
        delivered are skipped, so the caller sees each chunk once, in order.
        Otherwise the error says how many chunks were delivered.
        ``stream.info.attempts`` records every provider tried.

        ``avoid`` lists peer ids routing must not choose (e.g. a provider whose
        last answer a verifier rejected). Keyword arguments other than
        ``timeout``, ``trace``, ``replay`` and ``avoid`` are sent as request
        parameters. ``timeout`` (seconds) is the whole
        request's deadline (retries included), sent to the provider so it stops too.

        Raises (while iterating) a :class:`ModelNetError` subclass; never ends
        silently before the provider's end frame.
        """
        if capability is None:
            raise BadRequestError("capability is required")
        info = ResponseInfo()
        if target is None:
            return InferenceStream(
                self._routed(capability, input, params, timeout, trace, replay, set(avoid), info), info
            )
        return InferenceStream(self._infer(target, capability, input, params, timeout, trace, info), info)

    async def _infer(
        self,
        target: str | multiaddr.Multiaddr | ID,
        capability: str,
        input: Any,
        params: dict[str, Any],
        timeout: float | None,
        trace: TraceContext | None,
        info: ResponseInfo,
    ) -> AsyncIterator[Any]:
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        if not isinstance(target, ID) and is_circuit_addr(target):
            await self._dial_circuit(str(target), deadline)
        pinfo = self._resolve_target(target)
        info.peer = str(pinfo.peer_id)
        tc = trace or TraceContext(trace_id=new_request_id(), span_id=os.urandom(8))
        for fresh in (False, True):
            stream = self._streams.acquire(info.peer) if not fresh else None
            reused = stream is not None
            if stream is None:
                stream = await self._open_stream(pinfo, deadline)
            agen = run_request(
                stream,
                capability=capability,
                input=input,
                params=params,
                deadline=deadline,
                trace=tc,
                info=info,
                max_frame_size=self.limits.max_frame_size,
                window=self.window,
                release=self._streams.release_to(info.peer),
            )
            try:
                async for chunk in agen:
                    yield chunk
                return
            except (ProtocolError, UnavailableError):
                # A kept stream the provider had just closed: nothing was received,
                # so the request never ran there. Try once more on a new stream.
                if not reused or info.received:
                    raise
                log.debug("kept stream to %s was stale; retrying on a new one", info.peer)
            finally:
                await agen.aclose()  # type: ignore[attr-defined]

    # -- availability ----------------------------------------------------------

    def availability_table(self) -> dict[str, Any]:
        """Live availability entries by peer id (this peer's own included), from gossip."""
        return self.availability.table() if self.availability is not None else {}

    async def mesh_view(self, *, timeout: float = 5.0, discover_task: str | None = None) -> list[Any]:
        """The mesh as this peer sees it: availability gossip joined with capability cards.

        Each row (a :class:`~modelnet_p2p.services.availability.service.MeshViewRow`) is a
        peer: its state and load from gossip (if it is alive), and its
        capabilities with their verified cards (from discovery: every
        capability name seen in gossip is looked up, plus ``discover_task``).
        """
        table = self.availability_table()
        names = {name for entry in table.values() for name, _ in entry.capabilities}
        cards: dict[str, list[Any]] = {}
        found: list[CapabilityCard] = []
        with trio.move_on_after(timeout):
            for name in sorted(names):
                found.extend(await self.discover(model=name, timeout=timeout))
            if discover_task:
                found.extend(await self.discover(discover_task, timeout=timeout))
        for card in found:
            cards.setdefault(card.peer_id, [])
            for cap in card.capabilities:
                if all(c.name != cap.name for c in cards[card.peer_id]):
                    cards[card.peer_id].append(cap)
        # Read the table again: the lookups took time, and entries may have expired.
        return mesh_view(self.availability_table(), cards)

    async def ping(self, peer_id: str, *, timeout: float = 5.0) -> float | None:
        """Round-trip time to a connected or known peer in milliseconds (libp2p ping), or ``None``."""
        from libp2p.host.ping import PingService

        pid = parse_peer_id(peer_id)
        if pid is None or pid == self.identity.peer_id:
            return None
        with trio.move_on_after(timeout):
            try:
                if not self.host.get_network().get_connections(pid):
                    await self._dial(
                        PeerInfo(pid, _known_addrs(self.host, pid)), trio.current_time() + timeout
                    )
                started = trio.current_time()
                await PingService(self.host).ping(pid, 1)
                return (trio.current_time() - started) * 1000
            except Exception as exc:
                log.debug("ping %s failed: %r", peer_id, exc)
        return None

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

    # -- routing ---------------------------------------------------------------

    async def providers(
        self, capability: str, *, timeout: float = 5.0, refresh: bool = False
    ) -> list[Candidate]:
        """Every known provider of ``capability`` (other than this peer), as routing candidates.

        Joins discovery (verified capability cards, cached for
        :data:`PROVIDER_CACHE_TTL` seconds) with availability gossip (state
        and load, fresher than any card).
        """
        now = trio.current_time()
        cached = self._provider_cache.get(capability)
        if cached is None or refresh or now - cached[0] > PROVIDER_CACHE_TTL:
            cards = await self.discover(model=capability, timeout=timeout)
            self._provider_cache[capability] = (trio.current_time(), cards)
        else:
            cards = cached[1]
        found: dict[str, Candidate] = {}
        for card in cards:
            if card.peer_id == self.peer_id:
                continue
            cap = next((c for c in card.capabilities if c.name.lower() == capability.lower()), None)
            addrs = sorted(card.dial_addrs, key=lambda a: "/p2p-circuit" not in a)
            found[card.peer_id] = Candidate(
                peer_id=card.peer_id,
                addrs=addrs,
                idempotent=bool(cap and cap.idempotent),
                max_concurrency=(cap.max_concurrency or 0) if cap else 0,
                card=card,
            )
        self._join_availability(capability, found)
        return list(found.values())

    def _join_availability(self, capability: str, found: dict[str, Candidate]) -> None:
        """Fill in state and load from availability gossip; add gossiping providers the DHT missed."""
        service = getattr(self, "availability", None)
        if service is None:
            return
        for pid, entry in service.table().items():
            if pid == self.peer_id:
                continue
            serves = any(name.lower() == capability.lower() for name, _ in entry.capabilities)
            cand = found.get(pid)
            if cand is None:
                if not serves:
                    continue
                cand = found[pid] = Candidate(peer_id=pid)
            cand.state = str(entry.state)
            cand.in_flight = entry.record.in_flight
            cand.queue = entry.record.queue
            if entry.record.max_concurrency:
                cand.max_concurrency = entry.record.max_concurrency

    async def _routed(
        self,
        capability: str,
        input: Any,
        params: dict[str, Any],
        timeout: float | None,
        trace: TraceContext | None,
        replay: bool | None,
        avoid: set[str],
        info: ResponseInfo,
    ) -> AsyncIterator[Any]:
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        tc = trace or TraceContext(trace_id=new_request_id(), span_id=os.urandom(8))
        tried: set[str] = set(avoid)
        delivered = 0
        refreshed = False
        last_error: ModelNetError | None = None
        while True:
            # A provider's card can take one RPC timeout (5 s) plus a DHT query to arrive.
            lookup = max(0.05, min(10.0, deadline - trio.current_time()))
            with trio.move_on_at(deadline):
                cands = await self.providers(capability, timeout=lookup)
            if trio.current_time() >= deadline:
                raise DeadlineExceededError(
                    f"deadline exceeded routing {capability!r} after {len(info.attempts)} attempts",
                    chunks_delivered=delivered,
                )
            chosen = self.router.choose(cands, exclude=tried)
            if chosen is None and not refreshed:
                refreshed = True  # the cache may be stale: look again once
                cands = await self.providers(capability, timeout=lookup, refresh=True)
                chosen = self.router.choose(cands, exclude=tried)
            if chosen is None:
                if last_error is not None:
                    last_error.chunks_delivered = delivered
                    raise last_error
                if not cands:
                    raise NotFoundError(f"no provider of {capability!r} found in the mesh")
                busy = [
                    c
                    for c in cands
                    if c.peer_id not in tried
                    and not self.router.banned(c.peer_id)
                    and c.state in (None, "ready", "draining", "joining")
                ]
                if busy:
                    raise OverloadedError(
                        f"all {len(busy)} live providers of {capability!r} are at capacity or draining",
                        chunks_delivered=delivered,
                    )
                raise UnavailableError(
                    f"none of the {len(cands)} known providers of {capability!r} is available "
                    "(left, failing or banned)",
                    chunks_delivered=delivered,
                )
            pid = chosen.peer_id
            tried.add(pid)
            target = chosen.addrs[0] if chosen.addrs else pid
            attempt: dict[str, Any] = {"peer": pid, "status": "running", "chunks": 0}
            info.attempts.append(attempt)
            sub = ResponseInfo()
            skip = delivered
            started = trio.current_time()
            self.router.started(pid)
            try:
                async for chunk in self._infer(
                    target, capability, input, params, _remaining(deadline), tc, sub
                ):
                    attempt["chunks"] += 1
                    if attempt["chunks"] == 1:
                        self.router.observe_rtt(pid, (trio.current_time() - started) * 1000)
                    if skip:
                        skip -= 1  # delivered by an earlier provider
                        continue
                    delivered += 1
                    info.peer, info.chunks = pid, delivered
                    yield chunk
                if skip:
                    raise ProtocolError(
                        f"replay on {pid} gave {attempt['chunks']} chunks, fewer than the "
                        f"{delivered} already delivered",
                        chunks_delivered=delivered,
                    )
            except ModelNetError as exc:
                attempt.update(
                    status="error", error=str(exc), ms=round((trio.current_time() - started) * 1000, 1)
                )
                if isinstance(exc, OverloadedError):
                    self.router.overloaded(pid)
                elif exc.retryable:
                    self.router.failure(pid)
                exc.chunks_delivered = delivered
                if not exc.retryable or isinstance(exc, DeadlineExceededError):
                    raise
                if delivered and not (replay if replay is not None else chosen.idempotent):
                    raise UnavailableError(
                        f"provider {pid} failed after {delivered} chunks and {capability!r} is not "
                        f"idempotent, so the request was not replayed elsewhere: {exc.message}",
                        chunks_delivered=delivered,
                    ) from None
                if len(info.attempts) >= MAX_ROUTING_ATTEMPTS:
                    raise
                last_error = exc
                log.info("provider %s of %r failed (%s); trying another", pid, capability, exc.message)
                continue
            finally:
                self.router.finished(pid)
            attempt.update(status="ok", ms=round((trio.current_time() - started) * 1000, 1))
            self.router.success(pid)
            info.peer = pid
            info.finish_reason, info.usage = sub.finish_reason, sub.usage
            info.started, info.first_chunk_at, info.ended = sub.started, sub.first_chunk_at, sub.ended
            info.received += sub.received
            return

    async def call(
        self,
        target: str | multiaddr.Multiaddr | ID | None = None,
        capability: str | None = None,
        input: Any = None,
        *,
        timeout: float | None = None,
        trace: TraceContext | None = None,
        replay: bool | None = None,
        avoid: Collection[str] = (),
        **params: Any,
    ) -> Response:
        """Like :meth:`infer`, but collect the whole answer into a :class:`Response`."""
        stream = self.infer(
            target, capability, input, timeout=timeout, trace=trace, replay=replay, avoid=avoid, **params
        )
        chunks: list[Any] = []
        async with stream:
            async for chunk in stream:
                chunks.append(chunk)
        info = stream.info
        return Response(
            chunks=chunks,
            peer=info.peer,
            finish_reason=info.finish_reason,
            usage=info.usage,
            latency=(info.ended or info.started) - info.started,
            attempts=list(info.attempts),
        )


def _remaining(deadline: float) -> float | None:
    return None if math.isinf(deadline) else max(0.001, deadline - trio.current_time())


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


def _known_addrs(host: IHost, pid: ID) -> list[multiaddr.Multiaddr]:
    try:
        return list(host.get_peerstore().addrs(pid))
    except Exception:  # PeerStoreError: never heard of it
        return []


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

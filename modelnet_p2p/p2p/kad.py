"""The Kademlia DHT as the discovery service sees it: our own protocol id, our own types.

py-libp2p 0.8.1's ``KadDHT`` serves the protocol here: the routing table, the value and
provider stores, and the inbound handler. Everything else the discovery service needs is
in :class:`KadNode`, in terms of peer ids as base58 text, addresses as text, and the
messages :class:`KadRequest` / :class:`KadResponse`, so that no libp2p type leaves
``p2p/``. The workarounds of py-libp2p's Kademlia bugs (the protocol-id proxy first of
all) live in :mod:`._compat.kad`. Validation is strict: a server refuses values in any
namespace without a validator (py-libp2p's default would store them for 24 h).

If the proxy ever stopped working, our records would silently go to the public IPFS DHT.
:meth:`KadNode.start` therefore checks, before anyone is dialed, that the host serves our
protocol id (in server mode) and not ``/ipfs/kad/1.0.0``, and raises
:class:`PrivateProtocolError` otherwise; every request this module sends names our id.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, cast

import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.tools.anyio_service.api import ManagerAPI
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from ..errors import ProtocolError
from ..proto.framing import encode_varint
from ..proto.kadcards import append_cards, cards_in
from ._compat.goaway import pruned_by_peer
from ._compat.kad import (
    IPFS_KAD_PROTOCOL_ID,
    InboundLimitError,
    InboundLimits,
    KadHostView,
    MeshKadDHT,
    refuse_streams,
    store_value,
)
from ._compat.multistream import OptimisticStream, ProtocolRefused
from .ids import addr_bytes, addr_text, id_bytes, id_text, parse_addr, parse_id
from .kadcheck import TableChecker
from .notify import connected, on_disconnect
from .stream import close_quietly, reset_quietly

if TYPE_CHECKING:
    # trio-typing's stubs (installed with py-libp2p) shadow trio's own annotations.
    from trio_typing import TaskStatus

__all__ = [
    "IPFS_KAD_PROTOCOL_ID",
    "MAX_DETACHED_REQUESTS",
    "Host",
    "InboundLimitError",
    "InboundLimits",
    "KadKind",
    "KadNode",
    "KadOutcome",
    "KadPeer",
    "KadRequest",
    "KadResponse",
    "PrivateProtocolError",
    "ProviderVerifier",
    "RecordPolicy",
    "peer_id_bytes",
]

log = logging.getLogger(__name__)

#: Requests that may go on in the background after their caller stopped waiting (see
#: :meth:`KadNode.exchange`); past this many, a caller's cancellation cancels its request.
MAX_DETACHED_REQUESTS = 256

#: Requests in a row that a peer fails before a stream to it opened (unreachable, or its dial
#: out of time) before it leaves the routing table: one may be a busy machine, two in a row
#: rarely are. A request out of time with its stream open met a slow peer: it does not count.
#: A server also sends these requests to a table peer whose last connection closed
#: (:mod:`.kadcheck`): its callers would otherwise stay in its table after they left.
MAX_FAILURES = 2
#: Peers whose failures in a row are counted, at most (the oldest count is dropped); also
#: the most peers remembered as unreachable.
MAX_FAILING_PEERS = 1024
#: Seconds a peer dropped from the routing table (unreachable, or MAX_FAILURES in a row) is
#: left out of the closer peers of answers: other servers' tables keep handing out peers
#: that have left, and every lookup would try each again (py-libp2p's swarm refuses to dial
#: a peer for 60 s after a dial failed anyway: its negative cache).
UNREACHABLE_TIME = 60.0

#: The host type :class:`KadNode` runs on (services pass it through without looking inside).
Host = IHost


class PrivateProtocolError(RuntimeError):
    """The DHT would speak the public ``/ipfs/kad/1.0.0`` instead of our own protocol id."""


class KadKind(enum.IntEnum):
    """Kademlia message types (the values are the wire's)."""

    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4


@dataclass(frozen=True)
class KadPeer:
    """A peer as a DHT message lists it: base58 peer id and addresses as text."""

    peer_id: str
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class KadRequest:
    """One DHT request: ``value`` for PUT_VALUE, ``provider`` for ADD_PROVIDER; ``cards``:
    card envelopes in the extension field (``specs/capability.md``, "Cards beside provider
    records"), e.g. the provider's own card in an ADD_PROVIDER."""

    kind: KadKind
    key: bytes
    value: bytes | None = None
    provider: KadPeer | None = None
    cards: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class KadResponse:
    """The parts of a DHT answer discovery reads (peers that do not parse are left out)."""

    closer: tuple[KadPeer, ...] = ()
    providers: tuple[KadPeer, ...] = ()
    value: bytes | None = None
    #: Card envelopes in the extension field (unverified: the caller checks them).
    cards: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class KadOutcome:
    """How one request went: the ``answer`` (``None`` on failure), whether a stream was
    ``opened``, and whether the request ``timed_out`` (slow, not necessarily gone)."""

    answer: KadResponse | None
    opened: bool
    timed_out: bool


class RecordPolicy(Protocol):
    """Validates and selects the values of one namespace (a DHT validator).

    ``validate`` raises :class:`ValueError` for a value the server must not store.
    ``select`` returns the index of the best of ``values``; py-libp2p passes
    ``[new, old]`` on a local put and ``[existing, new]`` on a remote PUT, so the choice
    must depend on the values, not their positions.
    """

    def validate(self, key: str, value: bytes) -> None: ...

    def select(self, key: str, values: list[bytes]) -> int: ...


#: Checks that a provider record of ``key`` for ``peer`` points to a card that verifies and
#: lists the key: True, False (refuted: a DHT server no longer answers it), or None (no
#: verdict: the provider could not be asked just now).
ProviderVerifier = Callable[[bytes, KadPeer], Awaitable[bool | None]]


def peer_id_bytes(peer_id: str) -> bytes:
    """The binary form of a base58 peer id (``ValueError`` if it is not one)."""
    try:
        return id_bytes(peer_id)
    except Exception as exc:
        raise ValueError(f"not a peer id: {peer_id[:80]!r}") from exc


def _peer(peer: Message.Peer) -> KadPeer | None:
    try:
        return KadPeer(id_text(peer.id), tuple(addr_text(a) for a in peer.addrs))
    except Exception:
        return None


def _peers(items: Sequence[Message.Peer], limit: int) -> tuple[KadPeer, ...]:
    return tuple(p for raw in items[:limit] if (p := _peer(raw)) is not None)


def encode_request(req: KadRequest) -> bytes:
    """The protobuf bytes of ``req`` (without the length prefix)."""
    msg = Message(type=cast(Message.MessageType, int(req.kind)), key=req.key)
    if req.kind is KadKind.PUT_VALUE:
        msg.record.key = req.key
        msg.record.value = req.value or b""
    if req.provider is not None:
        peer = msg.providerPeers.add()
        peer.id = peer_id_bytes(req.provider.peer_id)
        peer.addrs.extend(addr_bytes(a) for a in req.provider.addrs)
    return append_cards(bytes(msg.SerializeToString()), req.cards)


def decode_response(data: bytes, *, max_closer: int, max_providers: int) -> KadResponse:
    """Parse an answer; only the first ``max_closer`` / ``max_providers`` peers are read."""
    msg = Message()
    msg.ParseFromString(data)
    value = msg.record.value if msg.HasField("record") and msg.record.value else None
    cards: tuple[bytes, ...] = ()
    if msg.providerPeers:
        try:
            cards = tuple(cards_in(data))
        except ProtocolError:
            cards = ()  # the known fields parsed: the answer stands without its cards
    return KadResponse(
        _peers(msg.closerPeers, max_closer), _peers(msg.providerPeers, max_providers), value, cards
    )


class KadNode:
    """One peer's DHT on its own protocol id: local stores, routing table, requests.

    Args:
        host: the libp2p host (before anyone is dialed).
        protocol: our DHT protocol id, e.g. ``/modelnet/kad/1.0.0``.
        server: answer DHT requests and store records (else only ask).
        provider_ttl: seconds a provider record stays in this server's store.
        max_providers_per_key: providers kept per key.
        add_provider_rate: ADD_PROVIDER messages accepted per sender per 10 s.
        inbound: bounds on inbound DHT streams and request rates per peer
            (:class:`InboundLimits`).
        max_values: values a server stores for others, at most.
        max_value_bytes: bytes of values a server stores for others, at most.
        identify_wait: seconds an inbound sender may take to complete identify before we
            decide whether it serves the DHT (and belongs in the routing table).
        max_response_size: largest answer read, in bytes.
        max_closer: closer peers read from one answer (Kademlia's k).
        max_providers: providers read from one answer.
        wall_clock: seconds since the epoch (provider record timestamps).
    """

    def __init__(
        self,
        host: Host,
        protocol: str,
        *,
        server: bool,
        provider_ttl: float,
        max_providers_per_key: int,
        add_provider_rate: int,
        inbound: InboundLimits,
        max_values: int,
        max_value_bytes: int,
        identify_wait: float,
        max_response_size: int,
        max_closer: int,
        max_providers: int,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if protocol == IPFS_KAD_PROTOCOL_ID:
            raise PrivateProtocolError(f"refusing to run our DHT on {IPFS_KAD_PROTOCOL_ID}")
        self._host = host
        self.protocol = protocol
        self.server = server
        self._settings = (provider_ttl, max_providers_per_key, add_provider_rate)
        self._inbound = inbound
        self._value_budget = (max_values, max_value_bytes)
        self._identify_wait = identify_wait
        self._max_response_size = max_response_size
        self._max_closer = max_closer
        self._max_providers = max_providers
        self._wall_clock = wall_clock
        self._view = KadHostView(host, protocol)
        self._dht: MeshKadDHT | None = None
        self._manager: ManagerAPI | None = None
        self._background: trio.Nursery | None = None
        #: Requests running in the background now (at most MAX_DETACHED_REQUESTS).
        self.detached = 0
        #: Failed requests in a row, by peer (see :meth:`_count_failure`).
        self._failures: dict[str, int] = {}
        #: Peers dropped from the routing table, and when (see UNREACHABLE_TIME).
        self._unreachable: dict[str, float] = {}
        #: A server's checks of table peers whose last connection closed (:mod:`.kadcheck`).
        self.table_checks: TableChecker | None = None
        #: Whether this peer closed a (muxed) connection itself, e.g. the connection manager
        #: trimming an idle one: its peer did not leave, and a close of that kind is not checked
        #: (a check would dial again what was just closed to save it).
        self.closed_here: Callable[[object], bool] = lambda _conn: False
        self._stop_watching: Callable[[], None] | None = None
        self.peer_id = str(host.get_id())

    # -- lifecycle -----------------------------------------------------------

    @property
    def _running(self) -> MeshKadDHT:
        if self._dht is None:
            raise RuntimeError("the DHT is not running")
        return self._dht

    @property
    def requests(self) -> int:
        """Outbound DHT streams opened so far (one per request)."""
        return self._view.requests

    async def start(self, nursery: trio.Nursery, refresher: Callable[[], Awaitable[None]]) -> None:
        """Create the DHT, check its protocol id, and run it in ``nursery``.

        ``refresher`` replaces py-libp2p's periodic routing-table refresh.
        Raises :class:`PrivateProtocolError` if the host would serve ``/ipfs/kad/1.0.0``.
        """
        ttl, per_key, rate = self._settings
        max_values, max_value_bytes = self._value_budget
        dht = MeshKadDHT(
            self._view,
            self.server,
            deferred=nursery,
            provider_ttl=ttl,
            max_providers_per_key=per_key,
            add_provider_rate=rate,
            inbound=self._inbound,
            max_values=max_values,
            max_value_bytes=max_value_bytes,
            identify_wait=self._identify_wait,
            wall_clock=self._wall_clock,
        )
        dht.refresher = refresher
        self._dht = dht
        self._background = nursery
        self.check_protocols()
        self._manager = await nursery.start(self._run, dht)
        if self.server:  # a client answers nobody: the peers of its table are checked when asked
            checks = self.table_checks = TableChecker(
                nursery, in_table=self.in_routing_table, connected=self.is_connected,
                probe=self._probe, attempts=MAX_FAILURES,
            )

            def closed(peer: str, conn: object) -> None:
                # Not one this peer let go, nor one its peer let go (GO_AWAY "pruned"):
                # in both cases the peer was alive, and a check would only dial it again.
                if not self.closed_here(conn) and not pruned_by_peer(conn):
                    checks.closed(peer)

            self._stop_watching = on_disconnect(self._host, closed)

    async def _run(self, dht: MeshKadDHT, task_status: TaskStatus[ManagerAPI]) -> None:
        try:
            async with background_trio_service(dht) as manager:
                task_status.started(manager)
                await manager.wait_finished()
        except Exception as exc:  # the DHT failing must not take the peer down
            log.warning("the DHT service stopped: %r", exc)

    def check_protocols(self) -> None:
        """Raise :class:`PrivateProtocolError` unless the host serves our DHT id, and only it.

        A server must have a handler for our protocol id; no peer may have one for
        ``/ipfs/kad/1.0.0`` (which would mean py-libp2p bypassed the view).
        """
        served = {str(p) for p in self._host.get_mux().get_protocols() if p}
        if IPFS_KAD_PROTOCOL_ID in served:
            raise PrivateProtocolError(
                f"the DHT registered a handler for {IPFS_KAD_PROTOCOL_ID}: the protocol-id view failed"
            )
        if self.server and self.protocol not in served:
            raise PrivateProtocolError(f"the DHT serves no handler for {self.protocol}")

    def stop(self) -> None:
        """Stop answering DHT requests and stop py-libp2p's service; never raises."""
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._dht is not None and self.server:
            refuse_streams(self._view)
        if self._manager is not None and self._manager.is_running:
            self._manager.cancel()

    def register_validator(self, namespace: str, policy: RecordPolicy) -> None:
        """Validate and select the values of ``/<namespace>/...`` keys with ``policy``."""
        self._running.register_validator(namespace, cast(Validator, policy))

    # -- the routing table and the peerstore ------------------------------------

    def closest_known(self, key: bytes, count: int) -> list[str]:
        """The ``count`` peers of the routing table closest to ``key``."""
        return [str(p) for p in self._running.routing_table.find_local_closest_peers(key, count)]

    def connected_peers(self) -> list[str]:
        return [str(p) for p in self._host.get_connected_peers()]

    def is_connected(self, peer_id: str) -> bool:
        """Whether the host holds an open connection to ``peer_id``."""
        return connected(self._host, parse_id(peer_id))

    def routing_table_size(self) -> int:
        return self._running.get_routing_table_size()

    def in_routing_table(self, peer_id: str) -> bool:
        return self._running.routing_table.peer_in_table(parse_id(peer_id))

    async def add_to_routing_table(self, peer_id: str) -> bool:
        """Add a peer that serves the DHT (identify is checked, as py-libp2p does)."""
        return await self._running.add_peer(parse_id(peer_id))

    def table_peers(self) -> list[str]:
        """Every peer in the routing table."""
        return [str(p) for p in self._running.routing_table.get_peer_ids()]

    def forget(self, peer_id: str) -> None:
        """Drop an unreachable peer from the routing table (and from answers, for a while)."""
        self._failures.pop(peer_id, None)
        self._unreachable.pop(peer_id, None)
        if len(self._unreachable) >= MAX_FAILING_PEERS:
            del self._unreachable[next(iter(self._unreachable))]
        self._unreachable[peer_id] = trio.current_time()
        self._running.routing_table.remove_peer(parse_id(peer_id))

    def _reachable_closer(self, resp: KadResponse) -> KadResponse:
        """``resp`` without the closer peers dropped here within UNREACHABLE_TIME."""
        if not self._unreachable or not resp.closer:
            return resp
        cutoff = trio.current_time() - UNREACHABLE_TIME
        closer = tuple(p for p in resp.closer if self._unreachable.get(p.peer_id, cutoff) <= cutoff)
        return resp if len(closer) == len(resp.closer) else replace(resp, closer=closer)

    def _count_failure(self, peer_id: str, failed: bool) -> None:
        """After MAX_FAILURES failed requests in a row, drop ``peer_id`` from the routing table."""
        previous = self._failures.pop(peer_id, 0)
        count = previous + 1 if failed else 0
        if not failed:
            self._unreachable.pop(peer_id, None)  # it answers again
        if count >= MAX_FAILURES and self._dht is not None:
            log.debug("DHT peer %s failed %d requests in a row: out of the routing table", peer_id, count)
            try:
                self.forget(peer_id)
            except Exception:  # not a peer id: in no table
                pass
        elif count:
            if len(self._failures) >= MAX_FAILING_PEERS:
                del self._failures[next(iter(self._failures))]
            self._failures[peer_id] = count

    def remember_addrs(self, peer: KadPeer, ttl: int) -> None:
        """Put ``peer``'s addresses into the peerstore for ``ttl`` seconds."""
        if peer.addrs:
            addrs = [parse_addr(a) for a in peer.addrs]
            self._view.get_peerstore().add_addrs(parse_id(peer.peer_id), addrs, ttl)

    # -- the local stores ---------------------------------------------------------

    def store_value(self, key: bytes, value: bytes, expires_at: float) -> None:
        """Store a value locally until ``expires_at`` (seconds since the epoch); not republished."""
        store_value(self._running, key, value, expires_at)

    def local_value(self, key: bytes) -> bytes | None:
        """The value stored here under ``key``, if it has not expired."""
        record = self._running.value_store.get(key)
        return None if record is None else bytes(record.value)

    def local_values(self, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
        """Every ``(key, value)`` stored here whose key starts with ``prefix``."""
        return [
            (k, bytes(record.value))
            for k, (record, _validity) in list(self._running.value_store.store.items())
            if k.startswith(prefix)
        ]

    def drop_value(self, key: bytes) -> None:
        self._running.value_store.remove(key)

    async def put_value(self, key: str, value: bytes) -> None:
        """py-libp2p's own validated local put (raises ``ValueError`` for a worse value)."""
        await self._running.put_value(key, value)

    def add_local_provider(self, key: bytes, peer: KadPeer) -> None:
        """Store a provider record this peer vouches for (its own): no verification."""
        info = PeerInfo(parse_id(peer.peer_id), [parse_addr(a) for a in peer.addrs])
        self._running.providers.add_verified(key, info)

    def verify_providers(self, verifier: ProviderVerifier, concurrency: int) -> None:
        """From now on check every provider record from the network with ``verifier``.

        Checks run ``concurrency`` at a time, newest first. Answers list verified records
        first, then unchecked ones, never refuted ones; a full key evicts refuted records
        first, then unverified ones.
        """
        if self._background is None:
            raise RuntimeError("the DHT is not running")

        async def check(key: bytes, info: PeerInfo) -> bool | None:
            return await verifier(key, KadPeer(str(info.peer_id), tuple(str(a) for a in info.addrs)))

        self._running.providers.start_verifying(self._background, check, concurrency)

    def carry_cards(
        self, offered: Callable[[bytes, str, bytes], None], cards_for: Callable[[list[str]], list[bytes]]
    ) -> None:
        """Cards beside provider records, as a server (``specs/capability.md``): ``offered(key,
        provider, card)`` gets the card an ADD_PROVIDER carries (unverified);
        ``cards_for(providers)`` gives the card envelopes to add to an answer listing them."""
        guard = self._running.guard
        guard.offered, guard.cards_for = offered, cards_for

    def provider_counts(self, key: bytes) -> tuple[int, int]:
        """``(verified, stored)`` provider records of ``key`` here."""
        store = self._running.providers
        records = store.providers.get(key, {})
        return sum(store.is_verified(key, p) for p in records), len(records)

    def guard_stats(self) -> dict[str, int]:
        """What the inbound guard and the stores refused so far (for tests and status)."""
        dht = self._running
        return {
            "active_streams": dht.guard.active,
            "evicted_streams": dht.guard.evicted,
            "refused_streams": dht.guard.refused,
            "rate_limited": dht.guard.rate_limited,
            "providers_rejected": dht.providers.rejected,
            "providers_evicted": dht.providers.evicted,
            "values_refused": dht.values.refused,
            "value_bytes": dht.values.stored_bytes(),
        }

    def local_providers(self, key: bytes) -> list[KadPeer]:
        """The provider records of ``key`` this server answers with (verified ones)."""
        return [
            KadPeer(str(i.peer_id), tuple(str(a) for a in i.addrs))
            for i in self._running.provider_store.get_providers(key)
        ]

    def provider_keys(self) -> int:
        """Keys this peer holds provider records for."""
        return len(self._running.provider_store.providers)

    def drop_expired_providers(self) -> None:
        self._running.provider_store.cleanup_expired()

    def clear_local_stores(self) -> None:
        """Forget every provider record and value stored here."""
        self._running.providers.clear()
        self._running.value_store.store.clear()

    async def library_find_providers(self, key: bytes, count: int = 20) -> list[str]:
        """py-libp2p's own provider lookup (on our protocol id), for comparison in benchmarks.

        It answers from the local store when that holds any record, and may stop early.
        """
        return [str(i.peer_id) for i in await self._running.provider_store.find_providers(key, count)]

    # -- requests ------------------------------------------------------------------

    async def request(self, peer_id: str, req: KadRequest, timeout: float) -> tuple[KadResponse | None, bool]:
        """Send ``req`` and read one answer within ``timeout``.

        Returns ``(answer, True)``, or ``(None, opened)`` on any failure, where ``opened``
        tells whether a stream was opened at all (a busy server resets excess streams).
        """
        outcome = await self.exchange(peer_id, req, timeout)
        return outcome.answer, outcome.opened

    async def exchange(self, peer_id: str, req: KadRequest, timeout: float) -> KadOutcome:
        """Send ``req`` and read one answer within ``timeout``; say how it went.

        A request that ran out of time (``timed_out``) met a slow peer or a busy machine;
        one that failed before a stream was open, and not for lack of time, met a peer
        that cannot be reached. A peer that fails ``MAX_FAILURES`` requests in a row before a
        stream to it opened leaves the routing table.

        The request runs in the DHT's nursery, so a caller that stops waiting (a lookup
        that ended, a deadline) does not cancel it: it goes on until answered or until
        ``timeout``, and then closes or resets its stream. Cancelling a dial half-way
        makes py-libp2p drop the new connection, and streams to that peer fail until
        the swarm has removed it (see :mod:`._compat.kad`). At most
        ``MAX_DETACHED_REQUESTS`` run like that; past it a request is cancelled with
        its caller.
        """
        background = self._background
        if background is None or self.detached >= MAX_DETACHED_REQUESTS:
            resp, ok, opened, timed_out = await self._exchange(peer_id, req, timeout, answered=True)
            return KadOutcome(resp if ok else None, opened or ok, timed_out)
        box: list[KadOutcome] = []
        done = trio.Event()

        async def run() -> None:
            try:
                resp, ok, opened, timed_out = await self._exchange(peer_id, req, timeout, answered=True)
                box.append(KadOutcome(resp if ok else None, opened or ok, timed_out))
            finally:
                self.detached -= 1
                done.set()

        self.detached += 1
        background.start_soon(run)
        await done.wait()
        return box[0] if box else KadOutcome(None, False, False)

    async def send(self, peer_id: str, req: KadRequest, timeout: float) -> bool:
        """Send a message that gets no answer we wait for (ADD_PROVIDER); True if written."""
        _, ok, _, _ = await self._exchange(peer_id, req, timeout, answered=False)
        return ok

    async def _exchange(
        self, peer_id: str, req: KadRequest, timeout: float, *, answered: bool
    ) -> tuple[KadResponse | None, bool, bool, bool]:
        """Write ``req`` on a new stream (and read one answer if ``answered``) within ``timeout``.

        Returns ``(answer, ok, opened, timed_out)``: ``ok`` once everything asked for is done,
        ``opened`` whether a stream was opened at all and the server took the protocol (it
        is proposed with the request: a refusal comes with the answer), ``timed_out``
        whether ``timeout`` ran out. The stream is closed if ``ok``, else reset.
        """
        data = encode_request(req)
        stream: INetStream | None = None
        resp: KadResponse | None = None
        ok = refused = False
        scope = trio.move_on_after(timeout)
        try:
            with scope:
                stream = await self._open(peer_id)
                await stream.write(encode_varint(len(data)) + data)
                if answered:
                    raw = await read_varint_prefixed_bytes_limited(stream, self._max_response_size)
                    resp = self._reachable_closer(decode_response(
                        raw, max_closer=self._max_closer, max_providers=self._max_providers
                    ))
                elif isinstance(stream, OptimisticStream):
                    await stream.confirm()  # written is not enough: the server took the protocol
                ok = True
        except ProtocolRefused as exc:  # it does not speak our DHT: as if no stream opened
            log.debug("DHT %s to %s refused: %s", "request" if answered else "message", peer_id, exc)
            refused = True
        except Exception as exc:
            log.debug("DHT %s to %s failed: %r", "request" if answered else "message", peer_id, exc)
        finally:
            if stream is not None:
                await _end(stream, ok)
        opened = stream is not None and not refused
        # gone: counts; slow with its stream open, or a stream broken by a live server: does not
        self._count_failure(peer_id, not ok and not opened)
        return resp, ok, opened, scope.cancelled_caught

    async def _probe(self, peer_id: str, timeout: float) -> bool:
        """One request of a table check (:mod:`.kadcheck`): whether a stream opened to ``peer_id``."""
        req = KadRequest(KadKind.FIND_NODE, peer_id_bytes(self.peer_id))
        return (await self.exchange(peer_id, req, timeout)).opened

    async def _open(self, peer_id: str) -> INetStream:
        # Through the view, so the stream is counted. The protocol is proposed with the
        # request (one round trip, not three: see ._compat.multistream).
        return await self._view.new_request_stream(parse_id(peer_id))


async def _end(stream: INetStream, ok: bool) -> None:
    if ok:
        await close_quietly(stream, 1.0)
    else:
        await reset_quietly(stream, 1.0)

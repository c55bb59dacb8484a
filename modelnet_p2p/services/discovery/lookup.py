"""Network-complete Kademlia lookups, done here rather than by py-libp2p.

py-libp2p's own lookups return early from the local store (``find_providers``,
``get_value``), return duplicates, treat a provider list as complete once ``count``
entries (duplicates included) have arrived, and look value keys up with FIND_NODE, which
py-libp2p servers reject for keys that are not multihashes and longer than 50 bytes (ours
are about 67). So every lookup here asks the network only (never the local store),
de-duplicates by peer id, and runs until the k closest peers known (failures excluded)
have all answered: Kademlia's termination rule.

Slow is not dead. A request that has not been answered within the *patience*
(:class:`RttEstimator`: the smoothed round-trip time of recent answers plus four times its
variation, so it grows when the machine is busy; requests that must dial first have their
own, since a security handshake takes far longer than a round trip, and on a busy machine
a patience fit for open connections made a lookup ask a new peer, with a new handshake, for
each slow dial) stops holding one of the ALPHA slots, and
the lookup asks the next candidate; the slow request itself runs on until the request
timeout (which grows with the measured round trips too), its answer still counts, and a
slow peer among the k closest is waited for. Answers are used as they arrive: providers
are fetched and delivered while the lookup goes on. A peer whose stream cannot even be
opened is dead: it is dropped from the candidates and from the routing table.

A lookup starts from the routing table's closest peers and from the closest peers heard
of in earlier answers (:mod:`.heard`: the table seldom holds the closest in a large mesh).
At most DIAL_CONCURRENCY of a peer's requests that must dial first are in flight at once;
a slow one gives its dial slot up with its ALPHA slot.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from ...errors import ProtocolError
from ...p2p.kad import KadKind, KadNode, KadOutcome, KadPeer, KadRequest, KadResponse, peer_id_bytes
from ...proto.card import CapabilityCard, open_card, value_key
from .heard import HeardPeers
from .query import Query
from .records import verified_card

__all__ = [
    "ADDR_TTL",
    "ALPHA",
    "CARD_FETCH_CONCURRENCY",
    "CARD_FETCH_TIMEOUT",
    "CARD_LOOKUP_CONCURRENCY",
    "DIAL_CONCURRENCY",
    "K",
    "MAX_PROVIDERS_PER_KEY",
    "MAX_PROVIDERS_PER_LOOKUP",
    "MAX_RESPONSE_SIZE",
    "MAX_SILENT_SERVERS",
    "RPC_TIMEOUT",
    "Lookups",
    "RttEstimator",
]

log = logging.getLogger(__name__)

#: Kademlia's k: records are stored on, and lookups converge to, the k closest peers.
K = 20
#: Requests in flight per lookup (the libp2p spec's alpha is 3; py-libp2p uses 10,
#: and on a LAN or loopback mesh more parallelism is mostly free).
ALPHA = 10
#: Requests that must dial first in flight per peer, over all its lookups (a slow one gives
#: its slot up at the dial patience). A new connection costs about 13 ms of CPU at each end
#: (the Noise handshake, identify, multistream): the 20 dials an announce's first lookups
#: started at once shared the peer's core and all ended late, the first one too.
DIAL_CONCURRENCY = 4
#: Seconds allowed for one DHT request, dial included.
RPC_TIMEOUT = 5.0
#: Largest DHT response read, in bytes: a GET_PROVIDERS answer lists at most
#: MAX_PROVIDERS_PER_KEY providers and k closer peers; a GET_VALUE answer holds one card.
MAX_RESPONSE_SIZE = 1 << 20
#: Providers a server keeps per key, and reads from one answer. py-libp2p keeps 20 (k)
#: and ignores any newer provider once 20 are stored, so a popular task would lose providers.
MAX_PROVIDERS_PER_KEY = 256
#: Card fetches from the providers themselves in flight during one discovery. A fetch
#: from a provider that does not answer (a tarpit) only waits, so many may wait at once.
CARD_FETCH_CONCURRENCY = 32
#: Seconds a card fetch from the provider itself may take, dial included (up to twice
#: as long when the measured round trips are that long). It does not feed the lookups'
#: round-trip estimator: providers are not the DHT servers a lookup asks,
#: and made-up ones that never answer must not make every later lookup more patient.
CARD_FETCH_TIMEOUT = 3.0
#: Card lookups in the DHT (when the provider itself gave no card) in flight during one
#: discovery: each costs requests to about k servers.
CARD_LOOKUP_CONCURRENCY = 4
#: Providers one discovery fetches cards of, at most: bounds what answers that
#: list made-up providers can make a discoverer do.
MAX_PROVIDERS_PER_LOOKUP = 1024
#: Seconds that addresses learned from DHT answers stay in the peerstore.
ADDR_TTL = 600
#: Seconds before a peer whose stream broke after opening is asked once more.
RETRY_DELAY = 0.05
#: Servers remembered as storing provider records without an echo.
MAX_SILENT_SERVERS = 1024
#: Patience (seconds) before any answer has been timed, and its lower bound.
INITIAL_PATIENCE = 1.0
MIN_PATIENCE = 0.3


class RttEstimator:
    """The smoothed round-trip time of DHT requests and its variation (the TCP estimator).

    :meth:`patience` is how long a request may take before the lookup stops waiting for
    it to go on (``srtt + 4 * rttvar``, between ``floor`` and ``ceiling``); it grows by
    itself on a busy machine, whose answers all come late.
    """

    def __init__(self, *, initial: float, floor: float, ceiling: float) -> None:
        self.initial = initial
        self.floor = floor
        self.ceiling = ceiling
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0

    def sample(self, rtt: float) -> None:
        """Account for one answer that took ``rtt`` seconds."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.samples += 1

    def patience(self) -> float:
        """Seconds after which an unanswered request counts as slow."""
        if self.srtt is None:
            return min(max(self.initial, self.floor), self.ceiling)
        return min(max(self.srtt + 4 * self.rttvar, self.floor), self.ceiling)

    def timeout(self, base: float) -> float:
        """Seconds one request may run: ``base``, or twice the patience's formula when the
        round trips are that long (a busy machine), at most ``2 * base``."""
        if self.srtt is None:
            return base
        return min(max(base, 2 * (self.srtt + 4 * self.rttvar)), 2 * base)


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest())


class Lookups:
    """Iterative lookups, provider searches and card fetches of one peer over ``kad``.

    Args:
        kad: the DHT node.
        rpc_timeout: seconds allowed for one request.
        wall_clock: seconds since the epoch (card expiry).
    """

    def __init__(self, kad: KadNode, *, rpc_timeout: float, wall_clock: Callable[[], float]) -> None:
        self.kad = kad
        self.rpc_timeout = rpc_timeout
        self._wall_clock = wall_clock
        #: Round-trip times of the answers so far on open connections, and of those that
        #: needed a dial first (a security handshake: on a busy machine, seconds): each
        #: decides when its kind of request is slow.
        self.rtt = RttEstimator(initial=INITIAL_PATIENCE, floor=MIN_PATIENCE, ceiling=rpc_timeout)
        self.dial_rtt = RttEstimator(initial=INITIAL_PATIENCE, floor=MIN_PATIENCE, ceiling=rpc_timeout)
        #: Requests that were still unanswered after the patience (a slot went to another peer).
        self.slow_requests = 0
        #: Providers found whose card came beside their record (no fetch), card fetches, and
        #: cards beside records that did not verify or named a peer the answer did not list.
        self.cards_carried = 0
        self.card_fetches = 0
        self.cards_refused = 0
        #: Servers seen to store a provider record without echoing it (other libp2p
        #: servers): an announce waits for their echo only for the patience.
        self.silent: OrderedDict[str, None] = OrderedDict()
        #: Peers listed in answers (``heard.py``): lookups start from the closest of these
        #: as well as from the routing table's.
        self.heard = HeardPeers(ttl=ADDR_TTL)
        self._dial_slots = trio.Semaphore(DIAL_CONCURRENCY)

    def note_silent(self, peer_id: str) -> None:
        """Remember that ``peer_id`` stores ``ADD_PROVIDER`` records without an echo."""
        self.silent[peer_id] = None
        self.silent.move_to_end(peer_id)
        while len(self.silent) > MAX_SILENT_SERVERS:
            self.silent.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _dial_slot(self, dialing: bool) -> AsyncIterator[Callable[[], None]]:
        """Hold one of the DIAL_CONCURRENCY slots while ``dialing``; yields a function that
        gives the slot up early (once; leaving gives it up otherwise)."""
        held = dialing
        if dialing:
            await self._dial_slots.acquire()

        def give_up() -> None:
            nonlocal held
            if held:
                held = False
                self._dial_slots.release()

        try:
            yield give_up
        finally:
            give_up()

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    async def request(self, peer_id: str, req: KadRequest) -> KadResponse | None:
        """Send one DHT request to ``peer_id`` and return its answer (``None`` on any failure)."""
        return (await self.timed_request(peer_id, req))[0]

    async def timed_request(
        self, peer_id: str, req: KadRequest, timeout: float | None = None
    ) -> tuple[KadResponse | None, bool]:
        """One request that feeds the round-trip estimator; ``(answer, opened)``."""
        outcome = await self.attempt(peer_id, req, timeout)
        return outcome.answer, outcome.opened

    def estimator(self, peer_id: str) -> RttEstimator:
        """The round-trip estimator of a request to ``peer_id`` now: :attr:`rtt` over an open
        connection, :attr:`dial_rtt` when the request must dial first."""
        return self.rtt if self.kad.is_connected(peer_id) else self.dial_rtt

    async def attempt(
        self, peer_id: str, req: KadRequest, timeout: float | None = None, est: RttEstimator | None = None
    ) -> KadOutcome:
        """One request within ``timeout`` (default: :meth:`RttEstimator.timeout`), timed.

        Over an open connection, answers and time-outs feed :attr:`rtt` (a time-out as the
        time it lasted, a lower bound of the round trip), so the allowance grows on a busy
        machine. A request that dialed first feeds :attr:`dial_rtt` with its answers only: a
        dial that never completes (a tarpit) says nothing of how long dials take.
        """
        est = self.estimator(peer_id) if est is None else est
        t0 = trio.current_time()
        allowed = est.timeout(self.rpc_timeout) if timeout is None else timeout
        outcome = await self.kad.exchange(peer_id, req, allowed)
        if outcome.answer is not None or (outcome.timed_out and est is self.rtt):
            est.sample(trio.current_time() - t0)
        return outcome

    async def send(self, peer_id: str, req: KadRequest) -> bool:
        """Send one DHT message that gets no answer we wait for; True if it was written."""
        return await self.kad.send(peer_id, req, self.rpc_timeout)

    async def closest(
        self,
        key: bytes,
        kind: KadKind,
        on_response: Callable[[str, KadResponse], None] | None = None,
        k: int = K,
        on_near: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Iterative lookup of ``key`` with requests of ``kind``; returns the ``k`` closest that answered.

        Kademlia's rule ends it: the lookup is over once each of the ``k`` peers closest to
        ``key`` among those known and not failed has answered (``k`` is Kademlia's k unless
        the caller needs fewer: an announce asks for its records' reach). Up to ALPHA requests are
        in flight, not counting slow ones (unanswered after :meth:`RttEstimator.patience`):
        a slow request gives its slot to the next candidate but runs on until the request
        timeout, and the lookup waits for it while its peer is among the k closest. A peer
        fails by running out of time, by being unreachable (no stream could be opened:
        it is also dropped from the routing table), or by breaking a stream twice (a
        broken stream is asked once more: busy py-libp2p servers reset excess streams).
        Each answer's closer peers join the candidates, and the answer goes to
        ``on_response`` at once; a peer that is then among the ``k`` closest candidates not
        failed also goes to ``on_near`` (an announce places its record there without
        waiting for the lookup's end). Requests still out when the lookup ends are not
        cancelled (:meth:`KadNode.exchange`); their answers are not waited for.
        """
        kad = self.kad
        me = kad.peer_id
        target = _hash(key)
        distance: dict[str, int] = {}

        def learn(pid: str, key_hash: int | None = None) -> None:
            if pid != me and pid not in distance:
                try:
                    distance[pid] = (_hash(peer_id_bytes(pid)) if key_hash is None else key_hash) ^ target
                except ValueError:
                    pass

        for pid in kad.closest_known(key, K):
            learn(pid)
        for pid in self.heard.seeds(target, K, trio.current_time()):
            learn(pid)
        if len(distance) < K:  # a fresh peer: its bootstrap peers may not be in the table yet
            for pid in kad.connected_peers():
                learn(pid)
        asked: set[str] = set()
        answered: set[str] = set()
        failed: set[str] = set()
        retried: set[str] = set()
        pending: set[str] = set()
        slow: set[str] = set()
        request = KadRequest(kind, key)
        send_done, recv_done = trio.open_memory_channel[None](float("inf"))

        async def watch(pid: str, patience: float, give_up_slot: Callable[[], None]) -> None:
            await trio.sleep(patience)
            if pid in pending:
                slow.add(pid)  # its slot goes to the next candidate
                self.slow_requests += 1
                give_up_slot()
                send_done.send_nowait(None)

        async def ask(pid: str) -> None:
            est = self.estimator(pid)  # a dial first: patient for as long as dials take
            async with self._dial_slot(est is self.dial_rtt) as give_up_slot:
                async with trio.open_nursery() as watchdog:
                    watchdog.start_soon(watch, pid, est.patience(), give_up_slot)
                    outcome = await self.attempt(pid, request, est=est)
                    watchdog.cancel_scope.cancel()
            resp = outcome.answer
            if resp is None:
                if outcome.opened and not outcome.timed_out and pid not in retried:
                    retried.add(pid)
                    await trio.sleep(RETRY_DELAY)
                    asked.discard(pid)
                else:
                    failed.add(pid)
                    self.heard.drop(pid)
                    if not outcome.opened and not outcome.timed_out:
                        # unreachable (not merely slow): stop handing it out, as py-libp2p does
                        kad.forget(pid)
            else:
                answered.add(pid)
                for peer in resp.closer:
                    self._learn_peer(peer, learn, pid)
                if on_response is not None:
                    try:
                        on_response(pid, resp)
                    except Exception as exc:
                        log.debug("bad DHT answer from %s: %r", pid, exc)
                if on_near is not None:
                    mine = distance[pid]
                    if sum(1 for p, d in distance.items() if d < mine and p not in failed) < k:
                        on_near(pid)
                with trio.move_on_after(1):
                    await kad.add_to_routing_table(pid)  # it answered: it serves the DHT
            pending.discard(pid)
            slow.discard(pid)
            send_done.send_nowait(None)

        async with trio.open_nursery() as nursery:
            while True:
                closest = sorted((p for p in distance if p not in failed), key=distance.__getitem__)[:k]
                if all(p in answered for p in closest):
                    break  # the k closest have all answered (or there is nobody left to ask)
                todo = [p for p in closest if p not in asked]
                for pid in todo[: max(0, ALPHA - len(pending - slow))]:
                    asked.add(pid)
                    pending.add(pid)
                    nursery.start_soon(ask, pid)
                await recv_done.receive()
            nursery.cancel_scope.cancel()  # stop waiting for peers no longer among the k closest
        return sorted(answered, key=distance.__getitem__)[:k]

    def _learn_peer(self, peer: KadPeer, learn: Callable[[str, int], None], reporter: str) -> None:
        if peer.addrs:
            try:
                self.kad.remember_addrs(peer, ADDR_TTL)
                key_hash = _hash(peer_id_bytes(peer.peer_id))
            except Exception:
                return
            if peer.peer_id != self.kad.peer_id:
                self.heard.note(peer.peer_id, key_hash, reporter, trio.current_time())
            learn(peer.peer_id, key_hash)

    async def find(
        self,
        query: Query,
        send: trio.MemorySendChannel[CapabilityCard],
        *,
        limit: int | None = None,
        own_card: Callable[[], CapabilityCard | None] = lambda: None,
        delivered: set[str] | None = None,
    ) -> int:
        """Send every verified card matching ``query`` to ``send``, each peer once; return the count.

        The provider records come from the network only (never this peer's own store);
        each provider's card is asked of the provider itself first, then of the DHT. This
        peer's own card comes from ``own_card``. Stops after ``limit`` cards; the caller
        bounds the time. ``delivered``: peer ids whose cards were sent already, shared by
        passes that may run at once; they are skipped, each new one is added, and ``limit``
        counts them all.
        """
        label, key = query.key()
        done = delivered if delivered is not None else set()
        seen: set[str] = set(done)
        sent = 0
        me = self.kad.peer_id
        limiter = trio.CapacityLimiter(CARD_FETCH_CONCURRENCY)
        lookup_limiter = trio.CapacityLimiter(CARD_LOOKUP_CONCURRENCY)

        async with trio.open_nursery() as nursery:

            def deliver(card: CapabilityCard | None) -> None:
                nonlocal sent
                if card is None or card.peer_id in done or not query.matches(card):
                    return
                if limit is not None and len(done) >= limit:
                    return
                try:
                    send.send_nowait(card)  # the channel is unbounded: no checkpoint between check and count
                except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
                    nursery.cancel_scope.cancel()  # nobody is listening any more
                    return
                done.add(card.peer_id)
                sent += 1
                if limit is not None and len(done) >= limit:
                    nursery.cancel_scope.cancel()

            async def fetch(provider: KadPeer) -> None:
                self.card_fetches += 1
                async with limiter:
                    card = await self.fetch_direct(provider.peer_id, provider.addrs)
                if card is None:
                    async with lookup_limiter:
                        card = await self.fetch_from_dht(provider.peer_id)
                deliver(card)

            def on_response(_peer: str, resp: KadResponse) -> None:
                carried = self._cards_beside(resp)
                for provider in resp.providers:
                    if len(seen) >= MAX_PROVIDERS_PER_LOOKUP:
                        return
                    if provider.peer_id in seen:
                        continue
                    seen.add(provider.peer_id)
                    card = carried.get(provider.peer_id)
                    if card is not None and query.matches(card):
                        self.cards_carried += 1
                        deliver(card)  # the server gave the provider's own signed card
                    elif provider.peer_id != me:
                        nursery.start_soon(fetch, provider)
                    else:
                        own = own_card()
                        if own is not None and not own.expired(self._now_ms()):
                            deliver(own)

            await self.closest(key, KadKind.GET_PROVIDERS, on_response)
            log.debug("lookup of %s found %d providers", label, len(seen - done) + sent)
        return sent

    def _cards_beside(self, resp: KadResponse) -> dict[str, CapabilityCard]:
        """The cards an answer carries beside its provider records that verify, by peer id
        (``specs/capability.md``, "Cards beside provider records"). Each is checked against
        the provider record it stands beside: a server can withhold a card, not forge one."""
        if not resp.cards:
            return {}
        listed = {p.peer_id for p in resp.providers}
        found: dict[str, CapabilityCard] = {}
        now = self._now_ms()
        for envelope in resp.cards:
            try:
                card = open_card(envelope, now_ms=now)
            except ProtocolError:
                self.cards_refused += 1
                continue
            if card.peer_id not in listed:
                self.cards_refused += 1
            elif card.peer_id not in found:
                found[card.peer_id] = card
        return found

    async def fetch_card(self, peer_id: str, addrs: Sequence[str] = ()) -> CapabilityCard | None:
        """The newest valid card of ``peer_id``: from the peer itself, else from the DHT."""
        card = await self.fetch_direct(peer_id, addrs)
        return card if card is not None else await self.fetch_from_dht(peer_id)

    async def fetch_direct(self, peer_id: str, addrs: Sequence[str] = ()) -> CapabilityCard | None:
        """``peer_id``'s valid card as the peer itself gives it, within :data:`CARD_FETCH_TIMEOUT`."""
        return (await self.ask_for_card(peer_id, addrs))[0]

    async def ask_for_card(
        self, peer_id: str, addrs: Sequence[str] = ()
    ) -> tuple[CapabilityCard | None, bool]:
        """Like :meth:`fetch_direct`; also whether the request ran out of time."""
        if addrs:
            try:
                self.kad.remember_addrs(KadPeer(peer_id, tuple(addrs)), ADDR_TTL)
            except Exception:
                return None, False  # not a peer id or not addresses: nothing to fetch from
        rejected: list[str] = []
        request = KadRequest(KadKind.GET_VALUE, value_key(peer_id).encode())
        outcome = await self.kad.exchange(
            peer_id, request, self.rtt.timeout(min(CARD_FETCH_TIMEOUT, self.rpc_timeout))
        )
        card = self._card_in(outcome.answer, peer_id, rejected)
        if rejected:
            log.info("rejected the card %s gave: %s", peer_id, "; ".join(set(rejected)))
        return card, outcome.timed_out

    async def fetch_from_dht(self, peer_id: str) -> CapabilityCard | None:
        """``peer_id``'s newest valid card found by an iterative lookup of its value key."""
        vkey = value_key(peer_id).encode()
        rejected: list[str] = []
        best: list[CapabilityCard] = []

        def on_response(_peer: str, resp: KadResponse) -> None:
            found = self._card_in(resp, peer_id, rejected)
            if found is not None and (not best or found.seq > best[0].seq):
                best[:] = [found]

        await self.closest(vkey, KadKind.GET_VALUE, on_response)
        if not best and rejected:
            log.info(
                "rejected every card of %s found (%d): %s", peer_id, len(rejected), "; ".join(set(rejected))
            )
        return best[0] if best else None

    def _card_in(self, resp: KadResponse | None, peer_id: str, rejected: list[str]) -> CapabilityCard | None:
        """The valid card of ``peer_id`` in a GET_VALUE answer, if there is one."""
        if resp is None or resp.value is None:
            return None
        try:
            return verified_card(resp.value, peer_id, self._now_ms())
        except ProtocolError as exc:
            rejected.append(exc.message)
            return None

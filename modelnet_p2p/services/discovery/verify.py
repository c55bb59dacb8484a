"""A DHT server's check of the provider records it is sent (``specs/capability.md``, "Provider records").

Provider records are unsigned: anyone can claim to provide a key, with any addresses. A
server therefore keeps and answers a record only once it points to a card that verifies
and derives the key: the card this server stores for the provider, else the card the
provider itself gives (at the record's addresses), else one found in the DHT. Until then
the record is answered after the verified ones. A record is refuted (no longer answered,
and the first to be evicted from a full key) when the card does not list the key or when
asking the provider runs out of time; a provider that could not be asked at all gets no
verdict (streams fail now and then on a busy machine). So 300 made-up providers pointing
at a tarpit neither fill a key nor keep sending discoverers to the tarpit.

Cards are cached per provider until they expire, so the records of one announce (up to 64
keys) cost one fetch, and none when the ADD_PROVIDER carries the card ("Cards beside
provider records": :meth:`ProviderCheck.offer`). The cached cards go out beside the records
in this server's GET_PROVIDERS answers (:meth:`ProviderCheck.cards_for`), so that a
discoverer need not fetch them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable

import trio

from ...errors import ProtocolError
from ...p2p.kad import KadPeer
from ...proto.card import CapabilityCard, card_keys, value_key
from .lookup import Lookups
from .records import verified_card

__all__ = [
    "FAILURE_TTL",
    "MAX_CACHED_CARDS",
    "RECHECK_DELAY",
    "VERIFY_CONCURRENCY",
    "VERIFY_TIMEOUT",
    "ProviderCheck",
]

log = logging.getLogger(__name__)

#: Provider records a server checks at once (a check of a made-up record mostly waits).
VERIFY_CONCURRENCY = 16
#: Seconds one check may take (a fetch from the provider, up to 6 s, then a DHT lookup).
VERIFY_TIMEOUT = 8.0
#: Seconds before a check that failed quickly is made once more: a provider's card may
#: still be on its way to the DHT when its provider records arrive.
RECHECK_DELAY = 1.0
#: Providers whose card a server keeps for its checks, and whose failed check it remembers.
MAX_CACHED_CARDS = 4096
#: Seconds a provider whose check failed gets the same verdict again without a fetch:
#: each fake identity costs a server one fetch per this long, however many records it sends.
FAILURE_TTL = 2.0


def _card_keys(card: CapabilityCard) -> Iterable[bytes]:
    return (key for _label, key in card_keys(card.capabilities))


class ProviderCheck:
    """A :data:`~modelnet_p2p.p2p.kad.ProviderVerifier`: does a record point to a card that verifies?

    Args:
        lookups: fetches cards (from the provider itself, else from the DHT).
        wall_clock: seconds since the epoch (card expiry).
        keys_of: the provider keys a card may be announced under (default: the card's keys).
        own_card: this server's own current card (it goes out beside its own records).
    """

    def __init__(
        self,
        lookups: Lookups,
        wall_clock: Callable[[], float],
        keys_of: Callable[[CapabilityCard], Iterable[bytes]] = _card_keys,
        own_card: Callable[[], CapabilityCard | None] = lambda: None,
    ) -> None:
        self._lookups = lookups
        self._wall_clock = wall_clock
        self._keys_of = keys_of
        self._own = own_card
        self._cards: OrderedDict[str, CapabilityCard] = OrderedDict()
        self._failed: OrderedDict[str, tuple[float, bool | None]] = OrderedDict()
        #: Records accepted and rejected so far.
        self.accepted = 0
        self.rejected = 0
        #: Cards offered with provider records that verified, and that did not; card
        #: fetches made for checks (from the provider, then the DHT).
        self.offers_kept = 0
        self.offers_rejected = 0
        self.fetches = 0

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _lists(self, card: CapabilityCard | None, key: bytes) -> bool:
        return card is not None and not card.expired(self._now_ms()) and key in set(self._keys_of(card))

    def _remember(self, card: CapabilityCard) -> None:
        old = self._cards.pop(card.peer_id, None)
        if old is not None and old.seq > card.seq:
            card = old  # never replace a newer card with an older one
        self._cards[card.peer_id] = card
        while len(self._cards) > MAX_CACHED_CARDS:
            self._cards.popitem(last=False)

    def offer(self, key: bytes, peer_id: str, envelope: bytes) -> None:
        """The card an ADD_PROVIDER from ``peer_id`` carries: kept if it verifies (it is
        ``peer_id``'s, signed, unexpired), so that the record's check needs no fetch."""
        try:
            card = verified_card(envelope, peer_id, self._now_ms())
        except ProtocolError as exc:
            self.offers_rejected += 1
            log.debug("card offered by %s rejected: %s", peer_id, exc.message)
            return
        self.offers_kept += 1
        self._remember(card)

    def cards_for(self, peer_ids: list[str]) -> list[bytes]:
        """The envelopes of the unexpired cards kept of ``peer_ids`` (this server's own card
        included), in that order, for a GET_PROVIDERS answer listing them."""
        now = self._now_ms()
        found = []
        for pid in peer_ids:
            card = self._own() if pid == self._lookups.kad.peer_id else self._cards.get(pid)
            if card is not None and not card.expired(now):
                found.append(card.envelope)
        return found

    def _stored(self, peer_id: str) -> CapabilityCard | None:
        value = self._lookups.kad.local_value(value_key(peer_id).encode())
        if value is None:
            return None
        try:
            return verified_card(value, peer_id, self._now_ms())
        except ProtocolError:
            return None

    async def __call__(self, key: bytes, peer: KadPeer) -> bool | None:
        """True if the record points to a card that verifies and lists ``key``; False if it is
        refuted (the card does not list it, or asking the provider ran out of time); None
        if there is no verdict (the provider could not be asked just now)."""
        last = self._failed.pop(peer.peer_id, None)
        if last is not None and trio.current_time() - last[0] < FAILURE_TTL:
            checked_at, verdict = last
        else:
            checked_at, verdict = trio.current_time(), await self._check(key, peer)
        if verdict:
            self.accepted += 1
            return True
        self.rejected += 1
        self._failed[peer.peer_id] = (checked_at, verdict)
        while len(self._failed) > MAX_CACHED_CARDS:
            self._failed.popitem(last=False)
        log.debug("provider record of %s for %s not verified (%s)", peer.peer_id, key.hex(), verdict)
        return verdict

    async def _check(self, key: bytes, peer: KadPeer) -> bool | None:
        cached = self._cards.get(peer.peer_id)
        if cached is not None and self._lists(cached, key):
            return True
        for attempt in range(2):
            card = self._stored(peer.peer_id)
            timed_out = False
            if card is None or not self._lists(card, key):
                self.fetches += 1
                with trio.move_on_after(VERIFY_TIMEOUT):
                    card, timed_out = await self._lookups.ask_for_card(peer.peer_id, peer.addrs)
                    if card is None:
                        card = await self._lookups.fetch_from_dht(peer.peer_id)
            if card is not None:
                self._remember(card)
                return self._lists(card, key)
            if timed_out and not _relayed_only(peer):
                return False  # the provider let the request run out of time, and the DHT has no card
            # A provider reached only through a relay is slow, not a tarpit: no verdict.
            if not attempt:
                await trio.sleep(RECHECK_DELAY)  # streams fail now and then on a busy machine
        return None


def _relayed_only(peer: KadPeer) -> bool:
    """Whether every address of ``peer`` is a circuit through a relay (found by tests/test_wan.py:
    relayed providers' card fetches ran out of time across a simulated WAN, and their records
    went unanswered until the next announce)."""
    return bool(peer.addrs) and all("/p2p-circuit" in a for a in peer.addrs)

"""Placing a card's records in the DHT until enough servers have acknowledged them (``specs/capability.md``).

An announce has one *target* per record: the card itself under its value key (``PUT_VALUE``)
and one provider record per provider key (``ADD_PROVIDER``). Each target goes to its
*reach*, ``min(k, FINAL_PER_ACK * replication)`` peers (10 by default): an iterative lookup
of its key (which ends once the reach closest have answered) places it at each server
that answers while among the reach closest peers known, as it answers, and at the end at
the reach closest found that do not have it yet. (It used to go to the k closest known, up
to k answerers and the k closest found: 20 to 40 servers acknowledged each record where 5
were needed, and one serve() cost a 100-peer mesh about 3.5 s of CPU. Then, up to r9, to
the reach closest of the routing table at once: in a 200-peer mesh those were seldom the
closest, and the record reached the closest only once the lookup had ended.) A server
*acknowledges* a record:

- ``PUT_VALUE``: by its answer (a server answers only once it has validated and stored the
  value);
- ``ADD_PROVIDER``: by its echo of the message (py-libp2p 0.8.1 servers echo it once the
  record is stored), waited for as long as any answer; a server that sends none (the libp2p
  spec gives ``ADD_PROVIDER`` no answer) acknowledges if a ``GET_PROVIDERS`` of the key
  sent to that same server lists this peer. A server seen to do that is remembered, and
  its echo is then waited for only for the lookups' patience. (The patience was the wait
  for every server: on a busy machine echoes came later, and each such record cost a
  second request.)

Each ``ADD_PROVIDER`` carries the card itself ("Cards beside provider records"), so that a
server can check the record without asking this peer for its card.

A target needs ``min(replication, peers found)`` acknowledgements, where the peers found
are those that answered any lookup of this announce or acknowledged any of its records
(one record's lookup may fail on a busy machine while another's gets through; the mesh is
the same). Targets short of that
are placed again, with a fresh lookup (the routing table of a young mesh fills as it goes),
after 0.25, 0.5, 1, 2, ... seconds on trio's clock, until the retry window (counted from
the end of the first placement) closes or a newer card supersedes this one. The whole
announce ends after its budget, with what was acknowledged by then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from ...p2p.kad import KadKind, KadPeer, KadRequest
from ...proto.card import CapabilityCard, value_key
from .index import announced_keys
from .lookup import K, Lookups

__all__ = ["ANNOUNCE_CONCURRENCY", "FIRST_RETRY", "MAX_RETRY", "AnnounceResult", "publish"]

log = logging.getLogger(__name__)

#: Lookups one announce runs at once (one per record).
ANNOUNCE_CONCURRENCY = 4
#: Seconds before the first retry of a record short of acknowledgements; doubled each time.
FIRST_RETRY = 0.25
#: Longest pause between two retries, in seconds.
MAX_RETRY = 4.0
#: Record deliveries one announce has in flight at once.
DELIVERY_CONCURRENCY = 32
#: Peers a record goes to (the closest its lookup finds: its reach), per acknowledgement
#: needed; at most k.
FINAL_PER_ACK = 2
#: Labels of the records placed first, before the other records and the card.
FIRST_LABELS = ("task:", "model:")


@dataclass
class AnnounceResult:
    """What one announce did: the card, and how many DHT servers acknowledged what.

    ``value_stored``: servers that acknowledged storing the card. ``provider_sends``:
    ``ADD_PROVIDER`` messages written. ``provider_acks``: provider records acknowledged,
    over all keys. ``acks`` and ``needed``: per record label (``card`` for the card,
    e.g. ``task:chat`` for a provider key), the acknowledgements got and needed.
    ``rounds``: placements tried (1 when every record was acknowledged at once).
    ``ack_times``: per record label, the seconds from the start of the announce to each
    acknowledgement of that record, in order (at most its reach per round).
    """

    card: CapabilityCard
    value_stored: int = 0
    provider_keys: int = 0
    provider_sends: int = 0
    provider_acks: int = 0
    replication: int = 0
    rounds: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    needed: dict[str, int] = field(default_factory=dict)
    ack_times: dict[str, list[float]] = field(default_factory=dict)

    @property
    def confirmed(self) -> bool:
        """Every record reached the servers it needed, and at least one server was found."""
        return bool(self.needed) and all(
            self.acks.get(label, 0) >= need > 0 for label, need in self.needed.items()
        )

    @property
    def min_acks(self) -> int:
        """The fewest acknowledgements any record got."""
        return min(self.acks.values(), default=0)


@dataclass
class _Target:
    label: str
    key: bytes
    request: KadRequest
    lookup_kind: KadKind
    acked: set[str] = field(default_factory=set)
    found: set[str] = field(default_factory=set)
    busy: set[str] = field(default_factory=set)

    def need(self, replication: int, found: set[str]) -> int:
        return min(replication, len(found | self.acked))


async def publish(
    card: CapabilityCard,
    lookups: Lookups,
    *,
    replication: int,
    retry_window: float,
    budget: float,
    still_current: Callable[[], bool] = lambda: True,
    keys: Sequence[tuple[str, bytes]] | None = None,
) -> AnnounceResult:
    """Place ``card`` and its provider records at the closest servers until enough acknowledge.

    ``keys``: the provider keys to place, as ``(label, key)`` (default: all of the card's,
    and the browse index). Gives up after ``budget`` seconds in all (first placement and
    retries). The local stores are the caller's business. Returns the acknowledgements counted.
    """
    me = KadPeer(card.peer_id, card.addrs)
    vkey = value_key(card.peer_id).encode()
    put = KadRequest(KadKind.PUT_VALUE, vkey, value=card.envelope)
    targets: list[_Target] = []
    if keys is None:
        keys = announced_keys(card.capabilities)  # the card's keys and the browse index
    for label, key in keys:
        provide = KadRequest(KadKind.ADD_PROVIDER, key, provider=me, cards=(card.envelope,))
        targets.append(_Target(label, key, provide, KadKind.FIND_NODE))
    # The card goes last: the provider records carry it, and they are what discoverers look
    # up first (the deliveries of an announce share DELIVERY_CONCURRENCY slots, in order).
    targets.append(_Target("card", vkey, put, KadKind.GET_VALUE))
    result = AnnounceResult(card, provider_keys=len(keys), replication=replication)
    began = trio.current_time()
    reach = min(K, FINAL_PER_ACK * replication)
    found_any: set[str] = set()  # answered a lookup of this announce
    lookup_limiter = trio.CapacityLimiter(ANNOUNCE_CONCURRENCY)
    delivery_limiter = trio.CapacityLimiter(DELIVERY_CONCURRENCY)

    async def acknowledged(t: _Target, pid: str) -> bool:
        if t.request.kind is KadKind.PUT_VALUE:
            return await lookups.request(pid, t.request) is not None
        # Modelnet servers echo once the record is stored, later on a busy machine: wait
        # as for any answer. Servers known to store records without an echo: the patience.
        patience = lookups.rtt.patience() if pid in lookups.silent else None
        echo, opened = await lookups.timed_request(pid, t.request, patience)
        if opened:
            result.provider_sends += 1
        if echo is not None:
            return True
        if not opened:
            return False
        check = await lookups.request(pid, KadRequest(KadKind.GET_PROVIDERS, t.key))
        stored = check is not None and any(p.peer_id == me.peer_id for p in check.providers)
        if stored:
            lookups.note_silent(pid)
        return stored

    async def deliver(t: _Target, pid: str) -> None:
        try:
            async with delivery_limiter:
                if await acknowledged(t, pid):
                    t.acked.add(pid)
                    result.ack_times.setdefault(t.label, []).append(trio.current_time() - began)
        finally:
            t.busy.discard(pid)

    def start(nursery: trio.Nursery, t: _Target, peers: list[str]) -> None:
        for pid in peers:
            if pid != me.peer_id and pid not in t.acked and pid not in t.busy:
                t.busy.add(pid)
                nursery.start_soon(deliver, t, pid)

    async def place(t: _Target, nursery: trio.Nursery) -> None:
        def near(pid: str) -> None:
            # It answered while among the reach closest known: place the record now, not
            # once the lookup ends (it waits for the slowest of the closest).
            start(nursery, t, [pid])

        async with lookup_limiter:
            found = await lookups.closest(t.key, t.lookup_kind, k=reach, on_near=near)
        t.found.update(found)
        found_any.update(found)
        start(nursery, t, found)

    async def round_of(batch: list[_Target]) -> None:
        result.rounds += 1
        async with trio.open_nursery() as nursery:
            for t in batch:
                nursery.start_soon(place, t, nursery)

    def peers_found() -> set[str]:
        return found_any.union(*(t.acked for t in targets))

    delay = FIRST_RETRY
    with trio.move_on_after(budget):  # a busy machine: report what was acknowledged by then
        # First the records a discoverer looks up (task and model keys), then the rest: the
        # work of a first placement is mostly dials and lookups, and a busy peer that does
        # it all at once delays every record.
        first = [t for t in targets if t.label.startswith(FIRST_LABELS)]
        await round_of(first)
        result.rounds -= 1  # one round in two steps
        await round_of([t for t in targets if t not in first])
        closes = trio.current_time() + retry_window  # from the end of the first round
        while still_current():
            found = peers_found()
            short = [t for t in targets if len(t.acked) < t.need(replication, found)]
            if not short or trio.current_time() + delay > closes:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY)
            await round_of(short)
    found = peers_found()
    for t in targets:
        result.acks[t.label] = len(t.acked)
        result.needed[t.label] = t.need(replication, found)
        if t.request.kind is KadKind.PUT_VALUE:
            result.value_stored = len(t.acked)
        else:
            result.provider_acks += len(t.acked)
    log.debug(
        "announced card seq %d in %d rounds: stored at %d peers, %d keys, %d provider records acknowledged",
        card.seq,
        result.rounds,
        result.value_stored,
        result.provider_keys,
        result.provider_acks,
    )
    return result

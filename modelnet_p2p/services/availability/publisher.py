"""When this peer publishes its availability record, and what the record says.

:class:`Publisher` is the sending half of the availability service, with no network: it
builds :class:`~modelnet_p2p.proto.availability.AvailabilityRecord` values and hands them to a
``send`` callable. A record goes out

* when the publisher starts, and whenever :meth:`Publisher.poke` is called (a restart of
  gossip, for example);
* at once on a significant change: state, capabilities, the load crossing a level (see
  :func:`~modelnet_p2p.services.availability.load.load_level`);
* every ``publish_interval`` seconds otherwise (a slow refresh: tens of seconds);

A neighbour that newly subscribes to one of its topics is *greeted*: the ``greet`` callable
sends it the latest record alone; only when there is none to send does a record go out to all.

but only while it serves something (once more after its last capability is withdrawn, so
that followers learn it), never more often than once per ``min_publish_gap`` (py-libp2p drops
bursts silently), and never after :meth:`Publisher.leave` until the state is set again.

Monotonic time is trio's (:func:`trio.current_time`, :func:`trio.sleep`); sequence numbers come
from the injected wall clock, so that they keep increasing across restarts.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ...proto.availability import MAX_SEQ, AvailabilityRecord, State
from .config import AvailabilityConfig
from .load import LoadProvider, LoadSnapshot, load_level, record_figures

__all__ = ["Publisher", "Send"]

log = logging.getLogger(__name__)

#: Hands a record to the network; returns whether it was published.
Send = Callable[[AvailabilityRecord], Awaitable[bool]]
#: Sends the latest record to one new subscriber alone; returns whether there was one to send.
Greet = Callable[[str], bool]


class Publisher:
    """This peer's state, capabilities and load, and the schedule of its records.

    Args:
        peer_id: this peer's id (base58), named in every record.
        config: publishing intervals, TTL and initial state.
        send: publishes a record; returns whether it went out.
        neighbours: the neighbours subscribed to this peer's topics (a new one is greeted).
        greet: sends the latest record to one new subscriber; ``False``: none to send, so
            a record goes out to all (the default greets nobody).
        load_provider: polled for the current load; ``None``: the figures given to :meth:`report`.
        wall_clock: wall-clock seconds, for sequence numbers.
    """

    def __init__(
        self,
        peer_id: str,
        config: AvailabilityConfig,
        send: Send,
        *,
        neighbours: Callable[[], frozenset[str]] = frozenset,
        greet: Greet = lambda peer_id: False,
        load_provider: LoadProvider | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.peer_id = peer_id
        self.config = config
        self._send = send
        self._neighbours = neighbours
        self._greet = greet
        self._load_provider = load_provider
        self._wall_clock = wall_clock
        self._reported = LoadSnapshot()
        self._state: State = config.initial_state
        self._caps: tuple[tuple[str, str], ...] = ()
        self._seq = 0
        self._wake = trio.Event()
        self._force = True
        self._silent = False
        #: A record is still owed to the followers of withdrawn capabilities.
        self._withdrawn = False
        self._lock = trio.Lock()

    # -- local state --------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def capabilities(self) -> tuple[tuple[str, str], ...]:
        return self._caps

    @property
    def silent(self) -> bool:
        """Whether publishing stopped (after :meth:`leave`)."""
        return self._silent

    @property
    def serving(self) -> bool:
        """Whether this peer serves something, and so publishes."""
        return bool(self._caps)

    def set_state(self, state: State | str) -> None:
        """Set this peer's state; published at once (within the rate limit).

        Setting any state but ``leaving`` resumes publishing after :meth:`leave`.
        """
        new = State(state)
        if new is not State.LEAVING:
            self._silent = False
        if new != self._state:
            self._state = new
            self.poke()

    def set_capabilities(self, caps: tuple[tuple[str, str], ...]) -> None:
        """Set the served capabilities (normalized ``(name, version)`` pairs, sorted by name)."""
        if caps != self._caps:
            self._withdrawn = self._withdrawn or (bool(self._caps) and not caps)
            self._caps = caps
            self.poke()

    def report(self, load: LoadSnapshot) -> None:
        """Set the load figures used when no load provider is set."""
        self._reported = load
        if self._load_provider is None:
            self._wake.set()

    @property
    def load_provider(self) -> LoadProvider | None:
        return self._load_provider

    @load_provider.setter
    def load_provider(self, provider: LoadProvider | None) -> None:
        self._load_provider = provider
        self._wake.set()

    def poke(self) -> None:
        """Publish at the next opportunity (within the rate limit)."""
        self._force = True
        self._wake.set()

    def current_load(self) -> LoadSnapshot:
        """The load figures the next record will carry."""
        if self._load_provider is None:
            return self._reported
        try:
            load = self._load_provider()
        except Exception as exc:
            log.debug("load provider failed: %r", exc)
            return self._reported
        self._reported = load
        return load

    def next_record(self, load: LoadSnapshot | None = None) -> AvailabilityRecord:
        """The record to publish now: state, capabilities, ``load`` (default: current) and a new seq."""
        load = load if load is not None else self.current_load()
        self._seq = min(max(self._seq + 1, int(self._wall_clock() * 1_000_000)), MAX_SEQ)
        return AvailabilityRecord(
            peer_id=self.peer_id,
            seq=self._seq,
            state=self._state,
            capabilities=self._caps,
            ttl_ms=int(self.config.effective_ttl * 1000),
            **record_figures(load),
        )

    # -- publishing ---------------------------------------------------------------------

    async def publish_now(self, load: LoadSnapshot | None = None) -> bool:
        """Build and send a record at once, bypassing the rate limit; returns whether it went out."""
        async with self._lock:
            try:
                record = self.next_record(load)
            except (ValueError, TypeError) as exc:
                log.warning("cannot build an availability record: %r", exc)
                return False
            sent = await self._send(record)
            if sent and not record.capabilities:
                self._withdrawn = False
            return sent

    async def leave(self) -> bool:
        """Publish ``leaving`` (if serving) and stop publishing; returns whether a record went out."""
        self._state = State.LEAVING
        self._silent = True
        self._wake.set()
        if not (self._caps or self._withdrawn):
            return False
        return await self.publish_now()

    async def drain(self, timeout: float | None = None, poll: float = 0.05) -> bool:
        """Announce ``draining`` and wait until no request is in flight.

        Returns ``True`` once the in-flight count reaches zero, ``False`` if ``timeout``
        seconds pass first. The state stays ``draining``.
        """
        self.set_state(State.DRAINING)
        with trio.move_on_after(math.inf if timeout is None else timeout):
            while True:
                if self.current_load().in_flight <= 0:
                    return True
                await trio.sleep(poll)
        return False

    async def run(self) -> None:
        """Publish on schedule until cancelled."""
        cfg = self.config
        last_publish = -math.inf
        next_periodic = -math.inf
        last_key: tuple[Any, ...] | None = None
        last_neighbours: frozenset[str] = frozenset()
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            if self._silent or not (self._caps or self._withdrawn):
                # Nothing to say: a peer that serves nothing publishes nothing.
                await self._wake.wait()
                self._force = True
                continue
            load = self.current_load()
            key = (load_level(load), load.max_concurrency)
            neighbours = self._neighbours()
            for pid in sorted(neighbours - last_neighbours):
                # A new subscriber learns about us without waiting a period: from our last
                # record sent to it alone, or, if we have none, from a new one sent to all.
                if not self._greet(pid):
                    self._force = True
            last_neighbours = neighbours
            due = self._force or key != last_key or now >= next_periodic
            if due:
                earliest = last_publish + cfg.min_publish_gap
                if now < earliest:
                    await trio.sleep_until(earliest)
                    continue
                self._force = False
                last_key = key
                await self.publish_now(load)
                last_publish = trio.current_time()
                next_periodic = last_publish + cfg.publish_interval
                continue
            with trio.move_on_at(min(next_periodic, now + cfg.load_poll_interval)):
                await self._wake.wait()

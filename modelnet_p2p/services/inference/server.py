"""The server side of ``/modelnet/infer/1.0.0``: accept streams, admit requests, run handlers.

The protocol itself (frames, admission order up to the capability lookup, credit,
stream reuse, timeouts) is :class:`~modelnet_p2p.proto.session.ServerSession`; this
module only drives it with trio: two tasks per stream take turns, one feeding it the
stream's bytes while the other runs the request the first one read (the reader of a
request runs it, so its handler starts without a wake-up of another task), the handler
queues chunks into it, and a writer sends whatever the session's window lets out,
joining every ready frame into one stream write (a streamed answer's first chunk is
written at once by the handler's own task).

Flow control: a yamux stream in py-libp2p 0.8.1 lets about 4 MiB pile up unread,
then resets the stream. So the server never has more than the client's window
unacknowledged (``specs/inference.md``, "Flow control"); a slow consumer slows the
handler down instead of losing the stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ...errors import (
    ConfigError,
    DeadlineExceededError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)
from ...p2p.resources import remote_ip
from ...p2p.stream import (
    STREAM_ERRORS,
    Stream,
    StreamEOF,
    close_quietly,
    remote_ended,
    remote_peer,
    reset_quietly,
    write_whole,
)
from ...proto.capability import Capability, capability_key
from ...proto.envelope import Signer
from ...proto.infer import Load, Request, via_entry
from ...proto.receipt import ChunkChain, signed_receipt
from ...proto.session import (
    DEADLINE_GRACE,
    IDLE_STREAM_TIMEOUT,
    MAX_WRITE_BATCH,
    NEED_DATA,
    PAUSED,
    REQUEST_READ_TIMEOUT,
    CancelReceived,
    ClientGone,
    Limits,
    ProtocolViolation,
    ServerSession,
    ServerState,
)
from ..access import AccessControl
from .admission import Admission, AdmissionLimits, Ticket
from .client import DEFAULT_WINDOW, ResponseInfo, new_request_id, run_request
from .handlers import Handler, InferenceRequest, handler_kind, run_handler

__all__ = [
    "DEADLINE_GRACE",
    "DEFAULT_WINDOW",
    "HANDLER_BUFFER",
    "IDLE_STREAM_TIMEOUT",
    "MAX_WRITE_BATCH",
    "READ_SIZE",
    "REQUEST_READ_TIMEOUT",
    "InferenceServer",
    "Limits",
    "LoadFigures",
    "ResponseInfo",
    "new_request_id",
    "run_request",
    "via_entry",
]

log = logging.getLogger(__name__)

#: Bytes asked of the stream per read.
READ_SIZE = 1 << 16
#: Chunks a handler may run ahead of the writer before it is suspended.
HANDLER_BUFFER = 64
#: ... or, while the chunks queued add up to at most :data:`MAX_WRITE_BATCH` bytes with the
#: next one (text or bytes; an upper bound of its frame from its length), this many: a fast
#: handler of short tokens then fills one write (256 chunks in 2 writes, not 6).
SMALL_CHUNK_BUFFER = 1024
#: Bytes of a chunk frame besides its data, at most (prefix, keys, ``seq``, ``load``, headers).
CHUNK_OVERHEAD = 128
#: How long a last ``err`` may take to write when the server gives a stream up.
FAREWELL_TIMEOUT = 0.5
#: After an ``err`` and its close, how long the client has to end its side before the server
#: resets the stream (whatever the client sends meanwhile is discarded, not buffered).
ERROR_LINGER = 1.0
#: A remote whose streams end in ``protocol_error`` this many times within
#: :data:`VIOLATION_WINDOW` seconds has its new streams reset on arrival, unread, for
#: :data:`VIOLATION_BAN` seconds: a conforming peer never sends one, and refusing a stream
#: before reading it costs far less than decoding its junk.
MAX_VIOLATIONS = 8
VIOLATION_WINDOW = 10.0
VIOLATION_BAN = 30.0
#: Remotes whose recent protocol errors are remembered (the oldest are forgotten first).
MAX_VIOLATORS = 4096

_WRITE_ERRORS: tuple[type[BaseException], ...] = (UnavailableError, *STREAM_ERRORS)
_IN_REQUEST = (ServerState.ADMITTING, ServerState.RUNNING, ServerState.FINISHING)
#: States in which a stream has work for a task that runs no request (``_Link.needs_turn``).
_TURN_STATES = (ServerState.ADMITTING, ServerState.FINISHING, ServerState.CLOSED, ServerState.RESET)
#: Handler kinds that give exactly one chunk, their return value (``handlers.run_handler``).
_ONE_CHUNK = frozenset({"async", "sync"})


class LoadFigures(Protocol):
    """A provider's load figures, as the availability service's ``LoadSnapshot`` holds them."""

    @property
    def in_flight(self) -> float: ...
    @property
    def queue(self) -> float: ...
    @property
    def max_concurrency(self) -> float: ...
    @property
    def latency_ms(self) -> float: ...
    @property
    def tokens_per_s(self) -> float: ...


@dataclass
class _Served:
    capability: Capability
    handler: Handler
    kind: str
    in_flight: int = 0


class _Link:
    """One accepted stream, its session, and the wake-ups between the tasks that share them."""

    def __init__(self, stream: Stream, session: ServerSession) -> None:
        self.stream = stream
        self.session = session
        # A parking lot, not an Event: notify runs once per chunk, and waking nobody (the
        # common case while a fast handler fills the queue) then costs one check of an int.
        self._changed = trio.lowlevel.ParkingLot()
        #: Tasks parked in :meth:`changed` (what ``len(self._changed)`` counts, without a call).
        self.waiting = 0
        #: Stops the running request's handler (set while one runs).
        self.on_stop: Callable[[], None] | None = None
        #: The client broke the protocol on this stream.
        self.violated = False
        #: The remote's address key for admission, looked up once per stream (a multiaddr parse).
        self.ip: str | None = None
        self.ip_known = False
        #: A write of this stream is under way (by the writer task, or a first chunk's by the
        #: handler's task): the other waits, so that frames leave in the session's order.
        self.writing = False
        #: A task runs a request (or writes a refusal) / a task reads (``_take_turns``).
        self.running = False
        self.reading = False
        #: The reading task decoded a request while the other still ran the last one, and
        #: waits to run it (``read_until_turn``): the other leaves it to the reader.
        self.handoff = False

    def notify(self) -> None:
        if self.waiting:
            self.waiting = 0
            self._changed.unpark_all()

    async def changed(self) -> None:
        self.waiting += 1
        try:
            await self._changed.park()
        except BaseException:
            self.waiting = len(self._changed)  # cancelled while parked: those still parked
            raise

    def stop_request(self) -> None:
        if self.on_stop is not None:
            self.on_stop()

    def needs_turn(self) -> bool:
        """Whether the stream has work no task does: a request waits for admission, a refusal
        or protocol error waits to be written, or the stream is over (see ``_take_turns``)."""
        return not self.running and self.session.state in _TURN_STATES

    async def read_until_turn(self) -> None:
        """Feed the session the stream's bytes, reading only when it needs more, until it has
        work for this task (:meth:`needs_turn`) or the stream breaks.

        Cancelling a read in py-libp2p's yamux can lose bytes already taken from its buffer,
        so a read is never cancelled mid-stream: the stream's two tasks take turns, one
        reading while the other runs a request, and only the end of the stream cancels one.
        """
        s = self.session
        while True:
            event = s.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.read(READ_SIZE)
                except StreamEOF:
                    s.receive_eof()
                    continue
                except STREAM_ERRORS:
                    s.connection_lost()
                    self.stop_request()
                    self.notify()
                    return
                s.receive_data(data)
                continue
            if event is PAUSED:
                if self.needs_turn():
                    return
                self.handoff = True
                try:
                    await self.changed()
                finally:
                    self.handoff = False
                continue
            if isinstance(event, CancelReceived | ClientGone | ProtocolViolation):
                self.stop_request()
            if isinstance(event, ProtocolViolation):
                self.violated = True
                log.info("protocol error from %s: %s", remote_peer(self.stream), event.error.message)
            self.notify()

    async def write(self, data: bytes) -> bool:
        """Write ``data`` (what ``data_to_send`` gave: all of it must go); ``False`` if the
        stream broke (the request is stopped)."""
        self.writing = True
        try:
            await write_whole(self.stream, data)
        except _WRITE_ERRORS:
            self.session.connection_lost()
            self.stop_request()
            return False
        finally:
            self.writing = False
            self.notify()  # room in the handler's queue again, or the writer's turn
        return True

    async def write_out(self) -> None:
        """Write what the session lets out until its final frame is out or the stream is done."""
        s = self.session
        while True:
            if not self.writing:
                data = s.data_to_send(trio.current_time())
                if data:
                    if not await self.write(data):
                        return
                    continue
                if s.state not in (ServerState.RUNNING, ServerState.FINISHING):
                    return
            with trio.move_on_at(s.timeout_at()):
                await self.changed()
                continue
            if s.on_timeout(trio.current_time()) is not None:
                self.stop_request()

    async def give_up(self, error: ModelNetError) -> None:
        """End the stream now: send ``error`` if a request was in progress, then reset."""
        s = self.session
        if s.state in _IN_REQUEST:
            s.abort(error)
            data = s.data_to_send(trio.current_time())
            with trio.CancelScope(shield=True), trio.move_on_after(FAREWELL_TIMEOUT):
                try:
                    await self.stream.write(data)
                except Exception:
                    pass
        s.connection_lost()
        await reset_quietly(self.stream)

    async def end(self) -> None:
        """Close or reset the stream, as the session's final state says.

        After an ``err`` (a refused request, a protocol error, a failed handler) the stream is
        closed, so that the ``err`` arrives, and what the client still sends is discarded;
        a client that has not ended its side within :data:`ERROR_LINGER` is reset.
        """
        if self.session.state is not ServerState.CLOSED:
            await reset_quietly(self.stream)
            return
        if await close_quietly(self.stream) and self.session.final_code is not None:
            if not remote_ended(self.stream):  # one wake-up per refused stream, not a poll
                await trio.sleep(ERROR_LINGER)
            if not remote_ended(self.stream):
                await reset_quietly(self.stream)


class InferenceServer:
    """Serves registered capabilities on incoming inference streams.

    Each accepted stream is handled in ``nursery`` (the peer's, see :meth:`bind`), so no
    request outlives the peer. Capability names are matched after
    :func:`~modelnet_p2p.proto.capability.capability_key`, as discovery matches them.
    """

    def __init__(self, local_peer: str, limits: Limits) -> None:
        self.local_peer = local_peer
        self.limits = limits
        self._served: dict[str, _Served] = {}
        self._in_flight = 0
        self._per_peer: dict[str, int] = {}
        #: Per remote with recent protocol errors: (errors in the window, window start, banned until).
        self._violations: dict[str, tuple[int, float, float]] = {}
        #: Fair shares of the request slots and a rate per caller (``admission.py``); the Peer
        #: replaces it with one built from its config.
        self.admission = Admission(AdmissionLimits(limits.max_concurrency, limits.max_concurrency_per_peer))
        self._nursery: trio.Nursery | None = None
        #: Who may call what (``services/access.py``); the Peer configures it.
        self.access = AccessControl()
        #: Signs receipts (``proto/receipt.py``) when a request asks, or always with ``always_sign``.
        self.signer: Signer | None = None
        self.always_sign = False
        #: While draining, new requests are refused with ``unavailable`` (retryable)
        #: and requests already running finish.
        self.draining = False
        #: Builds the ``request.mesh`` context for handlers (set by the Peer).
        self.mesh_factory: Callable[[InferenceRequest], Any] | None = None
        #: Called after each admitted request: (capability, remote peer, seconds, chunks, error code).
        self.on_request_done: Callable[[str, str, float, int, str | None], None] | None = None
        #: The load written into every answer (``specs/inference.md``, "Load"), counting each
        #: admitted request until it is done. ``None``: this server's own in-flight count and
        #: concurrency limit. The Peer passes its availability load (queue, latency, rate too).
        self.load_provider: Callable[[], LoadFigures] | None = None
        self._load_failed = False

    # -- registry ------------------------------------------------------------

    def check(self, capability: Capability) -> None:
        """Raise :class:`ConfigError` if ``capability`` would collide with another served one:
        a different name that is the same after normalization."""
        served = self._served.get(capability_key(capability.name))
        if served is not None and served.capability.name != capability.name:
            raise ConfigError(
                f"capability {capability.name!r} collides with {served.capability.name!r}: "
                "names are compared by their capability_key (specs/capability.md)"
            )

    def add(self, capability: Capability, handler: Handler) -> None:
        """Serve ``capability`` (replacing a handler of exactly the same name)."""
        self.check(capability)
        kind = handler_kind(handler)
        self._served[capability_key(capability.name)] = _Served(capability, handler, kind)

    def remove(self, name: str) -> None:
        self._served.pop(capability_key(name), None)

    def capabilities(self) -> list[Capability]:
        return [s.capability for s in self._served.values()]

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def current_load(self, remote: str | None = None) -> Load | None:
        """The load answers to ``remote`` carry now, with ``own``: its requests among those in
        flight (``None`` if the load provider fails)."""
        own = None if remote is None else self._per_peer.get(remote, 0)
        provider = self.load_provider
        if provider is None:
            return Load.clamped(self._in_flight, 0, self.limits.max_concurrency, own=own)
        try:
            f = provider()
            return Load.clamped(f.in_flight, f.queue, f.max_concurrency, f.latency_ms, f.tokens_per_s, own)
        except Exception as exc:  # a broken provider must not break answers: they go without
            log.log(logging.DEBUG if self._load_failed else logging.WARNING, "load provider failed: %r", exc)
            self._load_failed = True
            return None

    async def wait_idle(self) -> None:
        """Return once no request is running."""
        while self._in_flight:
            await trio.sleep(0.05)

    def bind(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    # -- stream handling -----------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """The libp2p stream handler: hand the stream to the peer's nursery and return."""
        if self._nursery is None or self.banned(remote_peer(stream)):
            await reset_quietly(stream)
            return
        self._nursery.start_soon(self._serve_stream, stream)

    def banned(self, remote: str) -> bool:
        """Whether ``remote``'s new streams are refused for repeated protocol errors."""
        entry = self._violations.get(remote)
        return entry is not None and trio.current_time() < entry[2]

    def _violation(self, remote: str) -> None:
        now = trio.current_time()
        count, since, until = self._violations.pop(remote, (0, now, 0.0))
        if now - since > VIOLATION_WINDOW:
            count, since = 0, now
        count += 1
        if count >= MAX_VIOLATIONS and until <= now:
            until = now + VIOLATION_BAN
            log.info("refusing streams from %s for %.0f s: %d protocol errors", remote, VIOLATION_BAN, count)
        self._violations[remote] = (count, since, until)  # re-inserted: the newest last
        if len(self._violations) > MAX_VIOLATORS:
            del self._violations[next(iter(self._violations))]

    async def _serve_stream(self, stream: Stream) -> None:
        # This must never raise: an exception escaping a handler stops the host.
        remote = remote_peer(stream)
        session = ServerSession(
            trio.current_time(),
            self.limits,
            local_peer=self.local_peer,
            load=lambda: self.current_load(remote),
        )
        link = _Link(stream, session)
        try:
            await self._serve(link)
        except Exception:
            log.exception("inference stream failed")
            await link.give_up(InternalError("the provider failed while serving the request"))
        except BaseException:
            # The peer is stopping: say so to a request in progress, so that the client knows
            # the request was seen (and does not resend it on a new stream).
            await link.give_up(UnavailableError("the provider is stopping"))
            raise

    async def _serve(self, link: _Link) -> None:
        """Serve one stream: one request, or several in turn if the client keeps it open."""
        remote = remote_peer(link.stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_turns, link, remote, nursery.cancel_scope)
            await self._take_turns(link, remote, nursery.cancel_scope)
        if link.violated:
            self._violation(remote)
        await link.end()

    async def _take_turns(self, link: _Link, remote: str, done: trio.CancelScope) -> None:
        """One of a stream's two tasks. Each reads while no other task does, and runs the
        request it read itself (the other task reads meanwhile): the request's handler then
        starts in the step that decoded it, not a scheduler pass later in another task. The
        task that finds the stream over (no request running) cancels both (``done``)."""
        s = link.session
        while True:
            # A request the reader decoded while this task ran the last one is the reader's
            # to run (it was woken when this task's run ended, and takes its turn next).
            if link.needs_turn() and not link.handoff:
                if s.state in (ServerState.CLOSED, ServerState.RESET):
                    done.cancel()
                    return
                link.running = True
                link.notify()  # the other task reads meanwhile
                try:
                    if s.state is ServerState.ADMITTING:
                        await self._admit_and_run(link, remote)
                    else:  # FINISHING: a refused request or a protocol error
                        await link.write_out()
                finally:
                    link.running = False
                    link.notify()
                continue
            if not link.reading:
                link.reading = True
                try:
                    await link.read_until_turn()
                finally:
                    link.reading = False
                continue
            with trio.move_on_at(s.timeout_at()):
                await link.changed()
                continue
            timed_out = s.on_timeout(trio.current_time())
            if timed_out is not None:
                log.debug("inference stream from %s: %s", remote, timed_out.reason)
                link.notify()

    def _admission_error(self, req: Request, remote: str) -> ModelNetError | None:
        served = self._served.get(capability_key(req.capability))
        if served is None:
            return NotFoundError(f"capability {req.capability!r} is not served by this peer")
        if self.draining:
            return UnavailableError("peer is draining; try another provider")
        denied = self.access.check(req, remote, served.capability)  # policy, token, rate (services/access.py)
        if denied is not None:
            return denied
        cap = served.capability
        if cap.max_concurrency is not None and served.in_flight >= cap.max_concurrency:
            return OverloadedError(f"capability {req.capability!r} is at its concurrency limit")
        return None

    def _take_slot(self, link: _Link, remote: str) -> Ticket | ModelNetError:
        """A request slot (fair shares, a rate per caller: ``admission.py``), or why not."""
        if not link.ip_known:  # a kept stream serves many requests; its remote never changes
            link.ip = remote_ip(link.stream, limit_loopback=self.admission.limits.limit_loopback)
            link.ip_known = True
        ip = link.ip
        try:
            return self.admission.admit(remote, ip, trio.current_time(), lambda e: _preempt(link, e))
        except OverloadedError as exc:
            return exc

    async def _admit_and_run(self, link: _Link, remote: str) -> None:
        """Admit the session's request (the hop and loop checks are the session's) and serve it."""
        s = link.session
        req = s.request
        assert req is not None
        error = self._admission_error(req, remote)
        ticket: Ticket | ModelNetError = error or self._take_slot(link, remote)
        if isinstance(ticket, ModelNetError):
            s.reject(ticket)
            link.notify()
            return
        served = self._served[capability_key(req.capability)]
        self._in_flight += 1
        self._per_peer[remote] = self._per_peer.get(remote, 0) + 1
        served.in_flight += 1
        started = trio.current_time()
        try:
            await self._run(link, req, served, remote)
        finally:
            self.admission.release(ticket)
            self._in_flight -= 1
            served.in_flight -= 1
            left = self._per_peer[remote] - 1
            if left:
                self._per_peer[remote] = left
            else:
                del self._per_peer[remote]
            self.access.done(req, remote, served.capability, s.chunks_written)
            if self.on_request_done is not None:
                self.on_request_done(
                    served.capability.name,
                    remote,
                    trio.current_time() - started,
                    s.chunks_written,
                    _outcome(s),
                )

    async def _run(self, link: _Link, req: Request, served: _Served, remote: str) -> None:
        """Run the handler and stream its answer through the session."""
        s = link.session
        now = trio.current_time()
        deadline = s.accept(now)
        signing = self.signer is not None and (req.receipt or self.always_sign)
        chain, started_ms = ChunkChain(req.input) if signing else None, time.time_ns() // 1_000_000
        link.notify()  # the reader waits for admission before it reads on
        request = InferenceRequest(
            request_id=req.request_id,
            capability=served.capability,
            input=req.input,
            params=req.params,
            deadline=deadline,
            remote_peer=remote,
            cancel_scope=trio.CancelScope(deadline=deadline),
            trace=req.trace,
        )
        if self.mesh_factory is not None:
            request.mesh = self.mesh_factory(request)
        link.on_stop = request.cancel
        streaming = served.kind not in _ONE_CHUNK

        def room(item: Any) -> bool:
            # HANDLER_BUFFER chunks, or SMALL_CHUNK_BUFFER of text or bytes within MAX_WRITE_BATCH.
            queued = s.queued_frames
            return queued < HANDLER_BUFFER or (
                queued < SMALL_CHUNK_BUFFER and s.queued_bytes + _frame_bound(item) <= MAX_WRITE_BATCH
            )

        def queue(item: Any) -> None:
            if not s.send_chunk(item):
                request.cancel_scope.cancel()  # the chunk could not be sent: the request failed
            elif chain is not None:
                chain.add(item)
            link.notify()

        offer_chunk = s.offer_chunk

        def offer(item: Any) -> bool:
            # The hot path, per chunk, with no coroutine: queue ``item`` if it may go without
            # waiting (not the first chunk, text or bytes, room in the queue); else ``emit``.
            if offer_chunk(item, HANDLER_BUFFER, SMALL_CHUNK_BUFFER, MAX_WRITE_BATCH):
                if chain is not None:
                    chain.add(item)
                if link.waiting:  # (link.notify, without a call per chunk while nobody waits)
                    link.notify()
                return True
            return False

        async def emit(item: Any) -> None:
            # Queue without yielding to the scheduler when there is room, so a fast
            # handler's chunks pile up and go out in one write; a handler that awaits
            # between chunks still has each one written at once.
            while s.running and not room(item):
                await link.changed()
            if not s.running:
                return  # the request ended; the handler's scope is cancelled
            queue(item)
            if streaming and not s.chunks_written:
                # The first chunk goes out at once, alone: a handler that never awaits would
                # otherwise fill the queue before the writer's turn, and the first chunk would
                # wait for the whole batch. Later chunks pile up while a write is under way and
                # go out joined in the next one. This task writes it itself unless the writer
                # already is (the writer's first turn is a scheduler pass later); the write is
                # shielded and bounded (write_whole), as the writer's.
                if not link.writing and (data := s.data_to_send(trio.current_time())):
                    await link.write(data)
                while s.running and not s.chunks_written:
                    await link.changed()

        async def produce() -> None:
            error: BaseException | None = None
            try:
                with request.cancel_scope:
                    await run_handler(served.handler, served.kind, request, emit, offer)
            except Exception as exc:
                error = exc
                if not isinstance(exc, ModelNetError):
                    log.warning(
                        "handler for %r raised %s: %s", served.capability.name, type(exc).__name__, exc
                    )
            if not s.running:
                return
            if error is None and request.cancel_scope.cancelled_caught:
                error = DeadlineExceededError(f"deadline of {deadline - now:.3f} s exceeded on the provider")
            if error is None:
                sealed = signed_receipt(self.signer, chain, req, request.finish_reason, request.usage, remote,
                                        started_ms, time.time_ns() // 1_000_000)  # fmt: skip
                s.send_end(request.finish_reason, request.usage, **sealed)
            elif isinstance(error, ModelNetError):
                s.send_error(error)
            else:
                s.send_error(InternalError(f"handler raised {type(error).__name__}: {error}"))
            link.notify()

        try:
            if served.kind in _ONE_CHUNK:
                # One chunk, after the handler returns: nothing to write meanwhile, so the
                # handler runs here rather than in a task of its own (one spawn less a request).
                await produce()
                await link.write_out()
            else:
                # The handler runs in this task and the writer in a new one: the handler starts
                # at once, and the writer's first turn comes when the first chunk is queued
                # (one scheduler pass less before it goes out).
                async def write_out() -> None:
                    await link.write_out()
                    request.cancel_scope.cancel()  # the answer is over or lost: stop the handler

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(write_out)
                    await produce()
        finally:
            link.on_stop = None
            request.mark_cancelled()


def _frame_bound(item: Any) -> int:
    """At most how many bytes the chunk frame of ``item`` takes (text: 4 bytes a character at
    most in UTF-8; anything but text and bytes counts as large)."""
    kind = type(item)
    if kind is str:
        return 4 * len(item) + CHUNK_OVERHEAD
    if kind is bytes:
        return len(item) + CHUNK_OVERHEAD
    return MAX_WRITE_BATCH + 1


def _preempt(link: _Link, error: ModelNetError) -> None:
    """End ``link``'s running request with ``error``: another caller takes its slot."""
    link.session.abort(error)
    link.stop_request()
    link.notify()


def _outcome(s: ServerSession) -> str | None:
    """The error code a request ended with (``None`` for success), for the load statistics."""
    return s.final_code

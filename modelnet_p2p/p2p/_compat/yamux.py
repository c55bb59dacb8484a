"""Workarounds of py-libp2p 0.8.1's yamux muxer.

Upstream behaviours corrected (the canaries in ``tests/test_compat_yamux.py`` fail once
upstream changes them):

- **A remote reset reads as an ordinary end of stream.** When the remote sends RST, yamux
  marks the stream ``reset_received`` and then finalizes it, removing its buffer; the next
  ``read()`` finds the buffer gone and raises ``StreamEOF`` ("Stream was removed during
  read") instead of ``StreamReset``. A protocol that must tell a clean close from a reset
  (``specs/inference.md``: a kept stream may be resent on only after a clean end of stream)
  cannot, from the exception alone. :func:`reset_by_remote` reads the flag yamux keeps (a
  public attribute of its stream), so a caller that got ``StreamEOF`` can ask whether it was
  really a reset.
- **Every connection runs two timers of its own, forever.** ``Yamux.start`` starts
  ``_measure_rtt_loop`` (a ping every 30 s from each side, whether or not the connection
  carries traffic) and ``_stale_stream_sweeper`` (a wake-up every 30 s) for each connection.
  An idle peer with 20 connections woke about 2 times a second for them, and the cost grew
  with its number of connections. :class:`LeanYamux` keeps the first RTT sample (one ping
  0.5 s after the start, as upstream) and drops both loops; :func:`run_keepalive`, one task
  per host, does their work for all the host's connections: it pings only a connection that
  has been silent (nothing received) for :data:`KEEPALIVE_INTERVAL` (its dialing side does;
  the accepting side waits twice as long), closes one whose ping
  stays unanswered for :data:`KEEPALIVE_TIMEOUT`, and sweeps stale streams only where a
  closed stream is waiting. It sleeps until the next connection falls due, and pings every
  connection due within :data:`KEEPALIVE_SLACK` of it in the same wake-up.
- **The configured yamux class is ignored.** ``MuxerMultistream.new_conn`` builds a plain
  ``Yamux`` whenever ``/yamux/1.0.0`` is negotiated, whatever class ``muxer_opt`` names for
  it. :func:`use_muxer_classes` gives a swarm's upgrader a :class:`ClassHonouringMuxer`,
  which builds the configured class.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INetConn, INetwork, ISecureConn
from libp2p.custom_types import TMuxerOptions
from libp2p.peer.id import ID
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import FLAG_SYN, TYPE_PING, YAMUX_HEADER_FORMAT, Yamux

__all__ = [
    "KEEPALIVE_INTERVAL",
    "KEEPALIVE_SLACK",
    "KEEPALIVE_TIMEOUT",
    "STALE_SWEEP_INTERVAL",
    "ClassHonouringMuxer",
    "LeanYamux",
    "ping",
    "reset_by_remote",
    "run_keepalive",
    "start_keepalive",
    "use_muxer_classes",
]

log = logging.getLogger(__name__)

#: Seconds a connection may stay silent (nothing received) before it is pinged. Upstream
#: pings every connection every 30 s from both sides; go-yamux's keepalive interval is 30 s.
KEEPALIVE_INTERVAL = 30.0
#: Seconds a ping may stay unanswered before its connection is closed as dead (generous: a
#: peer whose cores are busy still answers within seconds; upstream never closes).
KEEPALIVE_TIMEOUT = 20.0
#: Fraction of the interval by which a connection may be pinged early, so that one wake-up
#: serves every connection falling due close together.
KEEPALIVE_SLACK = 0.25
#: Seconds between stale-stream sweeps while some connection holds a closed stream (as
#: upstream's per-connection sweeper; its grace before a stream is reclaimed is 60 s).
STALE_SWEEP_INTERVAL = 30.0
#: A connection's accepting side waits this many intervals of silence before it pings (the
#: dialing side pings after one), so a silent connection costs one ping an interval, not two.
RESPONDER_FACTOR = 2.0
#: Seconds upstream waits before the first RTT sample of a new connection.
FIRST_RTT_DELAY = 0.5


def reset_by_remote(stream: Any) -> bool:
    """Whether the remote reset ``stream`` (a libp2p net stream), even if a read said EOF."""
    muxed = getattr(stream, "muxed_stream", None)
    return bool(getattr(muxed, "reset_received", False))


class LeanYamux(Yamux):
    """Yamux without its per-connection timer loops (:func:`run_keepalive` does their work).

    :attr:`last_heard` is the :func:`trio.current_time` of the last bytes read from the
    remote (the secured connection's ``read`` is wrapped to stamp it).
    """

    def __init__(
        self,
        secured_conn: ISecureConn,
        peer_id: ID,
        is_initiator: bool | None = None,
        on_close: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__(secured_conn, peer_id, is_initiator, on_close)
        try:
            self.last_heard = trio.current_time()
        except RuntimeError:  # made outside trio (tests of the class itself)
            self.last_heard = 0.0
        read = secured_conn.read

        async def heard(n: int | None = None) -> bytes:
            data = await read(n)
            self.last_heard = trio.current_time()
            return data

        # One attribute on this connection's own secured session; every yamux read goes
        # through it (handle_incoming reads headers and bodies with read_exactly). Where it
        # cannot be set, the connection looks silent and is pinged every interval (as upstream).
        try:
            vars(secured_conn)["read"] = heard
        except TypeError:
            log.debug("cannot watch reads of %r; it will be pinged every interval", secured_conn)

    async def _measure_rtt_loop(self) -> None:
        # Upstream's first sample only: the receive window's auto-tuning uses the RTT.
        await trio.sleep(FIRST_RTT_DELAY)
        if not self.event_shutting_down.is_set():
            try:
                await ping(self, KEEPALIVE_TIMEOUT)
            except Exception:
                pass

    async def _stale_stream_sweeper(self) -> None:
        return None

    def has_closed_streams(self) -> bool:
        """Whether a stale-stream sweep could reclaim anything here."""
        return any(s.closed for s in list(self.streams.values()))

    async def sweep_stale_streams(self) -> int:
        """What upstream's per-connection sweeper does at each wake-up."""
        async with self.streams_lock:
            return self._sweep_stale_streams()


async def ping(conn: Yamux, timeout: float) -> bool:
    """Send a yamux ping on ``conn``; whether its answer came within ``timeout`` seconds.

    The answer updates the connection's RTT estimate, as upstream's own pings do.
    """
    conn._ping_id += 1
    answered = conn._ping_event = trio.Event()
    header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_PING, FLAG_SYN, 0, conn._ping_id)
    await conn._write_frame(header)
    conn._ping_sent_time = trio.current_time()
    with trio.move_on_after(timeout):
        await answered.wait()
        return True
    return False


def _lean_conns(network: INetwork) -> list[tuple[INetConn, LeanYamux]]:
    out = []
    for conn in list(network.get_connections()):
        muxed = getattr(conn, "muxed_conn", None)
        if isinstance(muxed, LeanYamux) and not conn.is_closed:
            out.append((conn, muxed))
    return out


async def _ping_or_close(conn: INetConn, muxed: LeanYamux, timeout: float, pinging: set[int]) -> None:
    try:
        sent = trio.current_time()
        answered = await ping(muxed, timeout)
        if not answered and muxed.last_heard < sent and not conn.is_closed:
            log.debug("closing the connection to %s: no answer to a ping in %.0f s", muxed.peer_id, timeout)
            with trio.move_on_after(5):
                await conn.close()
    except Exception as exc:  # the connection went away meanwhile
        log.debug("keepalive ping to %s failed: %r", muxed.peer_id, exc)
    finally:
        pinging.discard(id(muxed))


async def run_keepalive(
    network: INetwork,
    *,
    interval: float = KEEPALIVE_INTERVAL,
    timeout: float = KEEPALIVE_TIMEOUT,
    slack: float = KEEPALIVE_SLACK,
    sweep_interval: float = STALE_SWEEP_INTERVAL,
) -> None:
    """Keep every :class:`LeanYamux` connection of ``network`` alive and swept, until cancelled.

    A new connection starts heard-from, so it falls due ``interval`` seconds later at the
    earliest: sleeping at most ``interval`` never misses one. The dialing side of a connection
    pings it after ``interval`` seconds of silence, the accepting side after twice that (a
    fallback for remotes that do not ping).
    """
    pinging: set[int] = set()
    next_sweep: float | None = None
    async with trio.open_nursery() as nursery:
        while True:
            now = trio.current_time()
            deadline = now + interval
            try:
                conns = _lean_conns(network)
                for conn, muxed in conns:
                    if id(muxed) in pinging:
                        continue
                    # The dialing side pings; the other waits twice as long, so that one
                    # ping (not one from each side) serves a silent connection.
                    due = muxed.last_heard + interval * (1 if muxed.is_initiator else RESPONDER_FACTOR)
                    if due - now <= slack * interval:
                        pinging.add(id(muxed))
                        nursery.start_soon(_ping_or_close, conn, muxed, timeout, pinging)
                    else:
                        deadline = min(deadline, due)
                if next_sweep is not None and now >= next_sweep:
                    next_sweep = None
                    for _, muxed in conns:
                        if muxed.has_closed_streams():
                            await muxed.sweep_stale_streams()
                if next_sweep is None and any(m.has_closed_streams() for _, m in conns):
                    next_sweep = now + sweep_interval
            except Exception as exc:  # never let a surprise stop the swarm's nursery
                log.debug("keepalive pass failed: %r", exc)
            if next_sweep is not None:
                deadline = min(deadline, next_sweep)
            await trio.sleep_until(max(deadline, now + 0.05))


def start_keepalive(network: INetwork, **settings: float) -> bool:
    """Run :func:`run_keepalive` in the swarm's own background nursery (it lives as long as the
    swarm runs); ``False`` if the swarm has none (then nothing pings or sweeps)."""
    nursery = getattr(network, "background_nursery", None)
    if nursery is None:
        return False

    async def keepalive() -> None:
        await run_keepalive(network, **settings)

    nursery.start_soon(keepalive)
    return True


class ClassHonouringMuxer(MuxerMultistream):
    """A ``MuxerMultistream`` that builds the muxer class configured for the negotiated protocol."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> Any:
        selector = self._selector
        protocol, transport_class = await selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed: Any
        if isinstance(transport_class, type) and issubclass(transport_class, Yamux):
            muxed = transport_class(conn, peer_id, is_initiator=conn.is_initiator)
        else:
            muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


def use_muxer_classes(swarm: Any, muxer_opt: TMuxerOptions) -> bool:
    """Make ``swarm``'s upgrader build the classes of ``muxer_opt``; ``False`` if it has none."""
    upgrader = getattr(swarm, "upgrader", None)
    current = getattr(upgrader, "muxer_multistream", None)
    if upgrader is None or current is None:
        return False
    upgrader.muxer_multistream = ClassHonouringMuxer(muxer_opt, current.negotiate_timeout)
    return True

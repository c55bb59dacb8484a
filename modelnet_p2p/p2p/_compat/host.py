"""Workarounds for py-libp2p 0.8.1's host and swarm.

Each function corrects one upstream behaviour (the canaries in ``tests/test_compat_host.py``
fail once upstream changes it):

- :func:`check_port_free`: the TCP listener binds with ``SO_REUSEPORT``, so a second host on a
  taken port binds "successfully" and the kernel splits the incoming connections between them.
- :func:`close_connections`: leaving ``host.run()`` closes each connection while being cancelled,
  unshielded (``SwarmConn.close()`` is cancelled before it closes the muxer and the socket leaks),
  and ``host.close()`` closes connections one after another, 0.2 s each.
- :func:`disable_auto_connector`: the swarm's auto-connector dials peers from the peerstore
  (aiming at the midpoint of the watermarks, 150 by default) whatever the watermarks say;
  setting them to 0 would make the pruner close every connection instead.
- :func:`end_inbound_handlers`: the swarm's handler of each accepted connection takes a slot
  of its inbound limiter (``max_connections`` slots), and once the connection is up it waits
  for the *swarm* to stop before giving the slot back: slot and handler outlive the
  connection. After ``max_connections`` inbound connections in the host's lifetime, open or
  long closed, every new one is refused (measured: 260 identities redialing a peer whose
  connection manager closed them locked out newcomers, and each closed connection left a
  task and its connection objects behind).
- :func:`gate_inbound`: the swarm has no per-peer admission of inbound streams before
  multistream-select runs (its resource manager counts streams, it does not rate them), and
  no way to refuse a peer id: a peer that opens streams as fast as they are reset makes the
  host pay a negotiation each, and Sybils closed over a connection limit redial at once.
- :func:`guard_handler`: an exception escaping a stream handler stops ``host.run()`` and with
  it the whole host.
- :func:`retire_stream_handler`: removing a handler races with multistream-select, which checks
  that a handler exists, awaits a write, then looks it up again: the ``KeyError`` stops the host.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from ...errors import ConfigError

__all__ = [
    "check_port_free",
    "close_connections",
    "disable_auto_connector",
    "guard_handler",
    "end_inbound_handlers",
    "gate_inbound",
    "retire_stream_handler",
]

log = logging.getLogger(__name__)

StreamHandler = Callable[[INetStream], Awaitable[None]]


def check_port_free(addr: multiaddr.Multiaddr) -> None:
    """Raise :class:`ConfigError` if a fixed TCP port in ``addr`` is already taken.

    A plain bind without ``SO_REUSEPORT`` finds the conflict that py-libp2p's own listener
    (which sets ``SO_REUSEPORT``, for hole punching) would not.
    """
    try:
        port = int(addr.value_for_protocol("tcp") or 0)
    except Exception:
        return
    if port == 0:
        return
    for proto, family in (("ip4", socket.AF_INET), ("ip6", socket.AF_INET6)):
        try:
            ip = addr.value_for_protocol(proto)
        except Exception:
            ip = None
        if not ip:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if os.name == "posix":
                # Else the connections of a previous run, in TIME_WAIT for a minute after
                # a restart, make the port look taken. A live listener is still found
                # (on POSIX, unlike Windows, SO_REUSEADDR does not let a bind steal a port).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((str(ip), port))
            except OSError as exc:
                raise ConfigError(f"cannot listen on {addr}: {exc.strerror}") from None


async def close_connections(host: IHost, timeout: float = 5.0) -> None:
    """Close every connection of ``host`` at once, while its swarm still runs; shielded.

    Call it before leaving ``host.run()``: the swarm would otherwise close them itself,
    unshielded, and leak their sockets (the other side keeps a dead connection). Closing
    them concurrently also avoids ``host.close()``'s 0.2 s per connection (a peer with 20
    DHT contacts took 4 s to stop).
    """
    with trio.CancelScope(shield=True):
        try:
            conns = list(host.get_network().get_connections())
        except Exception:
            return
        if not conns:
            return

        async def close(conn: Any) -> None:
            try:
                await conn.close()
            except Exception:
                pass

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for conn in conns:
                    nursery.start_soon(close, conn)


async def _no_auto_connect(*_args: Any, **_kwargs: Any) -> None:
    return None


def disable_auto_connector(host: IHost) -> None:
    """Stop the swarm's auto-connector from dialing every peer in the peerstore.

    It dials peers learned from the DHT every 30 s and after each disconnect. A modelnet peer
    connects on purpose: to bootstrap peers, DHT contacts and the providers it calls.
    """
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None and hasattr(connector, "maybe_connect"):
        connector.maybe_connect = _no_auto_connect


class InboundConnectionEnded(Exception):
    """Raised out of the swarm's inbound upgrade once the connection has closed (see below)."""


def end_inbound_handlers(host: IHost) -> bool:
    """End the swarm's handler of an inbound connection when the connection ends.

    The upgrade step the handler awaits now waits, after upgrading, for the connection to
    close and then raises :class:`InboundConnectionEnded`: the handler takes its error path
    (it closes the already closed socket) and gives back its limiter slot, instead of waiting
    for the swarm to stop. Returns whether the swarm had the method to wrap.
    """
    swarm: Any = host.get_network()
    original = getattr(swarm, "upgrade_inbound_raw_conn", None)
    if original is None or getattr(original, "ends_with_connection", False):
        return original is not None

    async def upgrade(raw_conn: Any, maddr: multiaddr.Multiaddr) -> Any:
        muxed = await original(raw_conn, maddr)
        closed = getattr(muxed, "event_closed", None)
        if not isinstance(closed, trio.Event):
            return muxed  # an unknown muxer: upstream's behaviour
        await closed.wait()
        raise InboundConnectionEnded

    upgrade.ends_with_connection = True  # type: ignore[attr-defined]
    swarm.upgrade_inbound_raw_conn = upgrade
    return True


class PeerRefused(Exception):
    """Raised out of the swarm's inbound security upgrade for a peer :func:`gate_inbound` refuses."""


def gate_inbound(
    host: IHost, *, admit_peer: Callable[[str], bool], admit_stream: Callable[[str], float | None]
) -> bool:
    """Ask ``admit_peer(peer_id)`` of each inbound connection once its security handshake
    is done (before the muxer, identify and every service's new-peer work), and
    ``admit_stream(peer_id)`` of each inbound stream before its protocol is negotiated: the
    seconds it waits first, or ``None`` (refused).

    A refused connection is closed (the swarm logs a failed security upgrade at debug level);
    a refused stream is reset unread. Calling it again replaces the two checks. Returns
    whether the swarm had both hooks (an unknown swarm: upstream's behaviour).
    """
    from libp2p.transport.exceptions import SecurityUpgradeFailure

    swarm: Any = host.get_network()
    upgrader: Any = getattr(swarm, "upgrader", None)
    secure = getattr(upgrader, "upgrade_security", None)
    handler = getattr(swarm, "common_stream_handler", None)
    if secure is None or handler is None:
        return False
    checks = getattr(secure, "gate_checks", None)
    if checks is not None:
        checks["peer"] = admit_peer
    else:
        checks = {"peer": admit_peer}

        async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: Any = None) -> Any:
            conn = await secure(raw_conn, is_initiator, peer_id)
            if not is_initiator and not checks["peer"](str(conn.get_remote_peer())):
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await conn.close()
                    except Exception:
                        pass
                raise SecurityUpgradeFailure("peer refused") from PeerRefused()
            return conn

        upgrade_security.gate_checks = checks  # type: ignore[attr-defined]
        upgrader.upgrade_security = upgrade_security
    stream_checks = getattr(handler, "gate_checks", None)
    if stream_checks is not None:
        stream_checks["stream"] = admit_stream
    else:
        stream_checks = {"stream": admit_stream}

        async def gated(stream: INetStream) -> None:
            try:
                peer = str(stream.muxed_conn.peer_id)
            except Exception:
                peer = ""
            wait = stream_checks["stream"](peer) if peer else 0.0
            if wait is None:
                await _reset(stream)
                return
            if wait > 0:
                await trio.sleep(wait)
            await handler(stream)

        gated.gate_checks = stream_checks  # type: ignore[attr-defined]
        swarm.common_stream_handler = gated
    return True


async def _reset(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await stream.reset()
        except Exception:
            pass


def guard_handler(handler: StreamHandler, name: str = "stream handler") -> StreamHandler:
    """``handler`` with a catch-all: an exception resets the stream instead of stopping the host."""

    async def guarded(stream: INetStream) -> None:
        try:
            await handler(stream)
        except Exception as exc:
            log.debug("%s failed: %r", name, exc)
            await _reset(stream)

    return guarded


def retire_stream_handler(host: IHost, protocol: TProtocol) -> None:
    """Stop serving ``protocol``: new streams are reset; ``host.close()`` drops the handler."""
    host.set_stream_handler(protocol, _reset)


def is_retired(host: IHost, protocol: TProtocol) -> bool:
    """Whether ``protocol``'s handler is one :func:`retire_stream_handler` left."""
    return host.get_mux().handlers.get(protocol) is _reset

"""The secure libp2p host that every peer runs: TCP, Noise only, yamux only.

py-libp2p's default ``new_host()`` also accepts plaintext and secio
connections, and offers mplex. A modelnet peer offers exactly one security
protocol (Noise) and one muxer (yamux), so an unauthenticated or downgraded
connection cannot be negotiated at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from ..errors import ConfigError
from .identity import Identity

__all__ = ["build_host", "parse_multiaddr", "running_host"]


def parse_multiaddr(addr: str | multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """Parse a multiaddr, raising :class:`ConfigError` with the offending text on failure."""
    if isinstance(addr, multiaddr.Multiaddr):
        return addr
    try:
        return multiaddr.Multiaddr(addr)
    except Exception as exc:
        raise ConfigError(f"invalid multiaddr {addr!r}: {exc}") from None


def build_host(identity: Identity, *, dial_timeout: float = 10.0) -> IHost:
    """A TCP host with Noise as its only security transport and yamux as its only muxer.

    ``max_connections_per_peer=1`` avoids py-libp2p's 250 ms "happy eyeballs"
    wait on every dial (measured: 5-10 ms per connect instead of 250 ms).
    """
    noise = NoiseTransport(identity.key_pair, noise_privkey=new_x25519_key_pair().private_key)
    config = ConnectionConfig(
        max_connections_per_peer=1,
        dial_timeout=dial_timeout,
        min_connections=0,
        low_watermark=0,
    )
    host = new_host(
        key_pair=identity.key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=config,
        enable_tcp=True,
    )
    _disable_auto_connector(host)
    _no_dial_retries(host)
    return host


def _no_dial_retries(host: IHost) -> None:
    """Fail a dial at once instead of retrying it three times.

    py-libp2p retries a failed dial after 0.1, 0.2 and 0.4 s, so every dial to
    a peer that has left costs 0.7 s per address; DHT lookups meet departed
    peers all the time (routing tables keep them until a query fails). A
    refused connection is not worth retrying; callers that want another
    attempt make it themselves, within their own deadline.
    """
    network = host.get_network()
    if hasattr(network, "retry_config"):
        network.retry_config = RetryConfig(max_retries=0)


async def _no_auto_connect(*_args: Any, **_kwargs: Any) -> None:
    return None


def _disable_auto_connector(host: IHost) -> None:
    """Stop py-libp2p's auto-connector from dialing every peer in the peerstore.

    It aims at (low + high watermark) / 2 connections (150 by default) and dials
    peers learned from the DHT, every 30 s and after each disconnect, whatever
    the watermarks are set to. A modelnet peer connects on purpose: to
    bootstrap peers, DHT contacts and the providers it calls.
    """
    connector = getattr(host.get_network(), "auto_connector", None)
    if connector is not None and hasattr(connector, "maybe_connect"):
        connector.maybe_connect = _no_auto_connect


def _listen_addrs(host: IHost) -> list[multiaddr.Multiaddr]:
    """The transport addresses the host is actually listening on (without /p2p/)."""
    get = getattr(host, "get_transport_addrs", None)
    addrs: list[Any] = list(get()) if get is not None else list(host.get_addrs())
    return addrs


def check_port_free(addr: multiaddr.Multiaddr) -> None:
    """Raise :class:`ConfigError` if a fixed TCP port in ``addr`` is already taken.

    py-libp2p 0.8.1 listens with SO_REUSEPORT (for hole punching), so a second
    peer on a taken port binds "successfully" and the kernel then splits the
    incoming connections between the two. A plain bind without SO_REUSEPORT
    finds the conflict first.
    """
    import os
    import socket

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


async def _close_connections(host: IHost, timeout: float = 5.0) -> None:
    """Close every connection at once, while the swarm still runs.

    py-libp2p 0.8.1 has two problems here. When ``host.run()`` exits, the
    swarm's service closes each connection while being cancelled, without a
    shield: ``SwarmConn.close()`` marks the connection closed, is cancelled
    before it closes the muxer, and the socket leaks (and the other side keeps
    a dead connection). And ``host.close()`` closes connections one after
    another, each close sleeping 0.2 s (0.1 s in ``Yamux.close``, 0.1 s in
    ``SwarmConn._cleanup``): a peer with 20 DHT contacts took 4 s to stop.
    """
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


@asynccontextmanager
async def running_host(host: IHost, listen: Sequence[multiaddr.Multiaddr]) -> AsyncIterator[IHost]:
    """Run ``host`` listening on ``listen``; on exit close it completely.

    py-libp2p only logs a failed bind and runs on with no addresses; this checks
    that every requested address is bound and raises :class:`ConfigError` if not.
    Leaving ``host.run()`` does not close the TCP listener either, so this always
    calls ``host.close()`` as well.
    """
    for addr in listen:
        check_port_free(addr)
    failure: ConfigError | None = None
    try:
        async with host.run(listen_addrs=list(listen)):
            bound = _listen_addrs(host)
            if listen and len(bound) < len(listen):
                wanted = ", ".join(str(a) for a in listen)
                failure = ConfigError(
                    f"could not listen on {wanted} (bound: {[str(a) for a in bound] or 'nothing'}); "
                    "is the address in use or not local?"
                )
            else:
                try:
                    yield host
                finally:
                    # Before leaving host.run(): its swarm would close the
                    # connections itself, unshielded, and leak their sockets.
                    with trio.CancelScope(shield=True):
                        await _close_connections(host)
    finally:
        with trio.CancelScope(shield=True):
            await host.close()
    if failure is not None:
        # Raised outside host.run() so that it is not wrapped in an exception group.
        raise failure

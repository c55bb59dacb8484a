"""The secure libp2p host that every peer runs: TCP, Noise only, yamux only.

py-libp2p's default ``new_host()`` also accepts plaintext and secio
connections, and offers mplex. A modelnet peer offers exactly one security
protocol (Noise) and one muxer (yamux), so an unauthenticated or downgraded
connection cannot be negotiated at all.

Its yamux connections have no timers of their own (:class:`~._compat.yamux.LeanYamux`): one
task per host pings only the connections that have been silent for 30 s and sweeps their
stale streams (:func:`~._compat.yamux.run_keepalive`), so what an idle peer spends does not
grow with a timer per connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import multiaddr
import trio
from libp2p import new_swarm
from libp2p.abc import IHost
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

from ..errors import ConfigError
from ._compat import netstream, notifees, pnet, taskparent
from ._compat.host import (
    check_port_free,
    close_connections,
    disable_auto_connector,
    end_inbound_handlers,
)
from ._compat.muxer import use_muxer_classes
from ._compat.rcmgr import resource_manager as new_resource_manager
from ._compat.rcmgr import swarm_cap
from ._compat.yamux import LeanYamux, start_keepalive
from .addresses import parse_multiaddr
from .identity import Identity
from .resources import ResourceLimits

__all__ = ["DEFAULT_DIAL_TIMEOUT", "Host", "build_host", "listen_addrs", "parse_multiaddr", "running_host"]

log = logging.getLogger(__name__)

#: The host type the layers above see (they never import libp2p themselves).
Host: TypeAlias = IHost


#: Seconds allowed to dial a peer; ``PeerConfig.connect_timeout`` takes its default from here.
DEFAULT_DIAL_TIMEOUT = 10.0


def build_host(
    identity: Identity, *, dial_timeout: float = DEFAULT_DIAL_TIMEOUT, psk: bytes | None = None,
    limits: ResourceLimits | None = None,
) -> IHost:
    """A TCP host with Noise as its only security transport and yamux as its only muxer.

    With ``psk`` (a 32-byte swarm key) every connection, relayed ones too, first runs
    the libp2p private-network protector (:mod:`._compat.pnet`, ``specs/network.md``,
    "Private networks"): peers without the key cannot complete a connection.

    ``max_connections_per_peer=1`` avoids py-libp2p's 250 ms "happy eyeballs"
    wait on every dial (measured: 5-10 ms per connect instead of 250 ms).

    A failed dial fails at once (``RetryConfig(max_retries=0)``) instead of being
    retried after 0.1, 0.2 and 0.4 s: every dial to a peer that has left would cost
    0.7 s per address, and DHT lookups meet departed peers all the time (routing tables
    keep them until a query fails). Callers that want another attempt make it
    themselves, within their own deadline.
    """
    limits = limits or ResourceLimits()
    noise = NoiseTransport(identity.key_pair, noise_privkey=new_x25519_key_pair().private_key)
    config = ConnectionConfig(
        max_connections_per_peer=1,
        dial_timeout=dial_timeout,
        min_connections=0,
        low_watermark=0,
        # The connection manager chooses whom to close; the swarm's own pruner never runs.
        max_connections=swarm_cap(limits.max_connections),
        high_watermark=swarm_cap(limits.max_connections),
    )
    # What new_host() would do, but new_host() does not pass retry_config on to the swarm.
    resource_manager = new_resource_manager(
        max_connections=limits.max_connections, max_connections_per_peer=limits.max_connections_per_peer
    )
    if psk is not None:
        if len(psk) != 32:
            raise ConfigError("a swarm key has 32 bytes")
        pnet.install()
    netstream.install()  # streams whose reads and writes do not yield when nothing waits
    taskparent.install()  # a new task's parent found in an index, not by a walk over all tasks
    muxers: TMuxerOptions = {TProtocol(YAMUX_PROTOCOL_ID): LeanYamux}
    swarm = new_swarm(
        key_pair=identity.key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt=muxers,
        connection_config=config,
        retry_config=RetryConfig(max_retries=0),
        resource_manager=resource_manager,
        enable_tcp=True,
        psk=psk.hex() if psk is not None else None,
    )
    notifees.install(swarm)  # stream events without a task per notifee
    if not use_muxer_classes(swarm, muxers):  # upstream would build a plain Yamux
        log.warning("cannot choose the yamux class: connections keep upstream's timers")
    host = BasicHost(network=swarm, resource_manager=resource_manager)
    disable_auto_connector(host)
    end_inbound_handlers(host)  # else no inbound connection after max_connections of them, ever
    return host


def listen_addrs(host: IHost) -> list[multiaddr.Multiaddr]:
    """The transport addresses the host is actually listening on (without /p2p/)."""
    get = getattr(host, "get_transport_addrs", None)
    addrs: list[Any] = list(get()) if get is not None else list(host.get_addrs())
    return addrs


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
            bound = listen_addrs(host)
            if listen and len(bound) < len(listen):
                wanted = ", ".join(str(a) for a in listen)
                failure = ConfigError(
                    f"could not listen on {wanted} (bound: {[str(a) for a in bound] or 'nothing'}); "
                    "is the address in use or not local?"
                )
            else:
                if not start_keepalive(host.get_network()):
                    log.warning("the swarm has no background nursery: idle connections will not be pinged")
                try:
                    yield host
                finally:
                    # Before leaving host.run(): its swarm would close the
                    # connections itself, unshielded, and leak their sockets.
                    await close_connections(host)
    finally:
        with trio.CancelScope(shield=True):
            await host.close()
    if failure is not None:
        # Raised outside host.run() so that it is not wrapped in an exception group.
        raise failure

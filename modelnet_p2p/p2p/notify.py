"""Connections: whether one is open to a peer, and closed ones as a callback (a swarm
notifee that hears only ``disconnected``).

The swarm calls a notifee's methods by name, each in a task of its own, and only after a
closed connection has left its table (``SwarmConn`` waits 0.1 s for its streams' resets
first). A close whose clean-up is cancelled half-way is never reported, so whatever a
callback releases must also be released some other way in the end (an expiry, a sweep):
the callback makes that early, not certain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

from libp2p.abc import IHost, INetConn, INotifee
from libp2p.peer.id import ID

__all__ = ["connected", "on_disconnect"]

log = logging.getLogger(__name__)

def connected(host: IHost, peer: ID) -> bool:
    """Whether ``host`` has an open connection to ``peer`` (a closed one may linger in the swarm)."""
    return any(not conn.is_closed for conn in host.get_network().get_connections(peer))


#: ``(peer id as text, the closed connection's muxed connection)``; must not block.
Disconnected = Callable[[str, Any], None]


class _Notifee:
    def __init__(self, callback: Disconnected) -> None:
        self.callback = callback

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        try:
            self.callback(str(conn.muxed_conn.peer_id), conn.muxed_conn)
        except Exception as exc:  # a failing callback must not disturb the swarm's clean-up
            log.debug("a disconnect callback failed: %r", exc)

    async def connected(self, network: Any, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


def on_disconnect(host: IHost, callback: Disconnected) -> Callable[[], None]:
    """Call ``callback`` for each connection of ``host`` that closes; returns the function
    that stops it (safe to call more than once)."""
    network = host.get_network()
    notifee = cast(INotifee, _Notifee(callback))  # the swarm calls it by method name
    network.register_notifee(notifee)

    def stop() -> None:
        try:
            network.remove_notifee(notifee)
        except Exception:
            pass

    return stop

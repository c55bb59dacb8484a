"""py-libp2p 0.8.1's resource manager (``libp2p.rcmgr``), configured to be a backstop.

What it does, as measured here (the canaries are in ``tests/test_compat_rcmgr.py``):

- **It works as a set of fixed caps.** The swarm asks it at each new connection: at most 8
  per peer, 256 inbound established, 1,024 in all by default, and a per-peer rate of new
  connections (10/s, bursts of 50).
- **It never makes room.** Once a cap is reached every newcomer is refused, and nothing
  closes an idle connection to let one in: about 256 idle connections lock new peers out.
  Its ``cidr_limits`` bound a whole subnet together, not each address in it, so it has no
  per-IP limit either.
- **Its circuit breaker refuses everyone** for 60 s after five failed admissions, and its
  "graceful degradation" lowers the limits for every peer under pressure: one abusive peer
  would turn them on for all.

So it is used for its caps, set *above* the connection manager's hard limits
(:class:`~modelnet_p2p.p2p.connmgr.ConnManager`), which chooses whom to close; the circuit
breaker and the degradation are off.
"""

from __future__ import annotations

from libp2p.rcmgr import ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.rcmgr.manager import ResourceLimits as RcmgrLimits

__all__ = ["HEADROOM", "resource_manager", "swarm_cap"]

#: Connections the swarm accepts over the connection manager's limit, for it to choose from
#: (connections still in their handshake count too: redialing Sybils fill them).
HEADROOM = 128


def swarm_cap(max_connections: int) -> int:
    """The swarm's connection cap for a connection manager limit of ``max_connections``."""
    return max_connections + HEADROOM


def resource_manager(*, max_connections: int, max_connections_per_peer: int) -> ResourceManager:
    """A resource manager whose caps stay out of the connection manager's way."""
    cap = swarm_cap(max_connections)
    limits = ConnectionLimits(
        max_pending_inbound=HEADROOM,
        max_pending_outbound=HEADROOM,
        max_established_inbound=cap,
        max_established_outbound=cap,
        max_established_per_peer=max_connections_per_peer,
        max_established_total=cap,
    )
    return ResourceManager(
        limits=RcmgrLimits(max_connections=cap),
        connection_limits=limits,
        enable_circuit_breaker=False,
        enable_graceful_degradation=False,
        enable_memory_pooling=False,
    )

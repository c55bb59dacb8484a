"""Canaries for ``modelnet_p2p/p2p/_compat/rcmgr.py``: py-libp2p 0.8.1's resource manager.

The ``test_stock_*`` tests assert the upstream behaviour the module works around; when one
fails, upstream has changed: check whether the settings are still right.
"""

from __future__ import annotations

from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.cidr_limits import CIDRLimiter

from modelnet_p2p.p2p._compat.rcmgr import HEADROOM, resource_manager, swarm_cap
from modelnet_p2p.p2p.host import build_host
from modelnet_p2p.p2p.identity import Identity
from modelnet_p2p.p2p.resources import ResourceLimits


def test_stock_caps_refuse_newcomers_at_256_inbound() -> None:
    rm = new_resource_manager()
    assert rm.connection_limits.max_established_inbound == 256
    assert rm.connection_limits.max_established_per_peer == 8
    # and its breaker and degradation, which act on every peer at once, are on
    assert rm.circuit_breaker is not None and rm.graceful_degradation is not None


def test_stock_cidr_limits_bound_a_subnet_not_each_address() -> None:
    limiter = CIDRLimiter([("127.0.0.0/8", 2)])
    assert limiter.acquire("127.0.0.1") and limiter.acquire("127.0.0.2")
    assert not limiter.acquire("127.0.0.3")  # a third address of the subnet: no per-IP budget


def test_caps_stay_above_the_connection_manager() -> None:
    rm = resource_manager(max_connections=100, max_connections_per_peer=8)
    assert rm.connection_limits.max_established_inbound == 100 + HEADROOM == swarm_cap(100)
    assert rm.connection_limits.max_established_per_peer == 8
    assert rm.circuit_breaker is None and rm.graceful_degradation is None
    swarm = build_host(Identity.generate(), limits=ResourceLimits(max_connections=100)).get_network()
    assert swarm.connection_config.max_connections == swarm_cap(100)  # type: ignore[attr-defined]

"""Named networks: which mesh a peer belongs to (see ``specs/network.md``).

A network id is carried in every protocol id and gossip topic a peer speaks,
so peers of different networks never exchange requests, DHT records or
availability gossip, even if they connect. The ``local`` network keeps the
plain ids (``/modelnet/infer/1.0.0``); any other network ``NAME`` inserts it
(``/modelnet/NAME/infer/1.0.0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["NETWORKS", "NetworkInfo", "get_network", "protocol_id", "topic"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


@dataclass(frozen=True)
class NetworkInfo:
    """A network's name and defaults."""

    name: str
    description: str
    bootstrap: tuple[str, ...] = ()
    settings: dict[str, Any] = field(default_factory=dict)

    def defaults(self) -> dict[str, Any]:
        out = dict(self.settings)
        if self.bootstrap:
            out["bootstrap"] = list(self.bootstrap)
        return out


NETWORKS: dict[str, NetworkInfo] = {
    "local": NetworkInfo(
        "local",
        "a mesh on this machine or LAN; no bootstrap peers unless given",
    ),
    "testnet": NetworkInfo(
        "testnet",
        "the shared test mesh; bootstrap peers come from --bootstrap, MODELNET_BOOTSTRAP "
        "or a config file (see specs/network.md for running one)",
        settings={"listen": ["/ip4/0.0.0.0/tcp/0"], "announce_interval": 120.0, "card_ttl": 300.0},
    ),
}


def get_network(name: str) -> NetworkInfo:
    """The named network; unknown names that are valid ids get empty defaults."""
    if name in NETWORKS:
        return NETWORKS[name]
    if not _NAME.match(name):
        raise ConfigError(
            f"invalid network name {name!r}: use 1-32 lowercase letters, digits and dashes"
        )
    info = NetworkInfo(name, "a private network")
    NETWORKS[name] = info
    return info


def protocol_id(base: str, network: str = "local") -> str:
    """``protocol_id("/modelnet/infer/1.0.0", "testnet") == "/modelnet/testnet/infer/1.0.0"``."""
    if network == "local":
        return base
    prefix = "/modelnet/"
    if not base.startswith(prefix):
        raise ValueError(f"not a modelnet protocol id: {base}")
    return f"{prefix}{network}/{base[len(prefix):]}"


def topic(base: str, network: str = "local") -> str:
    """Gossip topics follow the same rule as protocol ids."""
    return protocol_id(base, network)

"""Every default of the OpenAI gateway, written once.

:class:`~.app.Gateway`, :func:`~.app.serve_gateway` and ``modelnet gateway``
take their defaults from :class:`GatewayConfig`. This module needs none of the
gateway's HTTP packages, so the command line can read it before they are imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import PeerConfig

__all__ = ["GatewayConfig", "Routing"]

#: Who picks the providers of a model found by discovery (see :class:`GatewayConfig`).
Routing = Literal["mesh", "local"]


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings and their defaults.

    Attributes:
        listen: ``HOST:PORT`` of the HTTP API (loopback: no API key needed).
        request_timeout: seconds one request may take unless the client asks for
            less (header ``x-modelnet-timeout``): as long as a peer lets a request run.
        discovery_ttl: seconds the discovered model list is reused.
        lookup_timeout: seconds one discovery lookup may take.
        max_attempts: providers tried for one request, in all.
        routing: for models found by discovery, ``"mesh"`` (the mesh's provider
            lookup) or ``"local"`` (only the providers the gateway's discovery found).
        policy: the routing policy among a model's own providers
            (:data:`modelnet_p2p.mesh.routing.POLICIES`); the peer's default routing policy.
        max_body: largest request body accepted, in bytes.
        embedding_concurrency: mesh requests in flight at once for one embeddings request.
        keys_file: the API key file (:mod:`.keys`: each bearer key's mesh token and rate);
            ``None``: none.
        warm_streams: idle streams the peer's stream pool keeps per provider while the
            gateway runs (at least; the peer's own default is 8), so that this many
            concurrent HTTP requests each find a warm stream to their provider instead of
            opening one (a multistream negotiation, about 2.4 ms). Each is one of a yamux
            connection's 256 stream slots and is closed after 20 s idle.
    """

    listen: str = "127.0.0.1:8080"
    request_timeout: float = PeerConfig.max_request_time
    discovery_ttl: float = 10.0
    lookup_timeout: float = 3.0
    max_attempts: int = 3
    routing: Routing = "mesh"
    policy: str = str(PeerConfig.routing_policy)
    max_body: int = 8 * 1024 * 1024
    embedding_concurrency: int = 4
    keys_file: str | None = None
    warm_streams: int = 32

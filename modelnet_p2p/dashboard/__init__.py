"""A live web page of the mesh, a JSON health API and Prometheus metrics for any peer.

- :mod:`.state`: :class:`MeshWatch`, what one peer knows of the mesh, as JSON;
- :mod:`.app`: the page and its APIs over HTTP (starlette + hypercorn: the ``gateway``
  extra), ``modelnet dashboard`` and the gateway's ``/dashboard/``;
- :mod:`.metrics`: a Prometheus collector over a peer's counters and a small ``/metrics``
  server that needs nothing beyond the base install (``--metrics-listen``).

A face, like :mod:`modelnet_p2p.openai`: it reads the peer and its services, and nothing
below imports it. The page is a static bundle in ``static/``: no CDN, no build step.
"""

from __future__ import annotations

from .metrics import PeerCollector, peer_registry, serve_metrics
from .state import MeshWatch

__all__ = ["MeshWatch", "PeerCollector", "peer_registry", "serve_metrics"]

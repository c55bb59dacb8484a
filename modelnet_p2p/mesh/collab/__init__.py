"""Collaborative reasoning: pathways between models.

- :mod:`.patterns`: :func:`pipeline`, :func:`ensemble`, :func:`route`, :func:`draft_verify`;
- :mod:`.workflows`: the same patterns composed in a TOML file (``specs/workflow.md``);
- :mod:`.trace`: the :class:`Result` and :class:`Trace` tree every pattern returns: for
  each step the capability, the peer that served it, timing, chunks, retries and
  failures: the user's proof of which models were consulted.

Handlers reach the mesh through ``request.mesh`` (a :class:`MeshContext`, from
:mod:`modelnet_p2p.mesh.context`): calls made there inherit the request's deadline,
cancellation and trace, and the hop limit and the path of visited steps stop loops.
"""

from __future__ import annotations

from ..context import MeshContext
from .patterns import Mesh, Step, draft_verify, ensemble, pipeline, route
from .trace import Result, Trace
from .workflows import load_workflow, run_node, run_workflow, stream_text

__all__ = [
    "Mesh",
    "MeshContext",
    "Result",
    "Step",
    "Trace",
    "draft_verify",
    "ensemble",
    "load_workflow",
    "pipeline",
    "route",
    "run_node",
    "run_workflow",
    "stream_text",
]

"""Collaborative reasoning: pathways between models.

- :mod:`.patterns`: :func:`pipeline`, :func:`ensemble`, :func:`route`, :func:`draft_verify`;
- :mod:`.workflows`: the same patterns composed in a TOML file (``specs/workflow.md``);
- :mod:`.trace`: the :class:`Result` and :class:`Trace` tree every pattern returns: for
  each step the capability, the peer that served it, timing, chunks, retries and
  failures: the user's proof of which models were consulted;
- :mod:`.receipts`: with ``receipts=True``, the tree of the steps' signed receipts, checked
  offline end to end (``specs/inference.md``, "Trees of receipts").

Handlers reach the mesh through ``request.mesh`` (a :class:`MeshContext`, from
:mod:`modelnet_p2p.mesh.context`): calls made there inherit the request's deadline,
cancellation and trace, and the hop limit and the path of visited steps stop loops.
"""

from __future__ import annotations

from ..context import MeshContext
from .patterns import Mesh, Step, draft_verify, ensemble, pipeline, route
from .receipts import RECEIPT_TREE_FORMAT, receipt_tree, verify_receipt_tree
from .trace import RECEIPT_CHAIN_FORMAT, Result, Trace, receipt_chain, verify_receipt_chain
from .workflows import load_workflow, run_node, run_workflow, stream_text

__all__ = [
    "RECEIPT_CHAIN_FORMAT",
    "RECEIPT_TREE_FORMAT",
    "Mesh",
    "MeshContext",
    "Result",
    "Step",
    "Trace",
    "draft_verify",
    "ensemble",
    "load_workflow",
    "pipeline",
    "receipt_chain",
    "receipt_tree",
    "route",
    "run_node",
    "run_workflow",
    "stream_text",
    "verify_receipt_chain",
    "verify_receipt_tree",
]

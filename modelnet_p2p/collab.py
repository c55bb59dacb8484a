"""Collaboration patterns (pipeline, ensemble, router, draft-verify, workflows).

A thin re-export: the code lives in :mod:`modelnet_p2p.mesh.collab`.
"""

from .mesh.collab import *  # noqa: F403
from .mesh.collab import __all__ as __all__

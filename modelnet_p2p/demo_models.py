"""The demo's example models, usable as ``modelnet serve modelnet_p2p.demo_models:NAME`` targets.

A thin re-export: the code lives in :mod:`modelnet_p2p.demo.models`.
"""

from .demo.models import *  # noqa: F403
from .demo.models import __all__ as __all__

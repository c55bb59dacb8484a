"""Availability gossip (``specs/availability.md``): the service and its parts.

- :mod:`.service`: :class:`AvailabilityService`, which a :class:`~modelnet_p2p.Peer` runs;
- :mod:`.table`: the soft-state table and its validator (no network);
- :mod:`.publisher`: when and what this peer publishes (no network);
- :mod:`.load`: load figures and their sources; :mod:`.view`: the mesh view;
- :mod:`.config`: :class:`AvailabilityConfig`.
"""

from .config import AvailabilityConfig
from .load import InferenceLoad, LoadProvider, LoadSnapshot, load_level
from .publisher import Publisher
from .service import AvailabilityService, AvailabilityStats, start_availability
from .table import AvailabilityChange, AvailabilityEntry, AvailabilityTable, TableStats
from .view import CapabilityView, MeshViewRow, mesh_view

__all__ = [
    "AvailabilityChange",
    "AvailabilityConfig",
    "AvailabilityEntry",
    "AvailabilityService",
    "AvailabilityStats",
    "AvailabilityTable",
    "CapabilityView",
    "InferenceLoad",
    "LoadProvider",
    "LoadSnapshot",
    "MeshViewRow",
    "Publisher",
    "TableStats",
    "load_level",
    "mesh_view",
    "start_availability",
]

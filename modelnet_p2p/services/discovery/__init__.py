"""Capability discovery over the mesh's own Kademlia DHT (``specs/capability.md``).

:mod:`.service` runs the DHT and announces this peer's card, :mod:`.announce` places
the card's records until enough servers acknowledge them, :mod:`.lookup` finds
providers over the network (going on past slow peers) and fetches their cards,
:mod:`.query` says what is looked for, and :mod:`.records` decides which cards are stored and believed.
"""

from .lookup import Lookups
from .query import Query
from .records import CardValidator, verified_card
from .service import (
    DEFAULT_ANNOUNCE_INTERVAL,
    DEFAULT_CARD_TTL,
    DHT_PROTOCOL_ID,
    AnnounceResult,
    DhtModeName,
    Discovery,
)

__all__ = [
    "DEFAULT_ANNOUNCE_INTERVAL",
    "DEFAULT_CARD_TTL",
    "DHT_PROTOCOL_ID",
    "AnnounceResult",
    "CardValidator",
    "DhtModeName",
    "Discovery",
    "Lookups",
    "Query",
    "verified_card",
]

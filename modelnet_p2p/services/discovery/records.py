"""Which capability cards a DHT server stores and which a discoverer believes.

A card is believed only if it is well formed, signed by the peer its key (or the lookup)
names, within the size limits and not expired (:func:`~modelnet_p2p.proto.card.open_card`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...errors import ProtocolError
from ...proto.card import CapabilityCard, open_card, peer_of_value_key, select_card

__all__ = ["CardValidator", "verified_card"]

log = logging.getLogger(__name__)


def verified_card(value: bytes, peer_id: str, now_ms: int) -> CapabilityCard:
    """The card in ``value`` if it is ``peer_id``'s and valid at ``now_ms``; else :class:`ProtocolError`."""
    card = open_card(value, now_ms=now_ms)
    if card.peer_id != peer_id:
        raise ProtocolError(f"card names {card.peer_id}, not {peer_id}")
    return card


class CardValidator:
    """DHT record policy of the ``modelnet-card`` namespace (a :class:`~modelnet_p2p.p2p.kad.RecordPolicy`).

    ``validate`` accepts only a card that is well formed, signed by the peer its key names,
    within the size limits, and not expired. ``select`` returns the index of the best card
    by :func:`~modelnet_p2p.proto.card.select_card` (highest ``seq``). py-libp2p calls
    ``select(key, [new, old])`` on a local put and ``select(key, [existing, new])`` on a
    remote PUT, so only a choice that depends on the values and not on their positions is
    right on both paths.
    """

    def __init__(self, wall_clock: Callable[[], float]) -> None:
        self._wall_clock = wall_clock

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def validate(self, key: str, value: bytes) -> None:
        try:
            owner = peer_of_value_key(key)
            card = open_card(value, now_ms=self._now_ms())
            if card.peer_id != owner:
                raise ProtocolError(f"card of {card.peer_id} stored under the key of {owner}")
        except ProtocolError as exc:
            log.info("rejected card for %s: %s", key[:80], exc.message)
            raise ValueError(f"invalid capability card: {exc.message}") from None

    def select(self, key: str, values: list[bytes]) -> int:
        return select_card(values, self._now_ms())

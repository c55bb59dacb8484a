"""The muxer class a host is configured with, honoured.

Upstream: ``MuxerMultistream.new_conn`` builds a plain ``Yamux`` whenever ``/yamux/1.0.0``
is negotiated, whatever class ``muxer_opt`` names for it. :func:`use_muxer_classes` gives a
swarm's upgrader a :class:`ClassHonouringMuxer`, which builds the configured class (here
:class:`.yamux.LeanYamux`).
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import ISecureConn
from libp2p.custom_types import TMuxerOptions
from libp2p.peer.id import ID
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import Yamux

__all__ = ["ClassHonouringMuxer", "use_muxer_classes"]


class ClassHonouringMuxer(MuxerMultistream):
    """A ``MuxerMultistream`` that builds the muxer class configured for the negotiated protocol."""

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> Any:
        selector = self._selector
        protocol, transport_class = await selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed: Any
        if isinstance(transport_class, type) and issubclass(transport_class, Yamux):
            muxed = transport_class(conn, peer_id, is_initiator=conn.is_initiator)
        else:
            muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


def use_muxer_classes(swarm: Any, muxer_opt: TMuxerOptions) -> bool:
    """Make ``swarm``'s upgrader build the classes of ``muxer_opt``; ``False`` if it has none."""
    upgrader = getattr(swarm, "upgrader", None)
    current = getattr(upgrader, "muxer_multistream", None)
    if upgrader is None or current is None:
        return False
    upgrader.muxer_multistream = ClassHonouringMuxer(muxer_opt, current.negotiate_timeout)
    return True


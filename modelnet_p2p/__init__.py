"""modelnet_p2p: connect AI models peer to peer over libp2p.

Layers, from the bottom: identity and host (:mod:`.identity`, :mod:`.host`);
wire codecs (:mod:`.wire`); services (:mod:`.services`); faces (:class:`Peer`,
:mod:`.threaded`, :mod:`.cli`).
"""

from __future__ import annotations

from .config import VERSION as __version__
from .errors import (
    BadRequestError,
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    IdentityError,
    InternalError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthorizedError,
    UnavailableError,
)
from .log import set_verbose
from .p2p.identity import Identity
from .peer import InferenceStream, Peer, Response
from .proto.capability import Capability, CostHint
from .proto.card import CapabilityCard
from .services.inference.handlers import InferenceRequest

__all__ = [
    "BadRequestError",
    "CancelledError",
    "Capability",
    "CapabilityCard",
    "ConfigError",
    "CostHint",
    "DeadlineExceededError",
    "Identity",
    "IdentityError",
    "InferenceRequest",
    "InferenceStream",
    "InternalError",
    "ModelNetError",
    "NotFoundError",
    "OverloadedError",
    "Peer",
    "ProtocolError",
    "Response",
    "UnauthorizedError",
    "UnavailableError",
    "__version__",
    "set_verbose",
]

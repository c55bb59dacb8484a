"""modelnet_p2p: connect AI models peer to peer over libp2p.

Layers, from the bottom: :mod:`.proto` (sans-I/O codecs), :mod:`.p2p` (the only
importer of libp2p), :mod:`.services` (one protocol each), :mod:`.mesh` (routing,
the mesh client, request context, collaboration), and the faces: :class:`Peer`,
:mod:`.threaded`, :mod:`.testing`, :mod:`.openai`, :mod:`.cli`.

Everything here is a re-export, including every type that appears in a public signature.
"""

from __future__ import annotations

from .config import VERSION as __version__
from .config import Config, PeerConfig, load_config
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
from .mesh.client import InferenceStream, MeshClient, ReplayMismatchError, Response
from .mesh.collab import Mesh, Result, Step, Trace
from .mesh.context import MeshContext
from .mesh.routing import Candidate, Policy, Router
from .p2p.dialer import Dialer, PeerID, Target
from .p2p.identity import Identity
from .peer import Peer
from .proto.capability import Capability, CostHint
from .proto.card import CapabilityCard
from .proto.infer import TraceContext
from .proto.receipt import Receipt, ReceiptError
from .proto.session import Limits
from .services.availability import MeshViewRow
from .services.inference import Handler, InferenceRequest, ResponseInfo

__all__ = [
    "BadRequestError",
    "CancelledError",
    "Candidate",
    "Capability",
    "CapabilityCard",
    "Config",
    "ConfigError",
    "CostHint",
    "DeadlineExceededError",
    "Dialer",
    "Handler",
    "Identity",
    "IdentityError",
    "InferenceRequest",
    "InferenceStream",
    "InternalError",
    "Limits",
    "Mesh",
    "MeshClient",
    "MeshContext",
    "MeshViewRow",
    "ModelNetError",
    "NotFoundError",
    "OverloadedError",
    "Peer",
    "PeerConfig",
    "PeerID",
    "Policy",
    "ProtocolError",
    "Receipt",
    "ReceiptError",
    "ReplayMismatchError",
    "Response",
    "ResponseInfo",
    "Result",
    "Router",
    "Step",
    "Target",
    "Trace",
    "TraceContext",
    "UnauthorizedError",
    "UnavailableError",
    "__version__",
    "load_config",
    "set_verbose",
]

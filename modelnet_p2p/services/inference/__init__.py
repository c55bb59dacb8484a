"""``/modelnet/infer/1.0.0`` as a service: :mod:`.server` serves capabilities, :mod:`.client` asks
for them, :mod:`.handlers` runs every kind of handler. The protocol itself is
:mod:`modelnet_p2p.proto.session`."""

from .client import (
    ResponseInfo,
    StaleStreamError,
    StreamSource,
    new_request_id,
    request_batches_on_peer,
    request_on_peer,
    run_request,
    run_request_batches,
)
from .handlers import Handler, InferenceRequest
from .server import InferenceServer, Limits, LoadFigures

__all__ = [
    "Handler",
    "InferenceRequest",
    "InferenceServer",
    "Limits",
    "LoadFigures",
    "ResponseInfo",
    "StaleStreamError",
    "StreamSource",
    "new_request_id",
    "request_batches_on_peer",
    "request_on_peer",
    "run_request",
    "run_request_batches",
]

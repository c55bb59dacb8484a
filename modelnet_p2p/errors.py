"""The error tree of modelnet_p2p.

Every failure a caller can see is a :class:`ModelNetError`. Errors that travel
over the wire carry one of the codes in :data:`ERROR_CODES`; each code maps to
one subclass here, so a caller can catch exactly the level it cares about::

    try:
        answer = await peer.call(target, "echo", "hi")
    except OverloadedError:
        ...               # try later or elsewhere
    except ModelNetError as exc:
        if exc.retryable: ...

``retryable`` says whether the same request may succeed if sent again (to the
same or another provider). It is a property of the failure, not advice about
the deadline.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ERROR_CODES",
    "BadRequestError",
    "CancelledError",
    "ConfigError",
    "DeadlineExceededError",
    "IdentityError",
    "InternalError",
    "ModelNetError",
    "NotFoundError",
    "OverloadedError",
    "ProtocolError",
    "UnauthorizedError",
    "UnavailableError",
    "error_from_code",
    "exception_leaves",
]


class ModelNetError(Exception):
    """Base of every error raised by modelnet_p2p.

    Attributes:
        code: the wire error code (``"internal"`` for local-only errors).
        retryable: whether repeating the request may succeed.
        message: human-readable text, safe to show to a user.
        chunks_delivered: for request errors, how many chunks the caller had
            already received when the request failed (``0`` if none).
    """

    code: ClassVar[str] = "internal"
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        retryable: bool | None = None,
        chunks_delivered: int = 0,
    ) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.retryable = self.default_retryable if retryable is None else retryable
        self.chunks_delivered = chunks_delivered

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class BadRequestError(ModelNetError):
    """The request was malformed or its input or params were rejected."""

    code = "bad_request"


class NotFoundError(ModelNetError):
    """The remote peer does not serve the requested capability."""

    code = "not_found"


class UnauthorizedError(ModelNetError):
    """The remote peer refused the caller."""

    code = "unauthorized"


class OverloadedError(ModelNetError):
    """The provider is at its concurrency limit; try later or elsewhere."""

    code = "overloaded"
    default_retryable = True


class DeadlineExceededError(ModelNetError):
    """The request's deadline passed before it completed."""

    code = "deadline_exceeded"


class CancelledError(ModelNetError):
    """The request was cancelled (by the caller, or because the provider is leaving)."""

    code = "cancelled"


class InternalError(ModelNetError):
    """The provider's handler failed."""

    code = "internal"


class UnavailableError(ModelNetError):
    """The provider could not be reached or went away mid-request."""

    code = "unavailable"
    default_retryable = True


class ProtocolError(ModelNetError):
    """A peer broke the wire protocol: malformed or oversized frame, or a truncated stream."""

    code = "protocol_error"


class IdentityError(ModelNetError):
    """An identity key file is missing, malformed, unsafe or locked."""

    code = "internal"


class ConfigError(ModelNetError):
    """Bad local configuration (addresses, limits, options)."""

    code = "bad_request"


_BY_CODE: dict[str, type[ModelNetError]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        NotFoundError,
        UnauthorizedError,
        OverloadedError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
        UnavailableError,
        ProtocolError,
    )
}

#: The error codes defined by ``/modelnet/infer/1.0.0`` (see ``specs/inference.md``).
ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)


def error_from_code(
    code: str, message: str, *, retryable: bool | None = None, chunks_delivered: int = 0
) -> ModelNetError:
    """Build the exception for a wire error code.

    An unknown code (from a newer peer) becomes a :class:`ProtocolError` that
    names it, so that a caller never sees a bare ``KeyError``.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        return ProtocolError(f"unknown error code {code!r}: {message}", chunks_delivered=chunks_delivered)
    return cls(message, retryable=retryable, chunks_delivered=chunks_delivered)


def exception_leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside a (possibly nested) exception group, in order; ``[exc]`` for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in exception_leaves(inner)]
    return [exc]

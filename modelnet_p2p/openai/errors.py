"""Errors in OpenAI's format, and the HTTP answer for each mesh error.

Pure: no HTTP library. An answer is ``GatewayError.status``, ``.headers`` and
``.body()`` (``{"error": {"message", "type", "param", "code"}}``); the app
turns that into a response.

* ``NotFoundError`` → 404 ``model_not_found`` (``param: "model"``);
* ``OverloadedError`` → 429 ``overloaded``, ``retry-after``: the seconds the provider asked
  for (``retry after N s`` in its message, e.g. a token's rate caveat), rounded up; else 1;
* ``UnavailableError``, ``CancelledError`` → 503 with their own code, ``retry-after: 1``;
* ``DeadlineExceededError`` → 504 ``deadline_exceeded``, ``x-should-retry: false``;
* ``BadRequestError``, ``ConfigError`` → 400 ``bad_request``, with ``param`` by the
  ``"field: ..."`` convention of :mod:`.conventions`;
* ``UnauthorizedError`` → 403 ``unauthorized`` (``permission_error``; the ``openai`` client
  raises ``PermissionDeniedError``): the API key was accepted, but the provider refused the
  mesh token mapped to it (or its lack of one); the message starts with the reason
  (``no_token``, ``expired``, ``not_granted``, ...). A missing or wrong API key is 401;
* a key over its own rate (:mod:`.keys`) → 429 ``rate_limit_exceeded`` with ``retry-after``
  (:func:`rate_limited`);
* ``ProtocolError`` → 502 ``protocol_error``;
* anything else → 500 with its own code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import (
    BadRequestError,
    CancelledError,
    ConfigError,
    DeadlineExceededError,
    ModelNetError,
    NotFoundError,
    OverloadedError,
    ProtocolError,
    UnauthorizedError,
    UnavailableError,
)
from ..services.access import retry_after
from .conventions import error_param

__all__ = ["GatewayError", "from_mesh_error", "invalid", "rate_limited", "unauthorized"]


class GatewayError(Exception):
    """An error answer in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body of the answer (also the last event of a broken stream)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str, code: str = "invalid_value") -> GatewayError:
    """A 400 answer naming the request field at fault."""
    return GatewayError(400, message, param=param, code=code)


def unauthorized() -> GatewayError:
    """The 401 answer for a missing or wrong API key."""
    return GatewayError(
        401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.", code="invalid_api_key"
    )


def rate_limited(message: str, retry_after: int, limit: int | None) -> GatewayError:
    """The 429 answer for an API key over its rate (OpenAI's ``rate_limit_exceeded``)."""
    headers = {"retry-after": str(retry_after), "x-ratelimit-remaining-requests": "0"}
    if limit is not None:
        headers["x-ratelimit-limit-requests"] = str(limit)
        headers["x-ratelimit-reset-requests"] = f"{retry_after}s"
    return GatewayError(429, message, "requests", code="rate_limit_exceeded", headers=headers)


def from_mesh_error(exc: ModelNetError) -> GatewayError:
    """The HTTP answer for a mesh error (see the module docstring)."""
    if isinstance(exc, NotFoundError):
        return GatewayError(
            404,
            f"No reachable peer serves this model: {exc.message}",
            param="model",
            code="model_not_found",
        )
    if isinstance(exc, OverloadedError):
        wait = retry_after(exc)
        seconds = max(1, math.ceil(wait)) if wait is not None else 1
        return GatewayError(
            429, exc.message, "rate_limit_error", code="overloaded", headers={"retry-after": str(seconds)}
        )
    if isinstance(exc, UnavailableError | CancelledError):
        return GatewayError(503, exc.message, "server_error", code=exc.code, headers={"retry-after": "1"})
    if isinstance(exc, DeadlineExceededError):
        return GatewayError(
            504, exc.message, "server_error", code="deadline_exceeded", headers={"x-should-retry": "false"}
        )
    if isinstance(exc, BadRequestError | ConfigError):
        return GatewayError(400, exc.message, param=error_param(exc), code="bad_request")
    if isinstance(exc, UnauthorizedError):
        return GatewayError(403, exc.message, "permission_error", code="unauthorized")
    if isinstance(exc, ProtocolError):
        return GatewayError(502, exc.message, "server_error", code="protocol_error")
    return GatewayError(500, exc.message, "server_error", code=exc.code)

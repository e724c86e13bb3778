"""The service's exceptions, each with its HTTP status, and the one place they become
HTTP answers (``error_response``): the app's exception handler, and the body limit,
which answers before the app runs, both call it.

The native endpoints answer ``{"detail": ...}`` (FastAPI's shape: a message, or the
list of validation errors); the Open Inference Protocol's (under ``/v2``) answer
``{"error": "message"}``, as its specification says.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from starlette.responses import JSONResponse, Response

V2_PREFIX = "/v2"  # the Open Inference Protocol's endpoints, which have their own shape


class ServiceError(Exception):
    """Base of every error the service answers with a 4xx or 5xx."""

    status_code: int = 500
    headers: Mapping[str, str] | None = None

    def __init__(
        self, detail: Any, status_code: int | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """``status_code`` and ``headers``, when given, replace the class's."""
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        if headers is not None:
            self.headers = headers


def error_response(exc: ServiceError, path: str) -> Response:
    """The answer to ``exc`` raised on a request for ``path``, in that endpoint's shape."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        detail = exc.detail
        body: dict[str, Any] = {"error": detail if isinstance(detail, str) else str(detail)}
    else:
        body = {"detail": exc.detail}
    # (the standard library's JSON: a detail may quote an input past 64 bits)
    return JSONResponse(body, exc.status_code, exc.headers)


class ProtocolError(ServiceError):
    """A v2 inference request that breaks the protocol (400, or as raised)."""

    status_code = 400


class InvalidRequest(ServiceError):
    """The body is not valid JSON or does not match the model's fields (422)."""

    status_code = 422


class Unauthorized(ServiceError):
    """The API key is missing or wrong (401)."""

    status_code = 401
    headers = MappingProxyType({"WWW-Authenticate": "X-API-Key"})


class Forbidden(ServiceError):
    """The admin endpoints are off, or a path lies outside what may be loaded (403)."""

    status_code = 403


class NotFound(ServiceError):
    """What the request names does not exist: no checkpoint at a path (404)."""

    status_code = 404


class PayloadTooLarge(ServiceError):
    """The body or the number of instances is over its limit (413)."""

    status_code = 413


class UnsupportedMediaType(ServiceError):
    """The body is not declared as JSON (415)."""

    status_code = 415


class NotReady(ServiceError):
    """No model is loaded yet, or the service is shutting down (503)."""

    status_code = 503


class ClientGone(ServiceError):
    """The client disconnected before its request was read (499, which nobody receives)."""

    status_code = 499


class InvalidCheckpoint(ServiceError):
    """A reload named a checkpoint that does not load or verify (422); the old model stays."""

    status_code = 422


class Overloaded(ServiceError):
    """Too many calls are queued already (503): retry after a moment."""

    status_code = 503
    headers = MappingProxyType({"Retry-After": "1"})


class ReloadIncomplete(ServiceError):
    """Some worker did not switch to the new model in time: it is replaced by one that
    serves it (504)."""

    status_code = 504

"""The service's exceptions, each with its HTTP status; mapped to responses in one handler."""

from __future__ import annotations

from typing import Any, ClassVar


class ServiceError(Exception):
    """Base of every error the service answers with a 4xx or 5xx."""

    status_code: ClassVar[int] = 500
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidRequest(ServiceError):
    """The body is not valid JSON or does not match the model's fields (422)."""

    status_code = 422


class Unauthorized(ServiceError):
    """The API key is missing or wrong (401)."""

    status_code = 401
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "X-API-Key"}


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
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "1"}


class ReloadIncomplete(ServiceError):
    """Some worker did not switch to the new model in time: it is replaced by one that
    serves it (504)."""

    status_code = 504

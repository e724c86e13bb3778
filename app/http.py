"""HTTP plumbing every endpoint module shares: the runtime of a request, the API key,
JSON bodies in and out, validation against a compiled schema, the prediction log's
hand-over, OpenAPI pieces."""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import orjson
from fastapi import Depends, Request
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

from app.errors import ClientGone, InvalidRequest, Unauthorized, UnsupportedMediaType
from app.runtime import Runtime
from app.schemas import ErrorResponse, error_details
from app.store.base import Row

JSON = "application/json"


# The prediction routes take the runtime and check the key themselves (see
# app.routes.prediction_routes). Dependencies are async where used: FastAPI runs a sync
# one on a thread pool.
def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def log_served(
    request: Request,
    runtime: Runtime,
    version: str,
    rows: Sequence[Row],
    probabilities: npt.NDArray[np.float64],
    context: Row | None = None,
) -> None:
    """Hand a call's rows and answers to the prediction log (which samples, and never
    blocks), under the request's id and its route's template."""
    log = runtime.prediction_log
    if log.sample_rate > 0:
        scope = request.scope
        route = scope.get("route")  # (not request.url: building it costs more than the log)
        endpoint = route.path if route is not None else scope["path"]
        rid = scope["state"]["request_id"]
        log.offer(rid, endpoint, version, rows, probabilities, context)


def authorize(request: Request, runtime: Runtime) -> None:
    """401 unless the request carries the API key (when one is set)."""
    expected = runtime.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        raise Unauthorized("missing or invalid X-API-Key")


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code, media_type=JSON
    )


async def read_body(request: Request) -> bytes:
    """The raw body; a client that hung up before sending all of it is ClientGone."""
    try:
        return await request.body()
    except ClientDisconnect:
        raise ClientGone("the client closed the connection") from None


async def json_body(request: Request, *, optional: bool = False, untyped: bool = False) -> bytes:
    """The raw body of a JSON request, else 415 (before reading it, where it can tell).
    ``optional``: an empty body needs no content type; ``untyped``: no content type at
    all is taken as JSON (Triton's clients send none)."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == JSON or (media.startswith("application/") and media.endswith("+json"))
    if is_json or (untyped and not content_type):
        return await read_body(request)
    if optional and not await read_body(request):
        return b""
    raise UnsupportedMediaType(f"Content-Type must be {JSON}, not {content_type!r}")


def validate(body: bytes, adapter: TypeAdapter[Any]) -> Any:
    """The body, validated from its raw bytes by a model's compiled schema."""
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raise InvalidRequest(error_details(exc)) from None


def validate_value(value: Any, adapter: TypeAdapter[Any]) -> Any:
    """``validate`` for a body already parsed."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise InvalidRequest(error_details(exc)) from None


def body_schema(
    adapter: TypeAdapter[Any], components: dict[str, Any], *, required: bool = True
) -> dict[str, Any]:
    """An OpenAPI requestBody for ``adapter``; its definitions go to ``components``."""
    schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    return {"required": required, "content": {JSON: {"schema": schema}}}


ERROR_MEANINGS = {
    401: "the API key is missing or wrong",
    403: "the admin endpoints are off, or the path lies outside the models root",
    404: "no checkpoint at that path",
    413: "the body, or its number of rows, is over its limit",
    415: "the body is not declared as JSON",
    422: "the body is malformed, or names or holds what the model refuses",
    503: "overloaded (retry after Retry-After) or shutting down",
    504: "a worker did not switch in time; it is replaced by one serving the new model",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the errors an operation answers, in the native error shape."""
    return {
        status: {"description": ERROR_MEANINGS[status], "model": ErrorResponse}
        for status in statuses
    }

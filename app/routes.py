"""The endpoints, thin: validate, hand to the runtime, answer with pre-serialised JSON."""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import orjson
import pydantic_core
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect
from starlette.routing import Route

from app.errors import (
    ClientGone,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
)
from app.runtime import Runtime
from app.schemas import (
    ErrorResponse,
    PredictManyResponse,
    PredictResponse,
    RankResponse,
    ReloadRequest,
    ReloadResponse,
    RequestSchemas,
    error_details,
)

JSON = "application/json"
# A /predict_many body past this size is validated a slice of rows at a time.
SLICED_BODY_BYTES = 256 * 1024
SLICE_ROWS = 256
RELOAD_BODY = TypeAdapter(ReloadRequest)


# The prediction routes take the runtime and check the key themselves (see
# prediction_routes). Dependencies are async where used: FastAPI runs a sync one on a
# thread pool.
def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


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


async def json_body(request: Request, *, optional: bool = False, untyped: bool = False) -> bytes:
    """The raw body of a JSON request, else 415. ``optional``: an empty body needs no
    content type; ``untyped``: no content type at all is taken as JSON (Triton's
    clients send none)."""
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise ClientGone("the client closed the connection") from None
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    is_json = media == JSON or (media.startswith("application/") and media.endswith("+json"))
    if not is_json and not (optional and not raw) and not (untyped and not content_type):
        raise UnsupportedMediaType(f"Content-Type must be {JSON}, not {content_type!r}")
    return raw


def checkpoint_dir(root: Path, given: str) -> Path:
    """The checkpoint directory a reload names: relative to the models ``root``, or an
    absolute path inside it; 403 when it lies outside (``..``, a symlink that leaves the
    root)."""
    if "\0" in given:
        raise NotFound("no path holds a NUL character")
    resolved = (root / given).resolve()
    if not resolved.is_relative_to(root):
        raise Forbidden(f"model_dir {given!r} lies outside the models root {str(root)!r}")
    return resolved


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
    409: "not possible in this configuration",
    413: "the body, or its number of rows, is over its limit",
    415: "the body is not declared as JSON",
    422: "the body is malformed, or names or holds what the model refuses",
    503: "overloaded (retry after Retry-After) or shutting down",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses for the errors an operation answers, in the native error shape."""
    return {
        status: {"description": ERROR_MEANINGS[status], "model": ErrorResponse}
        for status in statuses
    }


async def predict(request: Request) -> Response:
    runtime = runtime_of(request)
    authorize(request, runtime)
    raw = await json_body(request)
    # The model that validates the request scores it (a reload may swap in another with
    # other fields): taken after the last await before the call is queued.
    model = runtime.model
    body = validate(raw, model.schemas.predict)
    explain = body.get("explain", False)
    probability, version, explanation = await runtime.predict_one(model, body["features"], explain)
    if explain:
        return json_response(
            {"probability": probability, "model_version": version, "explanation": explanation}
        )
    return json_response({"probability": probability, "model_version": version})


async def validate_rows(
    raw: bytes, schemas: RequestSchemas, key: str, limit: int, *, rank: bool = False
) -> Any:
    """A body of many rows (under ``key``) validated by ``whole``. Past SLICED_BODY_BYTES,
    with the same answers and errors, but in two steps: the ``envelope`` with its rows
    unchecked, then the rows a slice at a time, the event loop free between slices
    (validating 10,000 rows in one go held it, and every other call, for 200 ms).
    More rows than ``limit``: 413."""
    whole = schemas.rank if rank else schemas.predict_many
    envelope = schemas.rank_envelope if rank else schemas.predict_many_envelope
    if len(raw) <= SLICED_BODY_BYTES:
        body = validate(raw, whole)
        if len(body[key]) > limit:
            raise PayloadTooLarge(f"{len(body[key])} {key}; at most {limit}")
        return body
    try:
        data = pydantic_core.from_json(raw)  # (the parser validate_json uses)
    except ValueError:
        return validate(raw, whole)  # it says what is wrong
    body = validate_value(data, envelope)
    rows = body[key]
    if len(rows) > limit:
        raise PayloadTooLarge(f"{len(rows)} {key}; at most {limit}")
    instances = schemas.instances
    validated: list[Any] = []
    errors: list[dict[str, Any]] = []
    for start in range(0, len(rows), SLICE_ROWS):
        await asyncio.sleep(0)
        try:
            validated += instances.validate_python(rows[start : start + SLICE_ROWS])
        except ValidationError as exc:
            errors += error_details(exc, within=(key, start))
    if errors:
        raise InvalidRequest(errors)
    return {**body, key: validated}


async def predict_many(request: Request) -> Response:
    runtime = runtime_of(request)
    authorize(request, runtime)
    raw = await json_body(request)
    model = runtime.model  # (as in predict; it validates and scores, whatever a reload does)
    schemas = model.schemas
    body = await validate_rows(raw, schemas, "instances", runtime.settings.max_instances)
    instances = body["instances"]
    explain = body.get("explain", False)
    probabilities, version, explanations = await runtime.predict_many(model, instances, explain)
    if explain:
        return json_response(
            {
                "probabilities": probabilities,
                "model_version": version,
                "explanations": explanations,
            }
        )
    return json_response({"probabilities": probabilities, "model_version": version})


async def rank(request: Request) -> Response:
    """One context, many candidates: ``/predict_many`` of the candidates with the context
    merged into each, the context's work done once."""
    runtime = runtime_of(request)
    authorize(request, runtime)
    raw = await json_body(request)
    model = runtime.model  # (as in predict_many)
    limit = runtime.settings.max_instances
    body = await validate_rows(raw, model.schemas, "candidates", limit, rank=True)
    context, candidates = body["context"], body["candidates"]
    shared = context.keys()
    clashes = [
        {
            "type": "given_in_context",
            "loc": ["body", "candidates", i, name],
            "msg": f"field {name!r} is given in the context too: give it in one place",
        }
        for i, candidate in enumerate(candidates)
        for name in sorted(shared & candidate.keys())
    ]
    if clashes:
        raise InvalidRequest(clashes)
    explain = body.get("explain", False)
    probabilities, version, explanations = await runtime.predict_many(
        model, candidates, explain, context
    )
    answer: dict[str, Any] = {"probabilities": probabilities, "model_version": version}
    if (top_k := body.get("top_k")) is not None:
        best = np.argsort(-probabilities, kind="stable")[:top_k].tolist()
        answer["top"] = [{"index": i, "probability": probabilities[i]} for i in best]
    if explain:
        answer["explanations"] = explanations
    return json_response(answer)


def prediction_routes() -> list[Route]:
    """/predict and /predict_many as plain Starlette routes.

    FastAPI's request handling (parameter solving, its response machinery) costs more
    per call than routing, validation and answering together: served this way the
    service answered 30-40% more calls per second at 64 connections. They are
    documented by ``prediction_docs``.
    """
    return [
        Route("/predict", predict, methods=["POST"]),
        Route("/predict_many", predict_many, methods=["POST"]),
        Route("/rank", rank, methods=["POST"]),
    ]


PREDICTION_ERRORS = (401, 413, 415, 422, 503)


def prediction_docs(
    schemas: RequestSchemas, max_instances: int, components: dict[str, Any]
) -> APIRouter:
    """The OpenAPI description of the prediction routes: declared, never mounted."""
    docs = APIRouter()
    key_header = {
        "parameters": [
            {
                "name": "X-API-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "needed when the service has CTR_API_KEY",
            }
        ]
    }
    docs.add_api_route(
        "/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses=error_responses(*PREDICTION_ERRORS),
        openapi_extra={"requestBody": body_schema(schemas.predict, components), **key_header},
        summary="Click probability of one row",
    )
    docs.add_api_route(
        "/predict_many",
        predict_many,
        methods=["POST"],
        response_model=PredictManyResponse,
        responses=error_responses(*PREDICTION_ERRORS),
        openapi_extra={
            "requestBody": body_schema(schemas.predict_many, components),
            **key_header,
        },
        summary=f"Click probabilities of up to {max_instances} rows",
    )
    docs.add_api_route(
        "/rank",
        rank,
        methods=["POST"],
        response_model=RankResponse,
        responses=error_responses(*PREDICTION_ERRORS),
        openapi_extra={"requestBody": body_schema(schemas.rank, components), **key_header},
        summary=f"Click probabilities of up to {max_instances} candidates sharing one context",
    )
    return docs


def build_router() -> APIRouter:
    """The operational endpoints (FastAPI routes)."""
    router = APIRouter()

    async def check_api_key(request: Request, runtime: RuntimeDep) -> None:
        authorize(request, runtime)

    keyed = [Depends(check_api_key)]

    @router.get("/healthz", summary="The process is up")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @router.get(
        "/readyz",
        summary="A model is loaded and the service can answer",
        responses={503: {"description": "not ready (shutting down)"}},
    )
    async def readyz(runtime: RuntimeDep) -> Response:
        ready = runtime.ready
        store = runtime.model.store
        described = {"backend": store.backend, "state": store.state}
        if (reason := store.reason) is not None:
            described["reason"] = reason
        body = {
            "status": "ready" if ready else "not ready",
            "model_version": runtime.model.version,
            "embedding_store": described,
        }
        return json_response(body, 200 if ready else 503)

    @router.get(
        "/model",
        dependencies=keyed,
        summary="The loaded model's metadata",
        responses=error_responses(401),
    )
    async def model_info(runtime: RuntimeDep) -> Response:
        return json_response(runtime.model.describe())

    @router.post(
        "/admin/reload",
        response_model=ReloadResponse,
        summary="Load, verify and swap in a checkpoint without failing a request",
        openapi_extra={"requestBody": body_schema(RELOAD_BODY, {}, required=False)},
        responses=error_responses(401, 403, 404, 409, 413, 415, 422, 503),
    )
    async def reload(request: Request, runtime: RuntimeDep) -> Response:
        authorize(request, runtime)
        settings = runtime.settings
        if not settings.admin_enabled:
            raise Forbidden(
                "the admin endpoints are off: set CTR_API_KEY to use them behind the key, "
                "or CTR_ADMIN_ENDPOINTS=true on a network you trust"
            )
        raw = await json_body(request, optional=True)
        body = validate(raw, RELOAD_BODY) if raw.strip() else ReloadRequest()
        if settings.workers > 1:
            raise Conflict(
                "with CTR_WORKERS > 1 a reload would reach one worker: send SIGHUP to the "
                "server process instead (uvicorn restarts every worker on CTR_MODEL_DIR)"
            )
        directory = None
        if body.model_dir is not None:
            directory = checkpoint_dir(settings.reload_root, body.model_dir)
        version, previous = await runtime.reload(directory)
        return json_response({"model_version": version, "previous_version": previous})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(runtime: RuntimeDep) -> Response:
        return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router

"""The endpoints, thin: validate, hand to the runtime, answer with pre-serialised JSON."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pydantic_core
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import TypeAdapter, ValidationError
from starlette.routing import Route

from app.errors import Forbidden, InvalidRequest, NotFound, PayloadTooLarge
from app.http import (
    RuntimeDep,
    authorize,
    body_schema,
    error_responses,
    json_body,
    json_response,
    log_served,
    runtime_of,
    validate,
    validate_value,
)
from app.schemas import (
    PredictManyResponse,
    PredictResponse,
    RankResponse,
    ReloadRequest,
    ReloadResponse,
    RequestSchemas,
    error_details,
)

# A /predict_many body past this size is validated a slice of rows at a time.
SLICED_BODY_BYTES = 256 * 1024
SLICE_ROWS = 256
RELOAD_BODY = TypeAdapter(ReloadRequest)


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


async def predict(request: Request) -> Response:
    runtime = runtime_of(request)
    authorize(request, runtime)
    raw = await json_body(request)
    # The model that validates the request scores it (a reload may swap in another with
    # other fields): taken after the last await before the call is queued.
    model = runtime.model
    body = validate(raw, model.schemas.predict)
    explain = body.get("explain", False)
    features = body["features"]
    probability, version, explanation = await runtime.predict_one(model, features, explain)
    log_served(request, runtime, version, [features], np.array([probability]))
    if explain:
        return json_response(
            {"probability": probability, "model_version": version, "explanation": explanation}
        )
    return json_response({"probability": probability, "model_version": version})


async def validate_rows(
    raw: bytes, schemas: RequestSchemas, key: str, limit: int, *, rank: bool = False
) -> Any:
    """A /predict_many (or, ``rank``, /rank) body, its rows under ``key``, validated by
    its schema. Past SLICED_BODY_BYTES, with the same answers and errors, in two steps:
    the envelope with its rows unchecked, then the rows a slice at a time, the event
    loop free between slices (validating 10,000 rows in one go held it, and every other
    call, for 200 ms). More rows than ``limit``: 413."""
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
    log_served(request, runtime, version, instances, probabilities)
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
    log_served(request, runtime, version, candidates, probabilities, context)
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
    declared = [
        ("/predict", predict, PredictResponse, schemas.predict, "Click probability of one row"),
        (
            "/predict_many",
            predict_many,
            PredictManyResponse,
            schemas.predict_many,
            f"Click probabilities of up to {max_instances} rows",
        ),
        (
            "/rank",
            rank,
            RankResponse,
            schemas.rank,
            f"Click probabilities of up to {max_instances} candidates sharing one context",
        ),
    ]
    for path, endpoint, response, request, summary in declared:
        docs.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=response,
            responses=error_responses(*PREDICTION_ERRORS),
            openapi_extra={"requestBody": body_schema(request, components), **key_header},
            summary=summary,
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
        responses=error_responses(401, 403, 404, 413, 415, 422, 503, 504),
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
        directory = None
        if body.model_dir is not None:
            directory = checkpoint_dir(settings.reload_root, body.model_dir)
        link = getattr(request.state, "supervisor", None)
        if link is not None:  # a worker: the supervisor switches every worker
            return json_response(await link.reload(directory))
        version, previous = await runtime.reload(directory)
        return json_response({"model_version": version, "previous_version": previous})

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(runtime: RuntimeDep) -> Response:
        metrics = runtime.metrics
        return Response(metrics.exposition(), media_type=metrics.content_type)

    return router

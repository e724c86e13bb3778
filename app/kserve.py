"""The Open Inference Protocol (KServe v2, as Triton speaks it) over REST, beside the
native endpoints, on the same model and micro-batcher.

The server holds one model, ``ctr``; its one version is the loaded checkpoint's.
Its inputs are one tensor per field, named as the field, shape ``[-1]``: BYTES for
a sparse field (a string per row; "" is missing) and FP32 for a dense one (a number
per row; null is missing). Its output is ``probability``, FP32, shape ``[-1]``.
Tensor data in JSON, or binary (the binary tensor data extension, ``app.tensordata``:
what Triton's clients send by default), answered in kind. Errors are
``{"error": "..."}`` with 400 (a bad request) or 404 (no such model or version), as
``app.errors.error_response`` words every error under ``/v2``.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import tensordata
from app.columnar import ColumnRows
from app.config import Settings
from app.errors import ProtocolError
from app.http import authorize, json_body, json_response, log_served, read_body, runtime_of
from app.runtime import Runtime
from app.serving import ServingModel
from app.v2schemas import MODEL_NAME, OUTPUT, ErrorObject, InferResponse, datatype

PLATFORM = "pytorch_deepfm"
BINARY_TYPES = frozenset({"", "application/octet-stream"})


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meanings = {
        400: "a malformed request, or one the model cannot take",
        401: "the API key is missing or wrong",
        404: "no such model or version",
        413: "the body, or its number of rows, is over its limit",
        415: "the body is neither JSON nor binary tensor data",
        503: "overloaded (retry after Retry-After) or shutting down",
    }
    return {s: {"description": meanings[s], "model": ErrorObject} for s in statuses}


INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the inference response (in binary when asked for)",
        "model": InferResponse,
    },
    **_errors(400, 401, 404, 413, 415, 503),
}
_MODEL_RESPONSES = _errors(401, 404)
_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "not ready (shutting down)"},
    **_errors(404),
}


def document(schema: dict[str, Any], version: str, infer_body: dict[str, Any]) -> None:
    """Finish the OpenAPI description of the v2 paths in ``schema``: the inference
    operations take ``infer_body`` (the served model's ``InferSchema``); the model name
    and version parameters take the served model's (so a client or a fuzzer reaches the
    model, and learns that anything else is a 404); and no operation claims a 422, which
    these routes never answer."""
    values = {"name": [MODEL_NAME], "version": [version]}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/v2/"):
            continue
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if path.endswith("/infer"):
                operation["requestBody"] = infer_body
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in values:
                    parameter["schema"]["enum"] = values[parameter["name"]]


def build_v2_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

    @router.get("", summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response(
            {
                "name": "ctr-serve",
                "version": metadata.version("ctr-serve"),
                "extensions": [tensordata.EXTENSION],
            }
        )

    @router.get("/health/live", summary="Server liveness")
    async def live() -> Response:
        return json_response({"live": True})

    @router.get(
        "/health/ready",
        summary="Server readiness (200, else 400)",
        responses={400: {"description": "not ready (shutting down)"}},
    )
    async def ready(request: Request) -> Response:
        ready = runtime_of(request).ready
        return json_response({"ready": ready}, 200 if ready else 400)

    @router.get("/models/{name}", summary="Model metadata", responses=_MODEL_RESPONSES)
    async def model_metadata(request: Request, name: str) -> Response:
        return _metadata(request, name, None)

    @router.get(
        "/models/{name}/versions/{version}",
        summary="Model metadata of a version",
        responses=_MODEL_RESPONSES,
    )
    async def version_metadata(request: Request, name: str, version: str) -> Response:
        return _metadata(request, name, version)

    @router.get(
        "/models/{name}/ready",
        summary="200 when the model can infer",
        responses=_READY_RESPONSES,
    )
    async def model_ready(request: Request, name: str) -> Response:
        return _model_ready(request, name, None)

    @router.get(
        "/models/{name}/versions/{version}/ready",
        summary="200 when it can infer",
        responses=_READY_RESPONSES,
    )
    async def version_ready(request: Request, name: str, version: str) -> Response:
        return _model_ready(request, name, version)

    @router.post(
        "/models/{name}/infer",
        summary="Inference",
        responses=INFER_RESPONSES,
    )
    async def infer(request: Request, name: str) -> Response:
        return await _infer(request, name, None)

    @router.post(
        "/models/{name}/versions/{version}/infer",
        summary="Inference by a version",
        responses=INFER_RESPONSES,
    )
    async def version_infer(request: Request, name: str, version: str) -> Response:
        return await _infer(request, name, version)

    return router


def _check_model(
    runtime: Runtime, name: str, version: str | None, model: ServingModel | None = None
) -> None:
    """404 unless ``name`` (and ``version``) is the model served (``model``, by default
    the runtime's current one)."""
    served = (model or runtime.model).version
    if name != MODEL_NAME:
        raise ProtocolError(f"unknown model {name!r}; this server has {MODEL_NAME!r}", 404)
    if version is not None and version != served:
        raise ProtocolError(
            f"model {MODEL_NAME!r} has no version {version!r}; it serves {served!r}", 404
        )


def _metadata(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    authorize(request, runtime)
    _check_model(runtime, name, version)
    model = runtime.model
    return json_response(
        {
            "name": MODEL_NAME,
            "versions": [model.version],
            "platform": PLATFORM,
            "inputs": [
                {"name": f.name, "datatype": datatype(f.kind), "shape": [-1]}
                for f in model.features.fields
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}],
        }
    )


def _model_ready(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    _check_model(runtime, name, version)
    ready = runtime.ready
    return json_response({"name": MODEL_NAME, "ready": ready}, 200 if ready else 400)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    authorize(request, runtime)
    header = request.headers.get(tensordata.HEADER)
    # A binary body is no JSON: its content type is Triton's (none) or octet-stream.
    binary = header is not None and request.headers.get("content-type", "") in BINARY_TYPES
    raw = await (read_body(request) if binary else json_body(request, untyped=True))
    # The model that checks the request scores it (see app.routes.predict).
    model = runtime.model
    _check_model(runtime, name, version, model)
    body, rows = read_request(raw, header, model, runtime.settings)
    probabilities, served_by, _ = await runtime.predict_many(model, rows)
    log_served(request, runtime, served_by, rows, probabilities)
    answer: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "model_version": served_by,
        "outputs": [
            {
                "name": OUTPUT,
                "datatype": "FP32",
                "shape": [len(rows)],
                "data": probabilities.astype("float32").tolist(),
            }
        ],
    }
    if body.get("id") is not None:
        answer["id"] = body["id"]
    if tensordata.wants_binary(body):
        content, header_length = tensordata.encode(answer, probabilities)
        return Response(
            content,
            media_type="application/octet-stream",
            headers={tensordata.HEADER: str(header_length)},
        )
    return json_response(answer)


def read_request(
    raw: bytes, header: str | None, model: ServingModel, settings: Settings
) -> tuple[dict[str, Any], ColumnRows]:
    """An inference request's body (JSON, or with ``header``, the binary tensor data
    extension's ``Inference-Header-Content-Length``), validated, and its rows."""
    if header is None:
        body = model.v2.validate(raw)
    else:  # the JSON header validated, then the binary data decoded into its inputs
        raw, data = tensordata.split(raw, header)
        body = model.v2.validate(raw)
        tensordata.attach(body["inputs"], data)
    return body, _rows(body, model, settings)


def _rows(body: dict[str, Any], model: ServingModel, settings: Settings) -> ColumnRows:
    """A validated inference request (``InferSchema``) -> its rows, held as the columns
    they came in, after the checks no schema can make: no input twice, each as long as
    its shape, one batch size, at most ``max_instances`` rows."""
    columns: dict[str, Any] = {}
    size: int | None = None
    for tensor in body["inputs"]:
        name, (length,) = tensor["name"], tensor["shape"]
        if name in columns:
            raise ProtocolError(f"input {name!r} is given twice")
        data = tensor.get("data")
        if data is None:
            raise ProtocolError(f'input {name!r} has neither "data" nor binary data')
        if len(data) != length:
            raise ProtocolError(f"input {name!r} has {len(data)} values for shape [{length}]")
        if size is not None and length != size:
            raise ProtocolError(f"inputs have different batch sizes ({size} and {length})")
        size = length
        if tensor["datatype"] == "FP32" and not isinstance(data, np.ndarray):
            data = np.array(data, dtype=np.float64)  # (null: NaN, missing)
        columns[name] = data
    assert size is not None  # (at least one input)
    if size > settings.max_instances:
        raise ProtocolError(f"{size} rows; at most {settings.max_instances}", 413)
    return ColumnRows(columns, size)

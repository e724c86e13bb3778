"""The Open Inference Protocol (KServe v2, as Triton speaks it) over REST, beside the
native endpoints, on the same model and micro-batcher.

The server holds one model, ``ctr``; its one version is the loaded checkpoint's.
Its inputs are one tensor per field, named as the field, shape ``[-1]``: BYTES for
a sparse field (a string per row; "" is missing) and FP32 for a dense one (a number
per row; null is missing). Its output is ``probability``, FP32, shape ``[-1]``.
JSON tensor data only (the binary tensor extension is not offered). Errors are
``{"error": "..."}`` with 400 (a bad request) or 404 (no such model or version).
"""

from __future__ import annotations

import math
from importlib import metadata
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app.errors import ServiceError
from app.routes import authorize, json_response, runtime_of
from app.runtime import Runtime

MODEL_NAME = "ctr"
PLATFORM = "pytorch_deepfm"
OUTPUT = "probability"


class ProtocolError(Exception):
    """Answered as ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def error(message: str, status: int) -> Response:
    return json_response({"error": message}, status)


def empty(status: int) -> Response:
    return Response(status_code=status)


def build_v2_router() -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

    @router.get("", summary="Server metadata")
    async def server_metadata() -> Response:
        return json_response(
            {"name": "ctr-serve", "version": metadata.version("ctr-serve"), "extensions": []}
        )

    @router.get("/health/live", summary="200 while the server is up", response_class=Response)
    async def live() -> Response:
        return empty(200)

    @router.get("/health/ready", summary="200 when it can infer, else 400", response_class=Response)
    async def ready(request: Request) -> Response:
        return empty(200 if runtime_of(request).ready else 400)

    @router.get("/models/{name}", summary="Model metadata")
    async def model_metadata(request: Request, name: str) -> Response:
        return _metadata(request, name, None)

    @router.get("/models/{name}/versions/{version}", summary="Model metadata of a version")
    async def version_metadata(request: Request, name: str, version: str) -> Response:
        return _metadata(request, name, version)

    @router.get("/models/{name}/ready", summary="200 when the model can infer")
    async def model_ready(request: Request, name: str) -> Response:
        return _model_ready(request, name, None)

    @router.get("/models/{name}/versions/{version}/ready", summary="200 when it can infer")
    async def version_ready(request: Request, name: str, version: str) -> Response:
        return _model_ready(request, name, version)

    @router.post("/models/{name}/infer", summary="Inference")
    async def infer(request: Request, name: str) -> Response:
        return await _infer(request, name, None)

    @router.post("/models/{name}/versions/{version}/infer", summary="Inference by a version")
    async def version_infer(request: Request, name: str, version: str) -> Response:
        return await _infer(request, name, version)

    return router


def _check_model(runtime: Runtime, name: str, version: str | None) -> None:
    if name != MODEL_NAME:
        raise ProtocolError(f"unknown model {name!r}; this server has {MODEL_NAME!r}", 404)
    if version is not None and version != runtime.model.version:
        raise ProtocolError(
            f"model {MODEL_NAME!r} has no version {version!r}; it serves {runtime.model.version!r}",
            404,
        )


def _metadata(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    try:
        _authorize(request, runtime)
        _check_model(runtime, name, version)
    except ProtocolError as exc:
        return error(str(exc), exc.status)
    model = runtime.model
    return json_response(
        {
            "name": MODEL_NAME,
            "versions": [model.version],
            "platform": PLATFORM,
            "inputs": [
                {"name": f.name, "datatype": _datatype(f.kind), "shape": [-1]}
                for f in model.features.fields
            ],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1]}],
        }
    )


def _model_ready(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    try:
        _check_model(runtime, name, version)
    except ProtocolError as exc:
        return error(str(exc), exc.status)
    return empty(200 if runtime.ready else 400)


def _authorize(request: Request, runtime: Runtime) -> None:
    try:
        authorize(request, runtime)
    except ServiceError as exc:
        raise ProtocolError(str(exc.detail), exc.status_code) from None


async def _infer(request: Request, name: str, version: str | None) -> Response:
    runtime = runtime_of(request)
    try:
        _authorize(request, runtime)
        _check_model(runtime, name, version)
        if "inference-header-content-length" in request.headers:
            raise ProtocolError(
                "binary tensor data is not supported: send JSON data (binary_data=False)"
            )
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(f"the body is not valid JSON: {exc}") from None
        rows, request_id = _rows(body, runtime)
        probabilities, served_by, _ = await runtime.predict_many(rows)
    except ProtocolError as exc:
        return error(str(exc), exc.status)
    except ServiceError as exc:  # shutting down, overloaded
        return error(str(exc.detail), exc.status_code)
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
    if request_id is not None:
        answer["id"] = request_id
    return json_response(answer)


def _rows(body: Any, runtime: Runtime) -> tuple[list[dict[str, Any]], str | None]:
    """An inference request -> rows of raw values (field -> value), and its id."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ProtocolError('an inference request is an object with an "inputs" array')
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError('"id" must be a string')
    for output in body.get("outputs") or []:
        if not isinstance(output, dict) or output.get("name") != OUTPUT:
            raise ProtocolError(f'the only output is "{OUTPUT}"')
    fields = runtime.model.features.by_name
    max_chars = runtime.settings.max_value_chars
    columns: dict[str, list[Any]] = {}
    size: int | None = None
    for tensor in body["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ProtocolError('every input is an object with a "name"')
        name = tensor["name"]
        field = fields.get(name)
        if field is None:
            raise ProtocolError(f"unknown input {name!r}: GET /v2/models/{MODEL_NAME} lists them")
        if name in columns:
            raise ProtocolError(f"input {name!r} is given twice")
        expected = _datatype(field.kind)
        if tensor.get("datatype") != expected:
            raise ProtocolError(
                f"input {name!r} has datatype {tensor.get('datatype')!r}, expected {expected}"
            )
        shape = tensor.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 1
            or not isinstance(shape[0], int)
            or isinstance(shape[0], bool)
            or shape[0] < 1
        ):
            raise ProtocolError(f"input {name!r} must have shape [n], n >= 1, not {shape!r}")
        data = _flatten(tensor.get("data"), name)
        if len(data) != shape[0]:
            raise ProtocolError(f"input {name!r} has {len(data)} values for shape {shape}")
        if size is not None and shape[0] != size:
            raise ProtocolError(f"inputs have different batch sizes ({size} and {shape[0]})")
        size = shape[0]
        columns[name] = [_value(v, field.kind, name, max_chars) for v in data]
    if size is None:
        raise ProtocolError("no inputs")
    if size > runtime.settings.max_instances:
        raise ProtocolError(f"{size} rows; at most {runtime.settings.max_instances}")
    rows = [{} for _ in range(size)]  # type: list[dict[str, Any]]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            if value is not None:
                row[name] = value
    return rows, request_id


def _flatten(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise ProtocolError(f'input {name!r} needs a "data" array')
    if all(not isinstance(v, list) for v in data):
        return data
    flat: list[Any] = []
    for item in data:  # row-major nesting, as the protocol allows
        flat += _flatten(item, name) if isinstance(item, list) else [item]
    return flat


def _value(value: Any, kind: str, name: str, max_chars: int) -> Any:
    if value is None:
        return None
    if kind == "sparse":
        if not isinstance(value, str):
            raise ProtocolError(f"input {name!r} (BYTES) takes strings, not {value!r}")
        if len(value) > max_chars:
            raise ProtocolError(f"input {name!r} has a value over {max_chars} characters")
        return value or None  # "" is missing
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"input {name!r} (FP32) takes finite numbers, not {value!r}")
    return float(value)


def _datatype(kind: str) -> str:
    return "BYTES" if kind == "sparse" else "FP32"

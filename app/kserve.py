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

import math
from importlib import metadata
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import tensordata
from app.config import Settings
from app.errors import ProtocolError
from app.http import authorize, json_body, json_response, read_body, runtime_of
from app.runtime import Runtime
from app.serving import ServingModel

MODEL_NAME = "ctr"
PLATFORM = "pytorch_deepfm"
OUTPUT = "probability"
BINARY_TYPES = frozenset({"", "application/octet-stream"})


_OBJECT: dict[str, Any] = {"type": "object"}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype", "data"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": _OBJECT,
        "data": {"type": "array"},
    },
}
# What this model takes (the schema cannot say that every input's data must be as
# long as its shape, nor that all inputs share one batch size: those are 400s).
_INPUT = {
    **_TENSOR,
    "properties": {
        "name": {"type": "string", "description": "a field of the model (GET its metadata)"},
        "shape": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
            "maxItems": 1,
        },
        "datatype": {"type": "string", "enum": ["BYTES", "FP32"]},
        "parameters": _OBJECT,
        "data": {
            "type": "array",
            "items": {"type": ["string", "number", "null"]},
            "minItems": 1,
        },
    },
}
_ERROR = {
    "description": "the protocol's error object",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            }
        }
    },
}
INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": _OBJECT,
                        "inputs": {"type": "array", "items": _INPUT, "minItems": 1},
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string", "enum": [OUTPUT]},
                                    "parameters": _OBJECT,
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the inference response",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model_name", "outputs"],
                    "properties": {
                        "model_name": {"type": "string"},
                        "model_version": {"type": "string"},
                        "id": {"type": "string"},
                        "outputs": {"type": "array", "items": _TENSOR},
                    },
                }
            }
        },
    },
    400: _ERROR,
    401: _ERROR,
    404: _ERROR,
    413: _ERROR,
    415: _ERROR,
    503: _ERROR,
}
_MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {401: _ERROR, 404: _ERROR}
_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "not ready (shutting down)"},
    404: _ERROR,
}


def document(schema: dict[str, Any], version: str) -> None:
    """Finish the OpenAPI description of the v2 paths in ``schema``: the model name and
    version parameters take the served model's (so a client or a fuzzer reaches the
    model, and learns that anything else is a 404), and no operation claims a 422,
    which these routes never answer."""
    values = {"name": [MODEL_NAME], "version": [version]}
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/v2/"):
            continue
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
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
        openapi_extra=INFER_DOCS,
        responses=INFER_RESPONSES,
    )
    async def infer(request: Request, name: str) -> Response:
        return await _infer(request, name, None)

    @router.post(
        "/models/{name}/versions/{version}/infer",
        summary="Inference by a version",
        openapi_extra=INFER_DOCS,
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
                {"name": f.name, "datatype": _datatype(f.kind), "shape": [-1]}
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
    data = b""
    if header is not None:
        raw, data = tensordata.split(raw, header)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the body is not valid JSON: {exc}") from None
    if isinstance(body, dict):
        tensordata.attach(body.get("inputs"), data)
    elif data:
        raise ProtocolError("binary data with no inference request before it")
    rows, request_id = _rows(body, model, runtime.settings)
    probabilities, served_by, _ = await runtime.predict_many(model, rows)
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
    if tensordata.wants_binary(body):
        content, header_length = tensordata.encode(answer, probabilities)
        return Response(
            content,
            media_type="application/octet-stream",
            headers={tensordata.HEADER: str(header_length)},
        )
    return json_response(answer)


def _rows(
    body: Any, model: ServingModel, settings: Settings
) -> tuple[list[dict[str, Any]], str | None]:
    """An inference request -> rows of raw values (field -> value), and its id."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise ProtocolError('an inference request is an object with an "inputs" array')
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError('"id" must be a string')
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or any(
        not isinstance(output, dict) or output.get("name") != OUTPUT for output in outputs
    ):
        raise ProtocolError(f'"outputs" lists requested outputs; the only one is "{OUTPUT}"')
    fields = model.features.by_name
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
        columns[name] = [_value(v, field.kind, name) for v in data]
    if size is None:
        raise ProtocolError("no inputs")
    if size > settings.max_instances:
        raise ProtocolError(f"{size} rows; at most {settings.max_instances}", 413)
    rows = [{} for _ in range(size)]  # type: list[dict[str, Any]]
    for name, values in columns.items():
        for row, value in zip(rows, values, strict=True):
            if value is not None:
                row[name] = value
    return rows, request_id


def _flatten(data: Any, name: str) -> list[Any]:
    """The values of a tensor of shape [n]: a flat array (nesting would mean more
    dimensions than the shape has)."""
    if not isinstance(data, list) or any(isinstance(v, list | dict) for v in data):
        raise ProtocolError(f'input {name!r} of shape [n] needs a flat "data" array')
    return data


def _value(value: Any, kind: str, name: str) -> Any:
    if value is None:
        return None
    if kind == "sparse":
        if not isinstance(value, str):
            raise ProtocolError(f"input {name!r} (BYTES) takes strings, not {value!r}")
        return value or None  # "" is missing
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError(f"input {name!r} (FP32) takes finite numbers, not {value!r}")
    return float(value)


def _datatype(kind: str) -> str:
    return "BYTES" if kind == "sparse" else "FP32"

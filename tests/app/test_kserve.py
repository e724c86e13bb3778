"""The Open Inference Protocol endpoints, driven by the official Triton HTTP client
against the running server, and their error cases."""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from model.data import CRITEO_DENSE, CRITEO_SPARSE
from model.predict import Predictor
from tests.app.conftest import ClientFactory
from tests.app.test_routes import random_rows

MODEL = "ctr"
pytestmark = pytest.mark.anyio


def test_the_triton_client_reads_health_and_metadata(server_url: str, offline: Predictor) -> None:
    client = triton.InferenceServerClient(url=server_url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version=offline.checkpoint.version)
    assert not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "ctr-serve" and server["extensions"] == ["binary_tensor_data"]
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == [offline.checkpoint.version]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]}
    assert inputs == {
        **{name: ("FP32", [-1]) for name in CRITEO_DENSE},
        **{name: ("BYTES", [-1]) for name in CRITEO_SPARSE},
    }
    assert model["outputs"] == [{"name": "probability", "datatype": "FP32", "shape": [-1]}]
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")


@pytest.mark.parametrize(
    ("versioned", "binary"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_triton_inference_equals_predict_many(
    server_url: str, offline: Predictor, versioned: bool, binary: bool
) -> None:
    """tritonclient as its users call it: with its defaults (binary tensors in and out),
    or with JSON data."""
    rows = random_rows(offline, 64, seed=8, values=30)
    # A tensor has a value for every row: a dense value is a number (missing: the
    # field's mean after its transform would differ, so fill them), a sparse "" is
    # missing.
    for row in rows:
        for name in CRITEO_DENSE:
            row[name] = float(row.get(name) if row.get(name) is not None else 0.0)
    inputs = []
    for name in CRITEO_DENSE:
        tensor = triton.InferInput(name, [len(rows)], "FP32")
        tensor.set_data_from_numpy(
            np.array([row[name] for row in rows], dtype=np.float32), binary_data=binary
        )
        inputs.append(tensor)
    for name in CRITEO_SPARSE:
        tensor = triton.InferInput(name, [len(rows)], "BYTES")
        values = [str(row[name]) if row.get(name) is not None else "" for row in rows]
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        inputs.append(tensor)
    client = triton.InferenceServerClient(url=server_url.removeprefix("http://"))
    version = offline.checkpoint.version if versioned else ""
    # The default: no outputs named (all of them, in binary).
    outputs = None if binary else [triton.InferRequestedOutput("probability", binary_data=False)]
    result = client.infer(MODEL, inputs, model_version=version, request_id="r-1", outputs=outputs)
    got = result.as_numpy("probability")
    assert got.dtype == np.float32 and got.shape == (len(rows),)
    response = result.get_response()
    assert response["model_version"] == offline.checkpoint.version and response["id"] == "r-1"
    native = httpx.post(server_url + "/predict_many", json={"instances": rows}).json()
    np.testing.assert_allclose(got, native["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=1e-6, atol=1e-7)


def infer_body(**tensor: Any) -> dict[str, Any]:
    base = {"name": "C1", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
    return {"inputs": [{**base, **tensor}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/other/infer", infer_body(), 404, "unknown model"),
        ("/v2/models/ctr/versions/deepfm-000000000000/infer", infer_body(), 404, "no version"),
        ("/v2/models/ctr/infer", {"x": 1}, 400, '"inputs"'),
        ("/v2/models/ctr/infer", {"inputs": []}, 400, "no inputs"),
        ("/v2/models/ctr/infer", infer_body(name="C99"), 400, "unknown input"),
        ("/v2/models/ctr/infer", infer_body(datatype="FP32"), 400, "datatype"),
        ("/v2/models/ctr/infer", infer_body(shape=[3]), 400, "2 values for shape [3]"),
        ("/v2/models/ctr/infer", infer_body(shape=[1, 2]), 400, "shape [n]"),
        ("/v2/models/ctr/infer", infer_body(data=["a", 1]), 400, "takes strings"),
        ("/v2/models/ctr/infer", infer_body(data="ab"), 400, '"data" array'),
        (
            "/v2/models/ctr/infer",
            {"inputs": infer_body()["inputs"] * 2},
            400,
            "given twice",
        ),
        (
            "/v2/models/ctr/infer",
            {
                "inputs": [
                    *infer_body()["inputs"],
                    {"name": "I1", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]},
                ]
            },
            400,
            "different batch sizes",
        ),
        (
            "/v2/models/ctr/infer",
            {"inputs": [{"name": "I1", "datatype": "FP32", "shape": [1], "data": ["x"]}]},
            400,
            "finite numbers",
        ),
        ("/v2/models/ctr/infer", {**infer_body(), "outputs": [{"name": "x"}]}, 400, "output"),
        ("/v2/models/ctr/infer", {**infer_body(), "id": 3}, 400, '"id" must be a string'),
        ("/v2/models/ctr/infer", {"inputs": [{"shape": [1]}]}, 400, 'a string "name"'),
        ("/v2/models/ctr/infer", infer_body(name=["C1"]), 400, 'a string "name"'),
        ("/v2/models/ctr/infer", infer_body(shape=[0], data=["a"]), 400, "shape [n], n >= 1"),
        ("/v2/models/ctr/infer", infer_body(shape=[1], data=[]), 400, "'C1' has no values"),
        (
            "/v2/models/ctr/infer",
            {"inputs": [{"name": "C1", "datatype": "BYTES", "shape": [1]}]},
            400,
            'neither "data" nor binary data',
        ),
    ],
)
async def test_v2_errors_use_the_protocols_shape(
    client: httpx.AsyncClient, path: str, body: Any, status: int, message: str
) -> None:
    response = await client.post(path, json=body)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def binary_request(inputs: list[dict[str, Any]], data: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def strings(*values: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(v)) + v for v in values)


@pytest.mark.parametrize(
    ("inputs", "data", "message"),
    [
        # a header length past the body
        (None, b"", "past the body"),
        # a tensor's data size that does not match its shape
        (
            [{"name": "I1", "datatype": "FP32", "shape": [3], "binary_data_size": 8}],
            b"\0" * 8,
            "2 values for shape [3]",
        ),
        # FP32 data that is not whole floats
        (
            [{"name": "I1", "datatype": "FP32", "shape": [1], "binary_data_size": 3}],
            b"\0" * 3,
            "FP32 data of 3 bytes",
        ),
        # a truncated BYTES element, and a truncated length
        (
            [{"name": "C1", "datatype": "BYTES", "shape": [1], "binary_data_size": 6}],
            struct.pack("<I", 5) + b"ab",
            "cut off",
        ),
        (
            [{"name": "C1", "datatype": "BYTES", "shape": [1], "binary_data_size": 2}],
            b"\1\0",
            "length is cut off",
        ),
        # fewer bytes than the sizes say; more bytes than they say
        (
            [{"name": "C1", "datatype": "BYTES", "shape": [1], "binary_data_size": 40}],
            strings(b"a"),
            "left",
        ),
        (
            [{"name": "C1", "datatype": "BYTES", "shape": [1], "binary_data_size": 5}],
            strings(b"a") + b"xx",
            "belong to no input",
        ),
        # not UTF-8; non-finite floats
        (
            [{"name": "C1", "datatype": "BYTES", "shape": [1], "binary_data_size": 6}],
            strings(b"\xff\xfe"),
            "not UTF-8",
        ),
        (
            [{"name": "I1", "datatype": "FP32", "shape": [1], "binary_data_size": 4}],
            struct.pack("<f", float("nan")),
            "finite",
        ),
    ],
)
async def test_malformed_binary_tensor_data_is_a_400(
    client: httpx.AsyncClient, inputs: list[dict[str, Any]] | None, data: bytes, message: str
) -> None:
    if inputs is None:
        content, headers = b"{}", {"Inference-Header-Content-Length": "99"}
    else:
        for tensor in inputs:
            tensor["parameters"] = {"binary_data_size": tensor.pop("binary_data_size")}
        content, headers = binary_request(inputs, data)
    response = await client.post("/v2/models/ctr/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


async def test_binary_answers_in_kind(client: httpx.AsyncClient, offline: Predictor) -> None:
    data = strings(b"x", b"05db9164")
    body = {
        "inputs": [
            {"name": "C1", "datatype": "BYTES", "shape": [2]}
            | {"parameters": {"binary_data_size": len(data)}},
            {"name": "I1", "datatype": "FP32", "shape": [2], "data": [3.0, 1.0]},
        ],
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}],
    }
    header = json.dumps(body).encode()
    response = await client.post(
        "/v2/models/ctr/infer",
        content=header + data,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert response.status_code == 200
    length = int(response.headers["inference-header-content-length"])
    answer = json.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"] == {"binary_data_size": 8}
    got = np.frombuffer(response.content[length:], dtype="<f4")
    expected = offline.predict_rows([{"C1": "x", "I1": 3.0}, {"C1": "05db9164", "I1": 1.0}])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


async def test_v2_refuses_bad_json(client: httpx.AsyncClient) -> None:
    broken = await client.post("/v2/models/ctr/infer", content=b"{nope")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    nested = await client.post(
        "/v2/models/ctr/infer", json=infer_body(shape=[2], data=[["a"], ["b"]])
    )
    assert nested.status_code == 400 and "flat" in nested.json()["error"]  # [2, 1], not [2]
    deep = b'{"inputs": [{"name": "C1", "datatype": "BYTES", "shape": [1], "data": '
    deep += b"[" * 900 + b"]" * 900 + b"}]}"
    assert (await client.post("/v2/models/ctr/infer", content=deep)).status_code == 400
    outputs = await client.post("/v2/models/ctr/infer", json={**infer_body(), "outputs": True})
    assert outputs.status_code == 400 and "outputs" in outputs.json()["error"]
    assert (await client.get("/v2/models/other")).status_code == 404


async def test_every_refusal_under_v2_has_the_protocols_shape(make_client: ClientFactory) -> None:
    """The errors the whole service shares (the body limit, before the app runs; a
    content type; validation of the native routes beside) are worded per endpoint."""
    async with make_client(max_body_bytes=1000) as client:
        big = infer_body(shape=[300], data=["x" * 10] * 300)
        too_large = await client.post("/v2/models/ctr/infer", json=big)
        assert too_large.status_code == 413
        assert too_large.json() == {"error": "request body larger than 1000 bytes"}
        native = await client.post("/predict_many", json={"instances": [{"C1": "x" * 2000}]})
        assert native.status_code == 413
        assert native.json() == {"detail": "request body larger than 1000 bytes"}
        typed = await client.post(
            "/v2/models/ctr/infer", content=b"{}", headers={"content-type": "text/plain"}
        )
        assert typed.status_code == 415 and set(typed.json()) == {"error"}
        assert isinstance(typed.json()["error"], str)


async def test_v2_health_and_readiness_bodies(client: httpx.AsyncClient) -> None:
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    ready = await client.get("/v2/models/ctr/ready")
    assert ready.status_code == 200 and ready.json() == {"name": "ctr", "ready": True}
    unknown = await client.get("/v2/models/other/ready")
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]


async def test_v2_needs_the_api_key_except_for_health(make_client: ClientFactory) -> None:
    async with make_client(api_key="k") as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        denied = await client.post("/v2/models/ctr/infer", json=infer_body())
        assert denied.status_code == 401 and "X-API-Key" in denied.json()["error"]
        assert denied.headers["www-authenticate"] == "X-API-Key"
        assert (await client.get("/v2/models/ctr")).status_code == 401
        allowed = await client.post(
            "/v2/models/ctr/infer", json=infer_body(), headers={"X-API-Key": "k"}
        )
        assert allowed.status_code == 200
        assert allowed.json()["outputs"][0]["shape"] == [2]


@pytest.mark.parametrize("length", [b"\xb2", b"9" * 40, b"-1", b"1e3"])  # \xb2: latin-1 "²"
async def test_a_header_length_that_is_no_byte_count_is_a_400(
    client: httpx.AsyncClient, length: bytes
) -> None:
    response = await client.post(
        "/v2/models/ctr/infer", content=b"{}", headers={"Inference-Header-Content-Length": length}
    )
    assert response.status_code == 400 and "byte count" in response.json()["error"]

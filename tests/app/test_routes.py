import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.data import criteo_json_rows
from model.predict import Predictor
from tests.app.conftest import ClientFactory, lifespan

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parent.parent / "data"
ROW = {"I1": 3, "I2": None, "I5": 17668.5, "C1": "05db9164", "C2": 80, "C20": None}


async def predict(client: httpx.AsyncClient, features: Any) -> httpx.Response:
    return await client.post("/predict", json={"features": features})


async def test_predict_answers_the_contract(client: httpx.AsyncClient, offline: Predictor) -> None:
    response = await predict(client, ROW)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"probability", "model_version"}
    assert body["model_version"] == offline.checkpoint.version
    assert body["probability"] == pytest.approx(offline.predict_rows([ROW])[0], abs=1e-6)


async def test_sample_rows_match_the_offline_model_through_both_endpoints(
    client: httpx.AsyncClient, offline: Predictor
) -> None:
    rows = criteo_json_rows(DATA / "criteo_sample.tsv")
    expected = offline.predict_rows(rows)
    many = await client.post("/predict_many", json={"instances": rows})
    assert many.status_code == 200
    np.testing.assert_allclose(many.json()["probabilities"], expected, rtol=0, atol=1e-6)
    singles = await asyncio.gather(*(predict(client, row) for row in rows))
    got = [r.json()["probability"] for r in singles]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def random_rows(offline: Predictor, count: int, seed: int, values: int) -> list[dict[str, Any]]:
    """Rows mixing known values (the first ``values`` of each vocabulary), unseen values,
    nulls and absent fields."""
    rng = random.Random(seed)
    vocab = {
        f.name: list(offline.checkpoint.vocabulary(f.name).values[:values])
        for f in offline.features.embedded_fields
    }
    rows = []
    for _ in range(count):
        row: dict[str, Any] = {}
        for i in range(1, 14):
            if rng.random() < 0.8:
                row[f"I{i}"] = rng.choice([0, 1, 5, 42, 1e4, -1, 2.5])
        for i in range(1, 27):
            name, roll = f"C{i}", rng.random()
            if roll < 0.6:
                row[name] = rng.choice(vocab[name])
            elif roll < 0.8:
                row[name] = f"unseen-{rng.randrange(10**6)}"
            elif roll < 0.9:
                row[name] = None
        rows.append(row)
    return rows


async def test_concurrent_calls_are_batched_and_equal_unbatched(
    client: httpx.AsyncClient, offline: Predictor
) -> None:
    rows = random_rows(offline, 300, seed=5, values=50)
    responses = await asyncio.gather(*(predict(client, row) for row in rows))
    assert all(r.status_code == 200 for r in responses)
    got = [r.json()["probability"] for r in responses]
    np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)
    metrics = (await client.get("/metrics")).text
    calls = sample(metrics, "ctr_batch_calls_count")
    assert calls < 300  # some forward passes served several calls at once


def sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_predict_many_keeps_order_and_chunks(
    make_client: ClientFactory, offline: Predictor
) -> None:
    rows = random_rows(offline, 1000, seed=9, values=20)
    async with make_client(chunk_rows=128) as client:
        response = await client.post("/predict_many", json={"instances": rows})
    assert response.status_code == 200
    np.testing.assert_allclose(
        response.json()["probabilities"], offline.predict_rows(rows), rtol=0, atol=1e-6
    )


async def test_missing_null_and_unseen_values(client: httpx.AsyncClient) -> None:
    empty = (await predict(client, {})).json()["probability"]
    nulls = (await predict(client, {"I1": None, "C1": None})).json()["probability"]
    unseen = (await predict(client, {"C1": "never-seen-value"})).json()["probability"]
    assert empty == nulls == unseen  # a missing field is null; an unseen value is OOV
    as_int = (await predict(client, {"C2": 80})).json()["probability"]
    as_str = (await predict(client, {"C2": "80"})).json()["probability"]
    assert as_int == as_str  # an integer is the same value as its decimal string


@pytest.mark.parametrize(
    ("features", "field", "kind"),
    [
        ({"C99": "x"}, "C99", "extra_forbidden"),
        ({"str": 1}, "str", "extra_forbidden"),  # once mistaken for a union member's tag
        ({"int": "x"}, "int", "extra_forbidden"),
        ({"constrained-str": 1}, "constrained-str", "extra_forbidden"),
        ({"I1": "3"}, "I1", "dense_type"),
        ({"I1": True}, "I1", "dense_type"),
        ({"I1": [1]}, "I1", "dense_type"),
        ({"C1": 1.5}, "C1", "sparse_type"),
        ({"C1": True}, "C1", "sparse_type"),
        ({"C1": ["a"]}, "C1", "sparse_type"),
        ({"C1": {"a": 1}}, "C1", "sparse_type"),
        ({"C1": 2.5}, "C1", "sparse_type"),
        ({"C1": 1e300}, "C1", "sparse_type"),
        ({"C1": 2**63}, "C1", "sparse_type"),  # sparse integers are int64
        ({"C1": -(2**63) - 1}, "C1", "sparse_type"),
    ],
)
async def test_bad_values_are_422_naming_the_field(
    client: httpx.AsyncClient, features: dict[str, Any], field: str, kind: str
) -> None:
    response = await predict(client, features)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "features", field] and error["type"] == kind
    many = await client.post("/predict_many", json={"instances": [{}, {}, features]})
    assert many.status_code == 422
    assert many.json()["detail"][0]["loc"] == ["body", "instances", 2, field]


async def test_the_longest_string_and_the_widest_integers_are_accepted(
    client: httpx.AsyncClient,
) -> None:
    for value in ("x" * 256, 2**63 - 1, -(2**63)):
        response = await predict(client, {"C1": value})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
async def test_non_finite_dense_values_are_422(client: httpx.AsyncClient, token: bytes) -> None:
    response = await client.post(
        "/predict",
        content=b'{"features": {"I1": ' + token + b"}}",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][:3] == ["body", "features", "I1"]


@pytest.mark.parametrize(
    ("path", "content", "status"),
    [
        ("/predict", b"{not json", 422),
        ("/predict", b"", 422),
        ("/predict", b"[]", 422),
        ("/predict", b'{"features": {}, "extra": 1}', 422),
        ("/predict", b'{"feature": {}}', 422),
        ("/predict", b'{"features": []}', 422),
        ("/predict_many", b'{"instances": []}', 422),
        ("/predict_many", b'{"instances": {}}', 422),
        ("/predict_many", b'{"instances": [1]}', 422),
    ],
)
async def test_malformed_bodies_are_422(
    client: httpx.AsyncClient, path: str, content: bytes, status: int
) -> None:
    response = await client.post(
        path, content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail and "msg" in detail[0]
    assert "Traceback" not in response.text


async def test_non_json_content_type_is_415(client: httpx.AsyncClient) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = await client.post(
            "/predict", content=b'{"features": {}}', headers={"content-type": content_type}
        )
        assert response.status_code == 415, content_type
    ok = await client.post(
        "/predict",
        content=b'{"features": {}}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200


async def test_too_many_instances_is_413(make_client: ClientFactory) -> None:
    async with make_client(max_instances=5) as client:
        ok = await client.post("/predict_many", json={"instances": [{}] * 5})
        over = await client.post("/predict_many", json={"instances": [{}] * 6})
    assert ok.status_code == 200 and len(ok.json()["probabilities"]) == 5
    assert over.status_code == 413
    assert "5" in over.json()["detail"]


async def test_large_bodies_are_413_before_parsing(make_client: ClientFactory) -> None:
    body = json.dumps({"instances": [{"C1": "x" * 50}] * 40}).encode()
    async with make_client(max_body_bytes=1000) as client:
        declared = await client.post(
            "/predict_many", content=body, headers={"content-type": "application/json"}
        )

        async def chunks():  # no Content-Length: the limit is counted as the body streams
            for i in range(0, len(body), 256):
                yield body[i : i + 256]

        streamed = await client.post(
            "/predict_many", content=chunks(), headers={"content-type": "application/json"}
        )
        small = await client.post("/predict", json={"features": {}})
        metrics = (await client.get("/metrics")).text
    assert declared.status_code == 413 and "1000 bytes" in declared.json()["detail"]
    assert streamed.status_code == 413
    assert small.status_code == 200
    # Both refusals are counted as what the client got (the streamed one was once a 500).
    assert 'ctr_requests_total{endpoint="/predict_many",status="413"} 2.0' in metrics
    assert 'status="500"' not in metrics


async def test_operational_endpoints(client: httpx.AsyncClient, offline: Predictor) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "model_version": offline.checkpoint.version,
        "embedding_store": {"backend": "memory", "state": "ok"},
    }
    model = (await client.get("/model")).json()
    assert model["model_version"] == offline.checkpoint.version
    fields = {f["name"]: f for f in model["fields"]}
    assert fields["I1"]["kind"] == "dense" and fields["C1"]["kind"] == "sparse"
    assert fields["C1"]["vocab_size"] == offline.features.by_name["C1"].vocab_size
    assert model["embed_dim"] == 16 and model["hidden_units"] == [128, 64]
    assert model["metrics"]["test_auc"] > 0.7 and model["created_at"]


async def test_metrics_count_requests_batches_and_lookups(client: httpx.AsyncClient) -> None:
    await predict(client, ROW)
    await predict(client, {"I1": "bad"})
    await client.post("/predict_many", json={"instances": [ROW, ROW, ROW]})
    text = (await client.get("/metrics")).text
    assert 'ctr_requests_total{endpoint="/predict",status="200"}' in text
    assert 'ctr_requests_total{endpoint="/predict",status="422"}' in text
    assert 'ctr_request_latency_seconds_bucket{endpoint="/predict_many"' in text
    assert sample(text, "ctr_rows_predicted_total") >= 4  # 1 + 3 (+ the warm-up row)
    assert sample(text, "ctr_batch_rows_sum") >= 4
    assert 'ctr_embedding_lookups_total{tier="tables"}' in text
    assert 'ctr_errors_total{kind="InvalidRequest"} 1.0' in text
    assert 'ctr_model_info{version="deepfm-5c148811044d"} 1.0' in text


async def test_api_key(make_client: ClientFactory) -> None:
    async with make_client(api_key="s3cret") as client:
        missing = await predict(client, {})
        wrong = await client.post("/predict", json={"features": {}}, headers={"X-API-Key": "x"})
        right = await client.post(
            "/predict", json={"features": {}}, headers={"X-API-Key": "s3cret"}
        )
        many = await client.post("/predict_many", json={"instances": [{}]})
        model = await client.get("/model")
        model_ok = await client.get("/model", headers={"X-API-Key": "s3cret"})
        health = [(await client.get(p)).status_code for p in ("/healthz", "/readyz", "/metrics")]
    assert missing.status_code == wrong.status_code == many.status_code == 401
    assert model.status_code == 401 and model_ok.status_code == 200
    assert missing.json() == {"detail": "missing or invalid X-API-Key"}
    assert right.status_code == 200
    assert health == [200, 200, 200]


async def test_openapi_documents_the_real_fields(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    features = schema["components"]["schemas"]["Features"]
    assert set(features["properties"]) == {f"I{i}" for i in range(1, 14)} | {
        f"C{i}" for i in range(1, 27)
    }
    assert features["additionalProperties"] is False
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["features"]["$ref"].endswith("/Features")


async def test_unknown_paths_and_methods_are_4xx(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).status_code == 404
    assert (await client.get("/predict")).status_code == 405
    text = (await client.get("/metrics")).text
    assert 'ctr_requests_total{endpoint="other",status="404"}' in text


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/predict", [(b"content-type", b"application/json")]),
        ("/v2/models/ctr/infer", [(b"content-type", b"application/json")]),
        ("/v2/models/ctr/infer", [(b"inference-header-content-length", b"10")]),  # binary
    ],
)
async def test_a_client_that_disconnects_mid_body_is_not_an_error(
    path: str, headers: list[tuple[bytes, bytes]]
) -> None:
    """It used to surface as an unexpected error (500, with a traceback in the log), and
    still did on the v2 route."""

    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings())
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async with lifespan(app) as manager:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "headers": headers,
            "state": manager._state,
        }  # the lifespan state, as a server would pass it
        await app(scope, receive, send)
        metrics = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=metrics, base_url="http://ctr") as client:
            text = (await client.get("/metrics")).text
    assert sent[0]["status"] == 499
    assert 'ctr_errors_total{kind="ClientGone"} 1.0' in text
    assert 'status="500"' not in text
    assert 'kind="internal"' not in text

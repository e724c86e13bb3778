"""The defects of the hardening issue, one test (or a few) each, over the real app:
the admin endpoint's guard rails and content types, long sparse values, the
row-budgeted queue, metrics that mean what they say, and the v2 error paths."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.metrics import Metrics
from model.checkpoint import Checkpoint, load_checkpoint
from model.default_model import DEFAULT_MODEL_DIR
from model.features import KEY_CHARS, Field, Vocabulary, value_key
from model.predict import Predictor
from tests.app.conftest import ClientFactory
from tests.app.test_redis_store import metric
from tests.checkpoints import random_checkpoint
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.anyio

JSON = {"content-type": "application/json"}


@pytest.fixture
def models_root(tmp_path: Path) -> Path:
    """A models root holding a copy of the default model, as ``models/`` does."""
    root = tmp_path / "models"
    shutil.copytree(DEFAULT_MODEL_DIR, root / "default")
    return root


# -- 1 and 6: /admin/reload


async def test_admin_endpoints_are_off_without_a_key(make_client: ClientFactory) -> None:
    async with make_client() as client:
        response = await client.post("/admin/reload")
    assert response.status_code == 403 and "CTR_API_KEY" in response.json()["detail"]


async def test_a_non_json_reload_body_is_415_not_500(
    make_client: ClientFactory, models_root: Path
) -> None:
    settings = {"models_root": models_root, "model_dir": models_root / "default"}
    async with make_client(api_key="k", **settings) as client:
        key = {"X-API-Key": "k"}
        plain = await client.post(
            "/admin/reload",
            content=b'{"model_dir": ""}',
            headers={**key, "content-type": "text/plain"},
        )
        garbage = await client.post("/admin/reload", content=b"\xff", headers={**key, **JSON})
        empty = await client.post("/admin/reload", headers=key)  # no body: CTR_MODEL_DIR
        unkeyed = await client.post("/admin/reload", json={})
    assert plain.status_code == 415 and "Content-Type" in plain.json()["detail"]
    assert garbage.status_code == 422 and garbage.json()["detail"][0]["type"] == "json_invalid"
    assert empty.status_code == 200
    assert unkeyed.status_code == 401


async def test_model_dir_must_lie_in_the_models_root(
    make_client: ClientFactory, models_root: Path, tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(tiny_checkpoint.path, outside)
    (models_root / "escape").symlink_to(outside)  # a link that leaves the root
    shutil.copytree(tiny_checkpoint.path, models_root / "tiny")
    settings = {
        "admin_endpoints": True,
        "models_root": models_root,
        "model_dir": models_root / "default",
    }
    async with make_client(**settings) as client:

        async def reload(model_dir: str) -> httpx.Response:
            return await client.post("/admin/reload", json={"model_dir": model_dir})

        for refused in ["../outside", str(outside), "escape", "/etc", "tiny/../../outside"]:
            response = await reload(refused)
            assert response.status_code == 403, refused
            assert "models root" in response.json()["detail"]
        for missing in ["", "nope", "tiny/vocab", "\x00"]:  # schema-valid, nothing there
            assert (await reload(missing)).status_code == 404, missing
        assert (await client.get("/model")).json()["model_version"] != tiny_checkpoint.version
        relative = await reload("tiny")
        assert relative.status_code == 200
        assert relative.json()["model_version"] == tiny_checkpoint.version
        absolute = await reload(str(models_root / "default"))
        assert absolute.status_code == 200


async def test_every_post_answers_a_wrong_content_type_with_415(
    make_client: ClientFactory,
) -> None:
    async with make_client(admin_endpoints=True) as client:
        for path in ["/predict", "/predict_many", "/admin/reload", "/v2/models/ctr/infer"]:
            response = await client.post(
                path, content=b"{}", headers={"content-type": "text/plain"}
            )
            assert response.status_code == 415, path


async def test_the_openapi_document_lists_every_status(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    for path in ["/predict", "/predict_many"]:
        assert set(paths[path]["post"]["responses"]) >= {"200", "401", "413", "415", "422", "503"}
    reload = paths["/admin/reload"]["post"]
    assert set(reload["responses"]) >= {"200", "401", "403", "404", "415", "422", "503"}
    assert reload["requestBody"]["required"] is False
    v2 = paths["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert set(v2["responses"]) >= {"200", "400", "404", "413", "415"}
    assert "422" not in v2["responses"]
    names = {p["name"]: p["schema"].get("enum") for p in v2["parameters"]}
    version = (await client.get("/model")).json()["model_version"]
    assert names == {"name": ["ctr"], "version": [version]}


# -- 2: long sparse values


def long_values_checkpoint(directory: Path) -> Checkpoint:
    """A checkpoint whose vocabulary holds values of every length: short ones, one at the
    digest threshold, URLs and a user agent past it, and 5,000 characters."""
    url = "https://example.com/" + "path/" * 40 + "?q=" + "x" * 50
    values = (
        "short",
        "k" * KEY_CHARS,
        url,
        url + "2",  # differs only at its end
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 " * 4,
        "é" * 5000,
    )
    fields = (
        Field("U", "category", vocab=Vocabulary(values)),
        Field("D", "log", {"missing": 0.0}),
    )
    return random_checkpoint(directory, fields, seed=5, scale=1.0)


def test_long_values_are_found_by_their_digest(tmp_path: Path) -> None:
    checkpoint = long_values_checkpoint(tmp_path / "long")
    vocab = checkpoint.vocabulary("U")
    values = [*vocab.values, "unseen" * 30, None]
    ids, _ = checkpoint.features.encode_rows([{"U": v} for v in values])
    assert ids[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 0, 0]
    column = np.array(values, dtype=object)
    assert vocab.lookup(column).tolist() == [1, 2, 3, 4, 5, 6, 0, 0]
    # A key costs at most 34 characters whatever the value's length.
    assert max(len(value_key(v)) for v in vocab.values) <= max(KEY_CHARS, 34)
    assert value_key("k" * KEY_CHARS) == "k" * KEY_CHARS


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_long_values_score_as_the_offline_model_scores_them(
    make_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, store: str
) -> None:
    checkpoint = long_values_checkpoint(tmp_path / "long")
    vocab = checkpoint.vocabulary("U")
    rows: list[dict[str, Any]] = [{"U": v, "D": float(i)} for i, v in enumerate(vocab.values)]
    rows.append({"U": "never seen " * 1000})
    expected = Predictor(checkpoint).predict_rows(rows)
    settings: dict[str, Any] = {"model_dir": checkpoint.path}
    if store == "redis":
        settings |= {"redis_url": redis_server.url, "hold_tables": False, "local_cache_rows": 2}
    async with make_client(**settings) as client:
        for _ in range(2):  # cold, then through the cache (which evicts: 2 rows)
            response = await client.post("/predict_many", json={"instances": rows})
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(
                response.json()["probabilities"], expected, rtol=0, atol=1e-6
            )
        each = [
            (await client.post("/predict", json={"features": row})).json()["probability"]
            for row in rows
        ]
        np.testing.assert_allclose(each, expected, rtol=0, atol=1e-6)
        assert (await client.get("/readyz")).json()["embedding_store"]["state"] == "ok"
    if store == "redis":
        with redis_server.client() as r:
            fields = [f for key in r.scan_iter("ctr:rows:*") for f in r.hkeys(key)]
        assert max(len(f) for f in fields) <= KEY_CHARS * 2  # (bytes: "k"*64, digests)


async def test_integral_floats_are_the_integer(client: httpx.AsyncClient) -> None:
    as_int = await client.post("/predict", json={"features": {"C1": 80}})
    as_float = await client.post("/predict", content=b'{"features": {"C1": 80.0}}', headers=JSON)
    assert as_float.status_code == 200
    assert as_float.json()["probability"] == as_int.json()["probability"]
    beyond = await client.post(
        "/predict", content=b'{"features": {"C1": -9223372036854775809}}', headers=JSON
    )
    assert beyond.status_code == 422


# -- 4: rows, not calls, bound the queue and the forward pass


async def test_the_queue_limit_in_rows_answers_503_with_retry_after(
    make_client: ClientFactory, offline: Predictor
) -> None:
    rows = [{"C1": str(i), "I1": i} for i in range(400)]
    expected = offline.predict_rows(rows)
    async with make_client(max_queued_rows=500, max_instances=400, chunk_rows=64) as client:
        responses = await asyncio.gather(
            *(client.post("/predict_many", json={"instances": rows}) for _ in range(6))
        )
        metrics = (await client.get("/metrics")).text
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "six 400-row calls never passed a 500-row queue"
    assert all(r.headers["retry-after"] == "1" and "rows" in r.json()["detail"] for r in refused)
    for response in responses:
        if response.status_code == 200:
            np.testing.assert_allclose(
                response.json()["probabilities"], expected, rtol=0, atol=1e-6
            )
        else:
            assert response.status_code == 503
    assert metric(metrics, "ctr_overloaded_total") == len(refused)


async def test_a_big_call_is_scored_in_chunks_that_take_turns(
    make_client: ClientFactory, offline: Predictor
) -> None:
    """A 1,000-row call with a 100-row budget: no forward pass holds more than 100 rows,
    single calls sent meanwhile are answered, and every answer is exact."""
    rows = [{"C1": str(i), "I1": i % 50} for i in range(1000)]
    singles = rows[:40]
    async with make_client(chunk_rows=100) as client:
        big, *small = await asyncio.gather(
            client.post("/predict_many", json={"instances": rows}),
            *(client.post("/predict", json={"features": row}) for row in singles),
        )
        metrics = (await client.get("/metrics")).text
    np.testing.assert_allclose(
        big.json()["probabilities"], offline.predict_rows(rows), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(
        [r.json()["probability"] for r in small], offline.predict_rows(singles), atol=1e-6
    )
    # No pass had more than 100 rows (the histogram's 128 bucket holds them all).
    assert metric(metrics, 'ctr_batch_rows_bucket{le="128.0"}') == metric(
        metrics, "ctr_batch_rows_count"
    )
    assert metric(metrics, "ctr_batch_rows_count") >= 10


def test_the_queue_in_rows_can_hold_the_largest_call() -> None:
    with pytest.raises(ValueError, match="max_queued_rows"):
        Settings(max_instances=10_000, max_queued_rows=5_000)


# -- 7: lifecycle


async def test_a_store_is_closed_when_warm_up_fails(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app import runtime as runtime_module
    from app.serving import ServingModel

    def broken(self: ServingModel) -> Any:
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr(ServingModel, "warm", broken)
    before = {t.get_name() for t in asyncio.all_tasks()}
    settings = Settings(redis_url=redis_server.url)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        await runtime_module.Runtime.start(settings, Metrics())
    leftover = {t.get_name() for t in asyncio.all_tasks()} - before
    assert "redis-store-watcher" not in leftover
    with redis_server.client() as r:  # no connection of the store is left open
        clients = [c for c in r.client_list() if c.get("cmd") != "client|list"]
    assert clients == []


async def test_a_wrong_password_is_one_warning_and_the_reason_in_readyz(
    make_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        with server.client() as r:
            r.config_set("requirepass", "right")
        url = server.url.replace("redis://", "redis://:wrong@")
        async with make_client(redis_url=url) as client:
            store = (await client.get("/readyz")).json()["embedding_store"]
            assert store["state"] == "degraded"
            assert "AuthenticationError" in store["reason"] or "WRONGPASS" in store["reason"]
            await asyncio.sleep(0)
            probes = 0
            while probes < 4:  # the watcher keeps probing, twice a second
                await asyncio.sleep(0.5)
                probes += 1
    finally:
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("redis tier" in w for w in warnings) == 1, warnings


async def test_model_info_keeps_one_series(
    make_client: ClientFactory, tiny_checkpoint: Checkpoint
) -> None:
    async with make_client(admin_endpoints=True, models_root=Path("/")) as client:
        for target in [tiny_checkpoint.path, DEFAULT_MODEL_DIR]:
            response = await client.post("/admin/reload", json={"model_dir": str(target)})
            assert response.status_code == 200
        metrics = (await client.get("/metrics")).text
    series = [line for line in metrics.splitlines() if line.startswith("ctr_model_info{")]
    assert series == [
        f'ctr_model_info{{version="{load_checkpoint(DEFAULT_MODEL_DIR).version}"}} 1.0'
    ]


# -- 8: metrics


async def test_v2_requests_are_counted_by_route_template(client: httpx.AsyncClient) -> None:
    await client.get("/v2/models/ctr")
    await client.get("/v2/models/nope/ready")
    metrics = (await client.get("/metrics")).text
    assert 'ctr_requests_total{endpoint="/v2/models/{name}",status="200"} 1.0' in metrics
    assert 'ctr_requests_total{endpoint="/v2/models/{name}/ready",status="404"} 1.0' in metrics
    assert 'ctr_requests_total{endpoint="other"' not in metrics


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_missing_values_are_not_lookups(
    make_client: ClientFactory,
    redis_server: RedisServer,
    default_checkpoint: Checkpoint,
    store: str,
) -> None:
    settings = {"redis_url": redis_server.url} if store == "redis" else {}
    vocab = default_checkpoint.vocabulary("C1")
    async with make_client(**settings) as client:
        before = (await client.get("/metrics")).text
        # 26 embedded fields: 1 known value, 1 unseen, 24 missing.
        row = {"C1": vocab.values[0], "C2": "never-seen-value"}
        assert (await client.post("/predict", json={"features": row})).status_code == 200
        after = (await client.get("/metrics")).text

    def grew(name: str) -> float:
        return metric(after, name) - metric(before, name)

    tier = "lru" if store == "redis" else "tables"
    assert grew("ctr_embedding_missing_total") == 24
    assert grew(f'ctr_embedding_lookups_total{{tier="{tier}"}}') == 2
    if store == "memory":
        assert grew('ctr_embedding_hits_total{tier="tables"}') == 1
        assert grew("ctr_embedding_oov_total") == 1


# -- 10: the v2 error paths


async def test_v2_too_many_rows_is_413_as_natively(make_client: ClientFactory) -> None:
    tensor = {"name": "C1", "datatype": "BYTES", "shape": [3], "data": ["a", "b", "c"]}
    async with make_client(max_instances=2) as client:
        v2 = await client.post("/v2/models/ctr/infer", json={"inputs": [tensor]})
        native = await client.post("/predict_many", json={"instances": [{}, {}, {}]})
    assert v2.status_code == native.status_code == 413
    assert "at most 2" in v2.json()["error"]


async def test_a_big_body_validated_in_slices_says_what_one_pass_says(
    client: httpx.AsyncClient, default_checkpoint: Checkpoint, offline: Predictor
) -> None:
    """A body past SLICED_BODY_BYTES is validated a slice at a time (the event loop free
    between slices): its answers and its errors are the one-pass validation's."""
    from pydantic import ValidationError

    from app.routes import SLICE_ROWS, SLICED_BODY_BYTES
    from app.schemas import RequestSchemas, error_details

    rows: list[dict[str, Any]] = [
        {"C1": f"value-{i}", "C2": i, "I1": float(i % 7), "C3": "x" * 200} for i in range(2000)
    ]
    raw = json.dumps({"instances": rows}).encode()
    assert len(raw) > SLICED_BODY_BYTES and len(rows) > 4 * SLICE_ROWS
    good = await client.post("/predict_many", content=raw, headers=JSON)
    np.testing.assert_allclose(
        good.json()["probabilities"], offline.predict_rows(rows), rtol=0, atol=1e-6
    )
    bad_rows = [dict(r) for r in rows]
    bad_rows[3]["C1"] = 1.5
    bad_rows[SLICE_ROWS]["I1"] = "x"  # the first row of the second slice
    bad_rows[1999]["C2"] = -(2**63) - 1
    bad_rows[1000]["nope"] = 1
    bad = json.dumps({"instances": bad_rows}).encode()
    response = await client.post("/predict_many", content=bad, headers=JSON)
    assert response.status_code == 422
    schemas = RequestSchemas.build(default_checkpoint.features)
    with pytest.raises(ValidationError) as one_pass:
        schemas.predict_many.validate_json(bad)
    assert response.json()["detail"] == error_details(one_pass.value)
    locs = [d["loc"][2] for d in response.json()["detail"]]
    assert locs == [3, SLICE_ROWS, 1000, 1999]
    broken = await client.post("/predict_many", content=raw[:-1], headers=JSON)
    assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"

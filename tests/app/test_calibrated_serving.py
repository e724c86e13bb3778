"""A checkpoint that carries a down-sampling correction and a calibration map is served
through it on every endpoint, exactly as the offline Predictor computes."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.predlog import export_stream
from model.calibrate import calibrate
from model.checkpoint import Checkpoint, load_checkpoint
from model.data import CRITEO_SCHEMA, criteo_json_rows
from model.join import read_log
from model.predict import Predictor
from model.synthetic import read_truth
from tests.app.conftest import ClientFactory
from tests.conftest import PLANTED_HELD_OUT, PLANTED_ROWS
from tests.redis_servers import RedisServer
from tests.server_process import start

pytestmark = pytest.mark.anyio
FIRST_HELD_OUT = PLANTED_ROWS - round(PLANTED_ROWS * PLANTED_HELD_OUT)


@pytest.fixture(scope="module")
def held_out(planted_tsv: Path) -> list[dict[str, object]]:
    return criteo_json_rows(planted_tsv)[FIRST_HELD_OUT:]


@pytest.fixture(scope="module")
def isotonic_dir(
    sampled_checkpoint: Checkpoint, planted_tsv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The sampled model with an isotonic map over its correction, fitted on 20,000 rows
    of its validation split."""
    tmp = tmp_path_factory.mktemp("isotonic")
    splits = sampled_checkpoint.training["splits"]
    lines = planted_tsv.read_text().splitlines(keepends=True)
    valid = tmp / "valid.tsv"
    valid.write_text("".join(lines[splits["train"] : splits["train"] + 20_000]))
    calibrate(sampled_checkpoint.path, [valid], "criteo", CRITEO_SCHEMA, "isotonic", tmp / "model")
    return tmp / "model"


async def predict_all(
    make_client: ClientFactory, directory: Path, rows: list[dict[str, object]]
) -> np.ndarray:
    out: list[float] = []
    async with make_client(model_dir=directory) as client:
        for start in range(0, len(rows), 1000):
            response = await client.post(
                "/predict_many", json={"instances": rows[start : start + 1000]}
            )
            assert response.status_code == 200, response.text
            out += response.json()["probabilities"]
    return np.array(out)


async def test_served_probabilities_are_corrected_to_the_true_rate(
    make_client: ClientFactory,
    sampled_checkpoint: Checkpoint,
    planted_tsv: Path,
    held_out: list[dict[str, object]],
) -> None:
    served = await predict_all(make_client, sampled_checkpoint.path, held_out)
    offline = Predictor(sampled_checkpoint).predict_rows(held_out)
    np.testing.assert_allclose(served, offline, rtol=1e-6, atol=1e-7)
    true_ctr = read_truth(planted_tsv)[FIRST_HELD_OUT:].mean()
    assert abs(served.mean() / true_ctr - 1) < 0.02


async def test_every_endpoint_serves_the_calibrated_probability(
    make_client: ClientFactory, isotonic_dir: Path, held_out: list[dict[str, object]]
) -> None:
    checkpoint = load_checkpoint(isotonic_dir)
    rows = held_out[:50]
    offline = Predictor(checkpoint).predict_rows(rows)
    async with make_client(model_dir=isotonic_dir) as client:
        described = (await client.get("/model")).json()["calibration"]
        assert described["method"] == "isotonic" and described["negative_rate"] == 0.1
        assert described["breakpoints"] == len(checkpoint.calibration.x)

        one = (await client.post("/predict", json={"features": rows[0]})).json()
        np.testing.assert_allclose(one["probability"], offline[0], rtol=1e-6, atol=1e-7)

        many = await client.post("/predict_many", json={"instances": rows, "explain": True})
        body = many.json()
        np.testing.assert_allclose(body["probabilities"], offline, rtol=1e-6, atol=1e-7)
        for probability, explanation in zip(
            body["probabilities"], body["explanations"], strict=True
        ):
            # The logit is the model's; the explanation says which probability it served.
            assert explanation["probability"] == probability
            logit = np.float64(explanation["logit"])
            served = checkpoint.calibration.probabilities(np.array([logit]))[0]
            assert served == pytest.approx(probability, rel=1e-6)

        context = {k: v for k, v in rows[0].items() if k.startswith("C1")}
        candidates = [{k: v for k, v in row.items() if k not in context} for row in rows]
        merged = [{**context, **c} for c in candidates]
        ranked = await client.post("/rank", json={"context": context, "candidates": candidates})
        np.testing.assert_allclose(
            ranked.json()["probabilities"],
            Predictor(checkpoint).predict_rows(merged),
            rtol=1e-6,
            atol=1e-7,
        )

        inputs = []
        for f in checkpoint.features.fields:
            sparse = f.kind == "sparse"
            data = [
                ("" if r.get(f.name) is None else str(r[f.name])) if sparse else r.get(f.name)
                for r in rows
            ]
            datatype = "BYTES" if sparse else "FP32"
            inputs.append(
                {"name": f.name, "datatype": datatype, "shape": [len(rows)], "data": data}
            )
        v2 = await client.post("/v2/models/ctr/infer", json={"inputs": inputs})
        assert v2.status_code == 200, v2.text
        np.testing.assert_allclose(v2.json()["outputs"][0]["data"], offline, rtol=1e-6, atol=1e-7)


def test_two_workers_in_redis_mode_serve_calibrated_and_log_to_the_stream(
    isotonic_dir: Path, held_out: list[dict[str, object]], tmp_path: Path
) -> None:
    """As users run it: python -m app, 2 workers, rows from Redis (no tables held), every
    call logged to a Redis stream; the answers are the offline calibrated ones."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        process, url = start(
            CTR_MODEL_DIR=str(isotonic_dir),
            CTR_WORKERS="2",
            CTR_REDIS_URL=redis.url,
            CTR_HOLD_TABLES="false",
            CTR_REDIS_TIMEOUT_MS="2000",
            CTR_LOG_SAMPLE_RATE="1",
            CTR_LOG_STREAM="predictions",
            CTR_LOG_LEVEL="error",
        )
        rows = held_out[:200]
        try:
            with httpx.Client(base_url=url) as client:
                served = [
                    client.post(
                        "/predict_many",
                        json={"instances": rows[i : i + 20]},
                        headers={"X-Request-ID": f"r{i}"},
                    )
                    for i in range(0, 200, 20)
                ]
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
        assert process.returncode == 0
        assert all(a.status_code == 200 for a in served)
        got = [p for a in served for p in a.json()["probabilities"]]
        offline = Predictor(load_checkpoint(isotonic_dir)).predict_rows(rows)
        np.testing.assert_allclose(got, offline, rtol=1e-6, atol=1e-7)
        logged = tmp_path / "logged.jsonl"
        count, _ = export_stream(redis.client(), "predictions", logged)
        assert count == 200  # (the workers flushed their logs as they stopped)
        by_key = {(r["request_id"], r["row"]): r["probability"] for r in read_log([logged])}
        assert [by_key[f"r{i - i % 20}", i % 20] for i in range(200)] == got
    finally:
        redis.stop()

"""Fuzzing the running service (``python -m app`` over real HTTP): schemathesis's own run
over every operation of its /openapi.json (every phase, every check) in both stores, and
hypothesis throwing arbitrary JSON and bytes at both prediction endpoints. Never a 5xx;
every answer is documented and has its documented shape."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.data import CRITEO_DENSE, CRITEO_SPARSE
from tests.redis_servers import RedisServer
from tests.server_process import start

FIELDS = list(CRITEO_DENSE + CRITEO_SPARSE)


API_KEY = "fuzz-key"
CONFIG = Path(__file__).with_name("schemathesis.toml")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
EXAMPLES = 40  # per operation and phase


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_schemathesis_finds_no_failure(store: str, tmp_path: Path) -> None:
    """schemathesis's own run, as its users run it: every phase (examples, coverage,
    fuzzing, stateful) and every check, status-code and content-type conformance and
    auth included, over every operation of the server's /openapi.json, against the
    real server with an API key (so the admin endpoint is on) in each store, with two
    workers as users run it on a machine of two cores or more."""
    env = {"CTR_API_KEY": API_KEY, "CTR_LOG_LEVEL": "error", "CTR_WORKERS": "2"}
    redis = None
    if store == "redis":
        redis = RedisServer(tmp_path / "redis").start()
        env |= {"CTR_REDIS_URL": redis.url, "CTR_HOLD_TABLES": "false"}
    process, url = start(**env)
    report = tmp_path / "report.json"
    try:
        run = subprocess.run(
            [
                str(SCHEMATHESIS),
                "--config-file",
                str(CONFIG),
                "run",
                f"{url}/openapi.json",
                "--phases=examples,coverage,fuzzing,stateful",
                "--checks=all",
                f"--header=X-API-Key: {API_KEY}",
                f"--max-examples={EXAMPLES}",
                "--seed=20261207",  # reproducible in CI
                "--workers=1",
                "--report=json",
                f"--report-json-path={report}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"},
        )
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        if redis is not None:
            redis.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    results = json.loads(report.read_text())
    # Every operation tested, every phase run, no failure and no error.
    assert results["complete"] and results["exit_code"] == 0
    assert results["operations"]["tested"] == results["operations"]["total"] >= 16
    assert results["test_cases"]["unique_failures"] == results["test_cases"]["errored"] == 0
    assert process.returncode == 0
    # The case counts, for the CI log (pytest -rP shows them).
    print(f"schemathesis, {store} store: {results['test_cases']}")  # noqa: T201


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=12)
explain = {"explain": st.booleans() | json_values}
bodies = (
    json_values
    | st.fixed_dictionaries({"features": rows | json_values}, optional=explain)
    | st.fixed_dictionaries(
        {"instances": st.lists(rows, max_size=5) | json_values}, optional=explain
    )
)


def check_answer(response: httpx.Response, path: str) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        if path == "/predict":
            assert set(body) - {"explanation"} == {"probability", "model_version"}
            assert 0.0 <= body["probability"] <= 1.0
        else:
            assert set(body) - {"explanations"} == {"probabilities", "model_version"}
            assert all(0.0 <= p <= 1.0 for p in body["probabilities"])
    else:
        assert response.status_code in (413, 415, 422), response.text
        assert set(body) == {"detail"}
        if isinstance(body["detail"], list):
            for error in body["detail"]:
                assert {"type", "loc", "msg"} <= set(error) and error["loc"][0] == "body"


@pytest.mark.parametrize("path", ["/predict", "/predict_many"])
@given(body=bodies)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_json_is_answered_never_with_a_5xx(server_url: str, path: str, body: Any) -> None:
    content = json.dumps(body).encode()
    check_answer(httpx.post(server_url + path, content=content, headers=JSON), path)


@pytest.mark.parametrize("path", ["/predict", "/predict_many"])
@given(content=st.binary(max_size=200))
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_bytes_are_answered_never_with_a_5xx(
    server_url: str, path: str, content: bytes
) -> None:
    check_answer(httpx.post(server_url + path, content=content, headers=JSON), path)


@pytest.mark.parametrize("depth", [100, 10_000, 500_000])
def test_deep_nesting_is_a_clear_4xx(server_url: str, depth: int) -> None:
    content = b'{"features": ' + b"[" * depth + b"]" * depth + b"}"
    response = httpx.post(server_url + "/predict", content=content, headers=JSON)
    assert response.status_code in (413, 422)
    assert "detail" in response.json()


JSON = {"content-type": "application/json"}


tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(FIELDS) | st.text(max_size=4),
        "datatype": st.sampled_from(["BYTES", "FP32", "INT64"]),
        "shape": st.lists(st.integers(-2, 6), max_size=2),
    },
    optional={
        "parameters": st.fixed_dictionaries(
            {"binary_data_size": st.integers(-2, 40) | json_scalars}
        ),
        "data": json_values,
    },
)


@given(
    inputs=st.lists(tensors, max_size=4),
    data=st.binary(max_size=120),
    header=st.none() | st.integers(-3, 400).map(str) | st.text("0123456789x-+.", max_size=4),
)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
def test_arbitrary_binary_tensor_data_is_never_a_5xx(
    server_url: str, inputs: list[dict[str, Any]], data: bytes, header: str | None
) -> None:
    """The binary tensor data extension: any header length, sizes and bytes."""
    head = json.dumps({"inputs": inputs}).encode()
    length = str(len(head)) if header is None else header
    response = httpx.post(
        server_url + "/v2/models/ctr/infer",
        content=head + data,
        headers={"Inference-Header-Content-Length": length},
    )
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert set(response.json()) == {"error"}, (response.status_code, response.text)

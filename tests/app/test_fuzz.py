"""Fuzzing the running service (``python -m app`` over real HTTP): schemathesis over every
operation of its own /openapi.json, and hypothesis throwing arbitrary JSON and bytes
at both prediction endpoints. Never a 5xx; every answer has its documented shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
)

from model.data import CRITEO_DENSE, CRITEO_SPARSE

FIELDS = list(CRITEO_DENSE + CRITEO_SPARSE)


def test_every_operation_survives_generated_requests(server_url: str) -> None:
    """schemathesis (its pytest plugin does not run on pytest 9: the operations are driven
    here, each with its own hypothesis run)."""
    api = schemathesis.openapi.from_url(server_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert paths >= {("POST", "/predict"), ("POST", "/predict_many"), ("GET", "/readyz")}
    assert ("POST", "/admin/reload") in paths
    for operation in operations:
        # A reload loads a checkpoint for real: fewer of those.
        examples = 10 if operation.path == "/admin/reload" else 60

        @given(case=operation.as_strategy())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case: Any) -> None:
            case.call_and_validate(
                checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
            )

        run()


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

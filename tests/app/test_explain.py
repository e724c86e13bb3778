"""Explanations: the parts sum to the logit, the FM shares are the pairwise
interactions split in half, an OOV value contributes its OOV row, and a call without
"explain" is answered as before."""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint
from model.predict import Predictor
from tests.app.conftest import ClientFactory
from tests.app.test_routes import random_rows
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.anyio


def total(explanation: dict[str, float | dict[str, float]]) -> float:
    parts = [explanation["bias"], explanation["dnn"]]
    parts += list(explanation["first_order"].values())  # type: ignore[union-attr]
    parts += list(explanation["fm"].values())  # type: ignore[union-attr]
    return math.fsum(parts)  # type: ignore[arg-type]


def flat(explanation: dict[str, Any]) -> dict[str, float]:
    """An explanation as one flat mapping, for pytest.approx."""
    out = {}
    for key, value in explanation.items():
        if isinstance(value, dict):
            out.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            out[key] = value
    return out


def test_fm_shares_are_half_of_every_pairwise_interaction(
    default_checkpoint: Checkpoint,
) -> None:
    model = default_checkpoint.build_model()
    ids = torch.randint(0, 5, (16, default_checkpoint.config.num_fields))
    dense = torch.randn(16, default_checkpoint.config.num_dense)
    with torch.inference_mode():
        rows = model.gather(ids)
        parts = model.explain_rows(rows[..., 0], rows[..., 1:], dense)
        embeddings = rows[..., 1:].double()
        fields = embeddings.shape[1]
        brute = torch.zeros(16, fields, dtype=torch.float64)
        for f, g in itertools.permutations(range(fields), 2):
            brute[:, f] += 0.5 * (embeddings[:, f] * embeddings[:, g]).sum(dim=1)
        torch.testing.assert_close(parts["fm"].double(), brute, rtol=0, atol=1e-5)
        summed = (
            parts["bias"]
            + parts["first_order"].sum(1)
            + parts["dense_linear"].sum(1)
            + parts["fm"].sum(1)
            + parts["dnn"]
        )
        torch.testing.assert_close(summed, parts["logit"], rtol=0, atol=1e-5)
        torch.testing.assert_close(parts["logit"], model(ids, dense), rtol=0, atol=0)


async def test_explanations_sum_to_the_logit_through_both_endpoints(
    client: httpx.AsyncClient, offline: Predictor
) -> None:
    rows = random_rows(offline, 40, seed=21, values=30)
    expected = offline.predict_rows(rows)
    many = (await client.post("/predict_many", json={"instances": rows, "explain": True})).json()
    assert len(many["explanations"]) == len(rows)
    names = [f.name for f in offline.features.fields]
    embedded = [f.name for f in offline.features.embedded_fields]
    for i, explanation in enumerate(many["explanations"]):
        assert list(explanation["first_order"]) == names
        assert list(explanation["fm"]) == embedded
        assert total(explanation) == pytest.approx(explanation["logit"], abs=1e-5)
        probability = 1 / (1 + math.exp(-explanation["logit"]))
        assert probability == pytest.approx(expected[i], abs=1e-6)
        assert many["probabilities"][i] == pytest.approx(expected[i], abs=1e-6)
    one = (await client.post("/predict", json={"features": rows[0], "explain": True})).json()
    assert flat(one["explanation"]) == pytest.approx(flat(many["explanations"][0]), abs=1e-6)
    assert one["probability"] == pytest.approx(expected[0], abs=1e-6)


async def test_an_oov_value_contributes_its_oov_row(
    client: httpx.AsyncClient, default_checkpoint: Checkpoint
) -> None:
    c2 = [f.name for f in default_checkpoint.features.embedded_fields].index("C2")
    oov_weight = float(default_checkpoint.oov_rows[c2, 0])
    for value in ("never-seen", None):
        body = {"features": {"C2": value, "C1": "x"}, "explain": True}
        explanation = (await client.post("/predict", json=body)).json()["explanation"]
        assert explanation["first_order"]["C2"] == pytest.approx(oov_weight, abs=1e-7)
        assert explanation["fm"]["C2"] != 0.0  # its OOV embedding interacts like any row


async def test_without_explain_the_answer_is_unchanged(client: httpx.AsyncClient) -> None:
    row = {"I1": 3, "C1": "05db9164"}
    plain = (await client.post("/predict", json={"features": row})).json()
    assert set(plain) == {"probability", "model_version"}
    off = (await client.post("/predict", json={"features": row, "explain": False})).json()
    assert off == plain
    many = (await client.post("/predict_many", json={"instances": [row]})).json()
    assert set(many) == {"probabilities", "model_version"}
    bad = await client.post("/predict", json={"features": row, "explain": "yes"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "explain"]


async def test_explain_in_redis_mode_matches_memory_mode(
    make_client: ClientFactory, redis_server: RedisServer, offline: Predictor
) -> None:
    rows = random_rows(offline, 30, seed=5, values=30)
    body = {"instances": rows, "explain": True}
    async with make_client() as memory:
        expected = (await memory.post("/predict_many", json=body)).json()["explanations"]
    async with make_client(redis_url=redis_server.url, hold_tables=False) as redis:
        got = (await redis.post("/predict_many", json=body)).json()["explanations"]
    for a, b in zip(got, expected, strict=True):
        assert flat(a) == pytest.approx(flat(b), abs=1e-6)
    np.testing.assert_allclose([e["logit"] for e in got], [e["logit"] for e in expected])


async def test_explained_and_plain_calls_in_one_batch_each_get_their_own_answer(
    client: httpx.AsyncClient, offline: Predictor
) -> None:
    rows = random_rows(offline, 60, seed=31, values=30)
    expected = offline.predict_rows(rows)
    responses = await asyncio.gather(
        *(
            client.post("/predict", json={"features": row, "explain": i % 3 == 0})
            for i, row in enumerate(rows)
        )
    )
    for i, response in enumerate(responses):
        body = response.json()
        assert body["probability"] == pytest.approx(expected[i], abs=1e-6)
        assert ("explanation" in body) == (i % 3 == 0)
        if i % 3 == 0:
            explanation = body["explanation"]
            assert total(explanation) == pytest.approx(explanation["logit"], abs=1e-5)
    metrics = (await client.get("/metrics")).text
    calls = [line for line in metrics.splitlines() if line.startswith("ctr_batch_calls_count")]
    batches = float(calls[0].rsplit(" ", 1)[1])
    assert batches < len(rows)  # they were batched together, explained or not

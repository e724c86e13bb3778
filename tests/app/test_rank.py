"""POST /rank: one context, many candidates; exactly /predict_many on the merged rows."""

from __future__ import annotations

import random
from typing import Any

import httpx
import numpy as np
import pytest

from model.predict import Predictor
from tests.app.conftest import ClientFactory
from tests.app.test_routes import random_rows
from tests.redis_servers import RedisServer

pytestmark = pytest.mark.anyio

FIELDS = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def split(rows: list[dict[str, Any]], shared: set[str]) -> tuple[dict[str, Any], list[Any]]:
    """A ranking request from rows: the first row's ``shared`` fields as the context (a
    field it lacks is given as null), every row's other fields as a candidate."""
    context = {name: rows[0].get(name) for name in shared}
    candidates = [{k: v for k, v in row.items() if k not in shared} for row in rows]
    return context, candidates


def splits(seed: int) -> list[set[str]]:
    """Ways to share fields: none, all, the issue's (dense + half the sparse), random."""
    rng = random.Random(seed)
    return [
        set(),
        set(FIELDS),
        {*FIELDS[:13], *FIELDS[13:26]},
        *({f for f in FIELDS if rng.random() < 0.5} for _ in range(3)),
    ]


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_rank_is_predict_many_of_the_merged_rows(
    make_client: ClientFactory, redis_server: RedisServer, offline: Predictor, store: str
) -> None:
    rows = random_rows(offline, 60, seed=21, values=25)
    settings = {"redis_url": redis_server.url, "hold_tables": False} if store == "redis" else {}
    async with make_client(**settings) as client:
        for shared in splits(seed=4):
            context, candidates = split(rows, shared)
            merged = [{**context, **candidate} for candidate in candidates]
            for explain in (False, True):
                body = {"context": context, "candidates": candidates, "explain": explain}
                ranked = await client.post("/rank", json=body)
                assert ranked.status_code == 200, ranked.text
                many = await client.post(
                    "/predict_many", json={"instances": merged, "explain": explain}
                )
                np.testing.assert_allclose(
                    ranked.json()["probabilities"], many.json()["probabilities"], atol=1e-6
                )
                np.testing.assert_allclose(
                    ranked.json()["probabilities"],
                    offline.predict_rows(merged),
                    rtol=0,
                    atol=1e-6,
                )
                assert ranked.json()["model_version"] == offline.checkpoint.version
                if explain:
                    assert ranked.json()["explanations"] == many.json()["explanations"]
                else:
                    assert "explanations" not in ranked.json()


async def test_a_big_ranking_goes_in_chunks_and_stays_exact(
    make_client: ClientFactory, offline: Predictor
) -> None:
    rows = random_rows(offline, 700, seed=5, values=30)
    context, candidates = split(rows, set(FIELDS[:20]))
    async with make_client(chunk_rows=128) as client:
        ranked = await client.post("/rank", json={"context": context, "candidates": candidates})
    merged = [{**context, **candidate} for candidate in candidates]
    np.testing.assert_allclose(
        ranked.json()["probabilities"], offline.predict_rows(merged), rtol=0, atol=1e-6
    )


async def test_top_k_lists_the_best_candidates_first(
    client: httpx.AsyncClient, offline: Predictor
) -> None:
    rows = random_rows(offline, 40, seed=8, values=30)
    context, candidates = split(rows, set(FIELDS[:13]))
    for k in (1, 5, 40, 100):
        body = {"context": context, "candidates": candidates, "top_k": k}
        answer = (await client.post("/rank", json=body)).json()
        probabilities = answer["probabilities"]
        top = answer["top"]
        assert len(top) == min(k, len(candidates))
        assert [t["probability"] for t in top] == sorted(probabilities, reverse=True)[:k]
        assert all(probabilities[t["index"]] == t["probability"] for t in top)
    plain = await client.post("/rank", json={"context": context, "candidates": candidates})
    assert "top" not in plain.json()


async def test_bad_rankings_are_4xx_naming_the_field_and_candidate(
    make_client: ClientFactory,
) -> None:
    async with make_client(max_instances=3) as client:

        async def rank(body: dict[str, Any]) -> httpx.Response:
            return await client.post("/rank", json=body)

        clash = await rank({"context": {"C1": "a"}, "candidates": [{"C2": 1}, {"C1": None}]})
        assert clash.status_code == 422
        [error] = clash.json()["detail"]
        assert error["loc"] == ["body", "candidates", 1, "C1"] and "context" in error["msg"]
        empty = await rank({"context": {}, "candidates": []})
        assert empty.status_code == 422
        assert empty.json()["detail"][0]["loc"] == ["body", "candidates"]
        too_many = await rank({"context": {}, "candidates": [{}] * 4})
        assert too_many.status_code == 413 and "at most 3" in too_many.json()["detail"]
        for top_k in (0, -1, 1.5, "3", True, None):
            bad = await rank({"context": {}, "candidates": [{}], "top_k": top_k})
            assert bad.status_code == 422, top_k
            assert bad.json()["detail"][0]["loc"] == ["body", "top_k"]
        unknown = await rank({"context": {"C99": 1}, "candidates": [{}]})
        assert unknown.json()["detail"][0]["loc"] == ["body", "context", "C99"]
        bad_value = await rank({"context": {}, "candidates": [{}, {"I1": "x"}]})
        assert bad_value.json()["detail"][0]["loc"] == ["body", "candidates", 1, "I1"]
        missing = await rank({"candidates": [{}]})
        assert missing.status_code == 422


async def test_rank_answers_exactly_while_redis_is_down(
    make_client: ClientFactory, redis_server: RedisServer, offline: Predictor
) -> None:
    """Redis killed: the context's and the candidates' rows come from the tables."""
    rows = random_rows(offline, 30, seed=12, values=30)
    context, candidates = split(rows, set(FIELDS[:20]))
    merged = [{**context, **candidate} for candidate in candidates]
    async with make_client(redis_url=redis_server.url, local_cache_rows=10) as client:
        redis_server.kill()
        ranked = await client.post("/rank", json={"context": context, "candidates": candidates})
        assert ranked.status_code == 200
        assert (await client.get("/readyz")).json()["embedding_store"]["state"] == "degraded"
    np.testing.assert_allclose(
        ranked.json()["probabilities"], offline.predict_rows(merged), rtol=0, atol=1e-6
    )

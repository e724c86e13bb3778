"""The Redis store on a real 3-master Redis Cluster that the test starts on loopback ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from model import default_model
from model.data import criteo_json_rows
from model.predict import Predictor
from model.synthetic import generate
from tests.app.conftest import ClientFactory
from tests.app.test_redis_store import metric, store_of, wait_for_state
from tests.redis_servers import RedisCluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    started = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def known_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    path = tmp_path_factory.mktemp("known") / "rows.tsv"
    generate(path, 500, default_model.DATA)
    return criteo_json_rows(path)


async def test_parity_on_a_cluster_with_rows_on_every_node(
    make_client: ClientFactory,
    cluster: RedisCluster,
    offline: Predictor,
    known_rows: list[dict[str, Any]],
) -> None:
    with cluster.nodes[0].client() as r:
        info = r.cluster("info")
    assert (int(info["cluster_known_nodes"]), int(info["cluster_slots_assigned"])) == (3, 16384)
    async with make_client(
        redis_url=cluster.url, redis_cluster=True, hold_tables=False, local_cache_rows=100
    ) as client:
        assert (await client.get("/readyz")).json()["embedding_store"]["state"] == "ok"
        for _ in range(2):  # a small LRU: the second pass goes to the cluster again
            response = await client.post("/predict_many", json={"instances": known_rows})
            assert response.status_code == 200
            np.testing.assert_allclose(
                response.json()["probabilities"],
                offline.predict_rows(known_rows),
                rtol=0,
                atol=1e-6,
            )
        for row in known_rows[:20]:
            response = await client.post("/predict", json={"features": row})
            assert response.json()["probability"] == pytest.approx(
                offline.predict_rows([row])[0], abs=1e-6
            )
    rows_per_node = []
    for node in cluster.nodes:
        with node.client() as r:
            # (every partition hash holds its sentinel too)
            rows_per_node.append(sum(r.hlen(k) - 1 for k in r.scan_iter("ctr:rows:*")))
    total = sum(size - 1 for size in offline.checkpoint.config.vocab_sizes)
    assert sum(rows_per_node) == total
    # The hash tags spread a version's partitions over every node.
    assert min(rows_per_node) > total / 10


@pytest.mark.parametrize("hold_tables", [True, False])
async def test_a_master_that_loses_its_data_turns_the_store_degraded_and_is_repaired(
    make_client: ClientFactory,
    cluster: RedisCluster,
    offline: Predictor,
    known_rows: list[dict[str, Any]],
    hold_tables: bool,
) -> None:
    """A master other than the manifest's is flushed (as a node that restarts empty) under
    traffic. Its partition hashes read as missing: once read as "every value is OOV" and
    cached, while /readyz said ok. Now the sentinel in every hash gives it away: the store
    turns degraded, never caches a row from a missing hash, publishes the version again,
    and serves exact answers once it is ok."""
    expected = offline.predict_rows(known_rows)
    async with make_client(
        redis_url=cluster.url,
        redis_cluster=True,
        hold_tables=hold_tables,
        local_cache_rows=100,  # most rows come from the cluster, batch after batch
    ) as client:
        await wait_for_state(client, "ok")
        version = offline.checkpoint.version
        victim = next(n for n in cluster.nodes if not holds(n, f"ctr:manifest:{version}"))
        with victim.client() as r:
            assert r.dbsize() > 0
            r.flushall()
        states = []
        deadline = time.monotonic() + 60
        while True:  # traffic until the store is ok again
            response = await client.post("/predict_many", json={"instances": known_rows})
            assert response.status_code == 200
            answers = np.array(response.json()["probabilities"])
            state = (await store_of(client))["state"]
            states.append(state)
            if hold_tables:  # the tables answer for Redis: exact all along
                np.testing.assert_allclose(answers, expected, rtol=0, atol=1e-6)
            if "degraded" in states and state == "ok":
                break
            assert time.monotonic() < deadline, f"never repaired: {states[-5:]}"
            await asyncio.sleep(0.05)
        # Republished: the flushed master holds its share again, and every answer is exact
        # (no OOV row was cached for a value of a missing hash).
        with victim.client() as r:
            assert r.dbsize() > 0
        for _ in range(2):
            response = await client.post("/predict_many", json={"instances": known_rows})
            np.testing.assert_allclose(
                response.json()["probabilities"], expected, rtol=0, atol=1e-6
            )
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'ctr_embedding_fallbacks_total{reason="missing_version"}') >= 1


def holds(node: Any, key: str) -> bool:
    """Whether the cluster node ``node`` serves ``key``'s slot (and holds it)."""
    with node.client() as r:
        try:
            return bool(r.exists(key))
        except redis.ResponseError:  # MOVED: another node's slot
            return False

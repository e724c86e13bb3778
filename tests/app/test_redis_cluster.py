"""The Redis store on a real 3-master Redis Cluster that the test starts on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from model import default_model
from model.data import criteo_json_rows
from model.predict import Predictor
from model.synthetic import generate
from tests.app.conftest import ClientFactory
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
            rows_per_node.append(sum(r.hlen(k) for k in r.scan_iter("ctr:rows:*")))
    total = sum(size - 1 for size in offline.checkpoint.config.vocab_sizes)
    assert sum(rows_per_node) == total
    # The hash tags spread a version's partitions over every node.
    assert min(rows_per_node) > total / 10

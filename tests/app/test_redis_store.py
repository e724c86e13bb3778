"""The Redis embedding tier against real Redis servers the tests start (and kill, pause,
restart): parity with the memory store, publishing, faults, password and TLS URLs."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.metrics import Metrics
from app.runtime import Runtime
from app.store import publisher as publish_module
from app.store.client import connect
from app.store.layout import Layout, read_manifest
from app.store.publisher import PublishFailed, publish
from model import default_model
from model.checkpoint import Checkpoint
from model.data import criteo_json_rows
from model.predict import Predictor
from model.synthetic import SyntheticConfig, generate
from tests.app.conftest import ClientFactory
from tests.redis_servers import RedisServer, SlowProxy

pytestmark = pytest.mark.anyio

DATA = Path(__file__).parents[1] / "data"
SAMPLE = criteo_json_rows(DATA / "criteo_sample.tsv")


@pytest.fixture(scope="module")
def known_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Rows drawn like the default model's training data: most values are in its
    vocabularies (the Criteo sample's are not: for it, every sparse value is OOV)."""
    path = tmp_path_factory.mktemp("known") / "rows.tsv"
    generate(path, 300, default_model.DATA)
    return criteo_json_rows(path)


@pytest.fixture(scope="module")
def rows(
    known_rows: list[dict[str, Any]], unseen_rows: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Known values, unseen values and the Criteo sample rows."""
    return known_rows + unseen_rows + SAMPLE


@pytest.fixture(scope="module")
def unseen_rows(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Generated rows from another seed and wider vocabularies than the default model's:
    many values the model never saw, plus integer, missing and odd values."""
    path = tmp_path_factory.mktemp("unseen") / "rows.tsv"
    generate(path, 300, SyntheticConfig(seed=99, max_cardinality=5000))
    rows = criteo_json_rows(path)
    rows[0]["C1"] = 12345  # an integer sparse value is its decimal string
    rows[1]["C2"] = None
    rows[2]["C3"] = "ünïcødé {tag} \t"
    rows[3] = {}
    return rows


async def predict_all(client: httpx.AsyncClient, rows: list[dict[str, Any]]) -> np.ndarray:
    response = await client.post("/predict_many", json={"instances": rows})
    assert response.status_code == 200, response.text
    return np.array(response.json()["probabilities"])


async def predict_each(client: httpx.AsyncClient, rows: list[dict[str, Any]]) -> np.ndarray:
    responses = await asyncio.gather(*(client.post("/predict", json={"features": r}) for r in rows))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return np.array([r.json()["probability"] for r in responses])


async def store_of(client: httpx.AsyncClient) -> dict[str, str]:
    body: dict[str, str] = (await client.get("/readyz")).json()["embedding_store"]
    return body


def dense_only(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with every sparse value dropped: what a replica without tables answers
    when Redis cannot (every sparse value gets its OOV row)."""
    return [{k: v for k, v in row.items() if k.startswith("I")} for row in rows]


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


@pytest.mark.parametrize("hold_tables", [True, False])
async def test_redis_store_gives_the_memory_stores_probabilities(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
    hold_tables: bool,
) -> None:
    expected = offline.predict_rows(rows)
    async with make_client() as memory:
        np.testing.assert_allclose(await predict_all(memory, rows), expected, rtol=0, atol=1e-6)
    async with make_client(redis_url=redis_server.url, hold_tables=hold_tables) as client:
        assert await store_of(client) == {"backend": "redis", "state": "ok"}
        cold = await predict_all(client, rows)  # every row from Redis
        warm = await predict_all(client, rows)  # every row from the LRU
        one_by_one = await predict_each(client, rows[:64])
        metrics = (await client.get("/metrics")).text
    np.testing.assert_allclose(cold, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(warm, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one_by_one, expected[:64], rtol=0, atol=1e-6)
    assert metric(metrics, 'ctr_embedding_lookups_total{tier="redis"}') > 0
    assert metric(metrics, 'ctr_embedding_hits_total{tier="lru"}') > 0
    assert metric(metrics, "ctr_embedding_fallbacks_total") == 0
    assert metric(metrics, "ctr_lru_rows") > 0


async def test_a_tiny_lru_evicts_and_stays_exact(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    async with make_client(
        redis_url=redis_server.url, hold_tables=False, local_cache_rows=50
    ) as client:
        for _ in range(2):
            got = await predict_all(client, rows)
            np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)
        assert metric((await client.get("/metrics")).text, "ctr_lru_rows") == 50


async def test_the_replica_without_tables_holds_no_table_and_no_vocabulary(
    redis_server: RedisServer,
) -> None:
    settings = Settings(redis_url=redis_server.url, hold_tables=False)
    runtime = await Runtime.start(settings, Metrics())
    try:
        serving = runtime.model
        assert serving.store.backend == "redis"
        assert serving.store.state == "ok"
        assert serving._model.sparse_rows is None
        assert all(f.vocab is None for f in serving.features.embedded_fields)
        assert serving.describe()["fields"][14]["vocab_size"] > 1  # sizes come from spec.json
    finally:
        await runtime.close()


async def test_a_batchs_lookups_do_not_wait_for_the_event_loop(
    redis_server: RedisServer, known_rows: list[dict[str, Any]]
) -> None:
    """A batch's lookups go from its thread to Redis: they finish, from Redis, while
    the event loop is blocked (by HTTP work, in production), and the store stays ok."""
    settings = Settings(redis_url=redis_server.url, hold_tables=False, redis_timeout_ms=2000)
    metrics = Metrics()
    runtime = await Runtime.start(settings, metrics)
    try:
        store, keyed = runtime.model.store, runtime.model.keys(known_rows)
        encoded: list[Any] = []
        batch = threading.Thread(target=lambda: encoded.append(store.lookup(keyed)))
        batch.start()
        batch.join(timeout=30)  # on the loop's thread: the loop cannot run meanwhile
        assert not batch.is_alive(), "the lookups waited for the event loop"
        assert store.state == "ok"
        text = metrics.exposition().decode()
        lookups = metric(text, 'ctr_embedding_lookups_total{tier="redis"}')
        assert metric(text, 'ctr_embedding_hits_total{tier="redis"}') == lookups > 0
        assert encoded[0].shape[0] == len(known_rows)
    finally:
        await runtime.close()


# -- publishing


async def test_publish_is_idempotent_and_writes_the_manifest_last(
    redis_server: RedisServer, default_checkpoint: Checkpoint
) -> None:
    client = connect(Settings(redis_url=redis_server.url), timeout_s=5)
    try:
        assert await publish(client, default_checkpoint, partitions=8) is True
        keys_after_first = await client.dbsize()
        assert await publish(client, default_checkpoint, partitions=8) is False
        assert await client.dbsize() == keys_after_first
        found = await read_manifest(client, default_checkpoint.version)
        assert found is not None
        assert found["rows"] == sum(s - 1 for s in default_checkpoint.config.vocab_sizes)
        # 26 fields x 8 partitions, each with its sentinel however few rows it holds,
        # + the manifest
        assert keys_after_first == 26 * 8 + 1
        rows = 0
        for key in await client.keys("ctr:rows:*"):
            rows += await client.hlen(key) - 1
        assert rows == found["rows"]
    finally:
        await client.aclose()


async def test_two_publishers_write_once(
    redis_server: RedisServer, default_checkpoint: Checkpoint
) -> None:
    clients = [connect(Settings(redis_url=redis_server.url), timeout_s=5) for _ in range(3)]
    try:
        wrote = await asyncio.gather(*(publish(c, default_checkpoint, 16) for c in clients))
        assert sorted(wrote) == [False, False, True]
    finally:
        for c in clients:
            await c.aclose()


async def test_a_stale_lock_does_not_block_forever(
    redis_server: RedisServer, default_checkpoint: Checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_module, "LOCK_TTL_S", 1.0)
    layout = Layout(default_checkpoint.version, 16)
    client = connect(Settings(redis_url=redis_server.url), timeout_s=5)
    try:
        # A publisher that took the lock as publish() does, and died: its lock expires.
        dead = client.lock(layout.lock_key, timeout=publish_module.LOCK_TTL_S)
        assert await dead.acquire(blocking=False)
        token = dead.local.token
        publishing = asyncio.create_task(publish(client, default_checkpoint, 16))
        # While the dead holder's lock lives, nothing is published; then it expires.
        while not publishing.done():
            published = await client.exists(layout.manifest_key)
            holder = await client.get(layout.lock_key)
            if holder == token:  # (read after: the lock was the dead one's all along)
                assert not published
            await asyncio.sleep(0.02)
        assert await publishing is True
        assert await client.exists(layout.manifest_key)
    finally:
        await client.aclose()


async def test_a_half_written_version_is_not_used(
    make_client: ClientFactory,
    redis_server: RedisServer,
    default_checkpoint: Checkpoint,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    """Rows without a manifest (a publisher died midway; here: wrong rows) are rewritten
    before any is read."""
    layout = Layout(default_checkpoint.version, 64)
    zero_row = bytes(4 * (1 + default_checkpoint.config.embed_dim))
    with redis_server.client() as r:
        for j, f in enumerate(default_checkpoint.features.embedded_fields):
            for value in default_checkpoint.vocabulary(f.name).values[:50]:
                r.hset(layout.hash_key(j, value), value, zero_row)
    async with make_client(redis_url=redis_server.url, hold_tables=False) as client:
        got = await predict_all(client, rows)
    np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)


async def test_two_model_versions_in_one_redis_never_mix(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    tiny = Predictor(tiny_checkpoint)
    assert tiny_checkpoint.version != offline.checkpoint.version
    tiny_settings = {"model_dir": tiny_checkpoint.path, "hold_tables": False}
    async with (
        make_client(redis_url=redis_server.url, hold_tables=False) as default,
        make_client(redis_url=redis_server.url, **tiny_settings) as other,
    ):
        got_default = await predict_all(default, rows)
        got_tiny = await predict_all(other, rows)
    np.testing.assert_allclose(got_default, offline.predict_rows(rows), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got_tiny, tiny.predict_rows(rows), rtol=0, atol=1e-6)
    with redis_server.client() as r:
        assert len(r.keys("ctr:manifest:*")) == 2


def test_the_publish_command(redis_server: RedisServer, default_checkpoint: Checkpoint) -> None:
    env = {"CTR_REDIS_URL": redis_server.url, "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "app.publish"]
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"{default_checkpoint.version}: published"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.strip() == f"{default_checkpoint.version}: already published"
    unset = subprocess.run(command, env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert unset.returncode == 2
    assert "CTR_REDIS_URL" in unset.stderr
    missing = subprocess.run(
        [*command, "--model-dir", "/nonexistent"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == "/nonexistent: not a directory"  # a line, no traceback
    redis_server.kill()
    down = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 1
    assert down.stderr.startswith(f"publishing {default_checkpoint.version} failed")
    assert "Traceback" not in down.stderr


# -- faults


async def test_redis_killed_while_requests_flow(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the tables held, every request is answered, exactly, through the kill, and
    the store is back to ok once Redis is (it lost everything: the rows are republished)."""
    expected = offline.predict_rows(rows)
    caplog.set_level(logging.INFO, logger="app.store.redisstore")
    async with make_client(redis_url=redis_server.url, local_cache_rows=200) as client:
        results: dict[int, float] = {}

        async def sender(worker: int) -> None:
            for i in range(worker, len(rows) * 3, 8):
                response = await client.post("/predict", json={"features": rows[i % len(rows)]})
                assert response.status_code == 200, response.text
                results[i] = response.json()["probability"]

        senders = asyncio.gather(*(sender(w) for w in range(8)))
        await asyncio.sleep(0.2)
        redis_server.kill()
        await senders
        assert len(results) == len(rows) * 3
        got = np.array([results[i] for i in range(len(rows) * 3)])
        np.testing.assert_allclose(got, np.tile(expected, 3), rtol=0, atol=1e-6)
        store = await store_of(client)
        assert (store["backend"], store["state"]) == ("redis", "degraded") and store["reason"]
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, "ctr_embedding_fallbacks_total") > 0
        assert metric(metrics, "ctr_embedding_store_degraded") == 1

        redis_server.start()  # empty: the version is gone
        await wait_for_state(client, "ok")
        np.testing.assert_allclose(await predict_all(client, rows), expected, rtol=0, atol=1e-6)
    warnings = [
        r
        for r in caplog.records
        if r.name == "app.store.redisstore" and r.levelno == logging.WARNING
    ]
    assert [r.getMessage().split(" (")[0] for r in warnings] == [
        "redis tier degraded",
        "redis tier back: deepfm-5c148811044d rows come from Redis again",
    ]


async def wait_for_state(client: httpx.AsyncClient, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while (await store_of(client))["state"] != state:
        assert time.monotonic() < deadline, f"the store did not turn {state}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("hold_tables", [True, False])
async def test_a_stopped_redis_costs_at_most_the_time_budget(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    known_rows: list[dict[str, Any]],
    hold_tables: bool,
) -> None:
    """SIGSTOP: the server accepts connections and never answers. Requests still return,
    each within the budget plus normal latency, and the store recovers on SIGCONT."""
    budget_ms = 100
    async with make_client(
        redis_url=redis_server.url, hold_tables=hold_tables, redis_timeout_ms=budget_ms
    ) as client:
        with redis_server.client() as r:
            r.config_resetstat()
        redis_server.pause()
        try:
            answers = []
            for row in known_rows[:40]:  # LRU misses: each needs Redis
                # (httpx's own 5 s time-out is the guard: the store's socket time-out is
                # 10 s, so a call that waited on Redis would fail here)
                response = await client.post("/predict", json={"features": row})
                assert response.status_code == 200
                answers.append(response.json()["probability"])
            assert (await store_of(client))["state"] == "degraded"
            metrics = (await client.get("/metrics")).text
        finally:
            redis_server.resume()
        # Every call was answered by a lower tier, the first after its lookup timed out;
        # after it the store stopped asking Redis: at most the first call's lookups (one
        # HMGET per hash it needed) ever reached it.
        assert metric(metrics, 'ctr_embedding_fallbacks_total{reason="timeout"}') >= 1
        with redis_server.client() as r:
            hmgets = r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
        assert hmgets <= len(known_rows[0])
        if hold_tables:
            np.testing.assert_allclose(
                answers, offline.predict_rows(known_rows[:40]), rtol=0, atol=1e-6
            )
        await wait_for_state(client, "ok")
        np.testing.assert_allclose(
            await predict_all(client, known_rows),
            offline.predict_rows(known_rows),
            rtol=0,
            atol=1e-6,
        )


async def test_redis_down_at_start_up_then_back(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    url = redis_server.url
    redis_server.kill()
    async with make_client(redis_url=url) as client:
        store = await store_of(client)
        assert (store["backend"], store["state"]) == ("redis", "degraded") and store["reason"]
        got = await predict_all(client, rows)  # from the tables
        np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)
        redis_server.start()
        await wait_for_state(client, "ok")
        with redis_server.client() as r:
            assert r.exists(f"ctr:manifest:{offline.checkpoint.version}")


async def test_without_tables_a_down_redis_gives_oov_rows_not_errors(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    url = redis_server.url
    redis_server.kill()
    async with make_client(redis_url=url, hold_tables=False) as client:
        got = await predict_all(client, rows)
        all_oov = [{} for _ in rows]  # every sparse value OOV, dense values kept
        np.testing.assert_allclose(got, offline.predict_rows(dense_only(rows)), rtol=0, atol=1e-6)
        assert not np.allclose(got, offline.predict_rows(all_oov))
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, 'ctr_embedding_fallbacks_total{reason="unavailable"}') > 0


async def test_a_version_deleted_from_redis_is_not_read_and_is_republished(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    async with make_client(redis_url=redis_server.url, hold_tables=False) as client:
        with redis_server.client() as r:
            r.flushall()
        got = await predict_all(client, rows)  # misses find no manifest: OOV rows
        assert (await store_of(client))["state"] == "degraded"
        metrics = (await client.get("/metrics")).text
        assert metric(metrics, 'ctr_embedding_fallbacks_total{reason="missing_version"}') == 1
        await wait_for_state(client, "ok")
        # The rows fetched meanwhile were OOV stand-ins and were not cached.
        np.testing.assert_allclose(
            await predict_all(client, rows), offline.predict_rows(rows), rtol=0, atol=1e-6
        )
        assert not np.allclose(got, offline.predict_rows(rows))


async def test_a_slow_redis_is_one_degraded_episode_not_a_flapping_one(
    make_client: ClientFactory,
    redis_server: RedisServer,
    offline: Predictor,
    known_rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis answers, but in 150 ms, past the 50 ms budget: batches fall back to the
    tables; the store stays degraded (probes use the batch budget) until Redis is fast
    again, and each transition is logged once."""
    proxy = await SlowProxy(redis_server.port, delay=0.15).start()
    caplog.set_level(logging.INFO, logger="app.store.redisstore")
    try:
        async with make_client(redis_url=proxy.url, redis_timeout_ms=50) as client:
            assert (await store_of(client))["state"] == "ok"  # start-up allows 2 s
            deadline = time.monotonic() + 3
            i = 0
            while time.monotonic() < deadline:
                row = known_rows[i % len(known_rows)]
                response = await client.post("/predict", json={"features": row})
                assert response.json()["probability"] == pytest.approx(
                    offline.predict_rows([row])[0], abs=1e-6
                )
                i += 1
                await asyncio.sleep(0.01)
            assert (await store_of(client))["state"] == "degraded"
            proxy.delay = 0
            await wait_for_state(client, "ok")
    finally:
        await proxy.aclose()
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "app.store.redisstore" and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("redis tier degraded (timeout")
    assert warnings[1].startswith("redis tier back")


async def test_replicas_read_the_partitions_the_publisher_chose(
    make_client: ClientFactory,
    redis_server: RedisServer,
    default_checkpoint: Checkpoint,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    client = connect(Settings(redis_url=redis_server.url), timeout_s=5)
    try:
        assert await publish(client, default_checkpoint, partitions=16) is True
    finally:
        await client.aclose()
    async with make_client(
        redis_url=redis_server.url, hold_tables=False, redis_partitions=64
    ) as replica:
        assert (await store_of(replica))["state"] == "ok"
        got = await predict_all(replica, rows)
    np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)


async def test_a_publish_that_fails_midway_leaves_no_manifest_and_is_retried(
    make_client: ClientFactory,
    redis_server: RedisServer,
    default_checkpoint: Checkpoint,
    offline: Predictor,
    rows: list[dict[str, Any]],
) -> None:
    """Redis runs out of memory (noeviction) halfway through the rows: the manifest,
    written last, is never written, so no replica reads the partial rows; once Redis has
    room, a replica's watcher publishes the version and the store turns ok."""
    with redis_server.client() as r:
        used = int(r.info("memory")["used_memory"])
        r.config_set("maxmemory-policy", "noeviction")
        r.config_set("maxmemory", used + 200_000)  # room for part of the rows
    client = connect(Settings(redis_url=redis_server.url), timeout_s=5)
    try:
        with pytest.raises(PublishFailed, match=r"OutOfMemory|OOM"):
            await publish(client, default_checkpoint, partitions=16)
        assert await read_manifest(client, default_checkpoint.version) is None
        assert await client.keys("ctr:rows:*")  # some rows were written
    finally:
        await client.aclose()
    async with make_client(redis_url=redis_server.url, hold_tables=False) as replica:
        assert (await store_of(replica))["state"] == "degraded"
        got = await predict_all(replica, rows)  # OOV rows, not the partial rows
        np.testing.assert_allclose(got, offline.predict_rows(dense_only(rows)), rtol=0, atol=1e-6)
        with redis_server.client() as r:
            r.config_set("maxmemory", 0)
        await wait_for_state(replica, "ok", timeout=30)
        got = await predict_all(replica, rows)
    np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)


# -- URLs: password, TLS


async def test_a_password_url(
    make_client: ClientFactory, tmp_path: Path, offline: Predictor, rows: list[dict[str, Any]]
) -> None:
    server = RedisServer(tmp_path / "auth", ["--requirepass", "s3cret"])
    server.password = "s3cret"
    server.start()
    try:
        async with make_client(redis_url=server.url, hold_tables=False) as client:
            assert (await store_of(client))["state"] == "ok"
            got = await predict_all(client, rows)
        np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)
        wrong = f"redis://:wrong@127.0.0.1:{server.port}/0"
        async with make_client(redis_url=wrong) as client:
            assert (await store_of(client))["state"] == "degraded"
            assert (await client.post("/predict", json={"features": rows[0]})).status_code == 200
    finally:
        server.stop()


async def test_a_tls_url(
    make_client: ClientFactory, tmp_path: Path, offline: Predictor, rows: list[dict[str, Any]]
) -> None:
    certs = tmp_path / "tls"
    certs.mkdir()
    key, cert = certs / "key.pem", certs / "cert.pem"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    subprocess.run(command, check=True, capture_output=True)
    tls_port = RedisServer(tmp_path / "unused").port
    options = ["--tls-port", str(tls_port), "--tls-auth-clients", "no"]
    options += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    options += ["--tls-ca-cert-file", str(cert)]
    server = RedisServer(tmp_path / "tls-redis", options).start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={cert}"
        async with make_client(redis_url=url, hold_tables=False) as client:
            assert (await store_of(client))["state"] == "ok"
            got = await predict_all(client, rows)
        np.testing.assert_allclose(got, offline.predict_rows(rows), rtol=0, atol=1e-6)
        with server.client() as r:
            assert r.exists(f"ctr:manifest:{offline.checkpoint.version}")
    finally:
        server.stop()

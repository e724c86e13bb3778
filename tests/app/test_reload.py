"""Model lifecycle: hot reload (POST /admin/reload, SIGHUP) under load, refused
checkpoints, the queue limit, and SIGTERM while requests flow."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.errors import NotReady
from app.metrics import Metrics
from app.runtime import Runtime
from model.checkpoint import Checkpoint
from model.default_model import DEFAULT_MODEL_DIR
from model.features import Field, Vocabulary
from model.predict import Predictor
from tests.app.conftest import ClientFactory
from tests.app.test_routes import random_rows
from tests.checkpoints import random_checkpoint
from tests.redis_servers import RedisServer
from tests.server_process import start

pytestmark = pytest.mark.anyio


# The admin endpoints on without a key, and any checkpoint on this machine loadable: these
# tests are about reloading (test_admin.py holds the guard rails).
ADMIN = {"admin_endpoints": True, "models_root": Path("/")}


async def answered(answers: list[Any], more: int, timeout: float = 60) -> None:
    """Wait until ``more`` answers were added to ``answers`` (traffic flowed)."""
    target = len(answers) + more
    deadline = time.monotonic() + timeout
    while len(answers) < target:
        assert time.monotonic() < deadline, "the senders stalled"
        await asyncio.sleep(0.01)


async def reload(client: httpx.AsyncClient, model_dir: Path | None = None) -> httpx.Response:
    body = {"model_dir": str(model_dir)} if model_dir else None
    return await client.post("/admin/reload", json=body)


async def test_a_reload_under_load_fails_no_request_and_never_mixes_models(
    make_client: ClientFactory, offline: Predictor, tiny_checkpoint: Checkpoint
) -> None:
    """32 clients send /predict all along; the model is swapped twice. Every answer is a
    200, and its probability is what the model its version names computes."""
    tiny = Predictor(tiny_checkpoint)
    rows = random_rows(offline, 200, seed=11, values=30)
    expected = {
        offline.checkpoint.version: offline.predict_rows(rows),
        tiny_checkpoint.version: tiny.predict_rows(rows),
    }
    assert not np.allclose(*expected.values())  # the two models tell apart
    answers: list[tuple[int, float, str]] = []
    failures: list[str] = []
    done = asyncio.Event()
    async with make_client(**ADMIN) as client:

        async def sender(worker: int) -> None:
            i = worker
            while not done.is_set():
                response = await client.post("/predict", json={"features": rows[i % len(rows)]})
                if response.status_code != 200:
                    failures.append(response.text)
                else:
                    body = response.json()
                    answers.append((i % len(rows), body["probability"], body["model_version"]))
                i += 32

        senders = [asyncio.create_task(sender(w)) for w in range(32)]
        await answered(answers, 100)
        first = await reload(client, tiny_checkpoint.path)
        await answered(answers, 100)
        second = await reload(client)  # back to CTR_MODEL_DIR
        await answered(answers, 100)
        done.set()
        await asyncio.gather(*senders)
        model = (await client.get("/model")).json()
        metrics = (await client.get("/metrics")).text
    assert first.json() == {
        "model_version": tiny_checkpoint.version,
        "previous_version": offline.checkpoint.version,
    }
    assert second.json()["model_version"] == offline.checkpoint.version
    assert model["model_version"] == offline.checkpoint.version
    assert 'ctr_model_reloads_total{outcome="ok"} 2.0' in metrics
    assert not failures
    versions = {version for _, _, version in answers}
    assert versions == set(expected)  # both models answered
    for i, probability, version in answers:
        assert probability == pytest.approx(expected[version][i], abs=1e-6)


def other_fields_checkpoint(directory: Path) -> Checkpoint:
    """A checkpoint whose fields differ from the default model's: I1 is a category
    here (a dense number there), C1 is gone, and a field Z is new."""
    fields = (
        Field("I1", "category", vocab=Vocabulary(("3", "abc"))),
        Field("I2", "log", {"missing": 0.0}),
        Field("Z", "category", vocab=Vocabulary(("z",))),
    )
    return random_checkpoint(directory, fields, seed=1)


async def test_a_reload_that_changes_the_fields_never_scores_a_call_with_another_model(
    make_client: ClientFactory, offline: Predictor, tmp_path: Path
) -> None:
    """Each call is validated and scored by one model: a body valid for one model only
    gets that model's answer, or its 422, never a 500."""
    other = Predictor(other_fields_checkpoint(tmp_path / "other"))
    bodies = [{"I1": 3, "I2": 5}, {"I1": "abc", "I2": 5}, {"C1": "x", "I2": 1}, {"Z": "z"}]
    statuses: list[int] = []
    wrong: list[str] = []
    done = asyncio.Event()
    async with make_client(**ADMIN) as client:

        async def sender(worker: int) -> None:
            i = worker
            while not done.is_set():
                features = bodies[i % len(bodies)]
                response = await client.post("/predict", json={"features": features})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    model = other if body["model_version"] == other.checkpoint.version else offline
                    if abs(body["probability"] - model.predict_rows([features])[0]) > 1e-6:
                        wrong.append(f"{features} {body}")
                i += 1

        senders = [asyncio.create_task(sender(w)) for w in range(16)]
        for target in (tmp_path / "other", None, tmp_path / "other", None):
            await answered(statuses, 50)
            assert (await reload(client, target)).status_code == 200
        done.set()
        await asyncio.gather(*senders)
    assert not wrong
    assert set(statuses) == {200, 422}  # a body of the other model's fields: its 422


@pytest.mark.parametrize("damage", ["missing", "corrupt", "not a checkpoint"])
async def test_a_bad_checkpoint_is_refused_and_the_old_model_serves_on(
    make_client: ClientFactory, offline: Predictor, tmp_path: Path, damage: str
) -> None:
    target = tmp_path / "ckpt"
    if damage == "corrupt":
        shutil.copytree(DEFAULT_MODEL_DIR, target)
        weights = target / "weights.safetensors"
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "not a checkpoint":
        target.mkdir()
        (target / "notes.txt").write_text("hello")
    async with make_client(**ADMIN) as client:
        response = await reload(client, target)
        # No checkpoint there: 404. One that does not verify: 422.
        assert response.status_code == (422 if damage == "corrupt" else 404)
        assert str(target) in response.json()["detail"]
        assert (await client.get("/model")).json()["model_version"] == offline.checkpoint.version
        row = {"I1": 3, "C1": "05db9164"}
        served = (await client.post("/predict", json={"features": row})).json()
        assert served["probability"] == pytest.approx(offline.predict_rows([row])[0], abs=1e-6)
        metrics = (await client.get("/metrics")).text
        assert 'ctr_model_reloads_total{outcome="failed"} 1.0' in metrics


async def test_reload_needs_the_api_key_and_a_well_formed_body(make_client: ClientFactory) -> None:
    async with make_client(api_key="k") as client:
        assert (await client.post("/admin/reload")).status_code == 401
        response = await client.post("/admin/reload", headers={"X-API-Key": "k"})
        assert response.status_code == 200
        bad = await client.post("/admin/reload", json={"dir": "x"}, headers={"X-API-Key": "k"})
        assert bad.status_code == 422


async def test_a_reload_in_redis_mode_publishes_the_new_version(
    make_client: ClientFactory, redis_server: RedisServer, tiny_checkpoint: Checkpoint
) -> None:
    tiny = Predictor(tiny_checkpoint)
    rows = random_rows(tiny, 50, seed=3, values=20)
    async with make_client(redis_url=redis_server.url, hold_tables=False, **ADMIN) as client:
        assert (await reload(client, tiny_checkpoint.path)).status_code == 200
        ready = (await client.get("/readyz")).json()
        assert ready["model_version"] == tiny_checkpoint.version
        assert ready["embedding_store"] == {"backend": "redis", "state": "ok"}
        response = await client.post("/predict_many", json={"instances": rows})
    np.testing.assert_allclose(
        response.json()["probabilities"], tiny.predict_rows(rows), rtol=0, atol=1e-6
    )
    with redis_server.client() as r:
        assert r.exists(f"ctr:manifest:{tiny_checkpoint.version}")


async def test_a_full_queue_answers_503_with_retry_after(
    make_client: ClientFactory, offline: Predictor
) -> None:
    rows = random_rows(offline, 300, seed=4, values=30)
    expected = offline.predict_rows(rows)
    async with make_client(max_queued=2) as client:
        responses = await asyncio.gather(
            *(client.post("/predict", json={"features": row}) for row in rows)
        )
        metrics = (await client.get("/metrics")).text
    refused = [r for r in responses if r.status_code == 503]
    assert refused, "300 concurrent calls never filled a queue of 2"
    assert all(r.headers["retry-after"] == "1" for r in refused)
    for i, response in enumerate(responses):
        if response.status_code == 200:
            assert response.json()["probability"] == pytest.approx(expected[i], abs=1e-6)
        else:
            assert response.status_code == 503
    assert f"ctr_overloaded_total {float(len(refused))}" in metrics


def test_sighup_reloads_and_a_bad_checkpoint_keeps_the_old_model(
    tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    served = tmp_path / "served"
    shutil.copytree(DEFAULT_MODEL_DIR, served)
    process, url = start(CTR_MODEL_DIR=str(served))
    try:
        first = httpx.get(url + "/model").json()["model_version"]
        replace_dir(tiny_checkpoint.path, served)
        process.send_signal(signal.SIGHUP)
        wait_for_version(url, tiny_checkpoint.version)
        (served / "weights.safetensors").write_bytes(b"garbage")
        process.send_signal(signal.SIGHUP)
        wait_for_metric(url, 'ctr_model_reloads_total{outcome="failed"} 1.0')
        assert httpx.get(url + "/model").json()["model_version"] == tiny_checkpoint.version
        assert httpx.post(url + "/predict", json={"features": {}}).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    assert first != tiny_checkpoint.version
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    refused = [e for e in events if e["message"].startswith("reload refused")]
    assert len(refused) == 1 and refused[0]["level"] == "error"


def replace_dir(source: Path, target: Path) -> None:
    staged = target.with_name(target.name + ".new")
    shutil.copytree(source, staged)
    shutil.rmtree(target)
    staged.rename(target)


def wait_for_metric(url: str, line: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while line not in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, f"{line} never came"
        time.sleep(0.05)


def wait_for_version(url: str, version: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(url + "/model").json()["model_version"] != version:
        assert time.monotonic() < deadline, f"{version} never came"
        time.sleep(0.1)


def test_sigterm_under_load_cuts_off_no_accepted_request() -> None:
    """Clients keep sending while the server gets SIGTERM: every response it sends is a
    complete 200; afterwards connections are refused; the exit status is 0."""
    process, url = start()
    statuses: list[int] = []
    cut_off: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as session:
            while not stop.is_set():
                try:
                    response = session.post("/predict", json={"features": {"C1": "x"}})
                except httpx.ConnectError:
                    return  # the listener is closed: not accepted
                except httpx.TransportError as exc:
                    # A request written to a kept-alive connection the server closed, or
                    # a response cut off. The first is not an accepted request; tell
                    # them apart by whether any byte of a response came.
                    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
                        if "incomplete" in str(exc).lower():
                            cut_off.append(repr(exc))
                        continue
                    cut_off.append(repr(exc))
                    return
                statuses.append(response.status_code)
                assert 0.0 < response.json()["probability"] < 1.0

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(statuses) <= 50:  # traffic flows
        assert time.monotonic() < deadline, "no traffic"
        time.sleep(0.01)
    served_before = len(statuses)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr[-2000:]
    assert served_before > 50
    assert set(statuses) == {200}
    assert not cut_off, cut_off


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_reload_racing_shutdown_is_refused_and_leaks_nothing(
    tiny_checkpoint: Checkpoint, redis_server: RedisServer, store: str
) -> None:
    tasks_before = set(asyncio.all_tasks())
    threads_before = set(threading.enumerate())
    settings = Settings(redis_url=redis_server.url) if store == "redis" else Settings()
    runtime = await Runtime.start(settings, Metrics())
    started = {t.name for t in set(threading.enumerate()) - threads_before}
    assert "forward" in started  # (beside asyncio's executor, which outlives the runtime)
    reloading = asyncio.create_task(runtime.reload(tiny_checkpoint.path))
    await asyncio.sleep(0)  # the reload holds its lock and is loading
    await runtime.close()  # waits for it
    with pytest.raises(NotReady, match="shutting down"):
        await reloading
    assert runtime.model.version != tiny_checkpoint.version
    with pytest.raises(NotReady):
        await runtime.reload(tiny_checkpoint.path)
    # Nothing left behind: no task (the store's watcher), no thread (the batcher's
    # worker), no connection to Redis.
    assert set(asyncio.all_tasks()) <= tasks_before | {asyncio.current_task()}
    assert {t for t in threading.enumerate() if not t.name.startswith("asyncio_")} <= (
        threads_before
    )
    with redis_server.client() as r:
        assert [c for c in r.client_list() if c["cmd"] != "client|list"] == []

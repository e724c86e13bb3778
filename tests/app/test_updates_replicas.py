"""Streamed updates across replicas: two ``python -m app`` processes over one real Redis,
updates published with ``python -m app.publish --update`` while requests flow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.checkpoint import Checkpoint
from model.data import criteo_json_rows
from model.predict import Predictor
from tests.app.test_redis_store import metric
from tests.app.test_updates import ADDED, EDITED_FIELD, edited, touched, warm_started
from tests.redis_servers import RedisServer
from tests.server_process import start

pytestmark = pytest.mark.slow


def publish(redis_url: str, old: Path, new: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.publish", "--update", "--from", str(old), "--to", str(new)],
        env={**os.environ, "CTR_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "published as" in done.stdout


def wait_for(url: str, version: str, timeout: float = 30) -> None:
    """Until 20 answers in a row of ``url`` (of either of its 2 workers) name ``version``:
    each worker of a replica follows the updates itself."""
    deadline = time.monotonic() + timeout
    in_a_row = 0
    while in_a_row < 20:
        answer = httpx.post(url + "/predict", json={"features": {}}).json()
        in_a_row = in_a_row + 1 if answer["model_version"] == version else 0
        assert time.monotonic() < deadline, f"{url} did not reach {version}"


class Load:
    """Calls /predict_many on every replica in turn until stopped; keeps every answer."""

    def __init__(self, urls: list[str], rows: list[dict[str, Any]]) -> None:
        self.urls = urls
        self.rows = rows
        self.answers: list[tuple[str, str, np.ndarray]] = []  # (url, version, probabilities)
        self.failures: list[str] = []
        self.stopped: set[str] = set()  # replicas not to call (being stopped)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def wait(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` answers in all came back."""
        deadline = time.monotonic() + timeout
        while len(self.answers) < count:
            assert not self.failures, self.failures[:3]
            assert time.monotonic() < deadline, "the load stalled"
            time.sleep(0.01)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                for url in self.urls:
                    if url in self.stopped:
                        continue
                    try:
                        response = client.post(url + "/predict_many", json={"instances": self.rows})
                    except httpx.TransportError as exc:
                        self.failures.append(f"{url}: {exc!r}")
                        continue
                    if response.status_code != 200:
                        self.failures.append(f"{url}: {response.status_code} {response.text}")
                        continue
                    body = response.json()
                    self.answers.append(
                        (url, body["model_version"], np.array(body["probabilities"]))
                    )


def stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 0


def test_updates_reach_every_replica_under_load_and_a_stopped_one_catches_up(
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    generated_tsv: Path,
    day2_tsv: Path,
    tmp_path: Path,
) -> None:
    rows = criteo_json_rows(generated_tsv)[:300]
    for i, row in enumerate(rows[:30]):
        row[EDITED_FIELD] = ADDED[i % 2]
    u1 = warm_started(tiny_checkpoint, day2_tsv, tmp_path / "u1")  # dense weights move too
    u2 = edited(u1, tmp_path / "u2", shift=0.4)  # rows only: the rest stays byte-identical
    base = tiny_checkpoint.version
    expected = {
        base: Predictor(tiny_checkpoint).predict_rows(rows),
        f"{base}+u1": Predictor(u1).predict_rows(rows),
        f"{base}+u2": Predictor(u2).predict_rows(rows),
    }
    env = {
        "CTR_MODEL_DIR": str(tiny_checkpoint.path),
        "CTR_REDIS_URL": redis_server.url,
        "CTR_LOG_LEVEL": "warning",
        "CTR_WORKERS": "2",  # (each worker follows the updates itself)
    }
    a, url_a = start(**env)
    b, url_b = start(**env)
    try:
        with Load([url_a, url_b], rows) as load:
            load.wait(10)
            publish(redis_server.url, tiny_checkpoint.path, u1.path)
            for url in (url_a, url_b):
                wait_for(url, f"{base}+u1")
            load.stopped.add(url_b)
            time.sleep(0.2)  # (a call to B under way finishes)
            stop(b)  # B misses the next two updates (u2, then u3 below)
            publish(redis_server.url, u1.path, u2.path)
            wait_for(url_a, f"{base}+u2")
            load.wait(len(load.answers) + 10)
        assert not load.failures, load.failures[:3]
        versions = [version for _, version, _ in load.answers]
        assert set(versions) == set(expected), set(versions)
        for _, version, probabilities in load.answers:
            # Every answer is exactly the model its version names: no mix of two updates.
            np.testing.assert_allclose(probabilities, expected[version], rtol=0, atol=1e-6)
        # Each replica's versions only move forward.
        for url in (url_a, url_b):
            mine = [v for u, v, _ in load.answers if u == url]
            assert mine == sorted(mine, key=list(expected).index)
        # The row-only update moved the answers of its values only.
        moved = touched(rows, u1)
        one, two = expected[f"{base}+u1"], expected[f"{base}+u2"]
        np.testing.assert_array_equal(
            next(p[~moved] for _, v, p in load.answers if v == f"{base}+u2"), one[~moved]
        )
        assert not np.isclose(two[moved], one[moved]).any()
        # Values unseen at the base are scored with their new rows: not as OOV.
        assert not np.isclose(expected[f"{base}+u2"][:30], expected[base][:30]).any()
        u3 = edited(u2, tmp_path / "u3", shift=-0.2)
        publish(redis_server.url, u2.path, u3.path)
        expected[f"{base}+u3"] = Predictor(u3).predict_rows(rows)
        b, url_b = start(**env)  # from the base: applies u1, u2, u3 in order
        with Load([url_b], rows) as load:
            wait_for(url_b, f"{base}+u3")
            load.wait(len(load.answers) + 10)
        assert not load.failures, load.failures[:3]
        assert load.answers[-1][1] == f"{base}+u3"
        for _, version, probabilities in load.answers:
            np.testing.assert_allclose(
                probabilities, expected[version], rtol=0, atol=1e-6, err_msg=version
            )
        described = httpx.get(url_b + "/model").json()
        assert described["update"]["number"] == 3
        assert described["update"]["checkpoint"] == u3.version
        assert described["update"]["age_s"] >= 0
        metrics = httpx.get(url_b + "/metrics").text
        applied = metric(metrics, "ctr_model_updates_applied_total")  # (summed over workers)
        assert applied == 2 * 3  # both workers applied u1, u2 and u3
        assert metric(metrics, "ctr_model_update ") == 3
        published = metric(metrics, "ctr_model_published_timestamp_seconds")
        assert 0 <= time.time() - published < 600
        assert "ctr_model_published_timestamp_seconds" in metrics
    finally:
        for process in (a, b):
            if process.poll() is None:
                stop(process)

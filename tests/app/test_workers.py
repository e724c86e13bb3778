"""Several workers under the supervisor, as users run them: ``python -m app`` with
CTR_WORKERS=2 in a process of its own, over real HTTP. One /metrics, one model version
across reloads, replacement of a dead worker, and a drain on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.mmap_dict import MmapedDict

from model.checkpoint import WEIGHTS_FILE, Checkpoint
from model.default_model import DEFAULT_MODEL_DIR
from model.features import Field, Vocabulary
from model.predict import Predictor
from tests.app.test_routes import random_rows
from tests.checkpoints import random_checkpoint
from tests.processes import children, memory_of
from tests.redis_servers import RedisServer, free_port
from tests.server_process import start

WORKERS = {"CTR_WORKERS": "2", "CTR_ADMIN_ENDPOINTS": "true", "CTR_MODELS_ROOT": "/"}
CLIENTS = 32
PREDICTED = {"endpoint": "/predict", "status": "200"}  # the labels of /predict's 200s


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    messages: list[str] = field(default_factory=list)  # its log's, once it stopped


@contextmanager
def supervised(**env: str) -> Iterator[Served]:
    """``python -m app`` with two workers, ready; it must stop with status 0."""
    process, url = start(**{**WORKERS, **env})
    served = Served(process, url)
    try:
        wait_for_workers(process, 2)
        # Until a worker has started, connections to its socket wait in its backlog: an
        # answer on each of several connections means both have.
        for _ in range(20):
            assert httpx.get(url + "/readyz").status_code == 200
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    served.messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.strip()]


def wait_for_workers(process: subprocess.Popen[str], count: int, timeout: float = 60) -> set[int]:
    deadline = time.monotonic() + timeout
    while len(pids := children(process.pid)) != count:
        assert time.monotonic() < deadline, f"workers: {pids}"
        time.sleep(0.05)
    return pids


def versions_served(url: str, rows: int = 40) -> Counter[str]:
    """The versions of ``rows`` answers, each on a connection of its own (so they reach
    whichever worker accepts first)."""
    served: Counter[str] = Counter()
    for _ in range(rows):
        response = httpx.post(url + "/predict", json={"features": {"C1": "05db9164"}})
        assert response.status_code == 200, response.text
        served[response.json()["model_version"]] += 1
    return served


def per_worker(metrics_dir: Path, name: str, labels: dict[str, str]) -> dict[int, float]:
    """A counter's value in each worker's metric file."""
    values = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, sample_labels, _ = json.loads(key)
            if sample == name and sample_labels == labels:
                values[pid] = values.get(pid, 0.0) + value
    return values


def counted(url: str, sample: str) -> float:
    """A sample's value in /metrics (0 when absent)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


class Load:
    """``CLIENTS`` threads posting /predict rows until stopped, each on its own
    keep-alive connection; every answer and every failure kept."""

    def __init__(self, url: str, rows: list[dict[str, Any]]) -> None:
        self.url, self.rows = url, rows
        self.answers: list[tuple[int, float, str]] = []
        self.failures: list[str] = []
        self.transport_errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, args=(i,)) for i in range(CLIENTS)]

    def _send(self, worker: int) -> None:
        i = worker
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                row = i % len(self.rows)
                try:
                    response = client.post("/predict", json={"features": self.rows[row]})
                except httpx.TransportError as exc:
                    self.transport_errors.append(repr(exc))
                    if self._stop.is_set() or len(self.transport_errors) > 1000:
                        return
                    time.sleep(0.01)
                    continue
                if response.status_code == 200:
                    body = response.json()
                    self.answers.append((row, body["probability"], body["model_version"]))
                else:
                    self.failures.append(f"{response.status_code} {response.text}")
                i += CLIENTS

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def wait(self, more: int, timeout: float = 60) -> None:
        target = len(self.answers) + more
        deadline = time.monotonic() + timeout
        while len(self.answers) < target:
            assert time.monotonic() < deadline, f"stalled: {self.failures[-3:]}"
            time.sleep(0.01)


def test_auto_workers_log_their_count_and_threads() -> None:
    process, url = start(CTR_WORKERS="auto", CTR_LOG_LEVEL="info")
    try:
        assert httpx.get(url + "/readyz").status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    cpus = len(os.sched_getaffinity(0))
    messages = [json.loads(line)["message"] for line in stderr.splitlines() if line.strip()]
    if cpus > 1:
        assert any(f"with {cpus} workers of 1 torch thread" in m for m in messages), messages
    else:
        assert any("on 1 torch threads" in m or "on 1 torch thread" in m for m in messages)


def test_metrics_count_every_request_once_over_both_workers(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    with supervised(CTR_METRICS_DIR=str(metrics_dir)) as server:
        url = server.url
        sent = 120
        for _ in range(sent):  # a connection each: both workers take some
            response = httpx.post(url + "/predict", json={"features": {"I1": 1}})
            assert response.status_code == 200
        assert counted(url, 'ctr_requests_total{endpoint="/predict",status="200"}') == sent
        assert counted(url, "ctr_rows_predicted_total") == sent
        assert counted(url, 'ctr_request_latency_seconds_count{endpoint="/predict"}') == sent
        spread = per_worker(metrics_dir, "ctr_requests_total", PREDICTED)
        assert len(spread) == 2 and all(v > 0 for v in spread.values()), spread
        assert sum(spread.values()) == sent


def test_a_reload_under_load_switches_every_worker_and_fails_no_call(
    offline: Predictor, tiny_checkpoint: Checkpoint
) -> None:
    tiny = Predictor(tiny_checkpoint)
    rows = random_rows(offline, 200, seed=5, values=30)
    expected = {
        offline.checkpoint.version: offline.predict_rows(rows),
        tiny_checkpoint.version: tiny.predict_rows(rows),
    }
    with supervised() as server, Load(server.url, rows) as load:
        url = server.url
        load.wait(200)
        response = httpx.post(
            url + "/admin/reload", json={"model_dir": str(tiny_checkpoint.path)}, timeout=120
        )
        assert response.status_code == 200, response.text
        assert response.json() == {
            "model_version": tiny_checkpoint.version,
            "previous_version": offline.checkpoint.version,
            "workers": 2,
        }
        mark = len(load.answers)
        load.wait(200)
        # Answered after the reload: every worker serves the new version.
        assert {v for _, _, v in load.answers[mark:]} == {tiny_checkpoint.version}
        assert versions_served(url) == {tiny_checkpoint.version: 40}
        back = httpx.post(url + "/admin/reload", json={}, timeout=120)  # CTR_MODEL_DIR
        assert (
            back.status_code == 200 and back.json()["model_version"] == offline.checkpoint.version
        )
        load.wait(200)
    assert not load.failures and not load.transport_errors, (load.failures, load.transport_errors)
    for row, probability, version in load.answers:  # each answer by the model it names
        assert probability == pytest.approx(expected[version][row], abs=1e-6)
    assert {version for _, _, version in load.answers} == set(expected)


def test_a_killed_worker_is_replaced_by_one_serving_the_reloaded_version(
    tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    with supervised(CTR_METRICS_DIR=str(tmp_path)) as server:
        process, url = server.process, server.url
        sent = sum(versions_served(url, 10).values())  # counted by both workers
        reload = httpx.post(
            url + "/admin/reload", json={"model_dir": str(tiny_checkpoint.path)}, timeout=120
        )
        assert reload.status_code == 200, reload.text
        victim, survivor = sorted(children(process.pid))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (pids := children(process.pid)) == {survivor} or victim in pids:
            assert time.monotonic() < deadline, pids
            time.sleep(0.05)
        (replacement,) = pids - {survivor}
        # Ready once it answers: until then the survivor takes every connection.
        deadline = time.monotonic() + 60
        while per_worker(tmp_path, "ctr_requests_total", PREDICTED).get(replacement, 0) == 0:
            assert time.monotonic() < deadline, "the replacement never answered"
            assert versions_served(url, 10) == {tiny_checkpoint.version: 10}
            sent += 10
        assert versions_served(url) == {tiny_checkpoint.version: 40}
        sent += 40
        # Every call counted once, the dead worker's too (a count lags its answer a little).
        deadline = time.monotonic() + 10
        while (
            total := counted(url, 'ctr_requests_total{endpoint="/predict",status="200"}')
        ) < sent:
            assert time.monotonic() < deadline, (total, sent)
            time.sleep(0.05)
        assert total == sent
    died = (
        f"worker {victim} died (killed by SIGKILL): starting another on {tiny_checkpoint.version}"
    )
    assert any(m.startswith(died) for m in server.messages)


def test_a_worker_that_does_not_switch_in_time_is_named_and_replaced(
    tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    env = {"CTR_RELOAD_TIMEOUT_S": "3", "CTR_SHUTDOWN_TIMEOUT_S": "2"}
    with (
        supervised(CTR_METRICS_DIR=str(tmp_path), **env) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        # Which worker this keep-alive connection reached: the other one gets stuck.
        before = per_worker(tmp_path, "ctr_requests_total", PREDICTED)
        assert client.post("/predict", json={"features": {}}).status_code == 200
        deadline = time.monotonic() + 10  # (counted just after the answer is sent)
        while not (
            changed := [
                pid
                for pid, count in per_worker(tmp_path, "ctr_requests_total", PREDICTED).items()
                if count != before.get(pid)
            ]
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (mine,) = changed
        (stuck,) = children(server.process.pid) - {mine}
        os.kill(stuck, signal.SIGSTOP)  # it can neither load nor answer
        try:
            response = client.post("/admin/reload", json={"model_dir": str(tiny_checkpoint.path)})
            assert response.status_code == 504, response.text
            detail = response.json()["detail"]
            assert f"workers [{stuck}] did not switch to {tiny_checkpoint.version}" in detail
            assert "replaced by workers serving it" in detail
            # Its replacement takes its connections: every answer is the new version.
            assert versions_served(server.url) == {tiny_checkpoint.version: 40}
        finally:
            os.kill(stuck, signal.SIGCONT)
        # Woken, it drains and exits by itself: the load it missed holds nothing up.
        deadline = time.monotonic() + 30
        while stuck in children(server.process.pid):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert not [m for m in server.messages if "did not stop" in m or "ended with" in m]
    assert f"worker {stuck} did not load {tiny_checkpoint.version} within 3s: replacing it" in (
        server.messages
    )


def test_sigterm_during_a_reload_stops_every_worker_in_time(tiny_checkpoint: Checkpoint) -> None:
    """One worker cannot load (stopped); the other has loaded and waits for the swap
    when SIGTERM comes: the reload is abandoned, both drain, the server exits 0 well
    within the drain's time, and no worker had to be killed."""
    env = {"CTR_SHUTDOWN_TIMEOUT_S": "5", "CTR_RELOAD_TIMEOUT_S": "60"}
    with supervised(CTR_MODEL_DIR=str(tiny_checkpoint.path), **env) as server:
        stuck, _ = sorted(children(server.process.pid))
        os.kill(stuck, signal.SIGSTOP)
        try:
            server.process.send_signal(signal.SIGHUP)  # reload CTR_MODEL_DIR
            time.sleep(2)  # (the other worker loads the tiny model in well under that)
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
        finally:
            os.kill(stuck, signal.SIGCONT)
        server.process.wait(timeout=60)
        assert time.monotonic() - started < 5
    assert not [m for m in server.messages if "did not stop" in m or "ended with" in m]


def test_a_bad_checkpoint_leaves_every_worker_on_the_old_one(
    offline: Predictor, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(DEFAULT_MODEL_DIR, broken)
    with (broken / WEIGHTS_FILE).open("r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(b"\x00" * 16)
    version = offline.checkpoint.version
    with supervised() as server:
        url = server.url
        response = httpx.post(url + "/admin/reload", json={"model_dir": str(broken)})
        assert response.status_code == 422, response.text
        assert "does not match its version" in response.json()["detail"]
        missing = httpx.post(url + "/admin/reload", json={"model_dir": str(tmp_path / "none")})
        assert missing.status_code == 404
        assert versions_served(url) == {version: 40}


def test_sigterm_under_load_cuts_off_no_accepted_call(offline: Predictor, tmp_path: Path) -> None:
    """Every call a worker answered reached its client: the workers' own count of the
    calls they answered equals the answers the clients got (the metric files outlive
    the server in CTR_METRICS_DIR). The calls that failed failed to connect or were
    sent on a connection the server had closed, unread."""
    rows = random_rows(offline, 100, seed=3, values=30)
    with supervised(CTR_METRICS_DIR=str(tmp_path)) as server, Load(server.url, rows) as load:
        load.wait(300)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
    served = per_worker(tmp_path, "ctr_requests_total", PREDICTED)
    assert not load.failures, load.failures[:3]
    assert sum(served.values()) == len(load.answers)
    # Every worker drained and ended by itself: none was killed, no call was cancelled.
    assert not [m for m in server.messages if "did not stop" in m or "ended with" in m]
    assert not [m for m in server.messages if m.startswith("Cancel ")]


def test_a_worker_that_refuses_the_load_aborts_the_reload_everywhere(
    redis_server: RedisServer, tiny_checkpoint: Checkpoint
) -> None:
    """Redis takes no more writes: each worker loads the new model but cannot publish
    its rows, and refuses it (its current rows are in Redis). The supervisor verified
    the checkpoint, so this refusal comes from the workers: the reload is a 503, and
    every worker still serves the old version from Redis."""
    env = {"CTR_REDIS_URL": redis_server.url, "CTR_REDIS_TIMEOUT_MS": "2000"}
    with supervised(**env) as server:
        version = httpx.get(server.url + "/readyz").json()["model_version"]
        with redis_server.client() as r:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", "1")  # every write: OOM
        response = httpx.post(
            server.url + "/admin/reload",
            json={"model_dir": str(tiny_checkpoint.path)},
            timeout=120,
        )
        assert response.status_code == 503, response.text
        assert f"still serving {version}" in response.json()["detail"]
        assert versions_served(server.url) == {version: 40}
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["embedding_store"]["state"] == "ok", ready
    refused = [m for m in server.messages if m.startswith("reload refused")]
    assert refused and all(version in m for m in refused)


def test_redis_mode_publishes_once_whatever_the_worker_count(redis_server: RedisServer) -> None:
    with supervised(CTR_REDIS_URL=redis_server.url, CTR_REDIS_TIMEOUT_MS="2000") as server:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["embedding_store"]["backend"] == "redis"
        assert versions_served(server.url, 10) == {ready["model_version"]: 10}
    assert sum(m.startswith("published ") for m in server.messages) == 1, server.messages


def private_dirty_of_weights(pid: int) -> int:
    """kB of a process's mapping of the verified weights that it has written to."""
    dirty, inside, found = 0, False, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if not line[:1].isupper():  # a mapping's header: address range, perms, ..., path
            inside = line.rstrip().endswith(".safetensors")
            found = found or inside
        elif inside and line.startswith("Private_Dirty:"):
            dirty += int(line.split()[1])
    assert found, "the weights are not mapped"
    return dirty


@pytest.mark.slow
def test_two_workers_cost_at_most_1_3x_one_in_memory(tmp_path: Path) -> None:
    """A model of 1M embedding rows: the proportional set size of the whole server (the
    supervisor and 2 workers) is at most 1.3x the resident size of 1 worker alone."""
    values = 125_000
    fields = tuple(
        Field(f"C{j}", "category", vocab=Vocabulary(tuple(f"{j}-{i:x}" for i in range(values))))
        for j in range(8)
    )
    checkpoint = random_checkpoint(tmp_path / "big", fields, seed=1)
    assert sum(checkpoint.config.vocab_sizes) >= 1_000_000
    row = {f"C{j}": f"{j}-{j * 1000:x}" for j in range(8)}
    measured = {}
    for workers in (1, 2):
        process, url = start(CTR_WORKERS=str(workers), CTR_MODEL_DIR=str(checkpoint.path))
        try:
            wait_for_workers(process, 0 if workers == 1 else workers)
            for _ in range(200):  # a working set: encoding, forward passes
                assert httpx.post(url + "/predict", json={"features": row}).status_code == 200
            measured[workers] = memory_of(process.pid)
            if workers == 2:  # the tables are the page cache's: no worker wrote a page
                for pid in children(process.pid):
                    assert private_dirty_of_weights(pid) == 0
        finally:
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=60)
    ratio = measured[2]["Pss"] / measured[1]["Rss"]
    assert ratio <= 1.3, measured


def test_sighup_reloads_every_worker_from_the_model_dir(
    offline: Predictor, tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """SIGHUP to the supervisor: CTR_MODEL_DIR read again, every worker switched."""
    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    with supervised(CTR_MODEL_DIR=str(model_dir)) as server:
        assert versions_served(server.url, 10) == {offline.checkpoint.version: 10}
        shutil.rmtree(model_dir)
        shutil.copytree(tiny_checkpoint.path, model_dir)
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while versions_served(server.url, 20) != {tiny_checkpoint.version: 20}:
            assert time.monotonic() < deadline, "SIGHUP did not switch every worker"
            time.sleep(0.1)
    reloaded = f"reloaded: 2 workers serve {tiny_checkpoint.version} from {model_dir}"
    assert reloaded in server.messages


def test_workers_whose_supervisor_is_killed_stop() -> None:
    """SIGKILL leaves the supervisor no chance to stop its workers: each sees its
    control channel close and stops by itself, instead of serving on as an orphan."""
    process, _ = start(**WORKERS)
    try:
        workers = wait_for_workers(process, 2)
        process.kill()
        process.communicate(timeout=30)
        deadline = time.monotonic() + 60
        while alive := [pid for pid in workers if Path(f"/proc/{pid}").exists()]:
            assert time.monotonic() < deadline, f"orphaned workers still run: {alive}"
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()


def test_a_server_whose_checkpoint_does_not_load_exits_1(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text("{not json")
    env = {**os.environ, **WORKERS, "CTR_MODEL_DIR": str(tmp_path), "CTR_PORT": str(free_port())}
    run = subprocess.run(
        [sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 1, run.stderr[-2000:]
    assert "cannot start" in run.stderr


def v2_inputs(rows: list[dict[str, Any]], binary: bool) -> tuple[bytes, dict[str, str]]:
    """An inference request of ``rows``: every field a tensor; with ``binary`` the sparse
    ones as binary BYTES ("" missing), the dense ones in JSON (null missing)."""
    inputs, data = [], b""
    for name in [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]:
        values = [row.get(name) for row in rows]
        tensor: dict[str, Any] = {"name": name, "shape": [len(rows)]}
        if name.startswith("I"):
            tensor |= {"datatype": "FP32", "data": values}
        elif binary:
            raw = [("" if v is None else str(v)).encode() for v in values]
            chunk = b"".join(len(v).to_bytes(4, "little") + v for v in raw)
            tensor |= {"datatype": "BYTES", "parameters": {"binary_data_size": len(chunk)}}
            data += chunk
        else:
            tensor |= {"datatype": "BYTES", "data": values}
        inputs.append(tensor)
    header = json.dumps({"inputs": inputs}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def test_every_scoring_endpoint_answers_as_the_offline_model_over_two_workers_in_redis_mode(
    offline: Predictor, redis_server: RedisServer, tmp_path: Path
) -> None:
    """/predict_many, /rank (candidates read over their own fields) and v2 inference in
    JSON and in binary (rows kept as columns), on two workers reading rows from Redis
    with no tables: every answer the offline model's, to 1e-6, from both workers."""
    metrics_dir = tmp_path / "metrics"
    env = {"CTR_REDIS_URL": redis_server.url, "CTR_HOLD_TABLES": "false"}
    with supervised(**env, CTR_REDIS_TIMEOUT_MS="2000", CTR_METRICS_DIR=str(metrics_dir)) as s:
        for seed in range(8):  # a connection per call: both workers take some
            rows = random_rows(offline, 30, seed, values=20)
            expected = offline.predict_rows(rows)
            many = httpx.post(s.url + "/predict_many", json={"instances": rows})
            assert many.status_code == 200, many.text
            np.testing.assert_allclose(many.json()["probabilities"], expected, atol=1e-6)
            shared = [f"I{i}" for i in range(1, 14)][seed:] + [f"C{i}" for i in range(1, 9)]
            context = {name: rows[0].get(name) for name in shared}
            candidates = [{k: v for k, v in r.items() if k not in shared} for r in rows]
            merged = [{**context, **c} for c in candidates]
            ranked = httpx.post(
                s.url + "/rank", json={"context": context, "candidates": candidates}
            )
            assert ranked.status_code == 200, ranked.text
            np.testing.assert_allclose(
                ranked.json()["probabilities"], offline.predict_rows(merged), atol=1e-6
            )
            for binary in (False, True):
                body, headers = v2_inputs(rows, binary)
                inferred = httpx.post(s.url + "/v2/models/ctr/infer", content=body, headers=headers)
                assert inferred.status_code == 200, inferred.text
                got = inferred.json()["outputs"][0]["data"]
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        spread = per_worker(metrics_dir, "ctr_rows_predicted_total", {})
        assert sum(v > 0 for v in spread.values()) == 2, spread  # (the supervisor's: 0)

"""Request ids and the prediction log: what is logged, its sinks, and that a sink that
fails (Redis down, a full disk, a folder that cannot be written) costs no request."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from app.config import Settings
from app.main import create_app
from app.predlog import STREAM_FIELD, StreamSink, export_stream
from model.checkpoint import Checkpoint, load_checkpoint
from model.data import Schema
from model.default_model import DEFAULT_MODEL_DIR
from model.join import join, log_files, read_labels, read_log, train_command
from model.predict import Predictor
from model.train import TrainConfig, train
from tests.app.conftest import ClientFactory, lifespan
from tests.app.test_routes import random_rows
from tests.redis_servers import RedisServer
from tests.server_process import start

pytestmark = pytest.mark.anyio


def records(directory: Path) -> list[dict[str, Any]]:
    return list(read_log(log_files([directory])))


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry ``labels``, in an exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_every_answer_carries_a_request_id(make_client: ClientFactory) -> None:
    async with make_client() as client:
        given = await client.post(
            "/predict", json={"features": {}}, headers={"X-Request-ID": "abc-123"}
        )
        assert given.headers["x-request-id"] == "abc-123"
        made = await client.post("/predict", json={"features": {}})
        other = await client.post("/predict", json={"features": {}})
        assert len(made.headers["x-request-id"]) == 32
        assert made.headers["x-request-id"] != other.headers["x-request-id"]
        # Errors too; and an id that is no sensible one is replaced, not echoed.
        bad = await client.post("/predict", json={"nope": 1}, headers={"X-Request-ID": "x" * 300})
        assert bad.status_code == 422 and len(bad.headers["x-request-id"]) == 32
        spaced = await client.get("/healthz", headers={"X-Request-ID": "a b"})
        assert spaced.headers["x-request-id"] != "a b"


async def test_a_bug_answers_500_with_the_request_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler of unexpected errors answers outside every middleware: it sets the id
    itself, and says nothing of the internals."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    app = create_app(Settings(model_dir=DEFAULT_MODEL_DIR))
    async with lifespan(app) as manager:
        # (the server error middleware re-raises after answering: not into the test)
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://ctr") as client:
            monkeypatch.setattr("app.runtime.Runtime.predict_one", broken)
            answer = await client.post(
                "/predict", json={"features": {}}, headers={"X-Request-ID": "bug-1"}
            )
    assert answer.status_code == 500 and answer.json() == {"detail": "internal error"}
    assert answer.headers["x-request-id"] == "bug-1"


async def test_the_log_holds_every_row_as_served(
    make_client: ClientFactory, tmp_path: Path, offline: Predictor
) -> None:
    rows = random_rows(offline, 7, seed=1, values=30)
    async with make_client(log_sample_rate=1.0, log_dir=tmp_path) as client:
        one = await client.post(
            "/predict", json={"features": rows[0]}, headers={"X-Request-ID": "one"}
        )
        many = await client.post(
            "/predict_many", json={"instances": rows}, headers={"X-Request-ID": "many"}
        )
        context = {"C1": "05db9164", "I1": 3}
        candidates = [{"C3": "a"}, {"C3": "b"}]
        ranked = await client.post(
            "/rank",
            json={"context": context, "candidates": candidates},
            headers={"X-Request-ID": "rank"},
        )
        v2 = await client.post(
            "/v2/models/ctr/infer",
            json={"inputs": [{"name": "C1", "datatype": "BYTES", "shape": [2], "data": ["a", ""]}]},
            headers={"X-Request-ID": "v2"},
        )
        for response in (one, many, ranked, v2):
            assert response.status_code == 200, response.text
        await wait_for(lambda: len(records(tmp_path)) == 1 + len(rows) + 2 + 2)
        metrics = (await client.get("/metrics")).text
    logged = {(r["request_id"], r["row"]): r for r in records(tmp_path)}
    version = one.json()["model_version"]
    assert logged["one", 0]["features"] == rows[0]
    assert logged["one", 0]["probability"] == one.json()["probability"]
    assert {r["model_version"] for r in logged.values()} == {version}
    assert logged["one", 0]["endpoint"] == "/predict"
    for i, row in enumerate(rows):
        assert logged["many", i]["features"] == row
        assert logged["many", i]["probability"] == many.json()["probabilities"][i]
    # /rank: the candidate's fields with the context's, as scored.
    assert logged["rank", 1]["features"] == {**context, **candidates[1]}
    assert logged["rank", 1]["probability"] == ranked.json()["probabilities"][1]
    assert logged["v2", 0]["features"] == {"C1": "a"} and logged["v2", 1]["features"] == {}
    assert logged["v2", 0]["endpoint"] == "/v2/models/{name}/infer"
    assert metric(metrics, "ctr_prediction_log_records_total", sink="file") == len(logged)
    offline_probabilities = offline.predict_rows([r["features"] for r in logged.values()])
    np.testing.assert_allclose(
        [r["probability"] for r in logged.values()], offline_probabilities, rtol=1e-6, atol=1e-7
    )


async def test_sampling_logs_about_the_share_asked(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    async with make_client(log_sample_rate=0.25, log_dir=tmp_path) as client:
        for _ in range(400):
            assert (await client.post("/predict", json={"features": {}})).status_code == 200
    assert 60 <= len(records(tmp_path)) <= 140  # 100 expected; 4 standard deviations


async def test_log_files_rotate_by_size_and_keep_their_backups(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    async with make_client(
        log_sample_rate=1.0, log_dir=tmp_path, log_max_bytes=2000, log_backups=2
    ) as client:
        for _ in range(80):
            await client.post("/predict", json={"features": {"C1": "x"}})
            await asyncio.sleep(0.005)
    name = f"predictions-{os.getpid()}.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name, f"{name}.1", f"{name}.2"]
    # A file is rotated before a write would take it past the limit (one write holds
    # the calls queued meanwhile: a few records at most here).
    assert all(p.stat().st_size <= 2000 + 1500 for p in tmp_path.iterdir())
    assert len(records(tmp_path)) < 80  # the oldest went with the third rotation


async def test_a_redis_stream_sink_holds_the_records_capped(
    make_client: ClientFactory, redis_server: RedisServer, offline: Predictor, tmp_path: Path
) -> None:
    rows = random_rows(offline, 50, seed=3, values=30)
    settings = {
        "embedding_store": "memory",
        "redis_url": redis_server.url,
        "log_sample_rate": 1.0,
        "log_stream": "predictions",
        "log_stream_maxlen": 100,
    }
    async with make_client(**settings) as client:
        answer = await client.post(
            "/predict_many", json={"instances": rows}, headers={"X-Request-ID": "s"}
        )
        redis = redis_server.client()

        def stream() -> list[dict[str, Any]]:
            entries = redis.xrange("predictions")
            return [
                json.loads(line)
                for _, fields in entries
                for line in fields[STREAM_FIELD.encode()].splitlines()
            ]

        await wait_for(lambda: len(stream()) == 50)
        first = stream()[0]
        assert first["request_id"] == "s" and first["features"] == rows[0]
        assert first["probability"] == answer.json()["probabilities"][0]
        # Exported to a file, as model.join reads them; the next export takes the new ones.
        exported = tmp_path / "stream.jsonl"
        count, last = export_stream(redis, "predictions", exported)
        assert count == 50 and [r["row"] for r in read_log([exported])] == list(range(50))
        assert export_stream(redis, "predictions", exported, after=last) == (0, last)
    # Entries of at most 100 records; about maxlen records kept (trimmed by whole nodes).
    sink = StreamSink(redis_server.client(), "capped", maxlen=20_000)
    sink.write([b'{"n": %d}' % n for n in range(1000)])
    assert redis.xlen("capped") == 10
    for _ in range(49):
        sink.write([b'{"n": 0}'] * 1000)
    kept = sum(
        fields[STREAM_FIELD.encode()].count(b"\n") + 1 for _, fields in redis.xrange("capped")
    )
    assert 20_000 <= kept <= 30_000


async def test_a_failing_sink_costs_no_request_and_counts_its_drops(
    make_client: ClientFactory, redis_server: RedisServer, tmp_path: Path, offline: Predictor
) -> None:
    rows = random_rows(offline, 10, seed=4, values=30)
    expected = offline.predict_rows(rows)
    full = tmp_path / "full"
    full.mkdir()
    # A full disk: the log file is /dev/full, where every write fails with ENOSPC.
    (full / f"predictions-{os.getpid()}.jsonl").symlink_to("/dev/full")
    settings = {
        "embedding_store": "memory",
        "redis_url": redis_server.url,
        "log_sample_rate": 1.0,
        "log_dir": full,
        "log_stream": "predictions",
    }
    async with make_client(**settings) as client:
        redis_server.kill()  # and Redis is gone
        for _ in range(20):
            answer = await client.post("/predict_many", json={"instances": rows})
            assert answer.status_code == 200
            np.testing.assert_allclose(
                answer.json()["probabilities"], expected, rtol=1e-6, atol=1e-7
            )

        def dropped(sink: str) -> float:
            text = metrics_text[0]
            return metric(text, "ctr_prediction_log_dropped_total", sink=sink)

        metrics_text = [""]

        async def scrape() -> None:
            metrics_text[0] = (await client.get("/metrics")).text

        deadline = time.monotonic() + 10
        while True:
            await scrape()
            if dropped("file") == dropped("redis") == 200:
                break
            assert time.monotonic() < deadline, metrics_text[0]
            await asyncio.sleep(0.05)
        assert metric(metrics_text[0], "ctr_prediction_log_records_total", sink="file") == 0


async def test_a_log_folder_that_cannot_be_made_drops_and_recovers(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the folder should be")
    async with make_client(log_sample_rate=1.0, log_dir=blocked / "logs") as client:
        for _ in range(5):
            assert (await client.post("/predict", json={"features": {}})).status_code == 200

        async def drops() -> float:
            text = (await client.get("/metrics")).text
            return metric(text, "ctr_prediction_log_dropped_total", sink="file")

        deadline = time.monotonic() + 10
        while await drops() < 5:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        blocked.unlink()  # the disk is writable again: after its rest, the sink writes
        await asyncio.sleep(1.2)
        deadline = time.monotonic() + 10
        while not (blocked / "logs").exists() or not records(blocked / "logs"):
            assert time.monotonic() < deadline
            await client.post("/predict", json={"features": {}})
            await asyncio.sleep(0.1)


def test_join_round_trip_reproduces_the_served_probabilities_and_trains(
    tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    """Served by 2 workers with the log on: the joined rows, scored offline from the
    Parquet file the join writes, give the served probabilities to 1e-6, and training
    reads that file as it is."""
    logs = tmp_path / "logs"
    process, url = start(
        CTR_MODEL_DIR=str(tiny_checkpoint.path),
        CTR_WORKERS="2",
        CTR_LOG_SAMPLE_RATE="1",
        CTR_LOG_DIR=str(logs),
        CTR_LOG_LEVEL="error",
    )
    rows = random_rows(Predictor(tiny_checkpoint), 300, seed=5, values=30)
    served: dict[str, list[float]] = {}
    try:
        with httpx.Client(base_url=url) as client:
            for n, start_at in enumerate(range(0, 300, 30)):
                rid = f"req-{n}"
                answer = client.post(
                    "/predict_many",
                    json={"instances": rows[start_at : start_at + 30]},
                    headers={"X-Request-ID": rid},
                )
                assert answer.status_code == 200
                served[rid] = answer.json()["probabilities"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == 0
    assert len({p.name for p in logs.iterdir()}) >= 1
    # Clicks on a few rows; every other logged row is a negative.
    clicks = tmp_path / "clicks.jsonl"
    clicked = {(f"req-{n}", n % 30) for n in range(10)}
    clicks.write_text(
        "".join(json.dumps({"request_id": r, "row": i, "label": 1}) + "\n" for r, i in clicked)
    )
    out = tmp_path / "joined.parquet"
    quality = join([logs], read_labels([clicks]), tiny_checkpoint.features, out)
    assert quality[tiny_checkpoint.version]["rows"] == 300
    assert quality[tiny_checkpoint.version]["clicks"] == 10
    table = pq.read_table(out)
    assert table.num_rows == 300 and table.column("label").to_pylist().count(1.0) == 10
    columns = {
        f.name: (
            table.column(f.name).to_numpy(zero_copy_only=False).astype(object)
            if f.kind == "sparse"
            else table.column(f.name).fill_null(float("nan")).to_numpy()
        )
        for f in tiny_checkpoint.features.fields
    }
    offline = Predictor(tiny_checkpoint).predict_columns(columns, table.num_rows)
    expected = [served[r["request_id"]][r["row"]] for r in read_log(log_files([logs]))]
    np.testing.assert_allclose(offline, expected, rtol=1e-6, atol=1e-7)
    # The printed command's flags read it as it is.
    command = train_command(out, tiny_checkpoint.features).split()
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    schema = Schema(
        flags["--label"], tuple(flags["--dense"].split(",")), tuple(flags["--sparse"].split(","))
    )
    config = TrainConfig(epochs=1, embed_dim=4, hidden_units=(8,), valid_fraction=0.2)
    train([out], "parquet", schema, tmp_path / "next", config, progress=False)
    assert (
        load_checkpoint(tmp_path / "next").features.by_name.keys()
        == tiny_checkpoint.features.by_name.keys()
    )


def test_a_write_that_fails_midway_leaves_no_half_record(tmp_path: Path) -> None:
    """A file-size limit (as a full disk) cuts a write short: it is cut back, and the
    next record starts a line of its own."""
    script = """
import resource, signal, sys
from pathlib import Path
from app.config import Settings
from app.main import create_app
from app.predlog import FileSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sink = FileSink(Path(sys.argv[1]), 1 << 20, 1)
sink.write([b'{"n": 1}'])
resource.setrlimit(resource.RLIMIT_FSIZE, (60, resource.RLIM_INFINITY))
try:
    sink.write([b'{"n": 2, "pad": "' + b"x" * 100 + b'"}'])
except OSError:
    print("refused")
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
sink.write([b'{"n": 3}'])
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == "refused"
    (log,) = tmp_path.iterdir()
    assert log.read_text().splitlines() == ['{"n": 1}', '{"n": 3}']


def test_join_merges_processes_by_time_and_joins_a_repeated_key_once(
    tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()

    def record(rid: str, when: float) -> str:
        body = {"request_id": rid, "row": 0, "time": when, "model_version": "v"}
        return json.dumps({**body, "features": {"C1": rid}, "probability": 0.5}) + "\n"

    (logs / "predictions-100.jsonl").write_text(record("a", 1.0) + record("c", 3.0))
    (logs / "predictions-99.jsonl").write_text(record("b", 2.0) + record("a", 4.0))
    assert [r["request_id"] for r in read_log(log_files([logs]))] == ["a", "b", "c", "a"]
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("request_id,row,label\nb,0,1\n")
    out = tmp_path / "joined.parquet"
    quality = join([logs], read_labels([clicks]), tiny_checkpoint.features, out)
    assert quality["v"]["rows"] == 3 and quality["v"]["clicks"] == 1
    table = pq.read_table(out)
    assert table.column("C1").to_pylist() == ["a", "b", "c"]
    assert table.column("label").to_pylist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"row": 0, "label": 1}\n', "entry 1 is no label"),
        ('{"request_id": "a", "label": "yes"}\n', "entry 1 is no label"),
        ('{"request_id": "a", "label": 2}\n', "label 2.0, not 0 or 1"),
    ],
)
def test_labels_that_are_no_labels_are_refused_by_line(
    tmp_path: Path, text: str, message: str
) -> None:
    labels = tmp_path / "clicks.jsonl"
    labels.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_labels([labels])

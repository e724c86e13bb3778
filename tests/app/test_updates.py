"""Streamed updates (issue 15), in process: a real Redis, the real app, real checkpoints.

The replicas-as-processes tests are in test_updates_replicas.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.config import Settings
from app.follower import UpdateFollower
from app.metrics import Metrics
from app.runtime import load_serving_model
from app.store.client import RedisClient, connect
from app.store.layout import Layout
from app.store.publisher import PublishFailed, publish, publish_update
from app.store.updates import (
    AHEAD,
    TAG,
    Update,
    UpdateKeys,
    UpdateRefused,
    pick_row,
    tag_row,
    untag_row,
)
from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.data import criteo_json_rows
from model.features import FeatureSpec, Field, Vocabulary, value_key
from model.predict import Predictor
from model.train import main as train_main
from model.warmstart import extend_model
from tests.app.conftest import ClientFactory
from tests.redis_servers import RedisServer, SlowProxy, free_port

pytestmark = pytest.mark.anyio

EDITED_FIELD = "C3"
TOUCHED = 20  # of the field's values, the first TOUCHED get new rows
ADDED = ("fresh-value-1", "fresh-value-2")
PARTITIONS: int = Settings.model_fields["redis_partitions"].default  # (CTR_REDIS_PARTITIONS)


def edited(
    parent: Checkpoint, out: Path, field: str = EDITED_FIELD, shift: float = 0.5
) -> Checkpoint:
    """A checkpoint "trained on" from ``parent`` that only moved the rows of ``field``'s
    first TOUCHED values and learned rows for ADDED: its dense weights and OOV rows are
    the parent's, so no other value's answer may move."""
    spec = parent.read_features()
    fields = []
    for f in spec.fields:
        if f.name == field:
            assert f.vocab is not None
            new_values = tuple(v for v in ADDED if v not in set(f.vocab.values))
            f = Field(f.name, f.transform, f.stats, Vocabulary(f.vocab.values + new_values))
        fields.append(f)
    grown = FeatureSpec(tuple(fields))
    model = extend_model(parent.build_model(), spec, grown)
    j = [f.name for f in grown.embedded_fields].index(field)
    start = int(model.offsets[j])
    old_size = spec.vocab_sizes[j]
    assert model.sparse_rows is not None
    with torch.no_grad():
        table = model.sparse_rows.weight
        table[start + 1 : start + 1 + TOUCHED] += shift
        added = grown.vocab_sizes[j] - old_size
        table[start + old_size : start + old_size + added] = torch.linspace(
            -1, 1, added * table.shape[1]
        ).reshape(added, table.shape[1])
    save_checkpoint(
        out,
        model,
        grown,
        created_at="2026-01-02T00:00:00+00:00",
        training={"parent": {"version": parent.version, "new_values": len(ADDED)}},
    )
    return load_checkpoint(out)


@pytest.fixture(scope="module")
def rows(generated_tsv: Path) -> list[dict[str, Any]]:
    picked = criteo_json_rows(generated_tsv)[:400]
    # Some rows carry the new values: OOV to the base, their own rows after the update.
    for i, row in enumerate(picked[:40]):
        row[EDITED_FIELD] = ADDED[i % 2]
    return picked


def warm_started(parent: Checkpoint, data: Path, out: Path) -> Checkpoint:
    """``python -m model.train --init-from parent`` on ``data``: new dense weights too."""
    train_main(
        [
            *("--data", str(data), "--init-from", str(parent.path), "--out", str(out)),
            *("--epochs", "1", "--min-count", "3", "--quiet", "--created-at", "2026-01-02"),
        ]
    )
    return load_checkpoint(out)


def touched(rows: list[dict[str, Any]], parent: Checkpoint) -> np.ndarray:
    values = set(parent.vocabulary(EDITED_FIELD).values[:TOUCHED]) | set(ADDED)
    return np.array([str(row.get(EDITED_FIELD)) in values for row in rows])


async def answers(client: httpx.AsyncClient, rows: list[dict[str, Any]]) -> tuple[np.ndarray, str]:
    response = await client.post("/predict_many", json={"instances": rows})
    assert response.status_code == 200, response.text
    body = response.json()
    return np.array(body["probabilities"]), body["model_version"]


async def wait_for_update(
    client: httpx.AsyncClient, number: int, timeout: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        update: dict[str, Any] | None = (await client.get("/model")).json()["update"]
        if update is not None and update["number"] >= number:
            return update
        if time.monotonic() > deadline:
            ready = (await client.get("/readyz")).json()
            raise AssertionError(f"update {number} was not applied: {update}; {ready}")
        await asyncio.sleep(0.02)


async def assert_served(
    client: httpx.AsyncClient, rows: list[dict[str, Any]], model: Checkpoint, version: str
) -> None:
    """The replica answers ``rows`` as the offline ``model`` does, named ``version``."""
    got, served = await answers(client, rows)
    assert served == version
    np.testing.assert_allclose(got, Predictor(model).predict_rows(rows), rtol=0, atol=1e-6)


@asynccontextmanager
async def publisher(
    redis_server: RedisServer, base: Checkpoint | None = None
) -> AsyncIterator[RedisClient]:
    """A client of the test's Redis as ``python -m app.publish`` has one; ``base``
    published first (as the first replica to serve it would)."""
    client = connect(Settings(redis_url=redis_server.url), 10)
    try:
        if base is not None:
            await publish(client, base, PARTITIONS)
        yield client
    finally:
        await client.aclose()


# -- the row format


def test_a_replica_reads_each_row_as_of_the_update_it_serves() -> None:
    width = 8
    base, one, two = (bytes([i]) * width for i in (1, 2, 3))
    v1 = tag_row(one, 1, base, width)
    assert pick_row(base, width, 0) == base  # a base row: untagged
    assert pick_row(v1, width, 0) == base  # written, not applied yet: the old row
    assert pick_row(v1, width, 1) == one
    v2 = tag_row(two, 2, v1, width)
    assert [pick_row(v2, width, a) for a in (1, 2, 5)] == [one, two, two]
    assert pick_row(v2, width, 0) is AHEAD  # two behind: the old row is gone
    fresh = tag_row(one, 3, None, width)  # a value new in update 3: OOV before it
    assert pick_row(fresh, width, 2) is None and pick_row(fresh, width, 3) == one
    # Publishing update 2 again keeps what it replaced, not itself.
    assert tag_row(two, 2, v2, width) == v2
    for bad in (b"", one[:-1], one + b"\0", v2 + b"\0"):
        with pytest.raises(ValueError, match="bytes"):
            pick_row(bad, width, 9)
    assert len(v2) == 2 * (width + TAG.size)


# -- publishing


@pytest.mark.parametrize("hold_tables", [True, False])
async def test_an_update_moves_the_answers_of_touched_values_only(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    tmp_path: Path,
    hold_tables: bool,
) -> None:
    new = edited(tiny_checkpoint, tmp_path / "u1")
    hit = touched(rows, tiny_checkpoint)
    assert 40 < hit.sum() < len(rows) - 100
    expected = Predictor(new).predict_rows(rows)
    async with make_client(
        model_dir=tiny_checkpoint.path, redis_url=redis_server.url, hold_tables=hold_tables
    ) as client:
        before, version = await answers(client, rows)  # (every row cached)
        assert version == tiny_checkpoint.version
        async with publisher(redis_server) as r:
            update = await publish_update(r, tiny_checkpoint, new)
        assert update.version == f"{tiny_checkpoint.version}+u1"
        assert update.dense == {} and update.oov is None  # (they did not change)
        assert update.row_count == TOUCHED + len(ADDED)
        described = await wait_for_update(client, 1)
        assert described["checkpoint"] == new.version
        assert described["parent"] == tiny_checkpoint.version
        after, version = await answers(client, rows)
        assert version == f"{tiny_checkpoint.version}+u1"
        np.testing.assert_array_equal(after[~hit], before[~hit])  # byte-identical
        assert not np.isclose(after[hit], before[hit]).any()
        np.testing.assert_allclose(after, expected, rtol=0, atol=1e-6)
        metrics = (await client.get("/metrics")).text
        assert "ctr_model_updates_applied_total 1.0" in metrics
        assert "ctr_model_update 1.0" in metrics


async def test_a_replica_started_after_updates_catches_up_and_serves_the_last(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    day2_tsv: Path,
    tmp_path: Path,
) -> None:
    """Two trained updates (dense weights move too): a replica that starts at the base
    applies both, and answers as the last checkpoint does, from Redis rows and from its
    tables alike."""
    u1 = warm_started(tiny_checkpoint, day2_tsv, tmp_path / "u1")
    u2 = edited(u1, tmp_path / "u2", shift=-0.3)
    async with publisher(redis_server, tiny_checkpoint) as r:
        first = await publish_update(r, tiny_checkpoint, u1)
        assert first.dense and first.oov is not None
        await publish_update(r, u1, u2)
        # Not from the lineage's last checkpoint, or not from a published one: refused.
        with pytest.raises(UpdateRefused, match="lineage is at update 2"):
            await publish_update(r, tiny_checkpoint, u1)
        with pytest.raises(UpdateRefused, match="neither a published version"):
            await publish_update(r, edited(u2, tmp_path / "x"), u2)
    expected = Predictor(u2).predict_rows(rows)
    # Redis mode without tables; memory mode (the tables in process, updates over them);
    # redis mode with the tables held, whose fallback must answer the same.
    for store, hold_tables in (("redis", False), ("memory", True), ("redis", True)):
        async with make_client(
            model_dir=tiny_checkpoint.path,
            redis_url=redis_server.url,
            embedding_store=store,
            hold_tables=hold_tables,
        ) as client:
            await wait_for_update(client, 2)
            got, version = await answers(client, rows)
            assert version == f"{tiny_checkpoint.version}+u2"
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
            if store == "redis" and hold_tables:  # Redis gone: the tables and updates answer
                redis_server.kill()
                got, _ = await answers(client, rows)
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


async def test_a_malformed_update_changes_nothing_and_says_why(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    day2_tsv: Path,
    tmp_path: Path,
) -> None:
    async with make_client(model_dir=tiny_checkpoint.path, redis_url=redis_server.url) as client:
        before, _ = await answers(client, rows)
        with redis_server.client() as r:
            keys_before = sorted(r.keys("*"))
        # An unknown parent: trained from another checkpoint.
        stranger = edited(edited(tiny_checkpoint, tmp_path / "a"), tmp_path / "b")
        # Another embedding dimension: not a warm start of the served model.
        other = tmp_path / "wide"
        train_main(
            [
                *("--data", str(day2_tsv), "--out", str(other), "--epochs", "1"),
                *("--embed-dim", "4", "--quiet", "--created-at", "t"),
            ]
        )
        # Truncated rows: a checkpoint whose weights file lost its tail.
        truncated = tmp_path / "truncated"
        edited(tiny_checkpoint, truncated)
        weights = truncated / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:-1000])
        cases = {
            str(stranger.path): "was not trained from",
            str(other): "rows of 5 floats, the base",
            str(truncated): "weights",
        }
        for path, why in cases.items():
            done = await asyncio.to_thread(
                subprocess.run,
                [
                    *(sys.executable, "-m", "app.publish", "--update"),
                    *("--from", str(tiny_checkpoint.path), "--to", path),
                ],
                env={**os.environ, "CTR_REDIS_URL": redis_server.url},
                capture_output=True,
                text=True,
            )
            assert done.returncode == 1
            assert why in done.stderr
        with redis_server.client() as r:
            assert sorted(r.keys("*")) == keys_before
        after, version = await answers(client, rows)
        assert version == tiny_checkpoint.version
        np.testing.assert_array_equal(after, before)


async def test_an_update_a_replica_cannot_follow_is_refused_whole(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Defence in depth: an update in the stream that is malformed (here: rows one
    float narrower than the model's) is refused by the replica, which keeps serving what
    it served, and says why in /model and /metrics."""
    new = edited(tiny_checkpoint, tmp_path / "u1")
    async with make_client(model_dir=tiny_checkpoint.path, redis_url=redis_server.url) as client:
        await answers(client, rows)  # (cached rows, to be replaced)
        async with publisher(redis_server) as r:
            update = await publish_update(r, tiny_checkpoint, new)
        await wait_for_update(client, 1)
        keys = UpdateKeys(tiny_checkpoint.version)
        bad = replace(
            update,
            number=2,
            parent=new.version,
            rows=[rows_[:, :-1] for rows_ in update.rows],
        )
        with redis_server.client() as sync:
            sync.set(keys.blob(2), bad.to_bytes())
            sync.xadd(keys.stream, {"number": "2", "parent": new.version})
        deadline = time.monotonic() + 20
        while (await client.get("/model")).json()["update"]["refused"] is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        described = (await client.get("/model")).json()
        assert "this model's are 9 float32 wide" in described["update"]["refused"]
        assert described["model_version"] == f"{tiny_checkpoint.version}+u1"
        after, version = await answers(client, rows)
        assert version == f"{tiny_checkpoint.version}+u1"
        np.testing.assert_allclose(after, Predictor(new).predict_rows(rows), rtol=0, atol=1e-6)
        metrics = (await client.get("/metrics")).text
        assert "ctr_model_updates_refused_total 1.0" in metrics
    with pytest.raises(UpdateRefused, match="well-formed"):
        Update.from_bytes(update.to_bytes()[:-10])


def test_untag_row_gives_back_what_an_update_replaced() -> None:
    width = 8
    base, one, two = (bytes([i]) * width for i in (1, 2, 3))
    v1 = tag_row(one, 1, base, width)
    assert untag_row(v1, 1, width) == base  # a base row again: untagged
    assert untag_row(v1, 2, width) == v1  # update 2 did not write it
    v2 = tag_row(two, 2, v1, width)
    assert untag_row(v2, 2, width) == one + TAG.pack(1)
    assert untag_row(tag_row(two, 2, None, width), 2, width) is None  # it was absent


async def test_a_failed_publish_is_taken_back_by_the_next_attempt_and_a_repeat_is_harmless(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An attempt that wrote its rows and died before announcing them (here: at the
    XADD) leaves rows tagged with an update no replica applies; the next attempt, of
    another checkpoint, takes back those it does not write again."""
    first = edited(tiny_checkpoint, tmp_path / "first", field="C4")
    second = edited(tiny_checkpoint, tmp_path / "second")
    async with make_client(model_dir=tiny_checkpoint.path, redis_url=redis_server.url) as client:
        before, _ = await answers(client, rows)
        async with publisher(redis_server) as r:

            async def broken(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionError("Redis went away")

            with monkeypatch.context() as patch:
                patch.setattr(type(r), "xadd", broken)
                with pytest.raises(PublishFailed, match="Redis went away"):
                    await publish_update(r, tiny_checkpoint, first)
            # Its rows are there, tagged 1, but nobody serves update 1: answers unmoved.
            got, version = await answers(client, rows)
            assert version == tiny_checkpoint.version
            np.testing.assert_array_equal(got, before)
            await publish_update(r, tiny_checkpoint, second)
            again = await publish_update(r, tiny_checkpoint, second)  # (a repeat)
            assert again.number == 1
        await wait_for_update(client, 1)
        await assert_served(client, rows, second, f"{tiny_checkpoint.version}+u1")
    # C4's rows are base rows again (untagged), whoever reads them.
    c4 = [f.name for f in tiny_checkpoint.features.embedded_fields].index("C4")
    values = tiny_checkpoint.vocabulary("C4").values[:TOUCHED]
    with redis_server.client() as sync:
        for value in values:
            key = Layout(tiny_checkpoint.version, PARTITIONS).hash_key(c4, value_key(value))
            assert len(sync.hget(key, value_key(value))) == 9 * 4
    async with make_client(
        model_dir=tiny_checkpoint.path, redis_url=redis_server.url, hold_tables=False
    ) as fresh:
        got, _ = await answers(fresh, rows)
        np.testing.assert_allclose(got, Predictor(second).predict_rows(rows), rtol=0, atol=1e-6)


async def test_a_lost_hash_is_published_again_with_the_updates_it_held(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    new = edited(tiny_checkpoint, tmp_path / "u1")
    async with publisher(redis_server, tiny_checkpoint) as r:
        await publish_update(r, tiny_checkpoint, new)
    j = [f.name for f in tiny_checkpoint.features.embedded_fields].index(EDITED_FIELD)
    layout = Layout(tiny_checkpoint.version, PARTITIONS)
    lost = {layout.hash_key(j, value_key(v)) for v in ADDED}
    with redis_server.client() as sync:
        sync.delete(*lost)  # a node that restarted empty
    # A replica finds the hashes gone, publishes them again, and with them update 1.
    async with make_client(
        model_dir=tiny_checkpoint.path, redis_url=redis_server.url, hold_tables=False
    ) as client:
        await wait_for_update(client, 1)
        await assert_served(client, rows, new, f"{tiny_checkpoint.version}+u1")


async def test_a_replica_that_finds_its_updates_trimmed_jumps_to_those_kept(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    day2_tsv: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The stream keeps the last update only: a replica starting at the base takes it
    (its dense weights and OOV rows whole) and reads every row Redis holds as of it."""
    u1 = warm_started(tiny_checkpoint, day2_tsv, tmp_path / "u1")
    u2 = edited(u1, tmp_path / "u2")
    u3 = warm_started(u2, day2_tsv, tmp_path / "u3")
    async with publisher(redis_server, tiny_checkpoint) as r:
        for old, new in ((tiny_checkpoint, u1), (u1, u2), (u2, u3)):
            await publish_update(r, old, new, kept=1)
        assert await r.xlen(UpdateKeys(tiny_checkpoint.version).stream) == 1
    async with make_client(
        model_dir=tiny_checkpoint.path, redis_url=redis_server.url, hold_tables=False
    ) as client:
        described = await wait_for_update(client, 3)
        assert described["checkpoint"] == u3.version
        await assert_served(client, rows, u3, f"{tiny_checkpoint.version}+u3")
    assert "were trimmed from the stream" in caplog.text


async def test_a_replica_cut_off_from_redis_catches_up_when_it_is_back(
    make_client: ClientFactory,
    redis_server: RedisServer,
    tiny_checkpoint: Checkpoint,
    rows: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """An update published while a replica cannot reach Redis: it keeps answering as
    the update it serves (its tables), then applies the update once the link is back."""
    new = edited(tiny_checkpoint, tmp_path / "u1")
    proxy = await SlowProxy(redis_server.port, delay=0).start()
    try:
        async with make_client(model_dir=tiny_checkpoint.path, redis_url=proxy.url) as client:
            await answers(client, rows)
            proxy.cut()
            async with publisher(redis_server) as r:
                await publish_update(r, tiny_checkpoint, new)
            await asyncio.sleep(1.5)  # (the follower's reads fail meanwhile, and are retried)
            await assert_served(client, rows, tiny_checkpoint, tiny_checkpoint.version)
            proxy.restore()
            await wait_for_update(client, 1)
            await assert_served(client, rows, new, f"{tiny_checkpoint.version}+u1")
    finally:
        await proxy.aclose()


def test_the_update_command_says_why_it_cannot_publish(
    tiny_checkpoint: Checkpoint, tmp_path: Path
) -> None:
    """No Redis URL (exit 2), Redis unreachable (exit 1), --from without --update (a
    usage error): said on stderr, nothing published."""
    new = edited(tiny_checkpoint, tmp_path / "u1")
    update = [sys.executable, "-m", "app.publish", "--update"]
    paths = ["--from", str(tiny_checkpoint.path), "--to", str(new.path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    cases = [
        ([*update, *paths], env, 2, "CTR_REDIS_URL is not set"),
        (
            [*update, *paths],
            {**env, "CTR_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
            1,
            f"publishing {new.version} failed",
        ),
        ([sys.executable, "-m", "app.publish", *paths], env, 2, "--from and --to go with --update"),
        ([*update, "--from", str(new.path)], env, 2, "--update takes --from OLD and --to NEW"),
    ]
    for argv, environment, code, why in cases:
        done = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=120)
        assert done.returncode == code, done.stderr
        assert why in done.stderr


async def test_a_follower_stops_even_when_its_read_swallows_the_cancellation(
    redis_server: RedisServer, tiny_checkpoint: Checkpoint
) -> None:
    """redis-py can swallow the cancellation of a blocking XREAD (its read's clean-up)
    and return as if the read had ended: the follower must still stop, not read on
    forever and hang the service's shutdown. The real client reads from Redis; only
    its swallowing of the cancellation is forced here."""
    metrics = Metrics()
    model = await load_serving_model(
        Settings(model_dir=tiny_checkpoint.path), metrics, tiny_checkpoint
    )
    client = connect(Settings(redis_url=redis_server.url), 10)
    read = client.xread
    swallowed = 0

    async def swallowing(*args: Any, **kwargs: Any) -> Any:
        nonlocal swallowed
        try:
            return await read(*args, **kwargs)
        except asyncio.CancelledError:
            swallowed += 1
            return None

    client.xread = swallowing  # type: ignore[method-assign]

    async def between(fn: Any) -> object:
        return fn()

    follower = UpdateFollower(model, client, between, metrics)
    try:
        follower.start()
        await asyncio.sleep(0.3)  # (blocked in XREAD)
        closing = asyncio.create_task(follower.aclose())
        done, _ = await asyncio.wait({closing}, timeout=30)
        assert done, "the follower did not stop"
        assert swallowed == 1
        assert follower._task is not None and follower._task.done()
    finally:  # (a follower that did not stop: a cancellation it cannot swallow now)
        client.xread = read  # type: ignore[method-assign]
        if follower._task is not None and not follower._task.done():
            follower._task.cancel()
            await asyncio.wait({follower._task}, timeout=5)
        await model.store.aclose()

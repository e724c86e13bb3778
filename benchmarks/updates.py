"""Streamed updates: how fast they reach the replicas, what they cost them, what they weigh.

    python -m benchmarks.updates [--rows 1000000] [--latency-updates 20] [--repeats 3]

A generated DeepFM with ``--rows`` embedding rows (benchmarks.redis_tier's, embed
16) is published to a Redis server of this benchmark's own, and two replicas serve
it (uvicorn, one process each, redis mode, tables held). Then a lineage of updates
is published with ``app.store.publisher.publish_update`` (what ``python -m
app.publish --update`` runs), each made from the one before: rows changed at
random, dense weights nudged (the replicas swap them too). Measured, in one run:

- the time from the start of an update's publish to the moment both replicas answer
  with its version, over ``--latency-updates`` updates of 1,000 rows (p50, p99);
  target p99 <= 1 s;
- /predict req/s of one replica (wrk, 64 connections, the Zipf bodies of
  benchmarks.redis_tier) while updates of 100,000 rows follow one another for the
  whole run, against a run without any, alternating, ``--repeats`` times (medians);
  target >= 0.9x;
- the bytes and the time of an update of 1% of the rows against the full publish.

Everything shares one 2-core machine: wrk, Redis, both replicas and the publisher
(which in production runs elsewhere).

Writes benchmarks/results/updates.{json,md}. Needs wrk and redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from app.config import Settings
from app.store.client import connect
from app.store.publisher import publish_update
from app.store.updates import served_version
from benchmarks import report
from benchmarks.datasets import WORK
from benchmarks.redis_tier import big_checkpoint, traffic, write_bodies
from benchmarks.serve import Served, require, server, wrk
from model.checkpoint import TABLES, Checkpoint, load_checkpoint, save_checkpoint
from model.deepfm import DeepFM

CONNECTIONS = 64
LATENCY_ROWS = 1_000
LOAD_ROWS = 100_000
SHARE = 0.01  # the update whose bytes and time are set against a full publish
BODIES = 20_000


def child(parent: Checkpoint, out: Path, rows: int, seed: int) -> Checkpoint:
    """A checkpoint "trained on" from ``parent``: ``rows`` random rows moved (never an
    OOV row), every dense weight nudged."""
    rng = np.random.default_rng(seed)
    table = parent.state[TABLES].clone()
    offsets = set(np.cumsum([0, *parent.config.vocab_sizes[:-1]]).tolist())
    picked = [i for i in rng.choice(len(table), rows + len(offsets), replace=False).tolist()]
    picked = [i for i in picked if i not in offsets][:rows]
    with torch.no_grad():
        table[picked] += torch.from_numpy(rng.normal(0, 0.01, (rows, table.shape[1])).astype("f4"))
    model = DeepFM(parent.config, table=table)
    state = {
        name: t + torch.from_numpy(rng.normal(0, 1e-3, tuple(t.shape)).astype("f4"))
        for name, t in parent.state.items()
        if name != TABLES
    }
    model.load_state_dict(state, strict=False, assign=True)
    save_checkpoint(
        out,
        model,
        parent.read_features(),
        created_at="2026-12-07T00:00:00+00:00",
        training={"parent": {"version": parent.version, "new_values": 0}},
    )
    return load_checkpoint(out)


def version_of(url: str) -> str:
    request = urllib.request.Request(
        url + "/predict", data=b'{"features": {}}', headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(orjson.loads(response.read())["model_version"])


def until_served(replicas: list[Served], version: str, timeout: float = 60) -> float:
    """Poll until every replica answers with ``version``; the time it happened."""
    deadline = time.monotonic() + timeout
    pending = list(replicas)
    while pending:
        pending = [s for s in pending if version_of(s.url) != version]
        if time.monotonic() > deadline:
            raise SystemExit(f"{version} did not reach every replica")
    return time.perf_counter()


class Lineage:
    """The updates of one base, each made (untimed) from the last and then published."""

    def __init__(self, base: Checkpoint, work: Path, settings: Settings) -> None:
        self.base = base
        self.head = base
        self.number = 0
        self.work = work
        self.settings = settings

    def make(self, rows: int, count: int = 1) -> list[Checkpoint]:
        """The next ``count`` updates' checkpoints, each from the one before."""
        made: list[Checkpoint] = []
        for i in range(count):
            parent = made[-1] if made else self.head
            number = self.number + 1 + i
            made.append(child(parent, self.work / f"u{number}", rows, seed=number))
        return made

    def publish_niced(self, new: Checkpoint) -> None:
        """Publish ``new`` as the next update with ``python -m app.publish --update`` at
        the lowest CPU priority: as a publisher on a machine of its own would leave the
        replicas' cores to them (as far as one machine can show it)."""
        assert self.settings.redis_url is not None
        subprocess.run(
            [
                *("nice", "-n", "19", sys.executable, "-m", "app.publish", "--update"),
                *("--from", str(self.head.path), "--to", str(new.path)),
            ],
            env={**os.environ, "CTR_REDIS_URL": self.settings.redis_url.get_secret_value()},
            check=True,
            capture_output=True,
        )
        self._advance(new)

    def _advance(self, new: Checkpoint) -> None:
        if self.head is not self.base:  # (its successor is published: no longer needed)
            shutil.rmtree(self.head.path)
        self.head, self.number = new, self.number + 1

    def publish(self, new: Checkpoint) -> tuple[float, int, int]:
        """Publish ``new`` as the next update: (seconds, update rows, blob bytes)."""

        async def run() -> tuple[int, int]:
            client = connect(self.settings, timeout_s=60)
            try:
                update = await publish_update(client, self.head, new)
            finally:
                await client.aclose()
            return update.row_count, len(update.to_bytes())

        started = time.perf_counter()
        rows, size = asyncio.run(run())
        took = time.perf_counter() - started
        self._advance(new)
        return took, rows, size

    @property
    def version(self) -> str:
        return served_version(self.base.version, self.number)


def redis_bytes(url: str) -> int:
    out = subprocess.run(
        ["redis-cli", "-u", url, "info", "memory"], capture_output=True, text=True, check=True
    ).stdout
    return int(next(line for line in out.splitlines() if line.startswith("used_memory:"))[12:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="embedding rows")
    parser.add_argument("--latency-updates", type=int, default=20)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    require("wrk", "redis-server", "redis-cli")
    from tests.redis_servers import RedisServer  # (the tests' helper: a server of our own)

    model_dir = big_checkpoint(args.rows)
    base = load_checkpoint(model_dir)
    table_rows = sum(base.config.vocab_sizes)
    work = WORK / "updates"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sizes = [size - 1 for size in base.config.vocab_sizes]
    bodies = write_bodies(work / "bodies.jsonl", traffic(sizes, BODIES, seed=3))

    with ExitStack() as stack:
        redis_server = RedisServer(work / "redis").start()
        stack.callback(redis_server.stop)
        settings = Settings(redis_url=redis_server.url)
        env = {"CTR_LOG_LEVEL": "warning", "CTR_MODEL_DIR": str(model_dir)}
        env["CTR_REDIS_URL"] = redis_server.url
        empty = redis_bytes(redis_server.url)
        started = time.perf_counter()
        publish_env = {**env, "PATH": "/usr/bin:/bin"}
        subprocess.run([sys.executable, "-m", "app.publish"], env=publish_env, check=True)
        full_s = time.perf_counter() - started
        full_bytes = redis_bytes(redis_server.url) - empty
        print(f"full publish: {full_s:.1f} s, {full_bytes / 2**20:.0f} MiB")
        replicas = [stack.enter_context(server("app.main:create_app", env, 600)) for _ in range(2)]
        lineage = Lineage(base, work, settings)

        # An update of 1% of the rows: its bytes (Redis' growth: the blob and the tagged
        # rows) and its time, against the full publish.
        (share,) = lineage.make(int(SHARE * table_rows))
        before = redis_bytes(redis_server.url)
        share_s, share_rows, share_blob = lineage.publish(share)
        share_bytes = redis_bytes(redis_server.url) - before
        until_served(replicas, lineage.version)
        print(f"1% update: {share_rows:,} rows in {share_s:.2f} s, {share_bytes / 2**20:.1f} MiB")

        # Publish to served, on both replicas.
        latencies: list[float] = []
        lags: list[float] = []
        for _ in range(args.latency_updates):
            (new,) = lineage.make(LATENCY_ROWS)
            t0 = time.perf_counter()
            took, _, _ = lineage.publish(new)
            served = until_served(replicas, lineage.version)
            latencies.append(served - t0)
            lags.append(served - t0 - took)
        print(f"publish to served: {[round(x, 3) for x in latencies]}")

        # req/s of one replica while 100,000-row updates follow one another for the
        # whole run, against a run without any.
        wrk(replicas[0].url, "/predict", bodies, CONNECTIONS, 3)  # warm-up
        quiet: list[dict[str, float]] = []
        busy: dict[str, list[dict[str, float]]] = {"same": [], "niced": []}
        busy_publish: dict[str, list[float]] = {"same": [], "niced": []}
        covered: dict[str, list[float]] = {"same": [], "niced": []}
        for _ in range(args.repeats):
            quiet.append(wrk(replicas[0].url, "/predict", bodies, CONNECTIONS, args.duration))
            for how in ("same", "niced"):
                chain = lineage.make(LOAD_ROWS, count=args.duration + 2)  # (more than needed)
                result: dict[str, dict[str, float]] = {}

                def load(into: dict[str, dict[str, float]] = result) -> None:
                    into["run"] = wrk(
                        replicas[0].url, "/predict", bodies, CONNECTIONS, args.duration
                    )

                run = threading.Thread(target=load)
                began = time.perf_counter()
                run.start()
                for new in chain:
                    t0 = time.perf_counter()
                    if how == "same":
                        lineage.publish(new)
                    else:
                        lineage.publish_niced(new)
                    until_served(replicas, lineage.version)
                    busy_publish[how].append(time.perf_counter() - t0)
                    if not run.is_alive():
                        break
                covered[how].append(min(1.0, (time.perf_counter() - began) / args.duration))
                run.join()
                for unused in chain[chain.index(new) + 1 :]:
                    shutil.rmtree(unused.path)
                busy[how].append(result["run"])
                print(
                    f"quiet {quiet[-1]}  updates ({how}) {busy[how][-1]} ({covered[how][-1]:.2f})"
                )

    p50 = statistics.median(latencies)
    p99 = float(np.percentile(latencies, 99))
    quiet_rps = statistics.median(r["rps"] for r in quiet)
    busy_rps = {how: statistics.median(r["rps"] for r in runs) for how, runs in busy.items()}
    ratio = {how: rps / quiet_rps for how, rps in busy_rps.items()}
    targets = {
        "publish_to_served_p99_s": report.target(p99, "<= 1.0", p99 <= 1.0),
        "rps_during_100k_updates_ratio": report.target(
            ratio["same"], ">= 0.9", ratio["same"] >= 0.9
        ),
        "rps_during_100k_updates_ratio_publisher_niced": report.target(
            ratio["niced"], ">= 0.9", ratio["niced"] >= 0.9
        ),
    }
    figures: dict[str, Any] = {
        "rows": table_rows,
        "full_publish_s": full_s,
        "full_publish_bytes": full_bytes,
        "share_update": {
            "rows": share_rows,
            "s": share_s,
            "bytes": share_bytes,
            "blob": share_blob,
        },
        "latency_s": latencies,
        "apply_lag_s": lags,
        "quiet": quiet,
        "during_update": busy,
        "update_publish_to_served_s": busy_publish,
        "run_share_under_updates": covered,
        "targets": targets,
    }
    errors = sum(r["errors"] for r in quiet + busy["same"] + busy["niced"])
    lines = [
        "# Streamed updates",
        "",
        f"`python -m benchmarks.updates --rows {args.rows} --latency-updates "
        f"{args.latency_updates} --duration {args.duration} --repeats {args.repeats}`: a "
        f"generated DeepFM of {table_rows:,} embedding rows (embed 16) served by 2 replicas "
        "(uvicorn, one process each, redis mode, tables held) over one Redis, updates "
        "published in process with `publish_update` (what `python -m app.publish --update` "
        "runs). Every update moves random rows and nudges every dense weight. One 2-core "
        "machine for wrk, Redis, both replicas and the publisher.",
        "",
        f"| publish to served on both replicas ({args.latency_updates} updates of "
        f"{LATENCY_ROWS:,} rows) | p50 {p50 * 1000:.0f} ms | p99 {p99 * 1000:.0f} ms | "
        f"max {max(latencies) * 1000:.0f} ms |",
        "|---|---|---|---|",
        f"| of which after the publish returned (stream to swap) | p50 "
        f"{statistics.median(lags) * 1000:.0f} ms | p99 {np.percentile(lags, 99) * 1000:.0f} ms "
        f"| max {max(lags) * 1000:.0f} ms |",
        "",
        f"| /predict on one replica, wrk {CONNECTIONS} connections, {args.duration} s runs "
        f"(median of {args.repeats}) | req/s | p99 ms |",
        "|---|---|---|",
        f"| no update | {quiet_rps:,.0f} | {statistics.median(r['p99_ms'] for r in quiet):.1f} |",
        *(
            f"| during updates of {LOAD_ROWS:,} rows, one after another, {label} | "
            f"{busy_rps[how]:,.0f} ({ratio[how]:.2f}x) | "
            f"{statistics.median(r['p99_ms'] for r in busy[how]):.1f} |"
            for how, label in (
                ("same", "published in the benchmark's process"),
                ("niced", "published by `nice -n 19 python -m app.publish --update`"),
            )
        ),
        "",
        f"Errors in every run: {errors:.0f}. The {LOAD_ROWS:,}-row updates took "
        f"{statistics.median(busy_publish['same']):.2f} s in process and "
        f"{statistics.median(busy_publish['niced']):.2f} s niced (CLI: it loads both "
        "checkpoints), from publish to served on both replicas (medians); every run with "
        "updates was under them from its start to its end (shares "
        f"{', '.join(f'{c:.2f}' for c in covered['same'] + covered['niced'])}). The "
        "publisher shares the 2 cores with wrk and the replicas; in production it runs on "
        "a machine of its own, which the niced run stands in for as far as one machine can.",
        "",
        "| | rows | seconds | bytes in Redis |",
        "|---|---|---|---|",
        f"| full publish | {table_rows:,} | {full_s:.1f} | {full_bytes / 2**20:,.1f} MiB |",
        f"| update of {SHARE:.0%} | {share_rows:,} | {share_s:.2f} | "
        f"{share_bytes / 2**20:,.1f} MiB (blob {share_blob / 2**20:.1f} MiB) |",
        f"| ratio | {share_rows / table_rows:.3f} | {share_s / full_s:.3f} | "
        f"{share_bytes / full_bytes:.3f} |",
        "",
        *report.targets_table(targets),
    ]
    report.publish("updates", figures, lines)


if __name__ == "__main__":
    main()

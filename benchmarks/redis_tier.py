"""The Redis embedding tier against the in-memory store, with skewed traffic, in one run.

    python -m benchmarks.redis_tier [--rows 5200000] [--duration 10] [--repeats 3]

A generated DeepFM with ``--rows`` embedding rows (26 sparse fields, a few of
them with a million values or more; 13 dense fields; embed 16; weights drawn at
random, since only speed and memory are measured) is saved once under
benchmarks/work/ and published to a Redis server of this benchmark's own. Two
replicas serve it side by side: memory mode (the tables and vocabularies in
the process) and redis mode with ``CTR_HOLD_TABLES=false`` (neither: rows come
through the LRU from Redis). wrk (C, one thread) sends /predict bodies whose
sparse values follow a Zipf law over each field's values (exponent 1.2, as the
values of real click logs do), 2% of them unseen.

Measured, for both replicas: cold start (an empty LRU, fresh values) p99 at 64
connections; steady state (after a warm-up pass over the same bodies) req/s and
p99 at 64 connections, the median of ``--repeats`` runs, alternating replicas so
both see the same machine; the LRU hit rate over the steady runs; and each
process's resident memory (VmRSS) once loaded and after the load.

Targets: redis mode's steady req/s >= 0.85x memory mode's; its RSS below memory
mode's by at least 80% of the tables' size.

Writes benchmarks/results/redis_tier.{json,md}. Needs wrk and redis-server.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import report
from benchmarks.datasets import WORK
from benchmarks.serve import Served, require, server, wrk
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import CRITEO_DENSE, CRITEO_SPARSE
from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Field, Vocabulary
from tests.redis_servers import RedisServer

CONNECTIONS = 64
ZIPF_EXPONENT = 1.2
UNSEEN = 0.02
STEADY_BODIES = 50_000
COLD_BODIES = 20_000
EMBED_DIM = 16


def field_sizes(rows: int) -> list[int]:
    """26 vocabulary sizes summing to about ``rows``: a long tail of small fields and a
    few with a million values or more, as Criteo's are."""
    shares = np.array([1.0 / (i + 1) ** 1.3 for i in range(len(CRITEO_SPARSE))])
    sizes = np.maximum(np.round(shares / shares.sum() * rows), 10).astype(int)
    return sizes.tolist()  # type: ignore[no-any-return]


def big_checkpoint(rows: int) -> Path:
    """A generated checkpoint with ``rows`` embedding rows, made once."""
    path = WORK / f"big-model-{rows}"
    if (path / "spec.json").exists():
        return path
    sizes = field_sizes(rows)
    fields = [Field(name, "log", {"missing": 0.0}) for name in CRITEO_DENSE]
    fields += [
        Field(name, "category", vocab=Vocabulary(tuple(f"{i:08x}" for i in range(size))))
        for name, size in zip(CRITEO_SPARSE, sizes, strict=True)
    ]
    features = FeatureSpec(tuple(fields))
    torch.manual_seed(0)
    config = DeepFMConfig(
        vocab_sizes=features.vocab_sizes,
        num_dense=len(CRITEO_DENSE),
        embed_dim=EMBED_DIM,
        hidden_units=(256, 128),
    )
    model = DeepFM(config)
    assert model.sparse_rows is not None
    with torch.no_grad():
        model.sparse_rows.weight.normal_(0.0, 0.05)
    save_checkpoint(path, model, features, created_at="2026-11-30T00:00:00+00:00")
    return path


def traffic(sizes: list[int], count: int, seed: int) -> list[dict[str, Any]]:
    """/predict rows: Zipf-ranked values per field, ``UNSEEN`` of them never seen."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list[Any]] = {}
    for name, size in zip(CRITEO_SPARSE, sizes, strict=True):
        ranks = rng.zipf(ZIPF_EXPONENT, count)
        unseen = (ranks >= size) | (rng.random(count) < UNSEEN)
        values = [f"{r - 1:08x}" for r in ranks.tolist()]
        columns[name] = [
            f"new-{rng.integers(1 << 40):x}" if u else v
            for v, u in zip(values, unseen.tolist(), strict=True)
        ]
    for name in CRITEO_DENSE:
        columns[name] = rng.integers(0, 1000, count).tolist()
    return [{name: columns[name][i] for name in columns} for i in range(count)]


def write_bodies(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"features": r}) + "\n" for r in rows))
    return path


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return kib / 1024


def counters(url: str) -> dict[str, float]:
    """The LRU's lookups and hits so far, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for kind in ("lookups", "hits"):
        found = re.search(rf'^ctr_embedding_{kind}_total{{tier="lru"}} ([\d.e+]+)$', text, re.M)
        out[kind] = float(found.group(1)) if found else 0.0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_200_000, help="embedding rows")
    parser.add_argument("--duration", type=int, default=10, help="seconds per steady run")
    parser.add_argument("--cold", type=int, default=5, help="seconds of the cold-start run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    require("wrk", "redis-server")

    started = time.perf_counter()
    model_dir = big_checkpoint(args.rows)
    checkpoint = load_checkpoint(model_dir, tables=False)
    sizes = [size - 1 for size in checkpoint.config.vocab_sizes]
    table_rows = sum(checkpoint.config.vocab_sizes)
    table_mib = table_rows * (1 + EMBED_DIM) * 4 / 2**20
    print(f"model {checkpoint.version}: {table_rows:,} rows, tables {table_mib:,.0f} MiB")
    print(f"  (made or found in {time.perf_counter() - started:.0f} s)")
    del checkpoint

    work = WORK / "redis-tier"
    work.mkdir(parents=True, exist_ok=True)
    steady = write_bodies(work / "steady.jsonl", traffic(sizes, STEADY_BODIES, seed=1))
    cold = write_bodies(work / "cold.jsonl", traffic(sizes, COLD_BODIES, seed=2))

    with ExitStack() as stack:
        redis_server = RedisServer(work / "redis").start()
        stack.callback(redis_server.stop)
        env = {"CTR_LOG_LEVEL": "warning", "CTR_MODEL_DIR": str(model_dir)}
        redis_env = {**env, "CTR_REDIS_URL": redis_server.url, "CTR_HOLD_TABLES": "false"}
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "app.publish"],
            env={**redis_env, "PATH": "/usr/bin:/bin"},
            check=True,
        )
        publish_s = time.perf_counter() - t0
        with redis_server.client() as r:
            redis_mib = int(r.info("memory")["used_memory"]) / 2**20
        print(f"published in {publish_s:.0f} s; Redis holds {redis_mib:,.0f} MiB")

        replicas: dict[str, Served] = {}
        start_s: dict[str, float] = {}
        for mode, mode_env in (
            ("memory", {**env, "CTR_EMBEDDING_STORE": "memory"}),
            ("redis", redis_env),
        ):
            t0 = time.perf_counter()
            replicas[mode] = stack.enter_context(server("app.main:create_app", mode_env, 600))
            start_s[mode] = time.perf_counter() - t0
        rss_loaded = {mode: rss_mib(s.pid) for mode, s in replicas.items()}
        print(f"RSS once loaded: {rss_loaded}; start-up: {start_s}")

        cold_runs = {
            mode: wrk(s.url, "/predict", cold, CONNECTIONS, args.cold)
            for mode, s in replicas.items()
        }
        print(f"cold: {cold_runs}")
        for s in replicas.values():  # warm-up: every steady body once and more
            wrk(s.url, "/predict", steady, CONNECTIONS, max(args.duration, 10))
        before = {mode: counters(s.url) for mode, s in replicas.items()}
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in replicas}
        for _ in range(args.repeats):
            for mode, s in replicas.items():
                runs[mode].append(wrk(s.url, "/predict", steady, CONNECTIONS, args.duration))
                print(f"{mode:6} {runs[mode][-1]}")
        after = {mode: counters(s.url) for mode, s in replicas.items()}
        rss_after = {mode: rss_mib(s.pid) for mode, s in replicas.items()}

    steady_runs = {
        mode: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for mode, rs in runs.items()
    }
    lookups = after["redis"]["lookups"] - before["redis"]["lookups"]
    hit_rate = (after["redis"]["hits"] - before["redis"]["hits"]) / lookups if lookups else 0.0
    rps_ratio = steady_runs["redis"]["rps"] / steady_runs["memory"]["rps"]
    saved_mib = rss_after["memory"] - rss_after["redis"]
    targets = {
        "steady_rps_ratio_redis_to_memory": report.target(rps_ratio, ">= 0.85", rps_ratio >= 0.85),
        "rss_saved_share_of_tables": report.target(
            saved_mib / table_mib, ">= 0.8", saved_mib >= 0.8 * table_mib
        ),
    }
    figures = {
        "rows": table_rows,
        "tables_mib": table_mib,
        "publish_s": publish_s,
        "redis_used_mib": redis_mib,
        "start_s": start_s,
        "rss_loaded_mib": rss_loaded,
        "rss_after_mib": rss_after,
        "cold": cold_runs,
        "steady": steady_runs,
        "steady_runs": runs,
        "lru_hit_rate": hit_rate,
        "targets": targets,
        "duration_s": args.duration,
        "repeats": args.repeats,
    }
    m, r = steady_runs["memory"], steady_runs["redis"]
    lines = [
        "# The Redis embedding tier",
        "",
        f"`python -m benchmarks.redis_tier --rows {args.rows} --duration {args.duration} "
        f"--repeats {args.repeats}`: a generated DeepFM with {table_rows:,} embedding rows "
        f"(tables {table_mib:,.0f} MiB, embed {EMBED_DIM}), served by two replicas side by "
        "side: memory mode, and redis mode with `CTR_HOLD_TABLES=false` (default LRU of "
        "1,000,000 rows). wrk, one thread, "
        f"{CONNECTIONS} connections, /predict bodies with Zipf({ZIPF_EXPONENT}) values per "
        f"field, {UNSEEN:.0%} unseen; {STEADY_BODIES:,} distinct steady bodies. Steady figures "
        f"are medians of {args.repeats} runs of {args.duration} s, the replicas alternating; "
        f"cold start is one {args.cold} s run on {COLD_BODIES:,} fresh bodies before any other "
        "traffic. Same 2-core machine for wrk, Redis and both replicas.",
        "",
        "| | memory mode | redis mode (no tables) | ratio |",
        "|---|---|---|---|",
        f"| steady req/s | {m['rps']:,.0f} | {r['rps']:,.0f} | {rps_ratio:.2f} |",
        f"| steady p99 ms | {m['p99_ms']:.1f} | {r['p99_ms']:.1f} | |",
        f"| steady p50 ms | {m['p50_ms']:.1f} | {r['p50_ms']:.1f} | |",
        f"| cold-start p99 ms | {cold_runs['memory']['p99_ms']:.1f} | "
        f"{cold_runs['redis']['p99_ms']:.1f} | |",
        f"| cold-start req/s | {cold_runs['memory']['rps']:,.0f} | "
        f"{cold_runs['redis']['rps']:,.0f} | |",
        f"| errors (all runs) | {sum(x['errors'] for x in runs['memory']):.0f} | "
        f"{sum(x['errors'] for x in runs['redis']):.0f} | |",
        f"| RSS loaded, MiB | {rss_loaded['memory']:,.0f} | {rss_loaded['redis']:,.0f} | |",
        f"| RSS after load, MiB | {rss_after['memory']:,.0f} | {rss_after['redis']:,.0f} | |",
        f"| start-up s | {start_s['memory']:.1f} | {start_s['redis']:.1f} | |",
        "",
        f"LRU hit rate over the steady runs: {hit_rate:.2%}. Publishing took {publish_s:.0f} s "
        f"(`python -m app.publish`); Redis then used {redis_mib:,.0f} MiB.",
        f"Redis mode saves {saved_mib:,.0f} MiB of RSS, {saved_mib / table_mib:.2f}x the "
        "tables' size (the vocabularies the memory replica holds count too).",
        "",
        *report.targets_table(targets),
    ]
    report.publish("redis_tier", figures, lines)


if __name__ == "__main__":
    main()

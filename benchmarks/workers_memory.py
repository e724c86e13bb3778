"""The memory a worker costs: RSS and PSS of the whole server at 1, 2 and 4 workers.

    python -m benchmarks.workers_memory [--rows 5200000] [--workers 1 2 4]

``python -m app`` serves a generated model of ``--rows`` embedding rows (the 5.2M-row
model of benchmarks/redis_tier.py) in memory mode, with each worker count in turn. Once
every worker is up, wrk sends Zipf-ranked /predict traffic for a few seconds, so that
each worker has a working set (its interpreter, encoding, forward passes, the pages of
the tables and indexes it touched); then the resident (RSS) and proportional (PSS, from
/proc/<pid>/smaps_rollup) sizes of the supervisor and its workers are summed.

The baseline is 1 worker's RSS, in the same run. Workers share the tables and the
vocabulary indexes through the page cache (read-only maps of one file each), so the
target is that a worker costs its interpreter and working set, not another copy: the
issue's test asks 2 workers' total PSS <= 1.3x one worker's RSS on a 1M-row model.

Writes benchmarks/results/workers_memory.{json,md}. Needs wrk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.redis_tier import big_checkpoint, field_sizes, traffic, write_bodies
from benchmarks.serve import service, wrk
from tests.processes import children, memory_of

TRAFFIC_ROWS = 5_000
TRAFFIC_SECONDS = 5


def measure(model_dir: Path, workers: int, bodies: Path) -> dict[str, Any]:
    """One server's memory with ``workers`` workers, after its warm-up traffic."""
    env = {"CTR_WORKERS": str(workers), "CTR_MODEL_DIR": str(model_dir)}
    env["CTR_EMBEDDING_STORE"] = "memory"
    started = time.monotonic()
    with service(env) as (url, pid):
        while len(children(pid)) != (0 if workers == 1 else workers):
            time.sleep(0.05)
        ready_s = time.monotonic() - started
        load = wrk(url, "/predict", bodies, 4 * workers, TRAFFIC_SECONDS)
        kib = memory_of(pid)
    return {
        "workers": workers,
        "rss_mib": kib["Rss"] / 1024,
        "pss_mib": kib["Pss"] / 1024,
        "ready_s": ready_s,
        "traffic_rps": load["rps"],
        "traffic_errors": load["errors"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5_200_000, help="embedding rows")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args(argv)
    model_dir = big_checkpoint(args.rows)
    weights_mib = sum(f.stat().st_size for f in model_dir.iterdir()) / 2**20
    with tempfile.TemporaryDirectory() as work:
        bodies = write_bodies(
            Path(work) / "bodies.jsonl", traffic(field_sizes(args.rows), TRAFFIC_ROWS, seed=3)
        )
        runs = [measure(model_dir, w, bodies) for w in [1, *(w for w in args.workers if w != 1)]]
    base = runs[0]["rss_mib"]
    for run in runs:
        run["pss_vs_one_rss"] = run["pss_mib"] / base
        print(run, flush=True)
    by_workers = {run["workers"]: run for run in runs}
    targets = {}
    if 2 in by_workers:
        two = by_workers[2]["pss_vs_one_rss"]
        targets["two_workers_pss_vs_one_rss"] = report.target(two, "<= 1.3", two <= 1.3)
    figures = {"rows": args.rows, "checkpoint_mib": weights_mib, "runs": runs, "targets": targets}
    lines = [
        "# The memory a worker costs",
        "",
        f"`python -m benchmarks.workers_memory --rows {args.rows}`: `python -m app` in "
        f"memory mode on a generated model of {args.rows:,} embedding rows (checkpoint "
        f"{weights_mib:,.0f} MiB on disk), after {TRAFFIC_SECONDS} s of Zipf-ranked /predict "
        "traffic at 4 connections a worker. Sums over the supervisor and its workers; "
        "PSS from /proc/<pid>/smaps_rollup.",
        "",
        "| workers | total RSS MiB | total PSS MiB | PSS / 1 worker's RSS | start to every "
        "worker up, s | traffic req/s |",
        "|---|---|---|---|---|---|",
        *(
            f"| {r['workers']} | {r['rss_mib']:,.0f} | {r['pss_mib']:,.0f} | "
            f"{r['pss_vs_one_rss']:.2f} | {r['ready_s']:.1f} | {r['traffic_rps']:,.0f} |"
            for r in runs
        ),
        "",
        *report.targets_table(targets, ".2f"),
    ]
    if len(runs) >= 2:
        last, before = runs[-1], runs[-2]
        extra = (last["pss_mib"] - before["pss_mib"]) / (last["workers"] - before["workers"])
        figures["pss_mib_per_added_worker"] = extra
        lines += [
            "",
            f"Each worker added from {before['workers']} to {last['workers']} costs "
            f"{extra:,.0f} MiB of PSS.",
        ]
    report.publish("workers_memory", figures, lines)


if __name__ == "__main__":
    main()

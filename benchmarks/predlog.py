"""What the prediction log costs: /predict throughput with every call logged, against
the log off, in one run.

    python -m benchmarks.predlog [--duration 10] [--repeats 3]

Four replicas of ``python -m app`` (as users start it: its workers, the bundled
model), started side by side and measured in turn, alternating, so a noisy machine
affects them alike: the log off; at 100% sampling to files; to a Redis stream (a
Redis server of the benchmark's own); to both. wrk, one thread, 64 connections,
/predict bodies from the bundled Criteo sample. Figures are medians of
``--repeats`` runs; records written and dropped are read from each replica's
/metrics. Target: every logged replica at >= 0.95x the req/s of the one without.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from benchmarks import report
from benchmarks.serve import require, sample_rows, service, wrk
from tests.redis_servers import RedisServer

CONNECTIONS = 64
TARGET = 0.95


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and its children (the workers), threads
    included."""
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def logged_records(url: str) -> dict[str, float]:
    """Records written and dropped so far, summed over sinks (from /metrics)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {"written": 0.0, "dropped": 0.0}
    for line in text.splitlines():
        if line.startswith("ctr_prediction_log_records_total{"):
            out["written"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("ctr_prediction_log_dropped_total{"):
            out["dropped"] += float(line.rsplit(" ", 1)[1])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    require("wrk", "redis-server")

    with tempfile.TemporaryDirectory(prefix="ctr-predlog-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        bodies = work / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"features": r}) + "\n" for r in sample_rows()))
        redis = RedisServer(work / "redis").start()
        stack.callback(redis.stop)
        logged = {"CTR_LOG_SAMPLE_RATE": "1", "CTR_LOG_MAX_BYTES": str(256 << 20)}
        stream = {"CTR_REDIS_URL": redis.url, "CTR_EMBEDDING_STORE": "memory"}
        stream |= {"CTR_LOG_STREAM": "predictions", "CTR_LOG_STREAM_MAXLEN": "1000000"}
        configs = {
            "off": {},
            "file": {**logged, "CTR_LOG_DIR": str(work / "file")},
            "redis": {**logged, **stream},
            "file+redis": {**logged, **stream, "CTR_LOG_DIR": str(work / "both")},
        }
        replicas = {name: stack.enter_context(service(env)) for name, env in configs.items()}
        for s in replicas.values():
            wrk(s.url, "/predict", bodies, CONNECTIONS, 2)  # warm-up
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in replicas}
        before = {name: logged_records(s.url) for name, s in replicas.items()}
        for _ in range(args.repeats):
            for name, s in replicas.items():
                cpu = cpu_seconds(s.pid)
                run = wrk(s.url, "/predict", bodies, CONNECTIONS, args.duration)
                time.sleep(0.2)  # (the writers' last flush)
                run["cpu_us_per_request"] = (
                    (cpu_seconds(s.pid) - cpu) / (run["rps"] * args.duration) * 1e6
                )
                runs[name].append(run)
                print(f"{name:10} {runs[name][-1]}")
        after = {name: logged_records(s.url) for name, s in replicas.items()}
        files = sum(p.stat().st_size for p in (work / "file").rglob("*") if p.is_file())

    medians = {
        name: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        for name, rs in runs.items()
    }
    records = {
        name: {k: after[name][k] - before[name][k] for k in ("written", "dropped")}
        for name in replicas
    }
    base = medians["off"]["rps"]
    base_cpu = medians["off"]["cpu_us_per_request"]
    ratios = {name: m["rps"] / base for name, m in medians.items() if name != "off"}
    targets = {
        f"rps_ratio_{name.replace('+', '_and_')}_to_off": report.target(
            ratio, f">= {TARGET}", ratio >= TARGET
        )
        for name, ratio in ratios.items()
    }
    figures = {
        "connections": CONNECTIONS,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "medians": medians,
        "records": records,
        "file_bytes": files,
        "targets": targets,
    }
    lines = [
        "# The prediction log's cost",
        "",
        f"`python -m benchmarks.predlog --duration {args.duration} --repeats {args.repeats}`: "
        "four replicas of `python -m app` (its default workers, the bundled model) side by "
        "side, measured in turn: the log off, and every call logged (`CTR_LOG_SAMPLE_RATE=1`) "
        "to files, to a Redis stream, to both. wrk, one thread, "
        f"{CONNECTIONS} connections, /predict bodies from the bundled Criteo sample; medians "
        f"of {args.repeats} runs of {args.duration} s, alternating. Same 2-core machine for "
        "wrk, Redis and the replicas. CPU per request: the replica's processes' CPU time "
        "(all threads, user + system) over the requests of the run; the Redis server's "
        "is not in it.",
        "",
        "| log | req/s | ratio to off | p50 ms | p99 ms | errors | CPU µs per request | "
        "CPU over off | records written | dropped |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {m['rps']:,.0f} | {m['rps'] / base:.3f} | {m['p50_ms']:.1f} | "
            f"{m['p99_ms']:.1f} | {m['errors']:.0f} | {m['cpu_us_per_request']:.0f} | "
            f"{m['cpu_us_per_request'] / base_cpu:.3f} | {records[name]['written']:,.0f} | "
            f"{records[name]['dropped']:,.0f} |"
            for name, m in medians.items()
        ),
        "",
        f"The file sink wrote {files / 2**20:,.0f} MiB.",
        "",
        *report.targets_table(targets),
    ]
    report.publish("predlog", figures, lines)


if __name__ == "__main__":
    main()

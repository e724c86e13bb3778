"""Serving throughput and latency under load, with wrk, all cases in one run.

    python -m benchmarks.serve [--duration 5] [--repeats 3]

Cases, each a fresh server process on a loopback port, loaded by wrk (C, one
thread) at concurrency 1, 16 and 64 with real Criteo rows as /predict bodies:

  (a) the service, micro-batching on (CTR_BATCH_MAX=256);
  (b) the same service with batching off (CTR_BATCH_MAX=1);
  (c) the no-op floor: the same HTTP stack and the same request validation,
      then a constant answer (benchmarks/noop_app.py).

And /predict_many with 1,000 rows per call, in rows/s, against the rows/s of
encode + forward on the same rows in this process (no HTTP). Each figure is the
median of ``--repeats`` runs. Targets: (a) at concurrency 64 reaches 0.8x the
floor's req/s; (a) at concurrency 1 has a p50 within 0.5 ms of the floor's;
/predict_many reaches 0.5x the in-process rows/s.

Writes benchmarks/results/serve.{json,md,png}. Needs wrk (Debian package wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks import report
from model.checkpoint import load_checkpoint
from model.data import criteo_json_rows
from model.default_model import DEFAULT_MODEL_DIR
from model.predict import predict_logits

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "criteo_sample.tsv"
CONCURRENCY = (1, 16, 64)
MANY_ROWS = 1000
MANY_CONCURRENCY = 4

LUA = """
local bodies = {}
for line in io.lines(os.getenv("BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%s", {["Content-Type"] = "application/json"}, bodies[i])
end
"""


def sample_rows() -> list[dict[str, Any]]:
    return criteo_json_rows(SAMPLE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served(NamedTuple):
    url: str
    pid: int


@contextmanager
def server(target: str, env: dict[str, str], start_timeout: float = 60) -> Iterator[Served]:
    """A uvicorn server process for ``target`` (an app factory), ready, then stopped."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"server {target} did not start") from None
                time.sleep(0.1)
        yield Served(url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def wrk(url: str, path: str, bodies: Path, connections: int, seconds: int) -> dict[str, float]:
    """req/s, p50 and p99 (ms) and errors of one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(LUA % path)
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "BODIES": str(bodies)},
        ).stdout
    finally:
        Path(script).unlink()
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    errors += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _latency(out, "50%"),
        "p99_ms": _latency(out, "99%"),
        "errors": errors,
    }


def _latency(out: str, percentile: str) -> float:
    value, unit = re.search(rf"^\s+{percentile}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def median_run(
    url: str, path: str, bodies: Path, connections: int, seconds: int, repeats: int
) -> dict[str, float]:
    wrk(url, path, bodies, connections, 1)  # warm up connections and caches
    runs = [wrk(url, path, bodies, connections, seconds) for _ in range(repeats)]
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def in_process_rows_per_s(rows: list[dict[str, Any]], seconds: float = 5.0) -> float:
    """Encode + forward of the same 1,000-row calls, no HTTP: the ceiling of /predict_many."""
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR)
    model, features = checkpoint.build_model(), checkpoint.features
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        ids, dense = features.encode_rows(rows)
        predict_logits(model, ids, dense)
        done += len(rows)
    return done / (time.perf_counter() - started)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for case, label in LABELS.items():
        xs = list(CONCURRENCY)
        left.plot(xs, [results[case][str(c)]["rps"] for c in xs], "o-", label=label)
        right.plot(xs, [results[case][str(c)]["p99_ms"] for c in xs], "o-", label=label)
    left.set(
        xscale="log",
        xlabel="concurrent connections",
        ylabel="requests/s",
        title="/predict throughput",
    )
    right.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent connections",
        ylabel="p99 (ms)",
        title="/predict p99 latency",
    )
    for ax in (left, right):
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


LABELS = {
    "batched": "(a) service, batching on",
    "unbatched": "(b) service, batching off",
    "floor": "(c) no-op floor",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    torch.set_num_threads(os.cpu_count() or 1)

    rows = sample_rows()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    single = work / "single.jsonl"
    single.write_text("".join(json.dumps({"features": r}) + "\n" for r in rows))
    many_rows = [rows[i % len(rows)] for i in range(MANY_ROWS)]
    many = work / "many.jsonl"
    many.write_text(json.dumps({"instances": many_rows}) + "\n")

    in_process = in_process_rows_per_s(many_rows)
    print(f"in-process encode + forward: {in_process:,.0f} rows/s")
    cases = {
        "batched": ("app.main:create_app", {"CTR_BATCH_MAX": "256"}),
        "unbatched": ("app.main:create_app", {"CTR_BATCH_MAX": "1"}),
        "floor": ("benchmarks.noop_app:create_app", {}),
    }
    results: dict[str, Any] = {}
    for case, (target, env) in cases.items():
        results[case] = {}
        with server(target, {"CTR_LOG_LEVEL": "warning", **env}) as (url, _):
            for c in CONCURRENCY:
                results[case][str(c)] = median_run(
                    url, "/predict", single, c, args.duration, args.repeats
                )
                r = results[case][str(c)]
                print(
                    f"{case:9} c={c:<3} {r['rps']:8,.0f} req/s  p50 {r['p50_ms']:.2f} ms  "
                    f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']:.0f}"
                )
            if case == "batched":
                m = median_run(
                    url, "/predict_many", many, MANY_CONCURRENCY, args.duration, args.repeats
                )
                results["predict_many"] = {**m, "rows_per_s": m["rps"] * MANY_ROWS}
                print(f"predict_many: {m['rps'] * MANY_ROWS:,.0f} rows/s")
    shutil.rmtree(work)

    a64, f64 = results["batched"]["64"], results["floor"]["64"]
    a1, f1 = results["batched"]["1"], results["floor"]["1"]
    many_ratio = results["predict_many"]["rows_per_s"] / in_process
    c64_ratio = a64["rps"] / f64["rps"]
    c1_over_ms = a1["p50_ms"] - f1["p50_ms"]
    targets = {
        "c64_rps_ratio_to_floor": report.target(c64_ratio, ">= 0.8", c64_ratio >= 0.8),
        "c1_p50_over_floor_ms": report.target(c1_over_ms, "<= 0.5", c1_over_ms <= 0.5),
        "predict_many_ratio_to_in_process": report.target(many_ratio, ">= 0.5", many_ratio >= 0.5),
    }
    figures = {
        "duration_s": args.duration,
        "repeats": args.repeats,
        "cases": results,
        "in_process_rows_per_s": in_process,
        "targets": targets,
    }
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, report.RESULTS / "serve.png")
    lines = [
        "# Serving under load",
        "",
        f"`python -m benchmarks.serve --duration {args.duration} --repeats {args.repeats}`: "
        "wrk (1 thread) on the same 2-core machine, /predict bodies cycling through the 200 "
        "Criteo sample rows, the bundled default model; each figure is the median of "
        f"{args.repeats} runs of {args.duration} s.",
        "",
        "| case | conc. | req/s | p50 ms | p99 ms | req/s vs floor | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, label in LABELS.items():
        for c in CONCURRENCY:
            r = results[case][str(c)]
            ratio = r["rps"] / results["floor"][str(c)]["rps"]
            lines.append(
                f"| {label} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {ratio:.2f} | {r['errors']:.0f} |"
            )
    m = results["predict_many"]
    lines += [
        "",
        f"/predict_many, {MANY_ROWS} rows per call, {MANY_CONCURRENCY} connections: "
        f"{m['rows_per_s']:,.0f} rows/s (p50 {m['p50_ms']:.1f} ms) against "
        f"{in_process:,.0f} rows/s for encode + forward in process: {many_ratio:.2f}x.",
        "",
        *report.targets_table(targets),
        "",
        "![throughput and p99 by concurrency](serve.png)",
    ]
    report.publish("serve", figures, lines)


if __name__ == "__main__":
    main()

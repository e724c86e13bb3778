"""Serving throughput and latency under load, with wrk, all servers side by side in one run.

    python -m benchmarks.serve [--duration 5] [--repeats 3] [--torchserve-venv DIR]

Servers, each a process (tree) of its own on loopback, all started first and then loaded
in turn, round after round, so that a drift of the shared machine falls on every case:

  workers   the service as users start it (``python -m app``): CTR_WORKERS=auto;
  one       the same with CTR_WORKERS=1;
  floor-1   the no-op floor (benchmarks/noop_app.py: the same HTTP stack and request
            validation, then a constant answer), one uvicorn process;
  floor-n   the same floor with as many uvicorn processes as ``workers`` has;
  torchserve  TorchServe 0.12 with the same DeepFM shape class and the same body
            (../shared/peers/torchserve), when ``--torchserve-venv`` (or TS_VENV) names
            a virtualenv that has it.

wrk (C, one thread) sends /predict bodies cycling through real Criteo rows at 1, 16
and 64 connections. Each figure is the median of ``--repeats`` rounds. Then
/predict_many with 1,000 rows a call on ``workers``, against encode + forward of the
same rows in this process (no HTTP).

Targets (issue 11): ``workers`` at c=64 >= 1.5x TorchServe's req/s with a lower p99; at
c=1 a p50 <= 1/4 of TorchServe's; ``workers`` at c=64 >= 0.8x ``floor-n``; ``one`` at
c=64 >= 0.8x ``floor-1``. Informational: /predict_many >= 0.5x in process.

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
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from app.cpus import available_cpus
from benchmarks import report
from model.checkpoint import load_checkpoint
from model.data import criteo_json_rows
from model.default_model import DEFAULT_MODEL_DIR
from model.predict import predict_logits

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "criteo_sample.tsv"
PEER = ROOT.parent / "shared" / "peers" / "torchserve"
CONCURRENCY = (1, 16, 64)
MANY_ROWS = 1000
MANY_CONCURRENCY = 4
FLOOR = "benchmarks.noop_app:create_app"  # the no-op floor's app factory

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


def require(*tools: str) -> None:
    """Stop with how to install them when command-line tools are missing."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"{', '.join(missing)} needed: apt-get install {' '.join(missing)}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served(NamedTuple):
    url: str
    pid: int


def ready(url: str, probe: bytes | None) -> bool:
    """Whether the server answers 200: GET /readyz, or POST ``probe`` to ``url``."""
    request = (
        urllib.request.Request(url + "/readyz")
        if probe is None
        else urllib.request.Request(url, data=probe, headers={"Content-Type": "application/json"})
    )
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def started(
    command: list[str],
    env: dict[str, str],
    url: str,
    probe: bytes | None = None,
    stop: list[str] | None = None,
    start_timeout: float = 120,
) -> Iterator[Served]:
    """``command`` running until it answers (see ``ready``); stopped with SIGTERM (or
    ``stop``, a command) at the end."""
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + start_timeout
        while not ready(url, probe):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{command} did not start")
            time.sleep(0.2)
        yield Served(url, process.pid)
    finally:
        if stop is not None:
            subprocess.run(stop, check=False, capture_output=True)
        else:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def uvicorn_command(target: str, port: int, processes: int = 1) -> list[str]:
    command = [sys.executable, "-m", "uvicorn", target, "--factory", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
    return command + (["--workers", str(processes)] if processes > 1 else [])


@contextmanager
def server(
    target: str, env: dict[str, str], start_timeout: float = 60, processes: int = 1
) -> Iterator[Served]:
    """uvicorn serving ``target`` (an app factory) with ``processes`` processes, ready,
    then stopped."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = uvicorn_command(target, port, processes)
    with started(command, env, url, start_timeout=start_timeout) as s:
        yield s


@contextmanager
def service(env: dict[str, str]) -> Iterator[Served]:
    """``python -m app`` as users start it (its supervisor and workers), ready."""
    port = free_port()
    env = {"CTR_PORT": str(port), "CTR_LOG_LEVEL": "warning", **env}
    with started([sys.executable, "-m", "app"], env, f"http://127.0.0.1:{port}") as s:
        yield s


@contextmanager
def torchserve(venv: Path, body: bytes) -> Iterator[Served]:
    """The TorchServe peer (../shared/peers/torchserve/serve.sh), answering its route."""
    bin_dir = venv / "bin"
    url = "http://127.0.0.1:18120/predictions/ctr"
    env = {"TS_VENV": str(venv), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    stop = [str(bin_dir / "torchserve"), "--stop"]
    with started([str(PEER / "serve.sh")], env, url, probe=body, stop=stop) as s:
        yield s


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
    return medians(runs)


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def in_process_rows_per_s(rows: list[dict[str, Any]], seconds: float = 5.0) -> float:
    """Encode + forward of the same 1,000-row calls, no HTTP: the ceiling of /predict_many."""
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR)
    model, features = checkpoint.build_model(), checkpoint.features
    done, started_at = 0, time.perf_counter()
    while time.perf_counter() - started_at < seconds:
        ids, dense = features.encode_rows(rows)
        predict_logits(model, ids, dense)
        done += len(rows)
    return done / (time.perf_counter() - started_at)


class Target(NamedTuple):
    """Where a case's wrk runs go: the server's base URL and its prediction route."""

    url: str
    path: str


def rounds(
    targets: dict[str, Target], bodies: Path, seconds: int, repeats: int
) -> dict[str, dict[str, dict[str, float]]]:
    """Every case at every concurrency, ``repeats`` rounds in turn; the medians."""
    for target in targets.values():
        for c in CONCURRENCY:
            wrk(target.url, target.path, bodies, c, 1)  # warm up connections and caches
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {c: [] for c in CONCURRENCY} for name in targets
    }
    for round_ in range(repeats):
        for name, target in targets.items():
            for c in CONCURRENCY:
                r = wrk(target.url, target.path, bodies, c, seconds)
                runs[name][c].append(r)
                print(
                    f"round {round_ + 1} {name:10} c={c:<3} {r['rps']:8,.0f} req/s  "
                    f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']:.0f}",
                    flush=True,
                )
    return {name: {str(c): medians(runs[name][c]) for c in CONCURRENCY} for name in targets}


def plot(results: dict[str, Any], labels: dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for case, label in labels.items():
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


def check_targets(results: dict[str, Any], many_ratio: float) -> dict[str, dict[str, Any]]:
    w64, w1 = results["workers"]["64"], results["workers"]["1"]
    targets = {}
    if "torchserve" in results:
        t64, t1 = results["torchserve"]["64"], results["torchserve"]["1"]
        vs_ts = w64["rps"] / t64["rps"]
        targets["workers_c64_rps_vs_torchserve"] = report.target(vs_ts, ">= 1.5", vs_ts >= 1.5)
        p99 = w64["p99_ms"] / t64["p99_ms"]
        targets["workers_c64_p99_vs_torchserve"] = report.target(p99, "< 1", p99 < 1)
        p50 = w1["p50_ms"] / t1["p50_ms"]
        targets["workers_c1_p50_vs_torchserve"] = report.target(p50, "<= 0.25", p50 <= 0.25)
    to_floor = w64["rps"] / results["floor-n"]["64"]["rps"]
    targets["workers_c64_rps_vs_floor_n"] = report.target(to_floor, ">= 0.8", to_floor >= 0.8)
    one = results["one"]["64"]["rps"] / results["floor-1"]["64"]["rps"]
    targets["one_c64_rps_vs_floor_1"] = report.target(one, ">= 0.8", one >= 0.8)
    targets["predict_many_vs_in_process"] = report.target(many_ratio, ">= 0.5", many_ratio >= 0.5)
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--torchserve-venv",
        type=Path,
        default=os.environ.get("TS_VENV"),
        help="a virtualenv with torchserve (../shared/peers/torchserve/README.md)",
    )
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    torch.set_num_threads(os.cpu_count() or 1)
    workers = available_cpus()

    rows = sample_rows()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    single = work / "single.jsonl"
    single.write_text("".join(json.dumps({"features": r}) + "\n" for r in rows))
    many_rows = [rows[i % len(rows)] for i in range(MANY_ROWS)]
    many = work / "many.jsonl"
    many.write_text(json.dumps({"instances": many_rows}) + "\n")

    in_process = in_process_rows_per_s(many_rows)
    print(f"in-process encode + forward: {in_process:,.0f} rows/s")
    labels = {
        "workers": f"ctr-serve, default workers ({workers})",
        "one": "ctr-serve, 1 worker",
        "floor-1": "no-op floor, 1 process",
        "floor-n": f"no-op floor, {workers} processes",
    }
    with ExitStack() as stack:
        targets = {}
        for name, env in (("workers", {}), ("one", {"CTR_WORKERS": "1"})):
            served = stack.enter_context(service(env))
            targets[name] = Target(served.url, "/predict")
        for name, processes in (("floor-1", 1), ("floor-n", workers)):
            served = stack.enter_context(server(FLOOR, {}, processes=processes))
            targets[name] = Target(served.url, "/predict")
        if args.torchserve_venv is not None:
            stack.enter_context(
                torchserve(args.torchserve_venv, single.read_bytes().split(b"\n")[0])
            )
            targets["torchserve"] = Target("http://127.0.0.1:18120", "/predictions/ctr")
            labels["torchserve"] = "TorchServe 0.12, 2 workers, batch 64"
        results: dict[str, Any] = rounds(targets, single, args.duration, args.repeats)
        m = median_run(
            targets["workers"].url,
            "/predict_many",
            many,
            MANY_CONCURRENCY,
            args.duration,
            args.repeats,
        )
        results["predict_many"] = {**m, "rows_per_s": m["rps"] * MANY_ROWS}
        print(f"predict_many: {m['rps'] * MANY_ROWS:,.0f} rows/s")
    shutil.rmtree(work)

    many_ratio = results["predict_many"]["rows_per_s"] / in_process
    targets_met = check_targets(results, many_ratio)
    figures = {
        "duration_s": args.duration,
        "repeats": args.repeats,
        "workers": workers,
        "cases": results,
        "in_process_rows_per_s": in_process,
        "targets": targets_met,
    }
    report.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(results, labels, report.RESULTS / "serve.png")
    command = f"python -m benchmarks.serve --duration {args.duration} --repeats {args.repeats}"
    if args.torchserve_venv is not None:
        command += " --torchserve-venv DIR"
    lines = [
        "# Serving under load",
        "",
        f"`{command}`: wrk (1 thread) on the same {os.cpu_count()}-core machine as the "
        "servers, /predict bodies cycling through the 200 Criteo sample rows, the bundled "
        "default model. All servers run at once and are loaded in turn, round after round; "
        f"each figure is the median of {args.repeats} rounds of {args.duration} s.",
        "",
        "| server | conc. | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for case, label in labels.items():
        for c in CONCURRENCY:
            r = results[case][str(c)]
            lines.append(
                f"| {label} | {c} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | "
                f"{r['p99_ms']:.2f} | {r['errors']:.0f} |"
            )
    m = results["predict_many"]
    lines += [
        "",
        f"/predict_many, {MANY_ROWS} rows per call, {MANY_CONCURRENCY} connections, default "
        f"workers: {m['rows_per_s']:,.0f} rows/s (p50 {m['p50_ms']:.1f} ms) against "
        f"{in_process:,.0f} rows/s for encode + forward in process: {many_ratio:.2f}x.",
        "",
        *report.targets_table(targets_met),
        "",
        "![throughput and p99 by concurrency](serve.png)",
    ]
    report.publish("serve", figures, lines)


if __name__ == "__main__":
    main()

"""Where a /predict call's time goes: the service with 1 worker against the no-op floor,
both sampled by py-spy under the same wrk load.

    python -m benchmarks.serve_profile [--duration 10] [--rate 250]

Each server (``python -m app`` with CTR_WORKERS=1; the floor of benchmarks/noop_app.py,
one uvicorn process) is loaded by wrk at 64 connections while py-spy samples its
threads (without pausing them) for ``--duration`` seconds. A thread's samples over the
rate are its busy seconds; over the calls wrk completed in the window, its microseconds
per call. The event loop's time is split by the module each sample was in (its
innermost frame), so the service and the floor compare layer by layer; the slowest of
the service's own functions are listed by the time spent in them and what they call.

Writes benchmarks/results/serve_profile.{json,md}. Needs wrk, and py-spy
(``pip install py-spy``, in the ``profile`` extra), run as root or with ptrace allowed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.serve import (
    FLOOR,
    ROOT,
    Served,
    sample_rows,
    server,
    service,
    wrk,
)

CONNECTIONS = 64
LINE = re.compile(r"^thread \((\d+)\): (.*) (\d+)$")
FRAME = re.compile(r"^(.*) \((.*):\d+\)$")


def layer(path: str) -> str:
    """The layer a frame's file belongs to: a module of ours, or a library's name."""
    file = Path(path).with_suffix("")
    parts = file.parts
    if "site-packages" in parts:  # a library's module, by its dotted name
        return ".".join(parts[parts.index("site-packages") + 1 :])
    if file.is_relative_to(ROOT):
        return ".".join(file.relative_to(ROOT).parts)
    return "python: " + file.name  # the standard library (asyncio, selectors, threading)


def parse(raw: str) -> list[tuple[str, list[tuple[str, str]], int]]:
    """py-spy's raw output: (thread name, frames root first as (function, file), count)."""
    stacks = []
    for line in raw.splitlines():
        found = LINE.match(line)
        if found is None:
            continue
        thread, *frames = found.group(2).split(";")
        parsed = [m.groups() for m in map(FRAME.match, frames) if m is not None]
        stacks.append((thread, [(f, p) for f, p in parsed], int(found.group(3))))
    return stacks


def profile(served: Served, path: str, bodies: Path, seconds: int, rate: int) -> dict[str, Any]:
    """wrk at ``CONNECTIONS`` for ``seconds`` + 2 while py-spy samples the middle."""
    out = Path(tempfile.mkstemp(suffix=".txt")[1])
    wrk(served.url, path, bodies, CONNECTIONS, 1)  # warm up
    load: dict[str, float] = {}
    loader = threading.Thread(
        target=lambda: load.update(wrk(served.url, path, bodies, CONNECTIONS, seconds + 2))
    )
    loader.start()
    threading.Event().wait(1)
    sampler = ["py-spy", "record", "--pid", str(served.pid), "--duration", str(seconds)]
    sampler += ["--rate", str(rate), "--format", "raw", "--output", str(out), "--threads"]
    subprocess.run([*sampler, "--nonblocking", "--full-filenames"], check=True, capture_output=True)
    loader.join()
    stacks = parse(out.read_text())
    out.unlink()
    calls = load["rps"] * seconds
    per_call = 1e6 / rate / calls  # microseconds per call of one sample

    threads: Counter[str] = Counter()
    loop_layers: Counter[str] = Counter()
    ours: Counter[str] = Counter()  # inclusive, our functions, event loop and batcher
    for thread, frames, count in stacks:
        threads[thread] += count
        if thread == "MainThread" and frames:
            loop_layers[layer(frames[-1][1])] += count
        seen = set()
        for function, file in frames:
            name = layer(file)
            if name.split(".")[0] in ("app", "model") and (name, function) not in seen:
                seen.add((name, function))
                ours[f"{name}.{function}"] += count
    return {
        "rps": load["rps"],
        "p99_ms": load["p99_ms"],
        "threads_us_per_call": {t: n * per_call for t, n in threads.most_common()},
        "loop_layers_us_per_call": {k: n * per_call for k, n in loop_layers.most_common()},
        "ours_us_per_call": {k: n * per_call for k, n in ours.most_common(20)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds sampled")
    parser.add_argument("--rate", type=int, default=250, help="samples a second")
    args = parser.parse_args(argv)
    for tool in ("wrk", "py-spy"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed on PATH")
    with tempfile.TemporaryDirectory() as work:
        bodies = Path(work) / "single.jsonl"
        bodies.write_text("".join(json.dumps({"features": r}) + "\n" for r in sample_rows()))
        results = {}
        with service({"CTR_WORKERS": "1"}) as served:
            results["one"] = profile(served, "/predict", bodies, args.duration, args.rate)
        with server(FLOOR, {}) as floor_served:
            results["floor"] = profile(floor_served, "/predict", bodies, args.duration, args.rate)
    one, floor = results["one"], results["floor"]
    lines = [
        "# Where a /predict call's time goes",
        "",
        f"`python -m benchmarks.serve_profile --duration {args.duration} --rate {args.rate}`: "
        f"wrk at {CONNECTIONS} connections; py-spy samples every thread {args.rate} times a "
        f"second for {args.duration} s without pausing it. Microseconds per call: a "
        "thread's busy samples over the rate, over the calls answered in the window.",
        "",
        f"The service with 1 worker answered {one['rps']:,.0f} req/s (p99 "
        f"{one['p99_ms']:.1f} ms) and the floor {floor['rps']:,.0f} req/s (p99 "
        f"{floor['p99_ms']:.1f} ms) while sampled: {one['rps'] / floor['rps']:.2f}x.",
        "",
        "## Busy time per call, by thread",
        "",
        "| thread | service µs | floor µs |",
        "|---|---|---|",
    ]
    for thread in dict.fromkeys([*one["threads_us_per_call"], *floor["threads_us_per_call"]]):
        lines.append(
            f"| {thread} | {one['threads_us_per_call'].get(thread, 0):.1f} | "
            f"{floor['threads_us_per_call'].get(thread, 0):.1f} |"
        )
    lines += [
        "",
        "## The event loop's time per call, by the module it was in",
        "",
        "| module | service µs | floor µs | difference |",
        "|---|---|---|---|",
    ]
    layers = dict.fromkeys([*one["loop_layers_us_per_call"], *floor["loop_layers_us_per_call"]])
    for name in sorted(layers, key=lambda n: -one["loop_layers_us_per_call"].get(n, 0)):
        a = one["loop_layers_us_per_call"].get(name, 0)
        b = floor["loop_layers_us_per_call"].get(name, 0)
        if max(a, b) >= 0.5:
            lines.append(f"| {name} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
    lines += [
        "",
        "## The service's own functions: time in them and what they call, per call",
        "",
        "| function | µs |",
        "|---|---|",
        *(f"| `{k}` | {v:.1f} |" for k, v in one["ours_us_per_call"].items()),
    ]
    report.publish(
        "serve_profile", {"duration_s": args.duration, "rate": args.rate, "cases": results}, lines
    )


if __name__ == "__main__":
    main()

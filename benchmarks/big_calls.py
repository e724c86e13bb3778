"""Do big calls block small ones? /predict's latency at 16 connections, alone and while
another client keeps sending 10,000-row /predict_many calls, in one run.

    python -m benchmarks.big_calls [--duration 10] [--repeats 3]

Cases, each a fresh server (the service's defaults but the chunk size):

  (a) chunks of CTR_CHUNK_ROWS (the default, 1024 rows): a big call is scored a
      chunk at a time, and /predict calls take turns with its chunks;
  (b) the baseline: CTR_CHUNK_ROWS=10000, one forward pass per big call, as before
      batches had a row budget.

In each, wrk (one thread, 16 connections) sends real Criteo rows to /predict, first
alone, then while a client (a thread of this process, one call at a time) sends
10,000-row /predict_many calls. Figures are medians of ``--repeats`` runs. Target:
(a)'s p99 with the big calls is within 2x its p99 without them.

Writes benchmarks/results/big_calls.{json,md}. Needs wrk (Debian package wrk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.serve import sample_rows, server, wrk

CONNECTIONS = 16
BIG_ROWS = 10_000
CASES = {"chunked": "1024", "one pass per call": "10000"}


class BigCaller:
    """A client that keeps sending 10,000-row calls until stopped; counts them."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url + "/predict_many", body
        self.stop = threading.Event()
        self.calls = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BigCaller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=120)

    def _run(self) -> None:
        while not self.stop.is_set():
            request = urllib.request.Request(
                self.url, self.body, {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    json.load(response)
                    self.calls += 1
            except OSError:
                self.errors += 1


def run_case(
    chunk_rows: str, bodies: Path, big: bytes, seconds: int, repeats: int
) -> dict[str, Any]:
    env = {"CTR_CHUNK_ROWS": chunk_rows, "CTR_LOG_LEVEL": "warning"}
    with server("app.main:create_app", env) as served:
        wrk(served.url, "/predict", bodies, CONNECTIONS, 1)  # warm up
        alone, loaded, big_calls = [], [], []
        for _ in range(repeats):
            alone.append(wrk(served.url, "/predict", bodies, CONNECTIONS, seconds))
            with BigCaller(served.url, big) as caller:
                loaded.append(wrk(served.url, "/predict", bodies, CONNECTIONS, seconds))
            big_calls.append(caller.calls / seconds)
            assert caller.errors == 0, f"{caller.errors} big calls failed"

    def median(runs: list[dict[str, float]]) -> dict[str, float]:
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    return {
        "alone": median(alone),
        "with_big_calls": median(loaded),
        "big_calls_per_s": statistics.median(big_calls),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    rows = sample_rows()
    big_rows = [rows[i % len(rows)] for i in range(BIG_ROWS)]
    big = json.dumps({"instances": big_rows}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        bodies = Path(tmp) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"features": r}) + "\n" for r in rows))
        results = {
            name: run_case(chunk, bodies, big, args.duration, args.repeats)
            for name, chunk in CASES.items()
        }

    chunked = results["chunked"]
    ratio = chunked["with_big_calls"]["p99_ms"] / chunked["alone"]["p99_ms"]
    targets = {"p99 with big calls / alone (chunked)": report.target(ratio, "<= 2.0", ratio <= 2)}
    lines = [
        "# Big calls beside small ones",
        "",
        f"/predict at {CONNECTIONS} connections (wrk), alone and while one client keeps "
        f"sending {BIG_ROWS:,}-row /predict_many calls; medians of {args.repeats} runs of "
        f"{args.duration} s. Command: `python -m benchmarks.big_calls`.",
        "",
        "| case | /predict req/s alone | p50 alone | p99 alone | req/s with big calls "
        "| p50 with | p99 with | p99 ratio | big calls/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        a, w = r["alone"], r["with_big_calls"]
        lines.append(
            f"| {name} (CTR_CHUNK_ROWS={CASES[name]}) | {a['rps']:,.0f} | {a['p50_ms']:.2f} ms "
            f"| {a['p99_ms']:.2f} ms | {w['rps']:,.0f} | {w['p50_ms']:.2f} ms "
            f"| {w['p99_ms']:.2f} ms | {w['p99_ms'] / a['p99_ms']:.2f}x "
            f"| {r['big_calls_per_s']:.2f} |"
        )
    lines += ["", *report.targets_table(targets, ".2f")]
    report.publish("big_calls", {"results": results, "targets": targets}, lines)


if __name__ == "__main__":
    main()

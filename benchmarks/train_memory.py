"""Peak memory of the training pipeline as the data grows: 1M rows against 4M rows.

    python -m benchmarks.train_memory [--rows 1000000,4000000] [--epochs 1]

Each size is trained by ``python -m model.train`` in a child process on a
generated Criteo TSV (counting, vocabularies, encoding to disk, training,
validation, checkpoint); the child's peak resident set size comes from
wait4(2). The smallest size is the baseline. Target: the 4M-row run peaks
under 1.3x the 1M-row run. Writes benchmarks/results/train_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import report
from benchmarks.datasets import generated

RATIO_TARGET = 1.3


def peak_rss_of_training(data: Path, epochs: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one training run in a child process."""
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        command = [
            sys.executable,
            "-m",
            "model.train",
            "--data",
            str(data),
            "--out",
            str(Path(tmp) / "model"),
            "--epochs",
            str(epochs),
            "--quiet",
            "--workdir",
            tmp,
        ]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"training failed ({child.returncode}): {' '.join(command)}")
    return usage.ru_maxrss / 1024, seconds  # ru_maxrss is in KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", default="1000000,4000000", help="comma-separated sizes; the first is the baseline"
    )
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    sizes = [int(r) for r in args.rows.split(",")]

    runs = []
    for rows in sizes:
        path = generated(rows)
        rss, seconds = peak_rss_of_training(path, args.epochs)
        runs.append(
            {
                "rows": rows,
                "file_mib": path.stat().st_size / 2**20,
                "peak_rss_mib": rss,
                "seconds": seconds,
            }
        )
        print(f"{rows:>10,} rows: peak RSS {rss:,.0f} MiB in {seconds:.0f} s")
    base = runs[0]["peak_rss_mib"]
    for run in runs:
        run["ratio_to_baseline"] = run["peak_rss_mib"] / base
    ratio = runs[-1]["ratio_to_baseline"]
    met = ratio < RATIO_TARGET
    figures = {"epochs": args.epochs, "runs": runs, "target_ratio_below": RATIO_TARGET, "met": met}
    markdown = (
        f"""# Peak memory of training as the data grows

`python -m benchmarks.train_memory --rows {args.rows} --epochs {args.epochs}`: the whole
training pipeline (`python -m model.train`, default settings) in a child process;
peak RSS from wait4(2).

| rows | TSV size | peak RSS | ratio to {sizes[0]:,} rows | wall time |
|---|---|---|---|---|
"""
        + "".join(
            f"| {r['rows']:,} | {r['file_mib']:,.0f} MiB | {r['peak_rss_mib']:,.0f} MiB | "
            f"{r['ratio_to_baseline']:.3f} | {r['seconds']:.0f} s |\n"
            for r in runs
        )
        + f"""
Target: the {sizes[-1]:,}-row run peaks under {RATIO_TARGET}x the {sizes[0]:,}-row run:
{"met" if met else "**missed**"} ({ratio:.3f}x).
"""
    )
    out = report.write("train_memory", figures, markdown)
    print(markdown)
    print(f"written to {out}")


if __name__ == "__main__":
    main()

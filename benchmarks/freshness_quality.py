"""What a fresh model is worth when the world drifts: day 2's test rows scored by the
day-1 model, by the day-1 model trained on from day 2's first half
(``model.train --init-from``), and by a full retrain on both.

    python -m benchmarks.freshness_quality [--rows 400000]

Generated data (``model.synthetic``): day 1, then day 2 of the same world, where a
share of each field's values is new (``new_values``) and the others' effects moved
(``drift``). Day 2's first half is what arrived since the day-1 model; its second
half is the test. Every model trains with the project's defaults. The oracle scores
the test rows with their true probabilities: the best any model can do.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.datasets import WORK, generated
from model.checkpoint import load_checkpoint
from model.data import CRITEO_SCHEMA, read_chunks
from model.evaluate import auc, logloss
from model.predict import Predictor
from model.synthetic import SyntheticConfig, read_truth
from model.train import TrainConfig, train


def halves(path: Path, work: Path) -> tuple[Path, Path]:
    """The first and second half of a generated file's rows (truth alongside)."""
    lines = path.read_text().splitlines(keepends=True)
    truth = read_truth(path)
    middle = len(lines) // 2
    out = []
    parts = (("first", lines[:middle], truth[:middle]), ("second", lines[middle:], truth[middle:]))
    for name, part, p in parts:
        target = work / f"day2-{name}.tsv"
        target.write_text("".join(part))
        (work / f"day2-{name}.tsv.truth").write_text("".join(f"{x:.9f}\n" for x in p.tolist()))
        out.append(target)
    return out[0], out[1]


def scores(model_dir: Path, test: Path) -> dict[str, float]:
    predictor = Predictor(load_checkpoint(model_dir))
    labels, probs = [], []
    for chunk in read_chunks([test], "criteo", CRITEO_SCHEMA):
        labels.append(chunk.labels.astype(np.float64))
        probs.append(predictor.predict_columns(chunk.columns, len(chunk)))
    y, p = np.concatenate(labels), np.concatenate(probs)
    return {"auc": auc(y, p), "logloss": logloss(y, p)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=400_000, help="rows per day")
    parser.add_argument("--drift", type=float, default=SyntheticConfig().drift)
    parser.add_argument("--new-values", type=float, default=SyntheticConfig().new_values)
    args = parser.parse_args(argv)
    world = SyntheticConfig(seed=21, drift=args.drift, new_values=args.new_values)
    day1 = generated(args.rows, world)
    day2 = generated(args.rows, replace(world, day=1))
    work = WORK / "freshness-quality"
    work.mkdir(parents=True, exist_ok=True)
    arrived, test = halves(day2, work)
    config = TrainConfig()
    update, retrain = "day 1 + update on day 2's first half", "full retrain on both"
    runs: list[tuple[str, list[Path], str | None]] = [
        ("day-1 model", [day1], None),
        (update, [arrived], "day-1 model"),
        (retrain, [day1, arrived], None),
    ]
    results: dict[str, dict[str, float]] = {}
    dirs: dict[str, Path] = {}
    for name, paths, parent in runs:
        out = work / name.replace(" ", "-").replace("'", "")
        started = time.perf_counter()
        result = train(
            paths,
            "criteo",
            CRITEO_SCHEMA,
            out,
            config,
            progress=False,
            created_at="2026-01-01T00:00:00+00:00",
            init_from=dirs[parent] if parent else None,
        )
        seconds = time.perf_counter() - started
        dirs[name] = out
        best = float(result.metrics["best_epoch"])
        results[name] = {**scores(out, test), "train_s": seconds, "epochs": best}
        print(f"{name}: {results[name]}")
    labels = np.concatenate([c.labels for c in read_chunks([test], "criteo", CRITEO_SCHEMA)])
    oracle = {"auc": auc(labels, read_truth(test)), "logloss": logloss(labels, read_truth(test))}
    figures = {
        "rows_per_day": args.rows,
        "world": repr(world),
        "results": results,
        "oracle": oracle,
    }
    lines = [
        "# Freshness: the value of an update when the world drifts",
        "",
        f"`python -m benchmarks.freshness_quality --rows {args.rows}`: generated data, day 1 "
        f"then day 2 of the same world ({args.new_values:.0%} of each field's values new, "
        f"the others' effects drifted by {args.drift}); {args.rows:,} rows a day. Day 2's "
        "first half arrived after the day-1 model; its second half is the test. Every "
        "model trains with `model.train`'s defaults (early stopping on its own last 10%).",
        "",
        "| model | test AUC | test logloss | training s | best epoch |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['train_s']:.0f} | "
            f"{r['epochs']:.0f} |"
            for name, r in results.items()
        ),
        f"| oracle (the true probabilities) | {oracle['auc']:.4f} | {oracle['logloss']:.4f} | | |",
    ]
    report.publish("freshness_quality", figures, lines)


if __name__ == "__main__":
    main()

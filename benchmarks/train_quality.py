"""Model quality on generated Criteo-shaped data, against the oracle.

    python -m benchmarks.train_quality [--rows 1000000]

Generates rows with a planted truth (``model.synthetic``, default settings),
trains this project's DeepFM with its default training settings on an 80/10/10
split in file order, and scores the test rows. The baseline is the oracle: the
true click probabilities of the same test rows, the best any model can do.
Targets: test AUC within 0.005 of the oracle's, test logloss within 2% of it.
Writes benchmarks/results/train_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks import report
from benchmarks.datasets import generated
from model.data import CRITEO_SCHEMA, read_chunks
from model.evaluate import metrics
from model.synthetic import SyntheticConfig, read_truth
from model.train import TrainConfig, train

AUC_GAP_TARGET = 0.005
LOGLOSS_RATIO_TARGET = 1.02


def test_labels(path: Path, start: int) -> np.ndarray:
    labels = np.concatenate([c.labels for c in read_chunks([path], "criteo", CRITEO_SCHEMA)])
    return labels[start:].astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--min-count", type=int, default=10, help="Criteo practice: 10")
    args = parser.parse_args(argv)

    data_config = SyntheticConfig()
    path = generated(args.rows, data_config)
    config = TrainConfig(
        epochs=args.epochs, min_count=args.min_count, valid_fraction=0.1, test_fraction=0.1
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        result = train([path], "criteo", CRITEO_SCHEMA, Path(tmp) / "model", config)
    seconds = time.perf_counter() - started

    num_test = round(args.rows * 0.1)
    labels = test_labels(path, args.rows - num_test)
    oracle = metrics(labels, read_truth(path)[args.rows - num_test :])
    model = {"auc": result.metrics["test_auc"], "logloss": result.metrics["test_logloss"]}
    auc_gap = oracle["auc"] - model["auc"]
    logloss_ratio = model["logloss"] / oracle["logloss"]
    figures = {
        "rows": args.rows,
        "split": {"train": args.rows - 2 * num_test, "valid": num_test, "test": num_test},
        "model": model,
        "oracle": {"auc": oracle["auc"], "logloss": oracle["logloss"]},
        "auc_gap": auc_gap,
        "logloss_ratio": logloss_ratio,
        "targets": {"auc_gap_max": AUC_GAP_TARGET, "logloss_ratio_max": LOGLOSS_RATIO_TARGET},
        "met": {
            "auc": auc_gap <= AUC_GAP_TARGET,
            "logloss": logloss_ratio <= LOGLOSS_RATIO_TARGET,
        },
        "best_epoch": result.metrics["best_epoch"],
        "history": result.history,
        "train_seconds": seconds,
        "data_config": asdict(data_config),
        "train_config": {k: v for k, v in asdict(config).items()},
    }
    verdict = {True: "met", False: "**missed**"}
    auc_verdict = verdict[auc_gap <= AUC_GAP_TARGET]
    logloss_verdict = verdict[logloss_ratio <= LOGLOSS_RATIO_TARGET]
    best = result.metrics["best_epoch"]
    markdown = f"""# Training quality against the oracle

`python -m benchmarks.train_quality --rows {args.rows} --min-count {args.min_count}`:
{args.rows:,} generated rows, 80/10/10 split in file order, default training settings
but `--min-count {args.min_count}`; {seconds:.0f} s in all.

| | test AUC | test logloss |
|---|---|---|
| oracle (true probabilities) | {oracle["auc"]:.4f} | {oracle["logloss"]:.4f} |
| this DeepFM (best epoch {best}) | {model["auc"]:.4f} | {model["logloss"]:.4f} |
| gap | {auc_gap:.4f} (≤ {AUC_GAP_TARGET}: {auc_verdict}) | \
{100 * (logloss_ratio - 1):.2f}% (≤ 2%: {logloss_verdict}) |

Per epoch (validation rows):

| epoch | train loss | valid AUC | valid logloss |
|---|---|---|---|
""" + "".join(
        f"| {h['epoch']} | {h['train_loss']:.4f} | {h['valid_auc']:.4f} | "
        f"{h['valid_logloss']:.4f} |\n"
        for h in result.history
    )
    out = report.write("train_quality", figures, markdown)
    print(markdown)
    print(f"written to {out}")


if __name__ == "__main__":
    main()

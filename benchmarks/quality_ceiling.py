"""Where the gap to the oracle comes from (a diagnosis that goes with train_quality).

    python -m benchmarks.quality_ceiling [--rows 1000000] [--checkpoint DIR]

On the same generated rows and split as benchmarks/train_quality (80/10/10 in
file order), it reports:

1. the oracle as seen by someone who knows only the values met at least K times in
   the training rows (the others' effects set to zero): how much AUC the rare tail
   can cost at all;
2. with ``--checkpoint`` (a model trained on these rows, e.g. the one
   benchmarks/train_vs_deepctr leaves in benchmarks/work/ours-checkpoint), the
   least-squares fit of the model's test logits on the three planted terms
   (first-order, pairwise, dense): a coefficient near 1 means the term was learned.

Writes benchmarks/results/quality_ceiling.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.datasets import generated
from model.checkpoint import load_checkpoint
from model.data import CRITEO_SCHEMA, read_chunks, take_rows
from model.evaluate import auc, logloss
from model.predict import Predictor
from model.synthetic import GroundTruth, SyntheticConfig

THRESHOLDS = (1, 30, 100, 300, 1000, 3000)
TERMS = ("first-order", "pairwise", "dense")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)

    path = generated(args.rows)
    num_train, test_start = round(args.rows * 0.8), args.rows - round(args.rows * 0.1)
    chunks = list(take_rows(read_chunks([path], "criteo", CRITEO_SCHEMA), test_start, args.rows))
    labels = np.concatenate([c.labels for c in chunks]).astype(np.float64)
    truth = GroundTruth(SyntheticConfig())
    dense, idx = truth.replay(args.rows)
    test = slice(test_start, args.rows)

    ceilings = []
    for k in THRESHOLDS:
        known = [
            np.bincount(idx[:num_train, j], minlength=len(s.values) + 1) >= k
            for j, s in enumerate(truth.sparse)
        ]
        logits = truth.bias + truth.terms(dense[test], idx[test], known).sum(axis=1)
        probs = 1.0 / (1.0 + np.exp(-logits))
        ceilings.append(
            {"min_count": k, "auc": auc(labels, probs), "logloss": logloss(labels, probs)}
        )
        print(f"oracle knowing values seen >= {k:>4} times: AUC {ceilings[-1]['auc']:.4f}")

    figures: dict[str, Any] = {"rows": args.rows, "ceilings": ceilings}
    lines = [
        "# Where the gap to the oracle comes from",
        "",
        f"`python -m benchmarks.quality_ceiling --rows {args.rows}"
        + (f" --checkpoint {args.checkpoint}`" if args.checkpoint else "`")
        + f": the {test.stop - test.start:,} test rows of benchmarks/train_quality's split.",
        "",
        "| oracle knows the values seen in training at least | test AUC | test logloss |",
        "|---|---|---|",
        *(f"| {c['min_count']} times | {c['auc']:.4f} | {c['logloss']:.4f} |" for c in ceilings),
    ]
    if args.checkpoint:
        checkpoint = load_checkpoint(args.checkpoint)
        predictor = Predictor(checkpoint)
        probs = np.concatenate([predictor.predict_columns(c.columns, len(c)) for c in chunks])
        model_logits = np.log(probs / (1.0 - probs))
        terms = truth.terms(dense[test], idx[test])
        design = np.column_stack([terms, np.ones(len(terms))])
        coef, *_ = np.linalg.lstsq(design, model_logits, rcond=None)
        residual = model_logits - design @ coef
        r2 = 1.0 - residual.var() / model_logits.var()
        figures["model"] = {
            "version": checkpoint.version,
            "auc": auc(labels, probs),
            "coefficients": dict(zip(TERMS, coef[:3].tolist(), strict=True)),
            "r2": r2,
        }
        print(
            f"model {checkpoint.version}: AUC {figures['model']['auc']:.4f}; logit ~ "
            + ", ".join(f"{t} {c:.2f}" for t, c in zip(TERMS, coef[:3], strict=True))
        )
        lines += [
            "",
            f"Model `{checkpoint.version}` (test AUC {figures['model']['auc']:.4f}): its test "
            "logits fitted on the planted terms by least squares "
            f"(R² {r2:.3f}); 1 means the term is fully learned.",
            "",
            "| term | coefficient |",
            "|---|---|",
            *(f"| {t} | {c:.3f} |" for t, c in zip(TERMS, coef[:3], strict=True)),
        ]
    out = report.write("quality_ceiling", figures, "\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()

"""Fit a calibration map to a trained checkpoint on a labelled file, and write the
calibrated checkpoint (the same weights; a new version).

    python -m model.calibrate --checkpoint models/mine --data labelled.tsv \\
        --method isotonic --out models/mine-calibrated

The checkpoint's negative down-sampling correction is kept; the map is fitted on the
corrected probabilities (``model.calibration``). Use rows the model was not trained on:
its validation rows, or traffic logged since and joined with its clicks (``model.join``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model.calibration import METHODS, Calibration, Method
from model.checkpoint import load_checkpoint, save_checkpoint
from model.cli import add_data_arguments, data_format, schema_from_args
from model.data import Format, Schema, read_chunks
from model.evaluate import expected_calibration_error
from model.predict import Predictor
from model.train import fingerprint


def calibrate(
    checkpoint_dir: Path,
    paths: Sequence[Path],
    fmt: Format,
    schema: Schema,
    method: Method,
    out: Path,
    *,
    created_at: str | None = None,
) -> tuple[str, dict[str, float]]:
    """Write ``checkpoint_dir``'s model with ``method`` fitted on ``paths`` to ``out``;
    return the new version and the expected calibration error on ``paths`` before and
    after."""
    checkpoint = load_checkpoint(checkpoint_dir)
    predictor = Predictor(checkpoint)
    labels_parts, logit_parts = [], []
    for chunk in read_chunks(paths, fmt, schema):
        labels_parts.append(chunk.labels.astype(np.float64))
        logit_parts.append(predictor.predict_logits_columns(chunk.columns, len(chunk)))
    labels, logits = np.concatenate(labels_parts), np.concatenate(logit_parts)
    before = checkpoint.calibration
    after = Calibration(before.negative_rate).with_method(method, logits, labels)
    training = dict(checkpoint.training)
    training["calibration"] = {"method": method, "rows": len(labels), "files": fingerprint(paths)}
    version = save_checkpoint(
        out,
        predictor.model,
        checkpoint.read_features(),
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=checkpoint.metrics,
        training=training,
        calibration=after,
    )
    errors = {
        "ece_before": expected_calibration_error(labels, before.probabilities(logits)),
        "ece_after": expected_calibration_error(labels, after.probabilities(logits)),
    }
    return version, errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the trained model")
    add_data_arguments(parser)
    parser.add_argument("--method", choices=METHODS, default="isotonic")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--created-at", default=None, help="timestamp to record; default: now")
    args = parser.parse_args(argv)
    schema = schema_from_args(args, parser)
    version, errors = calibrate(
        args.checkpoint,
        args.data,
        data_format(args),
        schema,
        args.method,
        args.out,
        created_at=args.created_at,
    )
    print(
        f"{version} written to {args.out}: expected calibration error on the data "
        f"{errors['ece_before']:.4f} before, {errors['ece_after']:.4f} after"
    )


if __name__ == "__main__":
    main()

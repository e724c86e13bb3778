"""Evaluation: AUC, logloss, normalized entropy, calibration, and a report image.

    python -m model.evaluate --checkpoint models/default --data test.tsv --report report.png

Beside AUC and logloss (He et al. 2014, "Practical Lessons from Predicting Clicks on Ads
at Facebook"): normalized entropy, NE = logloss / H(observed CTR), the logloss against
always predicting the background rate (below 1 is better than that); the calibration
ratio, sum of predicted / sum of clicks (1 is calibrated on average); and the expected
calibration error, the row-weighted mean gap |predicted - observed| over equal-count bins.
The probabilities are the served ones (the checkpoint's calibration applied); the report
plots them beside the model's uncalibrated sigmoid(logit) when they differ.

When the data file was generated (``model.synthetic``), the oracle's metrics,
computed from the true probabilities, are printed beside the model's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

from model.calibration import sigmoid
from model.checkpoint import load_checkpoint
from model.cli import add_data_arguments, data_format, schema_from_args
from model.data import read_chunks
from model.predict import Predictor
from model.synthetic import read_truth, truth_path

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CalibrationBin:
    """One decile of rows by predicted probability."""

    rows: int
    mean_predicted: float
    observed_ctr: float


def auc(labels: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float:
    return float(roc_auc_score(labels, probs))


def logloss(labels: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float:
    return float(log_loss(labels, np.clip(probs, 1e-7, 1 - 1e-7), labels=[0, 1]))


def normalized_entropy(labels: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float:
    """Logloss over the entropy of the observed click rate (NE; 1: no better than the rate)."""
    ctr = float(np.clip(np.mean(labels), 1e-7, 1 - 1e-7))
    background = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return logloss(labels, probs) / float(background)


def calibration_ratio(labels: npt.NDArray[Any], probs: npt.NDArray[Any]) -> float:
    """Sum of predicted over sum of clicks (1: calibrated on average)."""
    return float(np.sum(probs) / max(float(np.sum(labels)), 1e-12))


def expected_calibration_error(labels: FloatArray, probs: FloatArray, bins: int = 10) -> float:
    """The row-weighted mean |mean predicted - observed CTR| over equal-count bins."""
    parts = calibration(labels, probs, bins)
    return sum(b.rows * abs(b.mean_predicted - b.observed_ctr) for b in parts) / len(labels)


def calibration(labels: FloatArray, probs: FloatArray, bins: int = 10) -> list[CalibrationBin]:
    """Mean predicted vs observed click rate in each of ``bins`` equal-count bins."""
    order = np.argsort(probs, kind="stable")
    return [
        CalibrationBin(len(part), float(probs[part].mean()), float(labels[part].mean()))
        for part in np.array_split(order, bins)
        if len(part)
    ]


def metrics(labels: FloatArray, probs: FloatArray) -> dict[str, float]:
    return {
        "auc": auc(labels, probs),
        "logloss": logloss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration_ratio": calibration_ratio(labels, probs),
        "ece": expected_calibration_error(labels, probs),
        "mean_predicted": float(np.mean(probs)),
        "observed_ctr": float(np.mean(labels)),
    }


def write_report(
    path: Path,
    labels: FloatArray,
    probs: FloatArray,
    history: Sequence[Mapping[str, Any]] = (),
    title: str = "",
    uncalibrated: FloatArray | None = None,
) -> None:
    """ROC curve, calibration plot (with ``uncalibrated``, the model's sigmoid(logit)
    before its calibration, beside the served probabilities) and (when there is one) the
    training curve, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if history else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.6), constrained_layout=True)
    fpr, tpr, _ = roc_curve(labels, probs)
    ax = axes[0]
    ax.plot(fpr, tpr, label=f"model (AUC {auc(labels, probs):.4f})")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(loc="lower right")

    ax = axes[1]
    curves = [("served", probs)]
    if uncalibrated is not None:
        curves.insert(0, ("before calibration", uncalibrated))
    top = 0.0
    for label, p in curves:
        bins = calibration(labels, p)
        predicted = [b.mean_predicted for b in bins]
        observed = [b.observed_ctr for b in bins]
        top = max(top, *predicted, *observed)
        ece = expected_calibration_error(labels, p)
        ax.plot(predicted, observed, "o-", label=f"{label} (ECE {ece:.4f})")
    top *= 1.05
    ax.plot([0, top], [0, top], ":", color="grey", label="perfect calibration")
    ax.set(xlabel="mean predicted CTR", ylabel="observed CTR", title="Calibration by decile")
    ax.legend(loc="upper left")

    if history:
        ax = axes[2]
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
        ax.plot(epochs, [h["valid_logloss"] for h in history], "o-", label="valid logloss")
        ax.set(xlabel="epoch", ylabel="logloss", title="Training curve")
        twin = ax.twinx()
        twin.plot(epochs, [h["valid_auc"] for h in history], "s--", color="C3", label="valid AUC")
        twin.set_ylabel("valid AUC")
        ax.legend(loc="upper left")
        twin.legend(loc="upper right")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    add_data_arguments(parser)
    parser.add_argument("--report", type=Path, default=None, help="write a PNG report here")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics as JSON here")
    args = parser.parse_args(argv)
    schema = schema_from_args(args, parser)
    checkpoint = load_checkpoint(args.checkpoint)
    predictor = Predictor(checkpoint)
    labels_parts, logit_parts = [], []
    for chunk in read_chunks(args.data, data_format(args), schema):
        labels_parts.append(chunk.labels.astype(np.float64))
        logit_parts.append(predictor.predict_logits_columns(chunk.columns, len(chunk)))
    labels, logits = np.concatenate(labels_parts), np.concatenate(logit_parts)
    probs = checkpoint.calibration.probabilities(logits)
    result: dict[str, Any] = {"model_version": checkpoint.version, "rows": len(labels)}
    result["calibrated_by"] = checkpoint.calibration.describe()
    result["model"] = metrics(labels, probs)
    uncalibrated = None
    if not checkpoint.calibration.identity:
        uncalibrated = sigmoid(logits)
        result["uncalibrated"] = metrics(labels, uncalibrated)
    result["calibration"] = [asdict(b) for b in calibration(labels, probs)]
    if len(args.data) == 1 and truth_path(args.data[0]).is_file():
        result["oracle"] = metrics(labels, read_truth(args.data[0]))
    print(f"model {checkpoint.version} on {len(labels)} rows")
    for who in ("model", "uncalibrated", "oracle"):
        if who in result:
            m = result[who]
            print(
                f"  {who:12}  AUC {m['auc']:.4f}  logloss {m['logloss']:.4f}  NE {m['ne']:.4f}  "
                f"calibration {m['calibration_ratio']:.3f}  ECE {m['ece']:.4f}  "
                f"mean predicted {m['mean_predicted']:.4f}  observed {m['observed_ctr']:.4f}"
            )
    print("  calibration (decile: rows, mean predicted, observed CTR)")
    for i, b in enumerate(result["calibration"], start=1):
        print(f"    {i:2}: {b['rows']:8}  {b['mean_predicted']:.4f}  {b['observed_ctr']:.4f}")
    if args.report:
        history = checkpoint.training.get("history", [])
        write_report(
            args.report, labels, probs, history, checkpoint.version, uncalibrated=uncalibrated
        )
        print(f"report written to {args.report}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

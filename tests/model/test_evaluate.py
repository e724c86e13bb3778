import json
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import Checkpoint
from model.evaluate import (
    calibration,
    calibration_ratio,
    expected_calibration_error,
    logloss,
    main,
    metrics,
    normalized_entropy,
)
from tests.conftest import GENERATED_ROWS


def test_calibration_bins_by_predicted_probability() -> None:
    probs = np.linspace(0.01, 0.5, 100)
    labels = (np.arange(100) % 4 == 0).astype(float)
    bins = calibration(labels, probs)
    assert len(bins) == 10 and sum(b.rows for b in bins) == 100
    assert [b.mean_predicted for b in bins] == sorted(b.mean_predicted for b in bins)
    assert bins[0].mean_predicted == pytest.approx(probs[:10].mean())
    assert bins[0].observed_ctr == pytest.approx(labels[:10].mean())


def test_metrics_of_a_perfect_and_a_useless_model() -> None:
    labels = np.array([0.0, 0.0, 1.0, 1.0])
    assert metrics(labels, np.array([0.1, 0.2, 0.8, 0.9]))["auc"] == 1.0
    assert metrics(labels, np.full(4, 0.5))["auc"] == 0.5
    assert logloss(labels, np.array([0.0, 0.0, 1.0, 1.0])) < 1e-6  # clipped, finite


def test_cli_prints_metrics_and_writes_a_report(
    tiny_checkpoint: Checkpoint,
    generated_tsv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    report, out = tmp_path / "report.png", tmp_path / "metrics.json"
    main(
        [
            "--checkpoint",
            str(tiny_checkpoint.path),
            "--data",
            str(generated_tsv),
            "--report",
            str(report),
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "oracle" in printed and "calibration" in printed
    result = json.loads(out.read_text())
    assert result["rows"] == GENERATED_ROWS and result["model_version"] == tiny_checkpoint.version
    # Over the whole file (training rows included), so no comparison with the oracle here.
    assert result["oracle"]["auc"] > 0.7 and result["model"]["auc"] > 0.7
    assert len(result["calibration"]) == 10
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and report.stat().st_size > 20_000


def test_normalized_entropy_and_calibration_measures() -> None:
    labels = (np.arange(100) % 10 == 0).astype(float)  # 10%, spread over every decile
    background = np.full(100, 0.1)
    # Predicting the background rate is NE 1, calibrated on average, no calibration error.
    assert normalized_entropy(labels, background) == pytest.approx(1.0)
    assert calibration_ratio(labels, background) == pytest.approx(1.0)
    assert expected_calibration_error(labels, background) == pytest.approx(0.0, abs=1e-12)
    # Twice too high: ratio 2, worse than the background rate.
    assert calibration_ratio(labels, 2 * background) == pytest.approx(2.0)
    assert normalized_entropy(labels, 2 * background) > 1.0
    assert expected_calibration_error(labels, 2 * background) == pytest.approx(0.1)
    informed = np.where(labels == 1, 0.6, 0.05)
    assert normalized_entropy(labels, informed) < 1.0


def test_a_calibrated_checkpoint_is_evaluated_before_and_after(
    sampled_checkpoint: Checkpoint,
    planted_tsv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    held_out = tmp_path / "held_out.tsv"
    lines = planted_tsv.read_text().splitlines(keepends=True)
    held_out.write_text("".join(lines[-20_000:]))
    report, out = tmp_path / "report.png", tmp_path / "metrics.json"
    main(
        [
            "--checkpoint",
            str(sampled_checkpoint.path),
            "--data",
            str(held_out),
            "--report",
            str(report),
            "--json",
            str(out),
        ]
    )
    assert "uncalibrated" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["calibrated_by"] == {"negative_rate": 0.1, "method": "none"}
    served, raw = result["model"], result["uncalibrated"]
    assert abs(served["calibration_ratio"] - 1) < 0.05 < raw["calibration_ratio"] - 3
    assert served["ne"] < 1.0 < raw["ne"] and served["ece"] < raw["ece"] / 10
    assert served["auc"] == pytest.approx(raw["auc"])  # the order is the model's
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

import json
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import Checkpoint
from model.evaluate import calibration, logloss, main, metrics
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

"""Negative down-sampling, its correction and calibration maps, on a planted truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.calibrate import calibrate
from model.calibration import Calibration, sigmoid
from model.checkpoint import (
    Checkpoint,
    CheckpointError,
    compute_version,
    load_checkpoint,
    save_checkpoint,
)
from model.data import CRITEO_SCHEMA, EncodedData, read_chunks, take_rows
from model.evaluate import expected_calibration_error
from model.predict import Predictor
from model.synthetic import read_truth
from tests.conftest import PLANTED_HELD_OUT, PLANTED_ROWS

FIRST_HELD_OUT = PLANTED_ROWS - round(PLANTED_ROWS * PLANTED_HELD_OUT)


def rows_between(
    path: Path, start: int, stop: int
) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
    """Columns, count and labels of the rows ``start..stop`` of a file."""
    chunks = list(take_rows(read_chunks([path], "criteo", CRITEO_SCHEMA), start, stop))
    columns = {k: np.concatenate([c.columns[k] for c in chunks]) for k in chunks[0].columns}
    labels = np.concatenate([c.labels for c in chunks]).astype(np.float64)
    return columns, len(labels), labels


def test_a_model_trained_on_10pct_of_negatives_predicts_the_true_rate_once_corrected(
    sampled_checkpoint: Checkpoint, planted_tsv: Path
) -> None:
    assert sampled_checkpoint.calibration == Calibration(negative_rate=0.1)
    assert sampled_checkpoint.training["config"]["negative_rate"] == 0.1
    columns, count, _ = rows_between(planted_tsv, FIRST_HELD_OUT, PLANTED_ROWS)
    true_ctr = read_truth(planted_tsv)[FIRST_HELD_OUT:].mean()
    predictor = Predictor(sampled_checkpoint)
    corrected = predictor.predict_columns(columns, count)
    assert abs(corrected.mean() / true_ctr - 1) < 0.02
    # Uncorrected, the same model's odds are 1 / w too high: its mean is 1 / (w + (1 - w)
    # ctr) = 5.3 times a small rate's, 4.6 times this one's (measured 1.005 and 4.57).
    uncorrected = sigmoid(predictor.predict_logits_columns(columns, count))
    assert uncorrected.mean() / true_ctr > 4


def test_isotonic_calibration_lowers_the_error_of_a_miscalibrated_model(
    sampled_checkpoint: Checkpoint, planted_tsv: Path, tmp_path: Path
) -> None:
    """The sampled model without its correction is miscalibrated (5x too high); isotonic
    calibration fitted on the validation rows brings it back, judged on held-out rows."""
    raw_dir = tmp_path / "miscalibrated"
    save_checkpoint(
        raw_dir,
        sampled_checkpoint.build_model(),
        sampled_checkpoint.read_features(),
        created_at="t",
        training=sampled_checkpoint.training,
    )
    raw = load_checkpoint(raw_dir)
    assert raw.calibration.identity
    valid = tmp_path / "valid.tsv"
    lines = planted_tsv.read_text().splitlines(keepends=True)
    splits = sampled_checkpoint.training["splits"]
    valid.write_text("".join(lines[splits["train"] : splits["train"] + splits["valid"]]))
    version, errors = calibrate(
        raw_dir, [valid], "criteo", CRITEO_SCHEMA, "isotonic", tmp_path / "fixed", created_at="t"
    )
    assert errors["ece_after"] < errors["ece_before"]
    fixed = load_checkpoint(tmp_path / "fixed")
    assert fixed.version == version != raw.version
    assert fixed.calibration.method == "isotonic"
    columns, count, labels = rows_between(planted_tsv, FIRST_HELD_OUT, PLANTED_ROWS)
    before = Predictor(raw).predict_columns(columns, count)
    after = Predictor(fixed).predict_columns(columns, count)
    assert (
        expected_calibration_error(labels, after) < expected_calibration_error(labels, before) / 5
    )
    # Centred: rows the model orders stay ordered (no ties a ranking would break badly).
    x = np.array(fixed.calibration.x)
    inside = np.linspace(x[0], x[-1], 2000)[1:-1]
    logits = np.log(inside) - np.log1p(-inside)
    assert (np.diff(fixed.calibration.probabilities(logits)) > 0).all()


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_a_calibration_survives_save_and_load_and_changes_the_version(
    tiny_checkpoint: Checkpoint, tmp_path: Path, generated_tsv: Path, method: str
) -> None:
    out = tmp_path / method
    version, _ = calibrate(
        tiny_checkpoint.path,
        [generated_tsv],
        "criteo",
        CRITEO_SCHEMA,
        method,
        out,  # type: ignore[arg-type]
        created_at="t",
    )
    loaded = load_checkpoint(out)
    assert loaded.version == version != tiny_checkpoint.version
    assert loaded.calibration.method == method
    # Format 2: a loader that predates calibrations refuses it rather than ignore it.
    assert loaded.spec["format_version"] == 2 and tiny_checkpoint.spec["format_version"] == 1
    assert Calibration.from_json(loaded.calibration.to_json()) == loaded.calibration
    columns, count, _ = rows_between(generated_tsv, 0, 500)
    logits = Predictor(tiny_checkpoint).predict_logits_columns(columns, count)
    calibrated = Predictor(loaded).predict_columns(columns, count)
    np.testing.assert_array_equal(calibrated, loaded.calibration.probabilities(logits))
    assert not np.allclose(calibrated, sigmoid(logits))
    # The map is part of the spec: one that is not a calibration is refused at load.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    spec = json.loads((broken / "spec.json").read_text())
    spec["calibration"]["method"] = "magic"
    (broken / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="does not match its version"):
        load_checkpoint(broken)  # the version covers the calibration
    del spec["version"]
    spec["version"] = compute_version(broken / "weights.safetensors", spec)
    (broken / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="malformed"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    "bad",
    [
        {"negative_rate": 0.0},
        {"negative_rate": 1.5},
        {"method": "magic"},
        {"method": "isotonic", "x": [0.2, 0.1], "y": [0.1, 0.2]},
        {"method": "isotonic", "x": [0.1, 0.2], "y": [0.2, 0.1]},
        {"method": "isotonic", "x": [0.1], "y": [1.5]},
        {"method": "isotonic", "x": [], "y": []},
        {"method": "platt", "a": float("nan")},
    ],
)
def test_impossible_calibrations_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Calibration.from_json(bad)


def test_the_correction_is_the_papers_formula() -> None:
    p = np.array([0.01, 0.3, 0.5, 0.9])
    w = 0.1
    logits = np.log(p / (1 - p))
    expected = p / (p + (1 - p) / w)
    np.testing.assert_allclose(Calibration(w).probabilities(logits), expected, rtol=1e-12)
    np.testing.assert_array_equal(Calibration().probabilities(logits), sigmoid(logits))


def test_down_sampling_keeps_every_positive_and_is_seeded(tmp_path: Path) -> None:
    labels = (np.arange(10_000) % 10 == 0).astype(np.float32)
    (tmp_path / "ids.i32").write_bytes(np.zeros(len(labels), np.int32).tobytes())
    (tmp_path / "dense.f32").write_bytes(b"")
    (tmp_path / "labels.f32").write_bytes(labels.tobytes())
    data = EncodedData(tmp_path, len(labels), 1, 0)

    def kept(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        batches = data.batches(0, len(labels), 512, rng=rng, negative_rate=0.25)
        return np.concatenate([y for _, _, y in batches])

    first = kept(1)
    assert first.sum() == labels.sum()  # every positive
    assert abs((first == 0).sum() / (labels == 0).sum() - 0.25) < 0.02
    np.testing.assert_array_equal(first, kept(1))  # seeded
    assert not np.array_equal(first, kept(2))
    with pytest.raises(ValueError, match="needs an rng"):
        next(data.batches(0, len(labels), 512, negative_rate=0.25))

"""Incremental training: a model trained on from a checkpoint keeps what it knew."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import Checkpoint, load_checkpoint
from model.data import CRITEO_SCHEMA, criteo_json_rows, read_chunks
from model.features import SpecFitter
from model.predict import Predictor, predict_logits
from model.synthetic import generate
from model.train import main
from model.warmstart import extend_model, extend_spec
from tests.conftest import TINY_DATA


@pytest.fixture(scope="module")
def day2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New traffic: the same fields, values the day-1 model never saw."""
    path = tmp_path_factory.mktemp("day2") / "data.tsv"
    generate(path, 10_000, replace(TINY_DATA, seed=8))
    return path


def test_known_values_keep_their_index_and_row_and_new_ones_follow(
    tiny_checkpoint: Checkpoint, generated_tsv: Path, day2: Path
) -> None:
    parent_spec = tiny_checkpoint.read_features()
    fitter = SpecFitter({f.name: f.transform for f in parent_spec.fields}, min_count=3)
    for chunk in read_chunks([day2], "criteo", CRITEO_SCHEMA):
        fitter.update(chunk.columns)
    spec = extend_spec(parent_spec, fitter.finish())
    grown = 0
    for old, new in zip(parent_spec.fields, spec.fields, strict=True):
        assert (old.name, old.transform, old.stats) == (new.name, new.transform, new.stats)
        if old.embedded:
            assert old.vocab is not None and new.vocab is not None
            assert new.vocab.values[: len(old.vocab)] == old.vocab.values
            assert len(set(new.vocab.values)) == len(new.vocab)
            grown += len(new.vocab) - len(old.vocab)
    assert grown > 100
    model = extend_model(tiny_checkpoint.build_model(), parent_spec, spec)
    # Before any step, the day-1 rows score exactly as the checkpoint scores them.
    rows = criteo_json_rows(generated_tsv)[:500]
    ids, dense = spec.encode_rows(rows)
    parent = Predictor(tiny_checkpoint)
    expected = predict_logits(parent.model, *parent.features.encode_rows(rows))
    np.testing.assert_array_equal(predict_logits(model, ids, dense), expected)
    # Day 2's new values have rows of their own, no longer the OOV row.
    new_rows = criteo_json_rows(day2)[:200]
    new_ids, _ = spec.encode_rows(new_rows)
    old_ids, _ = parent.features.encode_rows(new_rows)
    assert (new_ids > 0).sum() > (old_ids > 0).sum()


def test_train_init_from_records_its_parent(
    tiny_checkpoint: Checkpoint, day2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "day2-model"
    argv = ["--data", str(day2), "--init-from", str(tiny_checkpoint.path), "--out", str(out)]
    main([*argv, "--epochs", "1", "--min-count", "3", "--quiet", "--created-at", "t"])
    child = load_checkpoint(out)
    assert child.training["parent"]["version"] == tiny_checkpoint.version
    assert child.training["parent"]["new_values"] > 100
    assert child.config.embed_dim == tiny_checkpoint.config.embed_dim
    assert child.config.hidden_units == tiny_checkpoint.config.hidden_units
    for name in ("C1", "C2"):
        old = tiny_checkpoint.vocabulary(name).values
        assert child.vocabulary(name).values[: len(old)] == old
    capsys.readouterr()
    # What would change the architecture or the transforms is refused, not ignored.
    with pytest.raises(SystemExit):
        main([*argv, "--embed-dim", "32"])
    assert "--init-from keeps the checkpoint's architecture" in capsys.readouterr().err

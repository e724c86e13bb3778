from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.data import CRITEO_SCHEMA, count_rows, read_chunks
from model.evaluate import auc
from model.synthetic import GroundTruth, SyntheticConfig, generate, read_truth
from tests.conftest import GENERATED_ROWS


def test_generated_file_is_criteo_tsv_with_truth_beside_it(generated_tsv: Path) -> None:
    assert count_rows([generated_tsv], "criteo") == GENERATED_ROWS
    truth = read_truth(generated_tsv)
    assert truth.shape == (GENERATED_ROWS,)
    labels = np.concatenate(
        [c.labels for c in read_chunks([generated_tsv], "criteo", CRITEO_SCHEMA)]
    )
    assert 0.03 <= labels.mean() <= 0.25
    assert abs(truth.mean() - labels.mean()) < 0.01  # labels are draws from the truth
    assert auc(labels, truth) > 0.68  # the planted signal is real and strong
    first = generated_tsv.read_text().split("\n", 1)[0].split("\t")
    assert len(first) == 40 and first[0] in ("0", "1")


def test_values_look_like_criteo(generated_tsv: Path) -> None:
    chunk = next(read_chunks([generated_tsv], "criteo", CRITEO_SCHEMA))
    c = [v for v in chunk.columns["C1"].tolist() if v is not None]
    assert all(len(v) == 8 and int(v, 16) >= 0 for v in c[:100])
    # Zipf: the most common value is far more frequent than the median one.
    _, counts = np.unique(np.array(c), return_counts=True)
    assert counts.max() > 20 * np.median(counts)
    missing = [np.isnan(chunk.columns[n]).mean() for n in CRITEO_SCHEMA.dense]
    assert max(missing) > 0.1  # some counts are often missing


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    config = SyntheticConfig(seed=11, max_cardinality=50)
    generate(tmp_path / "a.tsv", 1000, config)
    generate(tmp_path / "b.tsv", 1000, config)
    generate(tmp_path / "c.tsv", 1000, SyntheticConfig(seed=12, max_cardinality=50))
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()
    assert (tmp_path / "a.tsv").read_bytes() != (tmp_path / "c.tsv").read_bytes()


def test_unrealistic_rates_are_refused() -> None:
    with pytest.raises(ValueError, match="base_ctr"):
        SyntheticConfig(base_ctr=0.5)


def test_field_aware_and_three_way_options_add_their_terms(tmp_path: Path) -> None:
    plain = SyntheticConfig(seed=11, max_cardinality=50)
    harder = SyntheticConfig(seed=11, max_cardinality=50, field_aware=True, three_way_std=0.3)
    generate(tmp_path / "plain.tsv", 3000, plain)
    generate(tmp_path / "harder.tsv", 3000, harder)
    # The options draw from streams of their own: the rows' features are the same, only
    # the truth (and so the labels) changes.
    strip = [line.split("\t", 1)[1] for line in (tmp_path / "plain.tsv").read_text().splitlines()]
    strip_h = [
        line.split("\t", 1)[1] for line in (tmp_path / "harder.tsv").read_text().splitlines()
    ]
    assert strip == strip_h
    assert not np.allclose(read_truth(tmp_path / "plain.tsv"), read_truth(tmp_path / "harder.tsv"))
    truth = GroundTruth(harder)
    dense, idx = truth.replay(3000)
    terms = truth.terms(dense, idx)
    assert terms.shape == (3000, 4)
    np.testing.assert_allclose(terms.std(axis=0)[3], 0.3, rtol=0.2)  # scaled to its std
    with pytest.raises(ValueError, match="three_way_std"):
        SyntheticConfig(three_way_std=-1.0)


def test_a_later_day_keeps_most_values_and_moves_the_truth(tmp_path: Path) -> None:
    base = SyntheticConfig(seed=5, max_cardinality=200)
    day0, day1 = GroundTruth(base), GroundTruth(replace(base, day=1))
    assert (
        GroundTruth(replace(base, day=0)).sparse[0].values.tolist()
        == day0.sparse[0].values.tolist()
    )
    kept, new = 0, 0
    for s0, s1 in zip(day0.sparse, day1.sparse, strict=True):
        same = s0.values == s1.values
        kept, new = kept + int(same.sum()), new + int((~same).sum())
        assert len(set(s1.values.tolist())) == len(s1.values)  # new values are new
        # A kept value's effect moved, but stays correlated with what it was.
        if same.sum() > 20:
            assert 0.5 < np.corrcoef(s0.effect[:-1][same], s1.effect[:-1][same])[0, 1] < 0.999
    assert 0.7 < kept / (kept + new) < 0.9  # about 20% new values
    generate(tmp_path / "d0.tsv", 2000, base)
    generate(tmp_path / "d1.tsv", 2000, replace(base, day=1))
    assert (tmp_path / "d0.tsv").read_bytes() != (tmp_path / "d1.tsv").read_bytes()
    labels = np.concatenate(
        [c.labels for c in read_chunks([tmp_path / "d1.tsv"], "criteo", CRITEO_SCHEMA)]
    )
    assert abs(labels.mean() - base.base_ctr) < 0.03

import math

import numpy as np
import pytest

from model.features import FeatureSpec, Field, Keyed, SpecFitter, Vocabulary, bucketize
from model.vocabindex import NOT_A_KEY


def obj(*values: object) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def test_vocabulary_counts_orders_and_cuts() -> None:
    fitter = SpecFitter({"c": "category"}, min_count=2)
    fitter.update({"c": obj("b", "a", "b", "c", "a", "b", None, "d")})
    fitter.update({"c": obj("c", None)})
    vocab = fitter.finish().by_name["c"].vocab
    # Most frequent first, ties by value; "d" (seen once) and missing are not values.
    assert vocab == Vocabulary(("b", "a", "c"))


def test_max_vocab_keeps_the_most_frequent() -> None:
    fitter = SpecFitter({"c": "category"}, max_vocab=2)
    fitter.update({"c": obj("x", "y", "y", "z", "z", "z")})
    assert fitter.finish().by_name["c"].vocab == Vocabulary(("z", "y"))


def test_unseen_and_missing_values_are_oov() -> None:
    vocab = Vocabulary(("a", "b"))
    assert vocab.lookup(obj("a", "b", "never-seen", None, "")).tolist() == [1, 2, 0, 0, 0]


def test_vocabulary_text_round_trip_keeps_odd_values() -> None:
    vocab = Vocabulary(("a b", "\u2028sep", "tab\there", "ünï", " "))
    assert Vocabulary.from_text(vocab.to_text()) == vocab
    assert Vocabulary.from_text("") == Vocabulary(())


@pytest.mark.parametrize(
    ("raw", "bucket"),
    [
        (-1.0, "-1"),
        (0.0, "0"),
        (1.0, "1"),
        (2.0, "2"),
        (3.0, "1"),
        (10.0, "5"),
        (100.0, "21"),
        (17668.0, "95"),
        (math.nan, None),
    ],
)
def test_criteo_winners_bucketing(raw: float, bucket: str | None) -> None:
    assert bucketize(np.array([raw])).tolist() == [bucket]


def test_log_transform_is_sign_preserving_and_fills_missing() -> None:
    spec = FeatureSpec(
        (Field("i", "log", {"missing": 0.0}), Field("c", "category", vocab=Vocabulary(())))
    )
    out = spec.transform_dense(np.array([[0.0], [1.0], [-1.0], [99.0], [math.nan]]))[:, 0]
    expected = [0.0, math.log(2), -math.log(2), math.log(100), 0.0]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


def test_standard_transform_learns_mean_and_std_on_present_values() -> None:
    fitter = SpecFitter({"i": "standard", "c": "category"})
    fitter.update({"i": np.array([1.0, 3.0, math.nan]), "c": obj("a")})
    fitter.update({"i": np.array([5.0, 7.0]), "c": obj("a")})
    spec = fitter.finish()
    f = spec.by_name["i"]
    assert f.stats["mean"] == pytest.approx(4.0)
    assert f.stats["std"] == pytest.approx(math.sqrt(5.0))
    np.testing.assert_allclose(
        spec.transform_dense(np.array([[4.0], [math.nan], [9.0]]))[:, 0],
        [0.0, 0.0, 5 / math.sqrt(5.0)],
        rtol=1e-6,
    )


def spec() -> FeatureSpec:
    fitter = SpecFitter({"i1": "log", "i2": "bucket", "c1": "category", "c2": "category"})
    fitter.update(
        {
            "i1": np.array([1.0, 2.0]),
            "i2": np.array([3.0, 100.0]),
            "c1": obj("x", "y"),
            "c2": obj("80", "z"),
        }
    )
    return fitter.finish()


def test_encode_shapes_and_dtypes() -> None:
    s = spec()
    ids, dense = s.encode(
        {"i1": np.array([1.0]), "i2": np.array([100.0]), "c1": obj("y"), "c2": obj("nope")}, 1
    )
    assert [f.name for f in s.embedded_fields] == ["i2", "c1", "c2"]
    assert ids.dtype == np.int64 and ids.shape == (1, 3)
    assert dense.dtype == np.float32 and dense.shape == (1, 1)
    assert ids[0, 2] == 0  # unseen
    assert s.by_name["i2"].kind == "dense" and s.by_name["c1"].kind == "sparse"


def test_serving_rows_encode_like_training_columns() -> None:
    s = spec()
    rows = [
        {"i1": 2, "i2": 3, "c1": "x", "c2": 80},  # an integer equals its decimal string
        {"i1": None, "c1": None},  # missing and absent fields
        {},
    ]
    columns = {
        "i1": np.array([2.0, math.nan, math.nan]),
        "i2": np.array([3.0, math.nan, math.nan]),
        "c1": obj("x", None, None),
        "c2": obj("80", None, None),
    }
    ids_rows, dense_rows = s.encode_rows(rows)
    ids_cols, dense_cols = s.encode(columns, 3)
    np.testing.assert_array_equal(ids_rows, ids_cols)
    np.testing.assert_array_equal(dense_rows, dense_cols)
    assert ids_rows[0].tolist() == [s.by_name["i2"].vocab.lookup(obj("1"))[0], 1, 1]
    assert ids_rows[1].tolist() == [0, 0, 0]


def test_keys_then_vocabularies_equal_encode_rows() -> None:
    """The by-value path (a Redis-backed server) and the id path see the same rows."""
    s = spec()
    rows = [{"i1": 2, "i2": 3, "c1": "x", "c2": 80}, {"i1": None, "c1": None}, {}, {"c2": "z"}]
    keyed = s.row_keys(rows)
    gone = NOT_A_KEY
    assert keyed.columns == [
        ["1", gone, gone, gone],
        ["x", gone, gone, gone],
        ["80", gone, gone, "z"],
    ]
    assert keyed.missing == 8
    ids = np.array([s.vocab_index.lookup(j, column) for j, column in enumerate(keyed.columns)]).T
    ids_rows, dense_rows = s.encode_rows(rows)
    np.testing.assert_array_equal(ids, ids_rows)
    np.testing.assert_array_equal(keyed.dense, dense_rows)
    assert s.row_keys([]).columns == [[], [], []]
    columns = {"i1": np.array([2.0]), "i2": np.array([3.0]), "c2": obj("80")}
    assert s.keys(columns, 1).columns == s.row_keys([{"i1": 2, "i2": 3, "c2": 80}]).columns


@pytest.mark.parametrize(
    "names", [set(), {"i1"}, {"i2"}, {"c2", "i1"}, {"i2", "c1"}, {"i1", "i2", "c1", "c2"}]
)
def test_a_plan_reads_its_fields_alone(names: set[str]) -> None:
    """The keys of some fields (a ranking request's context or candidates) are the whole
    rows' keys of those fields, named by their positions, in order."""
    s = spec()
    rows = [{"i1": 2, "i2": 3, "c1": "x", "c2": 80}, {"i1": None, "c1": ""}, {}, {"c2": "z"}]
    whole, part = s.row_keys(rows), s.row_keys(rows, s.plan(names))
    embedded = [j for j, f in enumerate(s.embedded_fields) if f.name in names]
    dense = [j for j, f in enumerate(s.dense_fields) if f.name in names]
    assert part.fields == tuple(embedded) and part.dense_positions == tuple(dense)
    assert part.columns == [whole.columns[j] for j in embedded]
    np.testing.assert_array_equal(part.dense, whole.dense[:, dense])
    np.testing.assert_array_equal(s.ids(part), s.ids(whole)[:, embedded])


def test_keyed_batches_slice_and_join() -> None:
    s = spec()
    rows = [{"i1": float(i), "c1": "x" if i % 2 else "y", "c2": i} for i in range(5)]
    keyed = s.row_keys(rows)
    joined = Keyed.concat([keyed[:2], keyed[2:3], keyed[3:]])
    assert joined.columns == keyed.columns
    np.testing.assert_array_equal(joined.dense, keyed.dense)
    some = s.plan({"c1"})
    with pytest.raises(ValueError, match="different fields"):
        Keyed.concat([keyed, s.row_keys(rows, some)])


def test_lists_of_raw_values_key_as_columns_do() -> None:
    """A server's columns (lists of raw values; "" and None missing) -> the same keys."""
    s = spec()
    rows = [{"i1": 2.0, "i2": 3.0, "c1": "x", "c2": "80"}, {"c1": ""}, {"i2": 100.0, "c2": "q"}]
    columns = {
        "i1": np.array([2.0, np.nan, np.nan]),
        "i2": [3.0, None, 100.0],
        "c1": ["x", "", None],
        "c2": ["80", None, "q"],
    }
    from_columns, from_rows = s.keys(columns, 3), s.row_keys(rows)
    assert from_columns.columns == from_rows.columns
    np.testing.assert_array_equal(from_columns.dense, from_rows.dense)


def test_a_spec_without_vocabularies_keeps_sizes_and_refuses_id_lookups() -> None:
    s = spec()
    light = FeatureSpec.from_json(s.to_json(), vocabs={})
    assert light.vocab_sizes == s.vocab_sizes
    assert light.row_keys([{"c1": "x"}]).columns == s.row_keys([{"c1": "x"}]).columns
    with pytest.raises(RuntimeError, match="not loaded"):
        light.encode_rows([{"c1": "x"}])
    with pytest.raises(ValueError, match="not loaded"):
        light.to_json()


def test_spec_json_round_trip() -> None:
    s = spec()
    vocabs = {f.name: f.vocab for f in s.embedded_fields if f.vocab is not None}
    assert FeatureSpec.from_json(s.to_json(), vocabs) == s


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown transform"):
        Field("x", "square")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a vocab"):
        Field("x", "category")
    with pytest.raises(ValueError, match="at least one sparse"):
        FeatureSpec((Field("x", "log"),))
    with pytest.raises(ValueError, match="min_count"):
        SpecFitter({"c": "category"}, min_count=0)

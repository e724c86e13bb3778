"""The vocabulary index against the dict lookups it replaced (kept here, as a reference)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import xxhash

import model.vocabindex
from model.checkpoint import Checkpoint
from model.data import CRITEO_SCHEMA, criteo_json_rows, read_chunks
from model.features import KEY_CHARS, FeatureSpec, bucketize, lookup_keys, value_key
from model.vocabindex import NOT_A_KEY, IndexFileError, VocabIndex

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture(autouse=True, params=["binary search", "buckets"])
def search(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test twice: small indexes are searched at once (``np.searchsorted``),
    large ones bucket by bucket; the buckets' way for every size too."""
    if request.param == "buckets":
        monkeypatch.setattr(model.vocabindex, "CACHED_ENTRIES", 0)


# -- the dict path of before: the reference


def dict_index(values: Sequence[str]) -> dict[str | None, int]:
    return {value_key(value): i for i, value in enumerate(values, start=1)}


def dict_lookup(index: Mapping[str | None, int], values: Sequence[Any]) -> npt.NDArray[np.int64]:
    """``Vocabulary.lookup`` as it was: a value, else (when long) its digest key."""
    ids = np.array([index.get(v, 0) for v in values], dtype=np.int64)
    for i in np.flatnonzero(ids == 0).tolist():
        value = values[i]
        if value is not None and len(value) > KEY_CHARS:
            ids[i] = index.get(value_key(value), 0)
    return ids


def dict_encode_rows(
    spec: FeatureSpec, indexes: Sequence[Mapping[str | None, int]], rows: Sequence[Any]
) -> npt.NDArray[np.int64]:
    """``encode_rows``' ids as they were: an integer is its decimal string, None missing."""
    ids = np.zeros((len(rows), len(spec.embedded_fields)), dtype=np.int64)
    for j, f in enumerate(spec.embedded_fields):
        raw = [row.get(f.name) for row in rows]
        if f.transform == "bucket":
            values = bucketize(np.array([math.nan if v is None else v for v in raw], dtype=float))
        else:
            values = [v if v is None or isinstance(v, str) else str(v) for v in raw]
        ids[:, j] = dict_lookup(indexes[j], values)
    return ids


def dict_encode(
    spec: FeatureSpec, indexes: Sequence[Mapping[str | None, int]], columns: Mapping[str, Any]
) -> npt.NDArray[np.int64]:
    num_rows = len(next(iter(columns.values())))
    ids = np.zeros((num_rows, len(spec.embedded_fields)), dtype=np.int64)
    for j, f in enumerate(spec.embedded_fields):
        if f.name in columns:
            ids[:, j] = dict_lookup(indexes[j], f.categories(columns[f.name]))
    return ids


# -- helpers


def indexes_of(checkpoint: Checkpoint) -> list[dict[str | None, int]]:
    return [
        dict_index(checkpoint.vocabulary(f.name).values)
        for f in checkpoint.features.embedded_fields
    ]


ODD = [
    None,
    "",
    "never-seen",
    NOT_A_KEY,  # what a missing value is looked up as: found nowhere
    "a\nb",
    "\n#",
    "x" * KEY_CHARS,
    "x" * (KEY_CHARS + 1),
    "long " * 100,
    "lone \ud800 surrogate",
    "\udfff",
    "ünïcødé",
    " ",
]


def test_every_value_and_odd_ones_give_the_dict_indices(tiny_checkpoint: Checkpoint) -> None:
    index = tiny_checkpoint.features.vocab_index
    for j, f in enumerate(tiny_checkpoint.features.embedded_fields):
        values = list(tiny_checkpoint.vocabulary(f.name).values)
        reference = dict_index(values)
        keys = [value_key(v) for v in values]
        assert index.lookup(j, keys).tolist() == list(range(1, len(values) + 1))
        odd = [*ODD, *(v + "!" for v in values[:20])]
        assert index.lookup(j, lookup_keys(odd)).tolist() == dict_lookup(reference, odd).tolist()
        assert lookup_keys([None]) == [NOT_A_KEY]  # a missing value: found nowhere
        assert not index.lookup(j, [NOT_A_KEY]).any()


def test_long_values_surrogates_and_digest_lookalikes() -> None:
    long = "é" * 5000
    values = ("a", long, "x" * KEY_CHARS, "x" * (KEY_CHARS + 1), "lone \ud800", " ")
    spec = FeatureSpec.from_json(
        [{"name": "c", "transform": "category", "vocab_size": len(values) + 1}],
        {},
        VocabIndex.build([[value_key(v) for v in values]]),
    )
    # (an empty value is missing, as None is: no vocabulary holds it)
    queries: list[Any] = [*values, long + "!", value_key(long), None, "", 7, "7", "\n"]
    reference = dict_index(values)
    rows = [{"c": q} for q in queries]
    expected = dict_encode_rows(spec, [reference], rows)
    assert spec.encode_rows(rows)[0].tolist() == expected.tolist()
    # The digest key of a long value finds it, as in the dict (a vocabulary value has
    # no "\n", so no value is a digest key).
    assert expected[:, 0].tolist() == [1, 2, 3, 4, 5, 6, 0, 2, 0, 0, 0, 0, 0]


def test_a_vocabulary_with_a_newline_key_is_refused() -> None:
    with pytest.raises(ValueError, match="no lookup key"):
        VocabIndex.build([["a", NOT_A_KEY]])


def fake_digest(width: int) -> Any:
    """xxh3 with all but ``width`` bytes of the hi word zeroed: hi words collide often."""

    def digest(data: bytes, seed: int = 0) -> bytes:
        real = xxhash.xxh3_128_digest(data, seed)
        return real[:width] + bytes(8 - width) + real[8:]

    return digest


@pytest.mark.parametrize("width", [0, 1])
def test_equal_hi_words_are_searched_through_exactly(
    monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """width 0: every entry shares one hi word; 1: runs of about 8 in 2,000."""
    monkeypatch.setattr(model.vocabindex, "xxh3_128_digest", fake_digest(width))
    fields = [[f"v{i}" for i in range(2000)], [f"v{i}" for i in range(0, 2000, 3)], ["v1"]]
    index = VocabIndex.build(fields)
    assert index.shared_hi
    for j, values in enumerate(fields):
        queries = [*values, "v2000", "v-1", NOT_A_KEY, *values[::-7]]
        reference = dict_index(values)
        assert index.lookup(j, queries).tolist() == dict_lookup(reference, queries).tolist()


def test_short_keys_of_many_fields_share_no_hi_word() -> None:
    """Why the seeds are spread over 64 bits: with seeds 0, 1, 2... these share hundreds
    of hi words (xxh3 adds the seed into a short key's word), which lookups would search."""
    fields = [[str(i) for i in range(1000)] for _ in range(40)]
    index = VocabIndex.build(fields)
    assert not index.shared_hi and len(np.unique(index.hi)) == 40_000
    naive = [xxhash.xxh3_128_digest(v.encode(), j)[:8] for j, f in enumerate(fields) for v in f]
    assert len(set(naive)) < 39_500


def test_any_two_field_seeds_differ_in_their_high_half() -> None:
    seeds = np.sort(np.array(model.vocabindex.SEEDS, dtype=np.uint64))
    gaps = [*np.diff(seeds).tolist(), int(seeds[0]) + (1 << 64) - int(seeds[-1])]
    assert min(gaps) >= 1 << 33


def test_a_repeated_value_gives_its_last_index_as_the_dict_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = ["a", "b", "a", "c", "b"]
    index = VocabIndex.build([values])
    assert index.lookup(0, ["a", "b", "c"]).tolist() == [3, 5, 4]
    assert [dict_index(values)[v] for v in "abc"] == [3, 5, 4]
    monkeypatch.setattr(model.vocabindex, "xxh3_128_digest", fake_digest(0))
    assert VocabIndex.build([values]).lookup(0, ["a", "b", "c"]).tolist() == [3, 5, 4]


def test_a_digest_shared_by_two_fields_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a 128-bit collision between fields would be: the index cannot tell them apart."""
    monkeypatch.setattr(model.vocabindex, "xxh3_128_digest", lambda data, seed=0: bytes(16))
    with pytest.raises(ValueError, match="share a 128-bit digest"):
        VocabIndex.build([["a"], ["b"]])


def test_a_field_seeds_its_digests() -> None:
    index = VocabIndex.build([["a", "b"], ["b", "a"]])
    assert index.find(["a", "a", "b", "b"], [0, 1, 0, 1]).tolist() == [1, 2, 2, 1]
    assert index.lookup(2, ["a"]).tolist() == [0]  # no such field: nothing found
    digests = model.vocabindex.digests(["a", "a"], [0, 1])
    assert digests.tolist()[0] != digests.tolist()[1]


def test_empty_indexes_and_queries() -> None:
    assert VocabIndex.build([[]]).lookup(0, ["a", NOT_A_KEY]).tolist() == [0, 0]
    assert VocabIndex.build([["a"]]).lookup(0, []).tolist() == []


def test_a_saved_index_opens_as_a_read_only_map_and_finds_the_same(tmp_path: Path) -> None:
    fields = [[f"v{i}" for i in range(3000)], ["x", "y"]]
    index = VocabIndex.build(fields, label="deepfm-abc")
    path = tmp_path / "sub" / "deepfm-abc.vocabindex"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    opened = VocabIndex.open(path)
    assert (opened.label, opened.sizes, len(opened)) == ("deepfm-abc", (3000, 2), 3002)
    assert not opened.hi.flags.writeable and not opened.ids.flags.writeable
    queries = ["v7", "x", "y", "zz", NOT_A_KEY]
    for j in range(2):
        assert opened.lookup(j, queries).tolist() == index.lookup(j, queries).tolist()
    assert path.stat().st_size == len(path.read_bytes()) and path.stat().st_mode & 0o044


def test_broken_index_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.vocabindex"
    VocabIndex.build([["a", "b"]]).save(path)
    data = path.read_bytes()
    for broken in (data[:-1], b"", b"garbage" * 10, data[:8] + b"\xff" * 8 + data[16:]):
        path.write_bytes(broken)
        with pytest.raises(IndexFileError):
            VocabIndex.open(path)
    with pytest.raises(IndexFileError):
        VocabIndex.open(tmp_path / "missing")


def test_encode_rows_and_encode_equal_the_dict_path_on_the_sample_data(
    tiny_checkpoint: Checkpoint, generated_tsv: Path
) -> None:
    spec = tiny_checkpoint.features
    indexes = indexes_of(tiny_checkpoint)
    rows = criteo_json_rows(DATA / "criteo_sample.tsv") + criteo_json_rows(generated_tsv)[:3000]
    rows += [{"C1": 5, "C2": None, "I1": None}, {}, {"C3": "x" * 200, "I2": 10**6}]
    ids, _ = spec.encode_rows(rows)
    np.testing.assert_array_equal(ids, dict_encode_rows(spec, indexes, rows))
    assert np.count_nonzero(ids) > ids.size // 3  # the test sees real hits, not only OOV
    for chunk in read_chunks([DATA / "criteo_sample.tsv", generated_tsv], "criteo", CRITEO_SCHEMA):
        ids, _ = spec.encode(chunk.columns, len(chunk))
        np.testing.assert_array_equal(ids, dict_encode(spec, indexes, chunk.columns))


def test_one_value_per_field(tiny_checkpoint: Checkpoint) -> None:
    spec = tiny_checkpoint.features
    for j, f in enumerate(spec.embedded_fields):
        values = tiny_checkpoint.vocabulary(f.name).values
        if f.transform == "category":
            assert spec.vocab_index.find([values[-1]], repeat(j)).tolist() == [len(values)]


def test_a_large_index_finds_every_key_through_its_bucket(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(200_000)]
    index = VocabIndex.build([keys[:150_000], keys[150_000:]])
    assert index.bits == 16 and len(index.starts) == (1 << 16) + 1
    index.save(tmp_path / "big.vocabindex")
    for found in (index, VocabIndex.open(tmp_path / "big.vocabindex")):
        assert found.lookup(0, keys[:150_000]).tolist() == list(range(1, 150_001))
        assert found.lookup(1, keys[150_000:]).tolist() == list(range(1, 50_001))
        assert not found.lookup(1, keys[:150_000]).any()
        assert not found.lookup(0, [f"u{i}" for i in range(50_000)]).any()

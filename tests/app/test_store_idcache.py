"""The memory store's id cache gives exactly the vocabulary index's ids, cached or not,
for every field or some of them, and stays within its capacity."""

from collections.abc import Iterable, Sequence

import numpy as np
import pytest

from app.store.idcache import IdCache
from model.features import FeatureSpec, Field, Vocabulary, lookup_keys
from model.vocabindex import VocabIndex

SPEC = FeatureSpec(
    (
        Field("d", "log"),
        Field("c1", "category", vocab=Vocabulary(tuple(f"a{i}" for i in range(50)))),
        Field("c2", "category", vocab=Vocabulary(tuple(f"a{i}" for i in range(0, 100, 2)))),
        Field("c3", "category", vocab=Vocabulary(("x", "y", "z"))),
    )
)


class CountingIndex(VocabIndex):
    """The vocabulary index, counting the keys it is asked for."""

    asked = 0

    def find(self, keys: Sequence[str], fields: Iterable[int]) -> np.ndarray:
        self.asked += len(keys)
        return super().find(keys, fields)


def counted() -> tuple[FeatureSpec, CountingIndex]:
    """SPEC with an index of its own that counts its searches."""
    index = CountingIndex.build(
        lookup_keys(f.vocab.values) for f in SPEC.embedded_fields if f.vocab is not None
    )
    assert isinstance(index, CountingIndex)
    return FeatureSpec(SPEC.fields, index), index


def batch(seed: int, size: int = 40) -> list[dict[str, object]]:
    """Rows with known, unseen, missing (absent, null, "") and integer values."""
    rng = np.random.default_rng(seed)
    values = ["a1", "a7", "a80", "x", "q", None, "", 12, "a49", "z"]
    return [
        {
            name: values[rng.integers(len(values))]
            for name in ("c1", "c2", "c3")
            if rng.random() < 0.9
        }
        for _ in range(size)
    ]


@pytest.mark.parametrize("capacity", [0, 5, 10_000])
def test_ids_equal_the_index_s_cached_or_not(capacity: int) -> None:
    spec, find = counted()
    cache = IdCache(spec, capacity)
    for seed in range(6):
        rows = batch(seed)
        keyed = SPEC.row_keys(rows)
        np.testing.assert_array_equal(cache.ids(keyed), SPEC.ids(keyed))
        some = SPEC.row_keys(rows, SPEC.plan({"c3", "c1"}))  # two of the three fields
        np.testing.assert_array_equal(cache.ids(some), SPEC.ids(keyed)[:, [0, 2]])
        assert len(cache) <= capacity + 3 * len(rows)
    if capacity == 10_000:  # every distinct key was asked for once per field at most
        assert find.asked <= 3 * 10
        assert len(cache) > 0


def test_a_full_cache_starts_again() -> None:
    cache = IdCache(SPEC, 4)
    cache.ids(SPEC.row_keys([{"c1": "a1", "c2": "a2", "c3": "x"}]))
    assert len(cache) == 3
    cache.ids(SPEC.row_keys([{"c1": "a40"}]))  # 3 more keys (a40, c2 and c3 missing)...
    assert len(cache) == 3  # ...would take it past 4: emptied, then those cached
    more = [{"c1": f"a{i}"} for i in range(20, 30)]  # more new keys than it holds
    np.testing.assert_array_equal(cache.ids(SPEC.row_keys(more)), SPEC.ids(SPEC.row_keys(more)))
    assert len(cache) == 3  # (none of them cached)


def test_a_cached_batch_asks_the_index_nothing() -> None:
    spec, find = counted()
    cache = IdCache(spec, 100)
    keyed = SPEC.row_keys(batch(1))
    first = cache.ids(keyed)
    asked = find.asked
    np.testing.assert_array_equal(cache.ids(keyed), first)
    assert find.asked == asked

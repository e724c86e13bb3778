import numpy as np
import pytest

from app.store.rowcache import MISS, RowCache
from model.vocabindex import NOT_A_KEY

OOV = np.array([[-1.0, -1.0], [-2.0, -2.0]], dtype=np.float32)  # two fields, width 2


def rows(*values: float) -> np.ndarray:
    return np.array([[v, v + 0.5] for v in values], dtype=np.float32)


def lookup(cache: RowCache, field: int, *values: str) -> list[int]:
    return cache.slots(field, list(values)).tolist()


def test_hits_misses_and_missing_values() -> None:
    cache = RowCache(capacity=4, oov_rows=OOV)
    cache.insert([(0, "a"), (1, "a")], rows(1, 2))
    slots = cache.slots(0, ["a", "b", NOT_A_KEY])
    assert slots[1] == MISS
    np.testing.assert_array_equal(cache.rows(slots[[0, 2]]), [[1, 1.5], [-1, -1]])
    np.testing.assert_array_equal(
        cache.rows(cache.slots(1, ["a", NOT_A_KEY])), [[2, 2.5], [-2, -2]]
    )
    assert lookup(cache, 1, "b") == [MISS]
    assert len(cache) == 2


def test_a_row_in_use_outlives_rows_that_are_not() -> None:
    cache = RowCache(capacity=3, oov_rows=OOV)
    cache.insert([(0, "hot")], rows(9))
    for i in range(50):  # a stream of one-off values, the hot one used all along
        cache.rows(cache.slots(0, ["hot"]))
        cache.insert([(0, f"cold{i}")], rows(i))
        assert len(cache) <= 3
    assert MISS not in lookup(cache, 0, "hot")
    np.testing.assert_array_equal(cache.rows(cache.slots(0, ["hot"])), rows(9))
    assert lookup(cache, 0, "cold0", "cold1", "cold48", "cold49")[:2] == [MISS, MISS]
    assert MISS not in lookup(cache, 0, "cold49")


def test_every_cached_value_keeps_its_own_row_whatever_the_evictions() -> None:
    rng = np.random.default_rng(0)
    cache = RowCache(capacity=64, oov_rows=OOV)
    truth = {}
    for step in range(400):
        values = [f"v{x}" for x in rng.zipf(1.3, 40) if x < 500]
        field = int(rng.integers(2))
        slots = cache.slots(field, values)
        for value, slot in zip(values, slots.tolist(), strict=True):
            if slot != MISS:
                np.testing.assert_array_equal(cache.rows(np.array([slot]))[0], truth[field, value])
        missed = [v for v, s in zip(values, slots.tolist(), strict=True) if s == MISS]
        new = list(dict.fromkeys(missed))
        fresh = rng.normal(size=(len(new), 2)).astype(np.float32)
        cache.insert([(field, v) for v in new], fresh)
        truth.update({(field, v): row for v, row in zip(new, fresh, strict=True)})
        assert len(cache) <= 64, step


def test_more_rows_than_capacity_keeps_the_last() -> None:
    cache = RowCache(capacity=2, oov_rows=OOV)
    cache.insert([(0, "x")], rows(7))
    cache.insert([(0, "a"), (0, "b"), (0, "c")], rows(1, 2, 3))
    assert lookup(cache, 0, "x", "a") == [MISS, MISS]
    np.testing.assert_array_equal(cache.rows(cache.slots(0, ["b", "c"])), rows(2, 3))
    np.testing.assert_array_equal(cache.rows(cache.slots(0, [NOT_A_KEY])), OOV[:1])


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RowCache(capacity=0, oov_rows=OOV)


def test_an_update_rewrites_the_cached_rows_it_changed_and_the_oov_copies() -> None:
    cache = RowCache(capacity=8, oov_rows=OOV)
    absent = np.array([False, True, False, True])
    cache.insert([(0, "a"), (0, "gone"), (1, "b"), (1, "new")], rows(1, -1, 3, -2), absent)
    cache.insert([(0, "c")], rows(5))  # (a row after them: the slots are not in order)
    assert cache.replace(1, ["new", "b", "uncached"], rows(7, 8, 9)) == 2
    assert lookup(cache, 1, "uncached") == [MISS]  # not cached by an update
    fresh = np.array([[10.0, 10.0], [20.0, 20.0]], dtype=np.float32)
    cache.set_oov(fresh)
    got = cache.rows(cache.slots(0, ["a", "gone", NOT_A_KEY, "c"]))
    np.testing.assert_array_equal(got, [[1, 1.5], [10, 10], [10, 10], [5, 5.5]])
    # "new" got a row of its own: no longer an OOV copy, so new OOV rows leave it be.
    np.testing.assert_array_equal(
        cache.rows(cache.slots(1, ["new", "b", NOT_A_KEY])), [[7, 7.5], [8, 8.5], [20, 20]]
    )
    cache.clear()
    assert len(cache) == 0 and lookup(cache, 0, "a") == [MISS]
    np.testing.assert_array_equal(cache.rows(cache.slots(1, [NOT_A_KEY])), fresh[1:])

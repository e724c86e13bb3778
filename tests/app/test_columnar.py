"""Rows held as columns read as the rows a native request would give."""

import numpy as np
import pytest

from app.columnar import ColumnRows


def test_rows_of_columns_leave_out_missing_values() -> None:
    rows = ColumnRows({"C1": ["a", "", None, "b"], "I1": np.array([1.5, np.nan, 3.0, np.nan])}, 4)
    assert len(rows) == 4
    assert list(rows) == [{"C1": "a", "I1": 1.5}, {}, {"I1": 3.0}, {"C1": "b"}]
    assert type(rows[0]["I1"]) is float  # (JSON-ready, as a validated row)
    assert rows[-1] == {"C1": "b"}
    with pytest.raises(IndexError):
        rows[4]


def test_a_slice_is_columns_too() -> None:
    rows = ColumnRows({"C1": ["a", "b", "c"], "I1": np.array([1.0, 2.0, 3.0])}, 3)
    part = rows[1:]
    assert isinstance(part, ColumnRows) and len(part) == 2
    assert list(part) == [{"C1": "b", "I1": 2.0}, {"C1": "c", "I1": 3.0}]
    assert len(rows[5:]) == 0
    with pytest.raises(ValueError, match="contiguous"):
        rows[::2]

"""Rows held as columns: the tensors of an Open Inference Protocol request.

``ColumnRows`` is a sequence of rows (field name -> raw value, as the native
endpoints validate them) that keeps its values in one column per field, as they
arrived. The forward pass keys its columns at once (``FeatureSpec.keys``), with
no dict built per row; anything that wants rows (the prediction log) gets them
one at a time, made when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, overload

import numpy as np

from model.features import Column


class ColumnRows(Sequence[dict[str, Any]]):
    """``size`` rows as columns: a sparse field's values (str; None or "" is missing),
    a dense field's (float64 NumPy array; NaN is missing). A field with no column is
    missing in every row."""

    def __init__(self, columns: Mapping[str, Column], size: int) -> None:
        self.columns = columns
        self.size = size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> ColumnRows: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | ColumnRows:
        if isinstance(index, slice):
            start, stop, step = index.indices(self.size)
            if step != 1:
                raise ValueError("a slice of rows is contiguous")
            return ColumnRows(
                {name: column[start:stop] for name, column in self.columns.items()},
                max(stop - start, 0),
            )
        if not -self.size <= index < self.size:
            raise IndexError(index)
        row: dict[str, Any] = {}
        for name, column in self.columns.items():
            value = column[index]
            if isinstance(value, np.floating):
                value = float(value)
                if math.isnan(value):
                    continue
            if value is not None and value != "":
                row[name] = value
        return row

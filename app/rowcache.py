"""The in-process LRU of embedding rows, the first tier of the Redis store.

Rows live in one float32 slab of ``capacity`` rows, allocated up front but
touched only as it fills, so the cache's memory is bounded by
``CTR_LOCAL_CACHE_ROWS`` whatever the vocabulary. Keys are ``(field, value)``.
Only the forward-pass worker thread uses a cache: it takes no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Key = tuple[int, str]
FloatRows = npt.NDArray[np.float32]


class RowCache:
    """At most ``capacity`` rows of ``width`` floats; the least recently used goes first."""

    def __init__(self, capacity: int, width: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._rows: FloatRows = np.empty((capacity, width), dtype=np.float32)
        self._slots: OrderedDict[Key, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, keys: Sequence[Key]) -> tuple[list[int], FloatRows, list[int]]:
        """(positions in ``keys`` found, their rows, positions missed); hits become recent."""
        slots = self._slots
        found: list[int] = []
        found_slots: list[int] = []
        missed: list[int] = []
        for i, key in enumerate(keys):
            slot = slots.get(key)
            if slot is None:
                missed.append(i)
            else:
                slots.move_to_end(key)
                found.append(i)
                found_slots.append(slot)
        return found, self._rows[found_slots], missed

    def insert(self, keys: Sequence[Key], rows: FloatRows) -> None:
        """Cache ``rows[i]`` under ``keys[i]``, evicting the least recently used rows."""
        if len(keys) > self.capacity:  # only the last ``capacity`` could stay anyway
            keys, rows = keys[-self.capacity :], rows[-self.capacity :]
        slots = self._slots
        targets = []
        for key in keys:
            slot = slots.get(key)
            if slot is not None:
                slots.move_to_end(key)
            elif len(slots) < self.capacity:
                slot = len(slots)
                slots[key] = slot
            else:
                _, slot = slots.popitem(last=False)
                slots[key] = slot
            targets.append(slot)
        self._rows[targets] = rows

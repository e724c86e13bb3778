"""The in-process cache of embedding rows, the first tier of the Redis store.

Rows live in one float32 slab of ``capacity`` rows (allocated up front, touched
only as it fills), so the cache's memory is bounded by ``CTR_LOCAL_CACHE_ROWS``
whatever the vocabulary; one dict per field maps a value to its slot. Eviction
is CLOCK (second chance), the LRU approximation of operating systems' page
caches: a hit only sets its slot's "referenced" flag, which a whole batch does
in one vectorised step, and the eviction hand passes over referenced slots once
(clearing their flag) before it takes them. A new row starts unreferenced, so
values seen once are evicted before values seen again. An exact LRU must reorder a list on
every hit, a Python-level step per value that cost redis mode a fifth of its
throughput against memory mode.

Each field's OOV row sits in a pinned slot past the evictable ones, and a
missing value (its key ``NOT_A_KEY``) maps to it. A value the store found absent is
cached with a copy of its field's OOV row, flagged as such: a model update that
brings new OOV rows (``set_oov``) rewrites those copies, and one that brings rows
for cached values (``replace``) rewrites theirs. Only the forward-pass worker thread
uses a cache: it takes no lock.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

import numpy as np
import numpy.typing as npt

from model.vocabindex import NOT_A_KEY

Key = tuple[int, str]  # (field, value)
FloatRows = npt.NDArray[np.float32]
Slots = npt.NDArray[np.int64]

MISS = -1


class RowCache:
    """At most ``capacity`` rows of ``width`` floats, keyed by (field, value)."""

    def __init__(self, capacity: int, oov_rows: FloatRows) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        fields, width = oov_rows.shape
        self.capacity = capacity
        self._rows: FloatRows = np.empty((capacity + fields, width), dtype=np.float32)
        self._rows[capacity:] = oov_rows
        self._index: list[dict[str, int]] = [{NOT_A_KEY: capacity + j} for j in range(fields)]
        self._owner: list[Key | None] = [None] * capacity
        self._referenced = np.zeros(capacity + fields, dtype=bool)
        self._absent = np.zeros(capacity, dtype=bool)  # holds a copy of an OOV row
        self._field = np.zeros(capacity, dtype=np.int64)  # of the value a slot holds
        self._used = 0
        self._hand = 0

    def __len__(self) -> int:
        return self._used

    def slots(self, field: int, values: Sequence[str]) -> Slots:
        """The slot of each lookup key of ``field`` (its OOV slot for ``NOT_A_KEY``),
        ``MISS`` if absent."""
        return np.fromiter(
            map(self._index[field].get, values, repeat(MISS)), dtype=np.int64, count=len(values)
        )

    def rows(self, slots: Slots) -> FloatRows:
        """The rows in ``slots`` (any shape), which count as used now."""
        self._referenced[slots] = True
        return self._rows[slots]

    def insert(
        self, keys: Sequence[Key], rows: FloatRows, absent: npt.NDArray[np.bool_] | None = None
    ) -> None:
        """Cache ``rows[i]`` under ``keys[i]`` (keys not cached yet), evicting as needed;
        ``absent[i]``: ``rows[i]`` is the OOV row of a value the store does not hold."""
        if absent is None:
            absent = np.zeros(len(keys), dtype=bool)
        if len(keys) >= self.capacity:  # only the last ``capacity`` could stay: start afresh
            cut = len(keys) - self.capacity
            keys, rows, absent = keys[cut:], rows[cut:], absent[cut:]
            self.clear()
        targets = self._take(len(keys))
        owner = self._owner
        for slot, key in zip(targets, keys, strict=True):
            old = owner[slot]
            if old is not None:
                del self._index[old[0]][old[1]]
            self._index[key[0]][key[1]] = slot
            owner[slot] = key
        self._rows[targets] = rows
        self._absent[targets] = absent
        self._field[targets] = [field for field, _ in keys]

    def clear(self) -> None:
        """Forget every cached row (the OOV rows stay)."""
        for j, field_index in enumerate(self._index):
            field_index.clear()
            field_index[NOT_A_KEY] = self.capacity + j
        self._owner = [None] * self.capacity
        self._absent[:] = False
        self._used = self._hand = 0

    def replace(self, field: int, values: Sequence[str], rows: FloatRows) -> int:
        """New rows for those of ``values`` (lookup keys of ``field``) that are cached;
        the others stay uncached. Returns how many were cached."""
        slots = self.slots(field, values)
        cached = (slots != MISS) & (slots < self.capacity)
        self._rows[slots[cached]] = rows[cached]
        self._absent[slots[cached]] = False
        return int(np.count_nonzero(cached))

    def set_oov(self, oov_rows: FloatRows) -> None:
        """New OOV rows: in the pinned slots, and in every cached copy of one."""
        self._rows[self.capacity :] = oov_rows
        copies = np.flatnonzero(self._absent)
        self._rows[copies] = oov_rows[self._field[copies]]

    def _take(self, count: int) -> list[int]:
        """``count`` (< capacity) slots: free ones first, then by the CLOCK hand."""
        taken = list(range(self._used, min(self._used + count, self.capacity)))
        self._used += len(taken)
        referenced = self._referenced
        referenced[taken] = True  # (for this call only: not to be taken twice)
        while len(taken) < count:
            window = referenced[self._hand : self.capacity]
            free = np.flatnonzero(~window)[: count - len(taken)]
            passed = int(free[-1]) + 1 if len(free) == count - len(taken) else len(window)
            chosen = (free + self._hand).tolist()
            window[:passed] = False  # passed over: the second chance is spent
            referenced[chosen] = True
            taken += chosen
            self._hand = (self._hand + passed) % self.capacity
        # A new row has no second chance until it is used again: a value seen once goes
        # before one seen twice, so a burst of one-off values cannot flush the hot rows.
        referenced[taken] = False
        return taken

"""The memory store's cache of vocabulary ids: (field, lookup key) -> id, in-process.

Finding a key's id in the vocabulary index (``model.vocabindex``) hashes its
UTF-8 bytes to 128 bits and searches sorted arrays: about 0.2 µs a key, most of
what encoding a batch cost. A dict per field that remembers the ids of the keys
seen lately answers a key in about a fifth of that, in C (``map(dict.get, ...)``),
so only keys not seen lately are hashed. Ids never change for a loaded checkpoint
(a streamed update brings rows, not ids: ``app.store.base.MemoryStore``), so a
cached id is never stale.

The cache holds at most ``capacity`` keys: when a batch would take it past that,
it is emptied and starts again (keys that keep coming are cached again at once;
an exact LRU would cost a Python step per hit, which is what the cache saves); a
batch of more new keys than that caches none. A key costs about 120 bytes (its
string, a dict slot, the id), in each worker process. Only the forward-pass
worker thread uses it: it takes no lock.
"""

from __future__ import annotations

from itertools import chain, repeat

import numpy as np
import numpy.typing as npt

from model.features import FeatureSpec, Keyed

Ids = npt.NDArray[np.int64]
MISS = -1


class IdCache:
    """Ids of the keys of ``features``' embedded fields, at most ``capacity`` of them (0:
    none, every batch searched as ``FeatureSpec.ids`` does)."""

    def __init__(self, features: FeatureSpec, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be at least 0")
        self.capacity = capacity
        self._features = features
        self._ids: list[dict[str, int]] = [{} for _ in features.embedded_fields]

    def __len__(self) -> int:
        return sum(map(len, self._ids))

    def ids(self, keyed: Keyed) -> Ids:
        """The ids ``B x F`` of a batch's keys (0: missing or unseen), those not cached
        found in one search and cached."""
        if not self.capacity:
            return self._features.ids(keyed)
        fields, columns = keyed.field_positions(), keyed.columns
        out = np.empty((len(keyed), len(columns)), dtype=np.int64)
        for c, (j, column) in enumerate(zip(fields, columns, strict=True)):
            out[:, c] = np.fromiter(
                map(self._ids[j].get, column, repeat(MISS)), dtype=np.int64, count=len(column)
            )
        missed = out == MISS
        if not missed.any():
            return out
        # The keys not cached, column by column, each once, found in one search.
        where = [
            (c, np.flatnonzero(missed[:, c])) for c in np.flatnonzero(missed.any(axis=0)).tolist()
        ]
        keys = [[columns[c][i] for i in rows.tolist()] for c, rows in where]
        unique = [list(dict.fromkeys(column)) for column in keys]
        found = self._features.vocab_index.find(
            list(chain.from_iterable(unique)),
            [fields[c] for (c, _), column in zip(where, unique, strict=True) for _ in column],
        ).tolist()
        keep = len(found) <= self.capacity  # (a batch of more new keys: none cached)
        if keep and len(self) + len(found) > self.capacity:
            for cached in self._ids:  # full: start again
                cached.clear()
        start = 0
        for (c, rows), column, new in zip(where, keys, unique, strict=True):
            ids = dict(zip(new, found[start : start + len(new)], strict=True))
            start += len(new)
            out[rows, c] = np.fromiter(map(ids.__getitem__, column), np.int64, len(column))
            if keep:
                self._ids[fields[c]].update(ids)
        return out

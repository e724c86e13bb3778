"""The embedding store: where a batch's embedding rows ``[w_f[x], V_f[x]_1..k]`` come from.

``MemoryStore`` reads them from the checkpoint tables held in the process;
``app.store.redisstore.RedisStore`` from an in-process LRU, then Redis, then (when held)
the tables. Both take a batch's lookup keys (``model.features.Keyed``, made by the one
encoding core), of every embedded field or of some.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from app.metrics import Metrics
from app.store.idcache import IdCache
from app.store.updates import Update
from model.deepfm import DeepFM
from model.features import FeatureSpec, Keyed

StoreState = Literal["ok", "degraded"]
Row = Mapping[str, Any]


class EmbeddingStore(ABC):
    """Gives a batch's embedding rows: its lookup keys (``model.features.Keyed``, ``B``
    rows of F fields, or of the fields it names) -> ``B x F x (1+k)`` float32."""

    backend: str

    @abstractmethod
    def lookup(self, keyed: Keyed) -> torch.Tensor:
        """Called on the forward-pass worker thread, never on the event loop."""

    @property
    @abstractmethod
    def state(self) -> StoreState: ...

    @property
    def reason(self) -> str | None:
        """While degraded: what went wrong last (for /readyz)."""
        return None

    @abstractmethod
    def apply_update(
        self, update: Update, jump: bool = False, rows: list[dict[str, Any]] | None = None
    ) -> None:
        """Serve a streamed update's rows (``app.store.updates``): on the worker thread,
        between batches. ``rows``: ``update.row_maps()``, made off it."""

    async def start(self) -> None:  # noqa: B027 (a store with nothing to start)
        """Connect (on the event loop); the default store has nothing to connect to."""

    async def aclose(self) -> None:  # noqa: B027 (a store with nothing to close)
        """Release connections; the default store holds none."""


class MemoryStore(EmbeddingStore):
    """Every row from the checkpoint tables held in this process, and (with
    ``CTR_REDIS_URL`` set) the rows and OOV rows of the streamed updates applied,
    over them: the tables are never written."""

    backend = "memory"

    def __init__(
        self, features: FeatureSpec, model: DeepFM, metrics: Metrics, id_cache_keys: int = 0
    ) -> None:
        self._features = features
        self._model = model
        self._ids = IdCache(features, id_cache_keys)
        # The rows updates changed or brought, per field (value key -> row), and the
        # OOV rows of the last update that brought some.
        self._overlay: list[dict[str, Any]] = [{} for _ in features.embedded_fields]
        self._new_oov: torch.Tensor | None = None
        self._lookups = metrics.lookups.labels("tables")
        self._hits = metrics.hits.labels("tables")
        self._oov = metrics.oov
        self._missing = metrics.missing

    def lookup(self, keyed: Keyed) -> torch.Tensor:
        ids = self._ids.ids(keyed)
        # Index 0 is a missing value or an unseen one; only the unseen were looked up.
        missing = keyed.missing
        oov = int(np.count_nonzero(ids == 0)) - missing
        self._missing.inc(missing)
        self._lookups.inc(ids.size - missing)
        self._hits.inc(ids.size - missing - oov)
        self._oov.inc(oov)
        fields = None if keyed.fields is None else torch.tensor(keyed.fields, dtype=torch.int64)
        with torch.inference_mode():
            gathered = self._model.gather(torch.from_numpy(ids), fields)
            if self._new_oov is not None or any(self._overlay):
                self._updated(gathered, ids, keyed)
        return gathered

    def _updated(self, gathered: torch.Tensor, ids: npt.NDArray[np.int64], keyed: Keyed) -> None:
        """The updates' rows over the tables' in ``gathered`` (in place): the new OOV
        rows at index 0, then the rows of the values updates changed or brought."""
        fields = list(keyed.field_positions())
        if self._new_oov is not None:
            oov = torch.from_numpy(ids == 0)
            gathered[oov] = self._new_oov[fields].expand(len(ids), -1, -1)[oov]
        for c, j in enumerate(fields):
            overlay = self._overlay[j]
            if overlay:
                for i, key in enumerate(keyed.columns[c]):
                    row = overlay.get(key)
                    if row is not None:
                        gathered[i, c] = torch.from_numpy(row)

    def apply_update(
        self, update: Update, jump: bool = False, rows: list[dict[str, Any]] | None = None
    ) -> None:
        if update.oov is not None:
            self._new_oov = torch.from_numpy(update.oov.astype(np.float32))
        for overlay, changed in zip(self._overlay, rows or update.row_maps(), strict=True):
            overlay.update(changed)

    @property
    def state(self) -> StoreState:
        return "ok"

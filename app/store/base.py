"""The embedding store: where a batch's embedding rows ``[w_f[x], V_f[x]_1..k]`` come from.

``MemoryStore`` reads them from the checkpoint tables held in the process;
``app.store.redisstore.RedisStore`` from an in-process LRU, then Redis, then (when held)
the tables. Both turn raw rows into the model's input the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from app.metrics import Metrics
from app.store.updates import Update
from model.deepfm import DeepFM
from model.features import FeatureSpec

StoreState = Literal["ok", "degraded"]
Row = Mapping[str, Any]
Encoded = tuple[torch.Tensor, npt.NDArray[np.float32]]


class EmbeddingStore(ABC):
    """Turns raw rows into model input: embedding rows ``B x F x (1+k)``, dense ``B x D``."""

    backend: str

    @abstractmethod
    def encode(self, rows: Sequence[Row]) -> Encoded:
        """Called on the forward-pass worker thread, never on the event loop."""

    @property
    @abstractmethod
    def state(self) -> StoreState: ...

    @property
    def reason(self) -> str | None:
        """While degraded: what went wrong last (for /readyz)."""
        return None

    def apply_update(
        self, update: Update, jump: bool = False, rows: list[dict[str, Any]] | None = None
    ) -> None:
        """Serve a streamed update's rows (``app.store.updates``); on the worker thread."""
        raise NotImplementedError(f"the {self.backend} store takes no streamed updates")

    async def start(self) -> None:  # noqa: B027 (a store with nothing to start)
        """Connect (on the event loop); the default store has nothing to connect to."""

    async def aclose(self) -> None:  # noqa: B027 (a store with nothing to close)
        """Release connections; the default store holds none."""


class MemoryStore(EmbeddingStore):
    """Every row from the checkpoint tables held in this process."""

    backend = "memory"

    def __init__(self, features: FeatureSpec, model: DeepFM, metrics: Metrics) -> None:
        self._features = features
        self._model = model
        self._lookups = metrics.lookups.labels("tables")
        self._hits = metrics.hits.labels("tables")
        self._oov = metrics.oov
        self._missing = metrics.missing

    def encode(self, rows: Sequence[Row]) -> Encoded:
        keyed = self._features.row_keys(rows)
        ids = self._features.ids(keyed)
        # Index 0 is a missing value or an unseen one; only the unseen were looked up.
        missing = keyed.missing
        oov = int(np.count_nonzero(ids == 0)) - missing
        self._missing.inc(missing)
        self._lookups.inc(ids.size - missing)
        self._hits.inc(ids.size - missing - oov)
        self._oov.inc(oov)
        with torch.inference_mode():
            return self._model.gather(torch.from_numpy(ids)), keyed.dense

    @property
    def state(self) -> StoreState:
        return "ok"

"""The embedding store: where a batch's embedding rows ``[w_f[x], V_f[x]_1..k]`` come from.

``MemoryStore`` reads them from the checkpoint tables held in the process. A
Redis-backed store (shared by every replica, with an in-process LRU in front)
fills the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from app.metrics import Metrics
from model.deepfm import DeepFM

StoreState = Literal["ok", "degraded"]


class EmbeddingStore(ABC):
    """Gathers the rows of a batch: ids ``B x F`` (0 = OOV) -> rows ``B x F x (1+k)``."""

    backend: str

    @abstractmethod
    def gather(self, ids: npt.NDArray[np.int64]) -> torch.Tensor:
        """Called on the forward-pass worker thread, never on the event loop."""

    @property
    @abstractmethod
    def state(self) -> StoreState: ...

    async def aclose(self) -> None:  # noqa: B027 (a store with nothing to close)
        """Release connections; the default store holds none."""


class MemoryStore(EmbeddingStore):
    """Every row from the checkpoint tables held in this process."""

    backend = "memory"

    def __init__(self, model: DeepFM, metrics: Metrics) -> None:
        self._model = model
        self._lookups = metrics.lookups.labels("tables")
        self._hits = metrics.hits.labels("tables")
        self._oov = metrics.oov

    def gather(self, ids: npt.NDArray[np.int64]) -> torch.Tensor:
        oov = int(np.count_nonzero(ids == 0))
        self._lookups.inc(ids.size)
        self._hits.inc(ids.size - oov)
        self._oov.inc(oov)
        with torch.inference_mode():
            return self._model.gather(torch.from_numpy(ids))

    @property
    def state(self) -> StoreState:
        return "ok"

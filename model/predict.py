"""Offline prediction: raw rows or columns -> click probabilities, with a checkpoint's model
and its calibration (``model.calibration``).

This is the reference the service is held to: a probability it serves equals,
within 1e-6, what ``Predictor`` computes for the same row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from model.checkpoint import Checkpoint
from model.deepfm import DeepFM

EVAL_BATCH = 65_536


def predict_logits(
    model: DeepFM, ids: npt.NDArray[np.int64], dense: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """Logits of encoded rows, in batches, without autograd."""
    out = np.empty(len(ids), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(ids), EVAL_BATCH):
            stop = start + EVAL_BATCH
            logits = model(torch.from_numpy(ids[start:stop]), torch.from_numpy(dense[start:stop]))
            out[start:stop] = logits.numpy()
    return out


class Predictor:
    """A checkpoint's feature encoding and model, in eval mode."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.features = checkpoint.features
        self.model = checkpoint.build_model()
        self.calibration = checkpoint.calibration

    def predict_logits_columns(
        self, columns: Mapping[str, npt.NDArray[Any]], num_rows: int
    ) -> npt.NDArray[np.float32]:
        """The model's logits (before the calibration) of columnar rows."""
        ids, dense = self.features.encode(columns, num_rows)
        return predict_logits(self.model, ids, dense)

    def predict_columns(
        self, columns: Mapping[str, npt.NDArray[Any]], num_rows: int
    ) -> npt.NDArray[np.float64]:
        return self.calibration.probabilities(self.predict_logits_columns(columns, num_rows))

    def predict_rows(self, rows: Sequence[Mapping[str, Any]]) -> npt.NDArray[np.float64]:
        ids, dense = self.features.encode_rows(rows)
        return self.calibration.probabilities(predict_logits(self.model, ids, dense))

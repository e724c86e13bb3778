"""A loaded model, ready to serve: feature encoding, embedding store and the dense part.

``ServingModel.predict`` scores raw rows (field name -> value) exactly as the
offline code in ``model/`` does, in chunks. It is CPU work: the micro-batcher's
worker thread runs it, off the event loop, one batch at a time (torch's own
threads use the cores).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from app.columnar import ColumnRows
from app.config import Settings
from app.metrics import Metrics
from app.schemas import RequestSchemas
from app.store.base import EmbeddingStore, Row
from app.store.updates import Update, UpdateRefused
from app.v2schemas import InferSchema
from model.calibration import Calibration
from model.checkpoint import TABLES, Checkpoint
from model.deepfm import DeepFM, Split
from model.features import Keyed, RowPlan

# Distinct context field sets whose split is kept: each holds a copy of the DNN's first
# layer (its columns taken apart), and a ranking client sends the same few.
SPLITS_KEPT = 8
Explained = dict[str, Any]  # one row's explanation (app.schemas.Explanation)


class PreparedUpdate(NamedTuple):
    """An update made ready off the worker thread (``ServingModel.prepare_update``)."""

    model: DeepFM
    rows: list[dict[str, Any]]


class ServingModel:
    """One checkpoint's model and store; ``version`` names the model of every answer."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        model: DeepFM,
        store: EmbeddingStore,
        metrics: Metrics,
        settings: Settings,
    ) -> None:
        self.checkpoint = checkpoint
        self.version = checkpoint.version  # the base's, then "<base>+u<k>" (apply_update)
        self.update: Update | None = None  # the last update applied (app.store.updates)
        self.applied_at: float | None = None  # when (time.time())
        self.refused: str | None = None  # why an update was refused: updates stopped here
        self.features = checkpoint.features
        self.calibration = checkpoint.calibration
        self.schemas = RequestSchemas.build(checkpoint.features)
        self.v2 = InferSchema.build(checkpoint.features)  # (the Open Inference Protocol)
        self.store = store
        self._model = model
        self._metrics = metrics
        self._chunk_rows = settings.chunk_rows
        # (only the batcher's thread uses it; an update's weights empty it)
        self._splits: dict[frozenset[str], tuple[Split, RowPlan, RowPlan]] = {}

    def predict(self, rows: Sequence[Row]) -> npt.NDArray[np.float64]:
        """Click probabilities of ``rows``, in order. CPU-bound: call it off the event loop."""
        return self.score([rows])

    def score(self, calls: Sequence[Sequence[Row]]) -> npt.NDArray[np.float64]:
        """``predict`` of the rows of several calls in one pass: each call's keyed as it
        came (rows, or columns: ``app.columnar``), then the whole a chunk at a time."""
        keyed = Keyed.concat([self.keys(rows) for rows in calls])
        size, chunk = len(keyed), self._chunk_rows
        if not size:
            return np.empty(0)
        parts = [self._forward(keyed[start : start + chunk]) for start in range(0, size, chunk)]
        self._metrics.rows_predicted.inc(size)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def keys(self, rows: Sequence[Row]) -> Keyed:
        """The lookup keys and dense input of ``rows``."""
        if isinstance(rows, ColumnRows):
            return self.features.keys(rows.columns, len(rows))
        return self.features.row_keys(rows)

    def warm(self) -> None:
        """One forward pass of an empty row, to pay one-off costs before traffic comes
        (not counted as a row predicted)."""
        self._forward(self.keys([{}]))

    def _forward(self, keyed: Keyed) -> npt.NDArray[np.float64]:
        gathered = self.store.lookup(keyed)
        with torch.inference_mode():
            logits = self._model.forward_rows(
                gathered[..., 0], gathered[..., 1:], torch.from_numpy(keyed.dense)
            )
        return self.calibration.probabilities(logits.numpy())

    def rank(self, context: Row, rows: Sequence[Row]) -> npt.NDArray[np.float64]:
        """Click probabilities of ``rows`` with ``context``'s fields merged into each (a
        ranking request: ``predict`` of the merged rows), the context encoded, gathered
        and multiplied once (``DeepFM.forward_shared``), each candidate's fields alone
        encoded and gathered (a candidate holds none of the context's fields). CPU-bound,
        as ``predict``."""
        split, shared, own = self._split(frozenset(context))
        context_keys = self.features.row_keys([context], shared)
        candidate_keys = self.features.row_keys(rows, own)
        c = self.store.lookup(context_keys)[0]
        n = self.store.lookup(candidate_keys)
        with torch.inference_mode():
            logits = self._model.forward_shared(
                (c[:, 0], c[:, 1:], torch.from_numpy(context_keys.dense[0])),
                (n[..., 0], n[..., 1:], torch.from_numpy(candidate_keys.dense)),
                split,
            )
        self._metrics.rows_predicted.inc(len(rows))
        return self.calibration.probabilities(logits.numpy())

    def _split(self, names: frozenset[str]) -> tuple[Split, RowPlan, RowPlan]:
        """How a context naming the fields ``names`` divides the model's input, and how
        the context and the candidates are read: worked out once per set of names (a
        ranking client sends the same few) and model weights, LRU-bounded."""
        found = self._splits.pop(names, None)
        if found is None:
            features = self.features
            shared = features.plan(names)
            own = features.plan({f.name for f in features.fields} - names)
            split = self._model.split(
                torch.tensor(shared.fields, dtype=torch.int64),
                torch.tensor(shared.dense_positions, dtype=torch.int64),
            )
            found = (split, shared, own)
            if len(self._splits) >= SPLITS_KEPT:
                del self._splits[next(iter(self._splits))]
        self._splits[names] = found  # (most recent last)
        return found

    def explain(self, rows: Sequence[Row]) -> tuple[npt.NDArray[np.float64], list[Explained]]:
        """``predict``, and each row's logit split into parts (``DeepFM.explain_rows``)."""
        probabilities: list[npt.NDArray[np.float64]] = []
        explanations: list[Explained] = []
        for start in range(0, len(rows), self._chunk_rows):
            keyed = self.keys(rows[start : start + self._chunk_rows])
            gathered = self.store.lookup(keyed)
            with torch.inference_mode():
                parts = {
                    name: part.detach().numpy()
                    for name, part in self._model.explain_rows(
                        gathered[..., 0], gathered[..., 1:], torch.from_numpy(keyed.dense)
                    ).items()
                }
            served = self.calibration.probabilities(parts["logit"])
            probabilities.append(served)
            explanations += self._explanations(parts, served)
        self._metrics.rows_predicted.inc(len(rows))
        return np.concatenate(probabilities), explanations

    @cached_property
    def _first_order_layout(self) -> tuple[list[int], list[str], list[str]]:
        """How explanations name their parts, worked out once per model: the columns of
        [embedded first-order terms, dense terms] in the spec's field order, the field
        names in that order, and the embedded fields' names."""
        embedded = [f.name for f in self.features.embedded_fields]
        dense = [f.name for f in self.features.dense_fields]
        column = {name: i for i, name in enumerate([*embedded, *dense])}
        names = [f.name for f in self.features.fields]
        return [column[name] for name in names], names, embedded

    def _explanations(
        self, parts: dict[str, npt.NDArray[np.float32]], served: npt.NDArray[np.float64]
    ) -> list[Explained]:
        order, names, embedded = self._first_order_layout
        first = np.concatenate((parts["first_order"], parts["dense_linear"]), axis=1)[:, order]
        first += 0.0  # -0.0 (a missing dense value times its weight) reads as 0.0
        return [
            {
                "logit": logit,
                "bias": bias,
                "first_order": dict(zip(names, first_row, strict=True)),
                "fm": dict(zip(embedded, fm_row, strict=True)),
                "dnn": dnn,
                "probability": probability,
            }
            for logit, bias, first_row, fm_row, dnn, probability in zip(
                parts["logit"].tolist(),
                parts["bias"].tolist(),
                first.tolist(),
                parts["fm"].tolist(),
                parts["dnn"].tolist(),
                served.tolist(),
                strict=True,
            )
        ]

    # -- streamed updates (app.store.updates; app.follower reads them)

    @property
    def update_number(self) -> int:
        return 0 if self.update is None else self.update.number

    @property
    def made_by(self) -> str:
        """The checkpoint whose weights are served: the base's, or the last update's."""
        return self.checkpoint.version if self.update is None else self.update.checkpoint

    def check_update(self, update: Update, jump: bool = False) -> None:
        """Raise UpdateRefused unless ``update`` is the next one of what is served (any
        later one when ``jump``) and fits this model."""
        served = self.checkpoint.version
        if update.base != served:
            raise UpdateRefused(f"update {update.number} is of {update.base}, not {served}")
        if not jump and update.number != self.update_number + 1:
            raise UpdateRefused(f"update {update.number} does not follow {self.version}")
        if jump and update.number <= self.update_number:
            raise UpdateRefused(f"update {update.number} is not past {self.version}")
        if not jump and update.parent != self.made_by:
            raise UpdateRefused(
                f"update {update.number} was made from {update.parent}, not {self.made_by}"
            )
        width = 1 + self.checkpoint.config.embed_dim
        fields = len(self.features.embedded_fields)
        if len(update.keys) != fields:
            raise UpdateRefused(f"update {update.number}: {len(update.keys)} fields, not {fields}")
        for j, rows in enumerate(update.rows):
            if rows.dtype != np.float32 or (len(rows) and rows.shape[1] != width):
                raise UpdateRefused(
                    f"update {update.number}, field {j}: rows of shape {rows.shape} "
                    f"({rows.dtype}), this model's are {width} float32 wide"
                )
        if update.oov is not None and update.oov.shape != (fields, width):
            raise UpdateRefused(f"update {update.number}: OOV rows of shape {update.oov.shape}")
        if update.dense:
            expected = {n: t.shape for n, t in self._model.state_dict().items() if n != TABLES}
            got = {n: t.shape for n, t in update.dense.items()}
            if got != expected:
                raise UpdateRefused(f"update {update.number}: its dense weights do not fit")
        elif jump:
            raise UpdateRefused(f"update {update.number} lacks the dense weights to jump to")
        if jump and update.oov is None:
            raise UpdateRefused(f"update {update.number} lacks the OOV rows to jump to")
        try:
            Calibration.from_json(update.calibration)
        except Exception as exc:
            raise UpdateRefused(f"update {update.number}: its calibration: {exc}") from exc

    def prepare_update(self, update: Update) -> PreparedUpdate:
        """What ``update`` switches to (``check_update`` first), built off the worker
        thread so that ``apply_update`` only swaps it in: the model, around the same
        tables, and the rows per field."""
        return PreparedUpdate(self._model_of(update), update.row_maps())

    def _model_of(self, update: Update) -> DeepFM:
        if not update.dense:
            return self._model
        current = self._model
        table = current.sparse_rows.weight if current.sparse_rows is not None else None
        model = DeepFM(current.config, tables=False, table=table)
        model.load_state_dict(dict(update.dense), strict=False, assign=True)
        return model.eval()

    def apply_update(self, update: Update, prepared: PreparedUpdate, jump: bool = False) -> None:
        """Serve ``update`` (on the batcher's worker thread, between batches: no batch sees
        two updates' weights): the rows to the store, the dense weights and calibration
        swapped, every answer from now named by the update."""
        self.store.apply_update(update, jump, prepared.rows)
        self._model = prepared.model
        self._splits.clear()  # (they hold the weights they were made from)
        self.calibration = Calibration.from_json(update.calibration)
        self.update, self.applied_at = update, time.time()
        self.version = update.version

    def describe(self) -> dict[str, Any]:
        """The metadata /model returns."""
        c = self.checkpoint
        return {
            "model_version": self.version,
            "created_at": c.created_at,
            "fields": [
                {
                    "name": f.name,
                    "kind": f.kind,
                    "transform": f.transform,
                    **({"vocab_size": f.vocab_size} if f.embedded else {}),
                }
                for f in self.features.fields
            ],
            "embed_dim": c.config.embed_dim,
            "hidden_units": list(c.config.hidden_units),
            "metrics": dict(c.metrics),
            "calibration": self.calibration.describe(),
            "embedding_store": self.store.backend,
            "base_version": c.version,
            "update": self._describe_update(),
        }

    def _describe_update(self) -> dict[str, Any] | None:
        """The last update applied: which, when published and applied, and its age."""
        u = self.update
        if u is None:
            return None if self.refused is None else {"number": 0, "refused": self.refused}
        published = datetime.fromisoformat(u.published_at).timestamp()
        return {
            "number": u.number,
            "checkpoint": u.checkpoint,
            "parent": u.parent,
            "rows": u.row_count,
            "published_at": u.published_at,
            "applied_at": datetime.fromtimestamp(self.applied_at or 0, UTC).isoformat(
                timespec="milliseconds"
            ),
            "age_s": round(time.time() - published, 3),
            "refused": self.refused,
        }

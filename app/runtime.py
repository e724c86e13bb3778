"""What the app runs on between start-up and shutdown: the model, its store and the batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch

from app.batching import BatcherClosed, MicroBatcher
from app.config import Settings
from app.embeddings import EmbeddingStore, MemoryStore, Row
from app.errors import NotReady
from app.metrics import Metrics
from app.redisclient import connect
from app.redisstore import RedisStore
from app.serving import ServingModel
from model.checkpoint import Checkpoint, load_checkpoint
from model.deepfm import DeepFM

log = logging.getLogger(__name__)

REDIS_SOCKET_TIMEOUT_S = 10.0

Result = tuple[np.ndarray, str]  # probabilities of one call's rows, and the model's version


def open_store(
    settings: Settings, checkpoint: Checkpoint, model: DeepFM, metrics: Metrics
) -> EmbeddingStore:
    """The embedding store the settings ask for, not yet started."""
    if settings.store == "memory":
        return MemoryStore(checkpoint.features, model, metrics)
    # The client's own socket timeout bounds publishing and probes; each batch's
    # lookups have the tighter CTR_REDIS_TIMEOUT_MS.
    client = connect(settings, timeout_s=REDIS_SOCKET_TIMEOUT_S)
    return RedisStore(checkpoint, model, client, settings, metrics)


class Runtime:
    """The loaded model behind the micro-batcher; created and closed by the app's lifespan."""

    def __init__(self, settings: Settings, metrics: Metrics, model: ServingModel) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self._batcher: MicroBatcher[Sequence[Row], Result] = MicroBatcher(
            self._process, settings.batch_max, name="forward"
        )
        self._closing = False

    @classmethod
    async def start(
        cls, settings: Settings, metrics: Metrics, checkpoint: Checkpoint | None = None
    ) -> Runtime:
        # The event loop needs a core of its own (HTTP parsing and validation): torch gets
        # the others unless told otherwise.
        threads = settings.torch_threads or max(1, (os.cpu_count() or 1) - 1)
        torch.set_num_threads(threads)
        if checkpoint is None:
            checkpoint = await asyncio.to_thread(
                load_checkpoint, settings.model_dir, tables=settings.tables_in_process
            )
        model = checkpoint.build_model()
        checkpoint = dataclasses.replace(checkpoint, state={})  # the model holds the tensors
        store = open_store(settings, checkpoint, model, metrics)
        await store.start()
        serving = ServingModel(checkpoint, model, store, metrics, settings)
        await asyncio.to_thread(serving.predict, [{}])  # the first pass pays one-off costs
        metrics.model_info.labels(serving.version).set(1)
        # Everything loaded so far lives as long as the process: keep the collector from
        # scanning it again and again under load (a full collection of the heap torch and
        # the model leave was a stall of a few hundred ms in the p99).
        gc.collect()
        gc.freeze()
        log.info(
            "serving %s from %s with the %s embedding store (%s) on %d torch threads",
            serving.version,
            checkpoint.path,
            store.backend,
            store.state,
            threads,
        )
        return cls(settings, metrics, serving)

    @property
    def ready(self) -> bool:
        return not self._closing

    async def predict_one(self, features: Row) -> tuple[float, str]:
        probabilities, version = await self._submit([features])
        return float(probabilities[0]), version

    async def predict_many(self, instances: Sequence[Row]) -> tuple[np.ndarray, str]:
        return await self._submit(instances)

    async def _submit(self, rows: Sequence[Row]) -> Result:
        try:
            return await self._batcher.submit(rows)
        except BatcherClosed:
            raise NotReady("the service is shutting down") from None

    def _process(self, calls: Sequence[Sequence[Row]]) -> list[Result]:
        """One batch, on the batcher's worker thread."""
        model = self.model  # one model for the whole batch: its version names every answer
        rows = [row for call in calls for row in call]
        self.metrics.batch_calls.observe(len(calls))
        self.metrics.batch_rows.observe(len(rows))
        probabilities = model.predict(rows)
        results: list[Result] = []
        start = 0
        for call in calls:
            results.append((probabilities[start : start + len(call)], model.version))
            start += len(call)
        return results

    async def close(self) -> None:
        """Answer everything queued, then release the store and the worker thread."""
        self._closing = True
        await self._batcher.close()
        await self.model.store.aclose()
        gc.unfreeze()  # what start froze may be garbage now (a test's app, a replaced model)

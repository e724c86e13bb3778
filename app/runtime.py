"""What the app runs on between start-up and shutdown: the model, its store and the batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from app.batching import BatcherClosed, MicroBatcher
from app.config import Settings
from app.embeddings import EmbeddingStore, MemoryStore, Row
from app.errors import InvalidCheckpoint, NotReady, Overloaded
from app.metrics import Metrics
from app.redisclient import connect
from app.redisstore import RedisStore
from app.serving import Explained, ServingModel
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.deepfm import DeepFM

log = logging.getLogger(__name__)

REDIS_SOCKET_TIMEOUT_S = 10.0

Call = tuple[Sequence[Row], bool]  # a call's rows, and whether it wants explanations
# A call's probabilities, the version of the model that computed them, and explanations.
Result = tuple[np.ndarray, str, list[Explained] | None]


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


async def load_serving_model(
    settings: Settings, metrics: Metrics, checkpoint: Checkpoint
) -> ServingModel:
    """A checkpoint's model with its embedding store started (its rows published in redis
    mode) and one forward pass done, ready to take traffic."""
    model = checkpoint.build_model()
    checkpoint = dataclasses.replace(checkpoint, state={})  # the model holds the tensors
    store = open_store(settings, checkpoint, model, metrics)
    await store.start()
    serving = ServingModel(checkpoint, model, store, metrics, settings)
    await asyncio.to_thread(serving.predict, [{}])  # the first pass pays one-off costs
    return serving


def settle_heap() -> None:
    """Collect, then freeze what is left: it lives as long as the model.

    Keeps the collector from scanning the heap torch and the model leave again and again
    under load (a full collection of it was a stall of a few hundred ms in the p99).
    """
    gc.collect()
    gc.freeze()


class Runtime:
    """The loaded model behind the micro-batcher; created and closed by the app's lifespan.

    ``model`` is replaced whole by ``reload``. A batch reads it once, so every row of a
    batch is scored by one model and answered with that model's version.
    """

    def __init__(self, settings: Settings, metrics: Metrics, model: ServingModel) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self._batcher: MicroBatcher[Call, Result] = MicroBatcher(
            self._process, settings.batch_max, name="forward"
        )
        self._closing = False
        self._reload_lock = asyncio.Lock()

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
        serving = await load_serving_model(settings, metrics, checkpoint)
        settle_heap()
        log.info(
            "serving %s from %s with the %s embedding store (%s) on %d torch threads",
            serving.version,
            serving.checkpoint.path,
            serving.store.backend,
            serving.store.state,
            threads,
        )
        return cls(settings, metrics, serving)

    async def reload(self, directory: Path | None = None) -> tuple[str, str]:
        """Load, verify, publish (redis store) and warm the checkpoint in ``directory``
        (default: CTR_MODEL_DIR), then swap it in; return (new version, old version).

        Calls in flight finish on the model they started with. A checkpoint that does not
        load raises InvalidCheckpoint and the current model keeps serving.
        """
        directory = directory or self.settings.model_dir
        async with self._reload_lock:
            old = self.model
            previous = old.version
            try:
                checkpoint = await asyncio.to_thread(
                    load_checkpoint, directory, tables=self.settings.tables_in_process
                )
                new = await load_serving_model(self.settings, self.metrics, checkpoint)
            except CheckpointError as exc:
                self.metrics.reloads.labels("failed").inc()
                log.error("reload refused, still serving %s: %s", old.version, exc)
                raise InvalidCheckpoint(str(exc)) from None
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                log.exception("reload of %s failed, still serving %s", directory, old.version)
                raise
            self.model = new  # the swap: the next batch reads the new model
            # A batch that started before the swap may still use the old model: once a
            # batch submitted now is done, none does.
            await self._batcher.submit(([], False))
            await old.store.aclose()
            if old.version != new.version:
                self.metrics.model_info.labels(old.version).set(0)
            self.metrics.model_info.labels(new.version).set(1)
            self.metrics.reloads.labels("ok").inc()
            del old
            gc.unfreeze()  # the old model's objects were frozen with the rest
            settle_heap()
            log.info("reloaded: serving %s from %s", new.version, directory)
            return new.version, previous

    @property
    def ready(self) -> bool:
        return not self._closing

    async def predict_one(
        self, features: Row, explain: bool = False
    ) -> tuple[float, str, Explained | None]:
        probabilities, version, explained = await self._submit(([features], explain))
        return float(probabilities[0]), version, explained[0] if explained else None

    async def predict_many(self, instances: Sequence[Row], explain: bool = False) -> Result:
        return await self._submit((instances, explain))

    async def _submit(self, call: Call) -> Result:
        if self._batcher.queued >= self.settings.max_queued:
            self.metrics.overloaded.inc()
            raise Overloaded(f"{self.settings.max_queued} calls are already queued; retry shortly")
        try:
            return await self._batcher.submit(call)
        except BatcherClosed:
            raise NotReady("the service is shutting down") from None

    def _process(self, calls: Sequence[Call]) -> list[Result]:
        """One batch, on the batcher's worker thread: every call's rows in one forward
        pass, but for calls that asked for explanations (a pass of their own each)."""
        model = self.model  # one model for the whole batch: its version names every answer
        rows = [row for call_rows, explain in calls if not explain for row in call_rows]
        self.metrics.batch_calls.observe(len(calls))
        self.metrics.batch_rows.observe(sum(len(call_rows) for call_rows, _ in calls))
        probabilities = model.predict(rows) if rows else np.empty(0)
        results: list[Result] = []
        start = 0
        for call_rows, explain in calls:
            if explain:
                explained, explanations = model.explain(call_rows)
                results.append((explained, model.version, explanations))
                continue
            results.append((probabilities[start : start + len(call_rows)], model.version, None))
            start += len(call_rows)
        return results

    async def close(self) -> None:
        """Answer everything queued, then release the store and the worker thread."""
        self._closing = True
        await self._batcher.close()
        await self.model.store.aclose()
        gc.unfreeze()  # what start froze may be garbage now (a test's app, a replaced model)

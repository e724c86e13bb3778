"""What the app runs on between start-up and shutdown: the model, its store and the batcher."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from app.batching import BatcherClosed, MicroBatcher
from app.config import Settings
from app.errors import InvalidCheckpoint, NotFound, NotReady, Overloaded
from app.follower import UpdateFollower
from app.metrics import Metrics
from app.predlog import PredictionLog, open_prediction_log
from app.serving import Explained, ServingModel
from app.store.base import EmbeddingStore, MemoryStore, Row
from app.store.client import connect, connect_sync
from app.store.redisstore import RedisStore
from model.checkpoint import (
    SPEC_FILE,
    Checkpoint,
    CheckpointError,
    Prepared,
    load_checkpoint,
)
from model.deepfm import DeepFM

log = logging.getLogger(__name__)

REDIS_SOCKET_TIMEOUT_S = 10.0
CHUNKED_ATTEMPTS = 3  # a call of several chunks, scored again when an update split it


class Call(NamedTuple):
    """What the batcher is given: rows to score by one model."""

    model: ServingModel  # the model its request was validated against
    rows: Sequence[Row]
    explain: bool  # also split each logit into parts
    context: Row | None = None  # (a ranking request) fields every row shares


class Result(NamedTuple):
    """A call's answer."""

    probabilities: np.ndarray
    version: str  # of the model that computed them
    explanations: list[Explained] | None


def open_store(
    settings: Settings, checkpoint: Checkpoint, model: DeepFM, metrics: Metrics
) -> EmbeddingStore:
    """The embedding store the settings ask for, not yet started."""
    if settings.store == "memory":
        return MemoryStore(checkpoint.features, model, metrics, settings.id_cache_keys)
    # The loop's client: its own socket timeout bounds publishing and probes. The
    # batches' lookups have a client of their own, with the tighter CTR_REDIS_TIMEOUT_MS.
    client = connect(settings, timeout_s=REDIS_SOCKET_TIMEOUT_S)
    lookups = connect_sync(settings, timeout_s=settings.redis_timeout_ms / 1000)
    return RedisStore(checkpoint, model, client, lookups, settings, metrics)


async def load_serving_model(
    settings: Settings, metrics: Metrics, checkpoint: Checkpoint
) -> ServingModel:
    """A checkpoint's model with its embedding store started (its rows published in redis
    mode) and one forward pass done, ready to take traffic."""
    model = await asyncio.to_thread(checkpoint.build_model)
    checkpoint = dataclasses.replace(checkpoint, state={})  # the model holds the tensors
    store = open_store(settings, checkpoint, model, metrics)
    try:
        await store.start()
        serving = ServingModel(checkpoint, model, store, metrics, settings)
        await asyncio.to_thread(serving.warm)
    except BaseException:  # (cancelled too: a started store has a task and a client)
        await asyncio.shield(store.aclose())
        raise
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

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        model: ServingModel,
        prediction_log: PredictionLog | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self.prediction_log = prediction_log or PredictionLog([], 0.0, 1, metrics)
        self._batcher: MicroBatcher[Call, Result] = MicroBatcher(
            self._process,
            settings.batch_max,
            name="forward",
            rows=lambda call: len(call.rows),
            max_rows=settings.chunk_rows,
        )
        self._closing = False
        self._follower: UpdateFollower | None = None
        self._pending: UpdateFollower | None = None  # a reload's, until its swap
        self._reload_lock = asyncio.Lock()
        # Rows of the calls accepted and not answered yet, and the calls of each model
        # (by id) under way: a replaced model's store closes once it has none.
        self._queued_rows = 0
        self._calls_of: collections.Counter[int] = collections.Counter()
        self._call_ended = asyncio.Condition()

    def _follower_of(self, model: ServingModel) -> UpdateFollower | None:
        """What applies the streamed updates of ``model``'s base version (redis store),
        not started yet."""
        settings = self.settings
        if settings.redis_url is None or not settings.follow_updates:
            return None
        client = connect(settings, timeout_s=REDIS_SOCKET_TIMEOUT_S)
        return UpdateFollower(model, client, self._batcher.between, self.metrics)

    async def _caught_up(self, model: ServingModel) -> UpdateFollower | None:
        """A follower of ``model``'s updates, those already published applied (before
        the model takes traffic), not started."""
        follower = self._follower_of(model)
        if follower is not None:
            try:
                await follower.catch_up()
            except BaseException:
                await asyncio.shield(follower.aclose())
                raise
        return follower

    def _follow(self, model: ServingModel, follower: UpdateFollower | None) -> None:
        """Serve ``model``'s updates as they come (``follower``: ``_caught_up``)."""
        created = model.checkpoint.created_at
        if created and model.update is None:
            self.metrics.published.set(datetime.fromisoformat(created).timestamp())
        self.metrics.update_number.set(model.update_number)
        self._follower = follower
        if follower is not None:
            follower.start()

    async def _unfollow(self) -> None:
        if self._follower is not None:
            await self._follower.aclose()
            self._follower = None

    @classmethod
    async def start(
        cls, settings: Settings, metrics: Metrics, checkpoint: Checkpoint | None = None
    ) -> Runtime:
        threads = settings.threads_per_worker
        torch.set_num_threads(threads)
        if checkpoint is None:
            checkpoint = await asyncio.to_thread(
                load_checkpoint, settings.model_dir, tables=settings.tables_in_process
            )
        serving = await load_serving_model(settings, metrics, checkpoint)
        metrics.serving(serving.version)
        settle_heap()
        log.info(
            "serving %s from %s with the %s embedding store (%s) on %d torch threads",
            serving.version,
            serving.checkpoint.path,
            serving.store.backend,
            serving.store.state,
            threads,
        )
        runtime = cls(settings, metrics, serving, open_prediction_log(settings, metrics))
        try:
            runtime._follow(serving, await runtime._caught_up(serving))
        except BaseException:
            await asyncio.shield(runtime.close())
            raise
        return runtime

    async def reload(self, directory: Path | None = None) -> tuple[str, str]:
        """Load, verify, publish (redis store) and warm the checkpoint in ``directory``
        (default: CTR_MODEL_DIR), then swap it in; return (new version, old version).

        Calls already accepted finish on the model they were validated against. A
        checkpoint that does not load raises InvalidCheckpoint, and a redis-store model
        whose rows could not be published (while the current one's were) raises
        NotReady; either way the current model keeps serving.
        """
        async with self._reload_lock:
            try:
                new = await self._load(directory or self.settings.model_dir)
            except Exception:
                self.metrics.reloads.labels("failed").inc()
                raise
            versions = await self._swap(new)
            self.metrics.reloads.labels("ok").inc()
            return versions

    async def load(self, prepared: Prepared) -> ServingModel:
        """A reload's first half, for a supervisor that switches every worker at once:
        ``load`` in each, then ``swap`` in each once all loaded (or ``discard``).
        Until the swap (or discard) no other reload starts."""
        await self._reload_lock.acquire()
        try:
            return await self._load(prepared)
        except BaseException:
            self._reload_lock.release()
            raise

    async def swap(self, new: ServingModel) -> tuple[str, str]:
        """A reload's second half (see ``load``): serve ``new``; (new, old version)."""
        try:
            return await self._swap(new)
        finally:
            self._reload_lock.release()

    async def discard(self, new: ServingModel) -> None:
        """Drop a model ``load`` returned, keep serving the current one (see ``load``)."""
        try:
            await self._drop_pending()
            await new.store.aclose()
        finally:
            self._reload_lock.release()

    async def _drop_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending.aclose()

    async def _load(self, source: Path | Prepared) -> ServingModel:
        """The checkpoint of ``source`` (a directory, or one the supervisor verified) as a
        model ready to swap in, else an error that says why (nothing changes)."""
        if self._closing:
            raise NotReady("the service is shutting down")
        old = self.model
        directory = source.directory if isinstance(source, Prepared) else source
        if not (directory / SPEC_FILE).is_file():
            log.error(
                "reload refused, still serving %s: no checkpoint at %s", old.version, directory
            )
            raise NotFound(f"no checkpoint at {directory} (no {SPEC_FILE})")
        try:
            checkpoint = await asyncio.to_thread(
                load_checkpoint, source, tables=self.settings.tables_in_process
            )
            new = await load_serving_model(self.settings, self.metrics, checkpoint)
        except (CheckpointError, OSError) as exc:
            log.error("reload refused, still serving %s: %s", old.version, exc)
            raise InvalidCheckpoint(str(exc)) from None
        except Exception:
            log.exception("reload of %s failed, still serving %s", directory, old.version)
            raise
        refusal = None
        if not self.ready:  # (close began while the new model loaded)
            refusal = "the service is shutting down"
        elif new.store.state != "ok" and old.store.state == "ok":
            refusal = f"the rows of {new.version} could not be read from Redis"
        if refusal is not None:
            await new.store.aclose()
            log.error("reload refused, still serving %s: %s", old.version, refusal)
            raise NotReady(f"{refusal}; still serving {old.version}")
        try:  # the updates already published, applied before the swap
            self._pending = await self._caught_up(new)
        except BaseException:
            await asyncio.shield(new.store.aclose())
            raise
        return new

    async def _swap(self, new: ServingModel) -> tuple[str, str]:
        old = self.model
        await self._unfollow()  # (an update of the old base may not apply to the new)
        self.model = new  # the swap: calls validated from now on use the new model
        pending, self._pending = self._pending, None
        self._follow(new, pending)
        await self._retire(old)
        self.metrics.serving(new.checkpoint.version, old.checkpoint.version)
        log.info("reloaded: serving %s from %s", new.version, new.checkpoint.path)
        return new.version, old.version

    async def _retire(self, old: ServingModel) -> None:
        """Close the replaced model's store once no call can use it."""
        # Calls validated before the swap name the old model: the chunks of a big one may
        # still be queued after the swap.
        key = id(old)
        async with self._call_ended:
            await self._call_ended.wait_for(lambda: not self._calls_of[key])
        await old.store.aclose()
        del old
        gc.unfreeze()  # the old model's objects were frozen with the rest
        await asyncio.to_thread(settle_heap)

    @property
    def ready(self) -> bool:
        return not self._closing

    async def predict_one(
        self, model: ServingModel, features: Row, explain: bool = False
    ) -> tuple[float, str, Explained | None]:
        """The probability of one row, by ``model`` (the model its request was validated
        against), and its version."""
        probabilities, version, explained = await self.predict_many(model, [features], explain)
        return float(probabilities[0]), version, explained[0] if explained else None

    async def predict_many(
        self,
        model: ServingModel,
        instances: Sequence[Row],
        explain: bool = False,
        context: Row | None = None,
    ) -> Result:
        """The probabilities of ``instances`` by ``model`` (with ``context``'s fields
        merged into each, when given), and its version. A call of more than
        CTR_CHUNK_ROWS rows is scored a chunk at a time, each chunk queued once the one
        before is done: the calls that arrive meanwhile take turns with it, instead of
        waiting for all of it."""
        rows = len(instances)
        self._admit(rows)
        self._calls_of[id(model)] += 1
        try:
            chunk = self.settings.chunk_rows
            if rows <= chunk:
                return await self._submit(Call(model, instances, explain, context))
            for _ in range(CHUNKED_ATTEMPTS):
                parts = [
                    await self._submit(
                        Call(model, instances[start : start + chunk], explain, context)
                    )
                    for start in range(0, rows, chunk)
                ]
                # A streamed update applied between two chunks: the call is scored again,
                # so that one update computed all of it (and its answer names that one).
                if len({version for _, version, _ in parts}) == 1:
                    break
            else:
                raise NotReady("the model was updated during every attempt; retry")
        finally:
            self._queued_rows -= rows
            self._calls_of[id(model)] -= 1
            if not self._calls_of[id(model)]:
                del self._calls_of[id(model)]
                async with self._call_ended:
                    self._call_ended.notify_all()
        explanations = [e for _, _, part in parts for e in part or ()] if explain else None
        return Result(np.concatenate([p for p, _, _ in parts]), parts[0][1], explanations)

    def _admit(self, rows: int) -> None:
        """503 when the queue is full: in calls, or in rows (an empty queue takes any)."""
        settings = self.settings
        if self._batcher.queued >= settings.max_queued:
            self.metrics.overloaded.inc()
            raise Overloaded(f"{settings.max_queued} calls are already queued; retry shortly")
        if self._queued_rows and self._queued_rows + rows > settings.max_queued_rows:
            self.metrics.overloaded.inc()
            raise Overloaded(
                f"{self._queued_rows} rows are already queued (at most "
                f"{settings.max_queued_rows}); retry shortly"
            )
        self._queued_rows += rows

    async def _submit(self, call: Call) -> Result:
        try:
            return await self._batcher.submit(call)
        except BatcherClosed:
            raise NotReady("the service is shutting down") from None

    def _process(self, calls: Sequence[Call]) -> list[Result]:
        """One batch, on the batcher's worker thread: the calls of each model (one but
        around a reload) in one forward pass, but for calls that asked for explanations
        (a pass of their own each)."""
        self.metrics.batch_calls.observe(len(calls))
        self.metrics.batch_rows.observe(sum(len(call.rows) for call in calls))
        results: list[Result | None] = [None] * len(calls)
        for model in {id(call.model): call.model for call in calls}.values():
            mine = [i for i, call in enumerate(calls) if call.model is model]
            plain = [i for i in mine if not calls[i].explain and calls[i].context is None]
            probabilities = model.score([calls[i].rows for i in plain]) if plain else np.empty(0)
            start = 0
            for i in plain:
                count = len(calls[i].rows)
                results[i] = Result(probabilities[start : start + count], model.version, None)
                start += count
            for i in mine:
                call = calls[i]
                if call.explain:  # a pass of its own, of the rows as they are scored
                    merged: Sequence[Row] = call.rows
                    if call.context is not None:
                        merged = [{**call.context, **row} for row in call.rows]
                    explained, explanations = model.explain(merged)
                    results[i] = Result(explained, model.version, explanations)
                elif call.context is not None:  # a ranking request: the context once
                    results[i] = Result(model.rank(call.context, call.rows), model.version, None)
        return [result for result in results if result is not None]  # (every call has one)

    async def close(self) -> None:
        """Answer everything queued, then release the store and the worker thread."""
        self._closing = True
        async with self._reload_lock:  # a reload under way finishes (or refuses) first
            pass
        try:
            await self._unfollow()
            await self._drop_pending()
            await self._batcher.close()
            await self.model.store.aclose()
        finally:
            if self.prediction_log.sample_rate > 0:  # (sinks to flush: off the loop)
                await asyncio.to_thread(self.prediction_log.close)
        gc.unfreeze()  # what start froze may be garbage now (a test's app, a replaced model)

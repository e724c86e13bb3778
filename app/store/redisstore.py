"""The Redis embedding store: rows from an in-process LRU, then Redis, then the tables.

For a batch, the unique ``(field, value)`` pairs are looked up in the LRU
(``app.store.rowcache``); the misses go to Redis in one pipelined round trip (one per
node of a cluster): an ``EXISTS`` of the version's manifest, then one ``HMGET``
per partition hash (``app.store.layout`` has the layout). A value Redis does not have
is OOV and gets its field's OOV row, which the replica holds; the answer is cached
like any other row.

The forward-pass thread sends the lookups itself, on a synchronous client of its
own whose socket operations give up after ``CTR_REDIS_TIMEOUT_MS``: a batch's
lookups never wait for the event loop, so a loop busy with HTTP is not taken for a
slow Redis. The event loop keeps the rest (start-up, probes, publishing) on an
asyncio client. When Redis fails (down, refusing, too slow, or without this
version's rows) the batch's misses come from the checkpoint tables when the
replica holds them (exact answers, cached), else they get OOV rows (not cached);
the store turns
``degraded`` and logs it once. While degraded, batches do not try Redis: a
watcher on the event loop probes it twice a second, publishes the version again
if Redis lost it, and turns the store ``ok`` again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import redis
import torch

from app.config import Settings
from app.metrics import Metrics
from app.store.base import EmbeddingStore, StoreState
from app.store.client import RedisClient, SyncRedisClient, close_sync
from app.store.layout import (
    ROW_DTYPE,
    SENTINEL,
    Layout,
    check_manifest,
    manifest,
    missing_partitions,
    read_manifest,
)
from app.store.publisher import PublishFailed, publish
from app.store.rowcache import MISS, Key, RowCache
from app.store.updates import AHEAD, Update, keys_by_field, pick_row
from model.checkpoint import TABLES, Checkpoint, load_checkpoint
from model.deepfm import DeepFM
from model.features import Keyed

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 0.5
PROBES_TO_RECOVER = 3  # in a row: a Redis that answers now and then is not back
PROBE_TIMEOUT_S = 2.0  # the first manifest read, at start-up
MAX_BACKOFF_S = 30.0  # between attempts to publish, while they fail

FailureKind = Literal["unavailable", "timeout", "missing_version"]


class MissingVersion(Exception):
    """Redis answers but holds no complete publish of this model version."""


class CorruptRow(Exception):
    """A row in Redis has the wrong size for this model."""


class RedisStore(EmbeddingStore):
    backend = "redis"

    def __init__(
        self,
        checkpoint: Checkpoint,
        model: DeepFM,
        client: RedisClient,
        lookups: SyncRedisClient,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        """``client`` serves the event loop; ``lookups`` the batches' threads (its
        socket time-out is the batch budget, ``CTR_REDIS_TIMEOUT_MS``)."""
        self._loop = asyncio.get_running_loop()
        self._client = client
        self._lookups_client = lookups
        self._features = checkpoint.features
        self._version = checkpoint.version
        self._expected = manifest(checkpoint, settings.redis_partitions)
        self._partitions = settings.redis_partitions
        self._timeout_s = settings.redis_timeout_ms / 1000
        self._oov = checkpoint.oov_rows.numpy().astype(np.float32)
        self._width = self._oov.shape[1]
        self._cache = RowCache(settings.local_cache_rows, self._oov)
        self._applied = 0  # the update of this version served (app.store.updates)
        # Held tables: the rows updates changed or brought, per field (value key -> row).
        self._overlay: list[dict[str, npt.NDArray[np.float32]]] = [
            {} for _ in checkpoint.features.embedded_fields
        ]
        self._layout: Layout | None = None  # known once the manifest was read
        # The tables, when held: the model's own tensor (no copy), for exact fallbacks.
        self._tables: npt.NDArray[np.float32] | None = None
        if model.sparse_rows is not None:
            self._tables = model.sparse_rows.weight.detach().numpy()
        self._offsets = model.offsets.tolist()
        self._checkpoint = checkpoint
        self._tables_of = self._source_of(checkpoint, model)
        # None while Redis serves; else what went wrong first in this episode.
        self._failure: FailureKind | None = "unavailable"
        self._reason = "not connected yet"  # what went wrong last, while degraded
        self._cause = ""  # the kind of failure last logged (see _cause)
        self._started = False  # before start(), "degraded" is no episode of its own
        self._failure_lock = threading.Lock()
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._metrics = metrics
        self._lookups = {t: metrics.lookups.labels(t) for t in ("lru", "redis", "tables")}
        self._hits = {t: metrics.hits.labels(t) for t in ("lru", "redis", "tables")}
        self._fallbacks = {r: metrics.fallbacks.labels(r) for r in get_args(FailureKind)}
        self._missing = metrics.missing

    def _source_of(self, checkpoint: Checkpoint, model: DeepFM) -> Callable[[], Checkpoint]:
        """How to get the tables to publish: the model's, else the checkpoint on disk."""
        if model.sparse_rows is not None:
            held = dataclasses.replace(
                checkpoint, state={TABLES: model.sparse_rows.weight.detach()}
            )
            return lambda: held

        def from_disk() -> Checkpoint:
            loaded = load_checkpoint(checkpoint.path)
            if loaded.version != checkpoint.version:
                raise RuntimeError(
                    f"{checkpoint.path} now holds {loaded.version}, not the {checkpoint.version} "
                    "this replica serves: nothing to publish"
                )
            return loaded

        return from_disk

    # -- the event loop's side: start, watch, publish, close

    async def start(self) -> None:
        """Find (or publish) this version's rows; Redis down leaves the store degraded."""
        try:
            await self._connect(PROBE_TIMEOUT_S)
        except Exception as exc:
            self._degrade("unavailable", f"{type(exc).__name__}: {exc}", _cause(exc))
        else:
            self._recover()
        self._watcher = asyncio.create_task(self._watch(), name="redis-store-watcher")

    async def _connect(self, timeout_s: float, whole: bool = True) -> None:
        """Read this version's manifest within ``timeout_s``, publishing the version first
        when Redis lacks it or (``whole``) any of its partition hashes."""
        found = await asyncio.wait_for(read_manifest(self._client, self._version), timeout_s)
        if found is not None and whole:
            check_manifest(found, self._expected)
            layout = Layout(self._version, int(found["partitions"]))
            fields = len(self._expected["fields"])
            # One EXISTS a hash, pipelined: more than a batch's budget may allow.
            gone = await asyncio.wait_for(
                missing_partitions(self._client, layout, fields), max(timeout_s, PROBE_TIMEOUT_S)
            )
            if gone:  # (publish says how many, and writes them again)
                found = None
        if found is None:
            log.info("%s is not (completely) published in Redis: publishing it", self._version)
            # Under the publish lock, so of the replicas that find the version missing,
            # one loads the tables (when it does not hold them) and the others wait.
            await publish(self._client, self._checkpoint, self._partitions, self._tables_of)
            found = await read_manifest(self._client, self._version)
            if found is None:
                raise MissingVersion(f"{self._version} is still not published")
        check_manifest(found, self._expected)
        self._layout = Layout(self._version, int(found["partitions"]))

    async def _watch(self) -> None:
        """While degraded: probe Redis as a batch would, and end the episode after a few
        probes in a row succeed; back off while publishing fails."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay, successes = PROBE_INTERVAL_S, 0
            while self._failure is not None:
                await asyncio.sleep(delay)
                try:
                    # The batch budget: a Redis too slow for batches is not back. Its hashes
                    # are all checked when a batch found one gone (a node lost its data).
                    await self._connect(
                        self._timeout_s if self._layout else PROBE_TIMEOUT_S,
                        whole=self._failure == "missing_version",
                    )
                except PublishFailed as exc:
                    self._still_degraded(f"publishing failed: {exc.__cause__}", _cause(exc))
                    delay, successes = min(delay * 2, MAX_BACKOFF_S), 0
                except Exception as exc:
                    # Down, refusing, a wrong password, a manifest of another checkpoint:
                    # retried all the same (an operator may fix it), and said once.
                    self._still_degraded(f"{type(exc).__name__}: {exc}", _cause(exc))
                    successes = 0
                else:
                    successes += 1
                    if successes >= PROBES_TO_RECOVER:
                        self._recover()

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        try:
            await self._client.aclose()
        finally:
            # (a batch still reading fails over to the lower tiers)
            await asyncio.to_thread(close_sync, self._lookups_client)

    # -- state, shared by both sides

    @property
    def state(self) -> StoreState:
        return "ok" if self._failure is None else "degraded"

    @property
    def reason(self) -> str | None:
        return None if self._failure is None else self._reason

    def _still_degraded(self, reason: str, cause: str) -> None:
        """A probe failed: /readyz shows why, and a warning says it once per cause (a
        wrong password, a foreign manifest: not what began the episode)."""
        self._reason = reason
        if cause != self._cause:
            self._cause = cause
            log.warning("redis tier still degraded: %s", reason)

    def _degrade(self, kind: FailureKind, detail: str, cause: str) -> None:
        """Enter (or stay in) a degraded episode: logged once, whatever its batches."""
        with self._failure_lock:
            first = self._failure is None or not self._started
            if first:
                self._failure = kind
                self._reason, self._cause = f"{kind}: {detail}", cause
            self._started = True
        self._metrics.store_degraded.set(1)
        if first:
            answer = "the checkpoint tables" if self._tables is not None else "OOV rows"
            log.warning(
                "redis tier degraded (%s: %s): answering from %s until it is back",
                kind,
                detail,
                answer,
            )
        self._loop.call_soon_threadsafe(self._wake.set)

    def _recover(self) -> None:
        with self._failure_lock:
            was, self._failure = self._failure, None
            episode = was is not None and self._started
            self._started = True
        self._metrics.store_degraded.set(0)
        if episode:
            log.warning("redis tier back: %s rows come from Redis again", self._version)

    # -- the worker thread's side: a batch's rows

    def lookup(self, keyed: Keyed) -> torch.Tensor:
        columns, fields = keyed.columns, keyed.field_positions()
        cache = self._cache
        slots = np.empty((len(keyed), len(columns)), dtype=np.int64)
        for c, (j, column) in enumerate(zip(fields, columns, strict=True)):
            slots[:, c] = cache.slots(j, column)
        missed = slots == MISS
        misses = int(np.count_nonzero(missed))
        # A missing value (NOT_A_KEY) is no lookup: it has its OOV slot, never a miss.
        missing = int(np.count_nonzero(slots >= cache.capacity))
        self._missing.inc(missing)
        self._lookups["lru"].inc(slots.size - missing)
        self._hits["lru"].inc(slots.size - missing - misses)
        if not misses:
            return torch.from_numpy(cache.rows(slots))
        out = np.empty((*slots.shape, self._width), dtype=np.float32)
        hit = ~missed
        out[hit] = cache.rows(slots[hit])  # before the misses' rows evict any of them
        # The unique (field, value) pairs missed, and which of them each miss is.
        keys: list[Key] = []
        position: dict[Key, int] = {}
        which = []
        for i, c in zip(*np.nonzero(missed), strict=True):  # row-major, as out[missed]
            key = (fields[c], columns[c][i])
            found = position.get(key)
            if found is None:
                found = position[key] = len(keys)
                keys.append(key)
            which.append(found)
        out[missed] = self._rows_of(keys)[which]
        self._metrics.lru_rows.set(len(cache))
        return torch.from_numpy(out)

    def _rows_of(self, keys: list[Key]) -> npt.NDArray[np.float32]:
        """The rows of cache misses: from Redis, else the tables, else OOV rows."""
        layout = self._layout
        if self._failure is None and layout is not None:
            try:
                rows, absent, ahead = self._from_redis(layout, keys)
            except MissingVersion as exc:
                self._degrade("missing_version", str(exc), _cause(exc))
            except TimeoutError as exc:  # a read, or the whole round trip, past the budget
                budget = f"lookups took over {self._timeout_s * 1000:.0f} ms"
                self._degrade("timeout", budget, _cause(exc))
            except Exception as exc:  # whatever it is, the lower tiers can answer
                log.debug("redis lookup failed", exc_info=True)
                self._degrade("unavailable", f"{type(exc).__name__}: {exc}", _cause(exc))
            else:
                if ahead:  # (not cached: the newest rows, not this update's)
                    kept = [i for i in range(len(keys)) if i not in ahead]
                    self._cache.insert([keys[i] for i in kept], rows[kept], absent[kept])
                else:
                    self._cache.insert(keys, rows, absent)
                return rows
        self._fallbacks[self._failure or "unavailable"].inc()
        if self._tables is None:
            self._metrics.oov.inc(len(keys))
            return self._oov[[j for j, _ in keys]]
        rows, absent = self._from_tables(keys)
        self._cache.insert(keys, rows, absent)  # exact: the same rows Redis would give
        return rows

    def _from_redis(
        self, layout: Layout, keys: list[Key]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], set[int]]:
        """The rows of ``keys`` in Redis as of the update served, which of them are
        absent (OOV), and which are newer than it (not to be cached)."""
        groups: dict[str, list[int]] = {}
        for i, (j, value) in enumerate(keys):
            groups.setdefault(layout.hash_key(j, value), []).append(i)
        requests = [(key, [keys[i][1] for i in members]) for key, members in groups.items()]
        pipe = self._lookups_client.pipeline(transaction=False)
        pipe.exists(layout.manifest_key)
        for key, fields in requests:
            pipe.hmget(key, [SENTINEL, *fields])
        started = time.perf_counter()
        try:
            replies: list[Any] = pipe.execute()
        except redis.TimeoutError as exc:  # a socket operation outlasted the budget
            raise TimeoutError(str(exc)) from exc
        took = time.perf_counter() - started
        self._metrics.redis_latency.observe(took)
        if took > self._timeout_s:  # (each of its reads was within the budget)
            raise TimeoutError(f"the lookups took {took * 1000:.0f} ms")
        if not replies[0]:
            raise MissingVersion(f"Redis holds no complete publish of {self._version}")
        rows = self._oov[[j for j, _ in keys]]  # absent from Redis: OOV
        present: list[int] = []
        packed: list[bytes] = []
        for (key, _), (members, values) in zip(
            requests, zip(groups.values(), replies[1:], strict=True), strict=True
        ):
            if values[0] is None:  # the sentinel: the hash is gone, absence proves nothing
                raise MissingVersion(f"the hash {key} of {self._version} is gone from Redis")
            for i, value in zip(members, values[1:], strict=True):
                if value is not None:
                    present.append(i)
                    packed.append(value)
        ahead: set[int] = set()
        row_bytes = self._width * ROW_DTYPE.itemsize
        blob = b"".join(packed)
        if len(blob) != len(packed) * row_bytes:  # rows written by updates: tagged
            present, packed, ahead = self._as_served(present, packed, row_bytes, keys)
            blob = b"".join(packed)
        self._lookups["redis"].inc(len(keys))
        self._hits["redis"].inc(len(present))
        self._metrics.oov.inc(len(keys) - len(present))
        if packed:
            rows[present] = np.frombuffer(blob, dtype=ROW_DTYPE).reshape(-1, self._width)
        absent = np.ones(len(keys), dtype=bool)
        absent[present] = False
        return rows, absent, ahead

    def _as_served(
        self, present: list[int], packed: list[bytes], row_bytes: int, keys: list[Key]
    ) -> tuple[list[int], list[bytes], set[int]]:
        """Tagged rows as of the update this replica serves (``pick_row``): the rows an
        update wrote before this replica applied it are not used yet. A row whose every
        part is newer (two updates behind) comes from the held tables, which are exact;
        without them it is the newest row, not cached, and counted."""
        kept: list[int] = []
        rows: list[bytes] = []
        ahead: set[int] = set()
        for i, value in zip(present, packed, strict=True):
            try:
                row = pick_row(value, row_bytes, self._applied)
            except ValueError as exc:
                raise CorruptRow(f"{self._version}, {keys[i]}: {exc}") from None
            if row is AHEAD:
                self._metrics.rows_ahead.inc()
                if self._tables is not None:
                    held, absent = self._from_tables([keys[i]])
                    row = None if absent[0] else held[0].astype(ROW_DTYPE).tobytes()
                else:
                    row = value[:row_bytes]
                    ahead.add(i)
            if row is not None:
                kept.append(i)
                rows.append(row)
        return kept, rows, ahead

    def _from_tables(
        self, keys: list[Key]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        assert self._tables is not None
        ids = self._features.vocab_index.find([value for _, value in keys], [j for j, _ in keys])
        rows = self._tables[ids + np.array([self._offsets[j] for j, _ in keys], dtype=np.int64)]
        absent = ids == 0
        if any(self._overlay):  # rows the updates applied changed or brought
            for i, (j, value) in enumerate(keys):
                row = self._overlay[j].get(value)
                if row is not None:
                    rows[i] = row
                    absent[i] = False
        if absent.any():  # (the OOV rows an update brought, or the checkpoint's)
            rows[absent] = self._oov[[j for j, _ in keys]][absent]
        hits = len(keys) - int(np.count_nonzero(absent))
        self._lookups["tables"].inc(len(keys))
        self._hits["tables"].inc(hits)
        self._metrics.oov.inc(len(keys) - hits)
        return rows, absent

    # -- updates (on the worker thread, between batches: see ServingModel.apply_update)

    def apply_update(
        self, update: Update, jump: bool = False, rows: list[dict[str, Any]] | None = None
    ) -> None:
        """Serve ``update``'s rows: cached rows replaced, OOV rows swapped, the held
        tables' overlay extended (by ``rows``: ``update.row_maps()``, made before).
        ``jump``: updates before it were missed (the stream was trimmed): the cache is
        dropped, and the held tables miss those rows."""
        if jump:
            self._cache.clear()
        if update.oov is not None:
            self._oov = update.oov.astype(np.float32)
            self._cache.set_oov(self._oov)
        for j, values, field_rows in keys_by_field(update):
            self._cache.replace(j, values, field_rows)
        if self._tables is not None:
            for overlay, changed in zip(self._overlay, rows or update.row_maps(), strict=True):
                overlay.update(changed)
        self._applied = update.number


def _cause(exc: BaseException) -> str:
    """The kind of a failure, as far as telling an operator twice goes: a time-out, a
    missing version, a failed publish, else the exception's type."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, MissingVersion):
        return "missing_version"
    if isinstance(exc, PublishFailed):
        return "publish"
    return type(exc).__name__

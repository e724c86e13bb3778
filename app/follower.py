"""A replica follows the streamed updates of the base version it serves.

``UpdateFollower`` reads the lineage's stream (``app.store.updates``) from the start,
then blocks on it for new entries: each update is fetched, decoded and checked off
the worker thread, its model built, and then swapped in on the batcher's worker
thread between two batches (``MicroBatcher.between``). Updates apply in order, each
once. When Redis is away the follower retries from the last entry it applied, so a
replica that was disconnected (or restarted: it starts from the base) catches up.
One that finds the updates it needs trimmed from the stream jumps to the oldest
update still there (then applies the rest in order): its row cache is dropped,
and (a warning says so) its held tables miss the rows of the updates it skipped
until a reload. An update that does not follow what is
served, or is malformed, is refused: nothing of it is applied, and the replica
stays where it is (``/model`` says why) until it is reloaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from app.metrics import Metrics
from app.serving import ServingModel
from app.store.client import RedisClient
from app.store.updates import Update, UpdateKeys, UpdateRefused, decode_entry

log = logging.getLogger(__name__)

BLOCK_MS = 1000  # one XREAD waits this long for an entry (the client's timeout is longer)
RETRY_S = 0.5  # after a failed read
MAX_RETRY_S = 30.0  # after failures that are no Redis error, backing off
STOP_WAIT_S = 5 * BLOCK_MS / 1000  # for the task to end once asked to stop
ENTRIES_PER_READ = 16

Between = Callable[[Callable[[], object]], Awaitable[object]]


class UpdateFollower:
    """Applies the updates of ``model``'s base version as they are published."""

    def __init__(
        self, model: ServingModel, client: RedisClient, between: Between, metrics: Metrics
    ) -> None:
        self._model = model
        self._client = client
        self._between = between
        self._metrics = metrics
        self._keys = UpdateKeys(model.checkpoint.version)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()  # (an event: what the loop reads may change)
        self._last_id: bytes | str = "0-0"  # of the last stream entry taken

    async def catch_up(self) -> None:
        """Apply every update already published (before the model takes traffic: a
        replica two or more updates behind cannot read every row exactly). Redis away
        or an update refused: left to the follower's task (``start``)."""
        try:
            while await self._read(block=None):
                pass
        except UpdateRefused as exc:
            self._refuse(exc)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("catching up with the updates of %s failed: %s", self._keys.base, exc)
        except Exception:  # (a bug: the task retries; serving goes on)
            log.exception("catching up with the updates of %s failed", self._keys.base)

    def start(self) -> None:
        """Follow the stream from the last update applied, in a task of its own."""
        if self._model.refused is None:
            self._task = asyncio.create_task(self._run(), name="update-follower")

    async def aclose(self) -> None:
        task = self._task
        if task is not None:
            # Asked to stop, then cancelled: redis-py can swallow the cancellation of a
            # read (its read timeout's clean-up), and the loop would read on; it stops
            # after that read (BLOCK_MS) instead.
            self._stopping.set()
            task.cancel()
            _, pending = await asyncio.wait({task}, timeout=STOP_WAIT_S)
            if pending:
                log.warning("the update follower did not stop in %.0f s: left behind", STOP_WAIT_S)
            else:
                await asyncio.gather(task, return_exceptions=True)  # (its end, collected)
        await self._client.aclose()

    async def _read(self, block: int | None) -> bool:
        """Read (waiting up to ``block`` ms for one) and apply the entries past the last
        one applied; False when there were none."""
        reply: list[Any] = await self._client.xread(  # type: ignore[assignment]
            {self._keys.stream: self._last_id}, count=ENTRIES_PER_READ, block=block
        )
        entries = [entry for _, stream_entries in reply or () for entry in stream_entries]
        for entry_id, fields in entries:
            await self._take(decode_entry(fields))
            self._last_id = entry_id
        return bool(entries)

    async def _run(self) -> None:
        failing: str | None = None
        delay = RETRY_S
        while not self._stopping.is_set():
            try:
                await self._read(block=BLOCK_MS)
            except UpdateRefused as exc:
                self._refuse(exc)
                return
            except (RedisError, OSError, TimeoutError) as exc:
                if failing is None:
                    log.warning("reading the updates of %s failed: %s", self._keys.base, exc)
                failing = type(exc).__name__
                await asyncio.sleep(RETRY_S)
            except Exception:  # a bug: said, and tried again later (never a silent end)
                if self._stopping.is_set():
                    return  # (the batcher closed under an update: the service is stopping)
                log.exception("following the updates of %s failed", self._keys.base)
                failing = "bug"
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_S)
            else:
                delay = RETRY_S
                if failing is not None:
                    log.info("reading the updates of %s again", self._keys.base)
                    failing = None

    def _refuse(self, exc: UpdateRefused) -> None:
        self._model.refused = str(exc)
        self._metrics.updates_refused.inc()
        log.error("update refused, serving %s until a reload: %s", self._model.version, exc)

    async def _take(self, entry: dict[str, str]) -> None:
        try:
            number = int(entry["number"])
        except (KeyError, ValueError) as exc:
            raise UpdateRefused(f"a stream entry without an update number: {entry}") from exc
        served = self._model.update_number
        if number <= served:
            return
        jump = number > served + 1  # the ones between were trimmed from the stream
        blob = await self._client.get(self._keys.blob(number))
        if not isinstance(blob, bytes):
            first = await self._client.xrange(self._keys.stream, count=1)
            if first and int(decode_entry(first[0][1] or {})["number"]) > number:
                return  # trimmed since it was read: the next entry jumps
            raise UpdateRefused(f"update {number} is announced, but its blob is gone from Redis")
        update = await asyncio.to_thread(Update.from_bytes, blob)
        self._model.check_update(update, jump)
        prepared = await asyncio.to_thread(self._model.prepare_update, update)
        await self._between(lambda: self._model.apply_update(update, prepared, jump))
        self._metrics.updates_applied.inc()
        self._metrics.update_number.set(number)
        self._metrics.published.set(datetime.fromisoformat(update.published_at).timestamp())
        if jump:
            log.warning(
                "updates %d..%d of %s were trimmed from the stream: jumped to %s, the row "
                "cache dropped; held tables miss their rows until a reload",
                served + 1,
                number - 1,
                self._keys.base,
                update.version,
            )
        log.info("serving %s (%d rows updated)", update.version, update.row_count)

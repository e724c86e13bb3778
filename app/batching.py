"""The micro-batcher: concurrent calls gathered into one batch, processed one batch at a time.

A single worker task takes the first waiting call and, without waiting for
company, every other call already queued behind it (up to ``max_calls``), and
hands them to ``process`` together. While a batch is processed (the forward pass
runs off the event loop), new calls queue; the next batch takes them all. At low
load a call therefore runs at once; under load batches grow by themselves.

A failure while processing a batch reaches every caller in it. ``close`` stops
taking new calls and drains those already queued before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new calls."""


class MicroBatcher(Generic[T, R]):
    """Gathers calls into batches for ``process``, which returns one result per item."""

    def __init__(
        self, process: Callable[[Sequence[T]], Awaitable[Sequence[R]]], max_calls: int
    ) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self._process = process
        self._max_calls = max_calls
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._closing = False
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (or the exception of its batch)."""
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def close(self) -> None:
        """Take no new calls, finish every queued one, then stop the worker."""
        self._closing = True
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_calls and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._run_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        live = [(item, future) for item, future in batch if not future.done()]
        if not live:
            return  # every caller went away
        try:
            results = await self._process([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)}")
        except Exception as exc:  # every caller of the batch gets the failure
            log.exception("a batch of %d calls failed", len(live))
            for _, future in live:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(live, results, strict=True):
            if not future.done():  # a caller that gave up is simply skipped
                future.set_result(result)

"""The micro-batcher: concurrent calls gathered into one batch, processed one batch at a time.

Callers on the event loop put their item on a queue and await a future. A worker
thread of its own takes the first waiting call and, without waiting for company,
every other call already queued behind it (up to ``max_calls``, and up to
``max_rows`` rows: a call that would pass it opens the next batch), processes them
together (the forward pass, off the event loop), and hands each caller its
result through the loop. While a batch is processed new calls queue; the next
batch takes them all. At low load a call therefore runs at once; under load
batches grow by themselves.

The worker never waits for the event loop to schedule it: a busy loop (parsing
and validating many requests) does not slow the batch cycle, which it does when
the batch loop is itself a task on that loop.

A failure while processing a batch reaches every caller in it. ``close`` stops
taking new calls and drains those already queued before it returns.

``between`` runs a function on the worker thread between two batches, after every
call queued before it: what the batches read (the model's weights, the row cache)
can change there without a lock, and no batch sees half of the change.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class _Between:
    """A function to run on the worker thread between batches (``between``)."""

    def __init__(self, fn: Callable[[], object], future: asyncio.Future[object]) -> None:
        self.fn = fn
        self.future = future


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new calls."""


class MicroBatcher(Generic[T, R]):
    """Gathers calls into batches for ``process``, which returns one result per item.

    ``process`` runs on the batcher's worker thread. Create the batcher on the
    event loop that will submit to it.
    """

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R]],
        max_calls: int,
        name: str = "micro-batcher",
        *,
        rows: Callable[[T], int] = lambda _: 1,
        max_rows: int | None = None,
    ) -> None:
        if max_calls < 1:
            raise ValueError("max_calls must be at least 1")
        self._process = process
        self._max_calls = max_calls
        self._rows = rows
        self._max_rows = max_rows
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def submit(self, item: T) -> R:
        """Queue ``item`` and wait for its result (or the exception of its batch)."""
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        future: asyncio.Future[R] = self._loop.create_future()
        self._queue.put((item, future))
        return await future

    async def between(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the worker thread once the calls queued before it are done, and
        before any queued after it; return its result (or raise its exception)."""
        if self._closing:
            raise BatcherClosed("the service is shutting down")
        future: asyncio.Future[object] = self._loop.create_future()
        self._queue.put(_Between(fn, future))
        return await future

    async def close(self) -> None:
        """Take no new calls, finish every queued one, then stop the worker."""
        if not self._closing:
            self._closing = True
            self._queue.put(_STOP)  # behind every call already queued
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        stop = False
        carried: object = None  # a call that did not fit its batch: it opens the next one
        while not stop:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            rows = 0
            entry = self._queue.get() if carried is None else carried
            carried = None
            while True:
                if entry is _STOP:
                    stop = True
                    break
                if isinstance(entry, _Between):
                    if batch:  # after the batch gathered so far
                        carried = entry
                    else:
                        self._run_between(entry)
                    break
                item_rows = self._rows(entry[0])  # type: ignore[index]
                if batch and self._max_rows is not None and rows + item_rows > self._max_rows:
                    carried = entry
                    break
                batch.append(entry)  # type: ignore[arg-type]
                rows += item_rows
                if len(batch) >= self._max_calls:
                    break
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._run_batch(batch)

    def _run_between(self, task: _Between) -> None:
        try:
            result = task.fn()
        except Exception as exc:
            self._loop.call_soon_threadsafe(_fail, [task.future], exc)
        else:
            self._loop.call_soon_threadsafe(_resolve, [task.future], [result])

    def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        # done() read from this thread can only be stale towards "not done": a caller
        # that gave up meanwhile is skipped again when the results are handed out.
        live = [(item, future) for item, future in batch if not future.done()]
        if not live:
            return
        try:
            results = self._process([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)}")
        except Exception as exc:  # every caller of the batch gets the failure
            log.exception("a batch of %d calls failed", len(live))
            self._loop.call_soon_threadsafe(_fail, [f for _, f in live], exc)
            return
        self._loop.call_soon_threadsafe(_resolve, [f for _, f in live], results)


def _resolve(futures: list[asyncio.Future[R]], results: Sequence[R]) -> None:
    for future, result in zip(futures, results, strict=True):
        if not future.done():
            future.set_result(result)


def _fail(futures: list[asyncio.Future[R]], exc: Exception) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(exc)

import asyncio
import threading
from collections.abc import Sequence

import pytest

from app.batching import BatcherClosed, MicroBatcher

pytestmark = pytest.mark.anyio


class Recorder:
    """A process function (it runs on the batcher's thread) that records its batches and
    can be held back at a gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: int | None = None

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        assert self.gate.wait(timeout=10)
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"boom on {self.fail_on}")
        return [i * 10 for i in items]


async def until(condition: object) -> None:
    """Poll ``condition()`` without sleeping on a timer."""
    for _ in range(100_000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def hold(
    batcher: MicroBatcher[int, int], recorder: Recorder, item: int
) -> asyncio.Future[int]:
    """Submit ``item`` and wait until its batch is being processed, held at the gate."""
    recorder.gate.clear()
    held = asyncio.ensure_future(batcher.submit(item))
    await until(lambda: recorder.batches)
    return held


async def queue(batcher: MicroBatcher[int, int], items: range) -> list[asyncio.Future[int]]:
    """Submit ``items`` and wait until they are all queued behind the held batch."""
    futures = [asyncio.ensure_future(batcher.submit(i)) for i in items]
    await until(lambda: batcher.queued >= len(items))
    return futures


async def test_a_lone_call_runs_at_once() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=8)
    # No timer: the call completes as soon as the worker takes it.
    assert await asyncio.wait_for(batcher.submit(3), timeout=5) == 30
    assert recorder.batches == [[3]]
    await batcher.close()


async def test_calls_queued_during_a_batch_form_the_next_batch() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=4)
    first = await hold(batcher, recorder, 0)
    rest = await queue(batcher, range(1, 10))
    recorder.gate.set()
    assert await first == 0
    assert await asyncio.gather(*rest) == [i * 10 for i in range(1, 10)]
    assert recorder.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    await batcher.close()


async def test_a_failed_batch_fails_every_caller_in_it_and_only_them() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=8)
    blocker = await hold(batcher, recorder, 100)
    doomed = await queue(batcher, range(5))
    recorder.fail_on = 3
    recorder.gate.set()
    assert await blocker == 1000
    results = await asyncio.gather(*doomed, return_exceptions=True)
    assert all(isinstance(r, ValueError) and "boom on 3" in str(r) for r in results)
    assert await batcher.submit(7) == 70  # the batcher goes on after a failure
    await batcher.close()


async def test_a_caller_that_gives_up_does_not_break_the_batch() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=8)
    blocker = await hold(batcher, recorder, 1)
    quitter, stayer = await queue(batcher, range(2, 4))
    quitter.cancel()
    await asyncio.sleep(0)
    recorder.gate.set()
    assert await blocker == 10 and await stayer == 30
    assert recorder.batches[-1] == [3]
    await batcher.close()


async def test_close_drains_queued_calls_then_refuses_new_ones() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=2)
    held = await hold(batcher, recorder, 0)
    pending = await queue(batcher, range(1, 5))
    closing = asyncio.ensure_future(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(BatcherClosed):
        await batcher.submit(9)
    recorder.gate.set()
    await closing
    assert [await p for p in [held, *pending]] == [0, 10, 20, 30, 40]


async def test_a_process_returning_the_wrong_count_fails_the_batch() -> None:
    def short(items: Sequence[int]) -> list[int]:
        return []

    batcher = MicroBatcher(short, max_calls=4)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        await batcher.submit(1)
    await batcher.close()


async def test_max_calls_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_calls"):
        MicroBatcher(lambda items: list(items), max_calls=0)


async def test_between_runs_after_the_calls_before_it_and_before_those_after() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_calls=8)
    first = await hold(batcher, recorder, 0)
    before = await queue(batcher, range(1, 3))
    seen: list[list[list[int]]] = []
    change = asyncio.ensure_future(batcher.between(lambda: seen.append(list(recorder.batches))))
    await until(lambda: batcher.queued >= 3)
    after = [asyncio.ensure_future(batcher.submit(i)) for i in range(3, 5)]
    await until(lambda: batcher.queued >= 5)
    recorder.gate.set()
    await asyncio.gather(first, *before, change, *after)
    # Calls 1 and 2 formed a batch of their own: the change cut it short.
    assert seen == [[[0], [1, 2]]]
    assert recorder.batches == [[0], [1, 2], [3, 4]]
    await batcher.close()


async def test_between_hands_back_the_result_or_the_exception() -> None:
    batcher = MicroBatcher(Recorder(), max_calls=8)
    assert await batcher.between(lambda: threading.current_thread().name) == "micro-batcher"

    def broken() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await batcher.between(broken)
    assert await batcher.submit(1) == 10  # the worker lives on
    await batcher.close()
    with pytest.raises(BatcherClosed):
        await batcher.between(lambda: None)

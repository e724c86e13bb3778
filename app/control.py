"""The control channel between the supervisor and each worker: JSON lines over a Unix
socket pair, and the worker's end of it.

Worker -> supervisor:
  {"op": "ready", "version": v}                      serving, after start-up
  {"op": "reload", "ref": r, "model_dir": p | null}  POST /admin/reload, to switch everyone
  {"op": "loaded" | "load_failed", "id": i, ...}     the answers to "load"
  {"op": "swapped", "id": i, "version": v}           the answer to "swap"
Supervisor -> worker:
  {"op": "load", "id": i, "prepared": {...}}         load a verified checkpoint, keep it aside
  {"op": "swap" | "discard", "id": i}                serve it now / drop it
  {"op": "reloaded", "ref": r, "status": s, "body": {...}}  how the reload asked for ended

A reload is two phases so that every worker switches or none does: each loads (and
warms, and in redis mode publishes) the new model beside the old; once all have, each
swaps. The worker whose end closes (its supervisor is gone) stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.errors import (
    InvalidCheckpoint,
    NotFound,
    NotReady,
    ReloadIncomplete,
    ServiceError,
)
from app.runtime import Runtime
from app.serving import ServingModel
from model.checkpoint import Prepared

log = logging.getLogger(__name__)

Message = dict[str, Any]
LINE_LIMIT = 16 << 20  # a message's longest line (a refusal's detail can be long)
# The statuses a reload may end with, as the worker that was asked answers them.
REFUSALS: dict[int, type[ServiceError]] = {
    e.status_code: e for e in (NotFound, InvalidCheckpoint, NotReady, ReloadIncomplete)
}


def encode(message: Message) -> bytes:
    return orjson.dumps(message) + b"\n"


def decode_lines(buffer: bytearray) -> list[Message]:
    """The complete lines at the start of ``buffer``, decoded, and removed from it."""
    end = buffer.rfind(b"\n")
    if end < 0:
        return []
    lines = bytes(buffer[: end + 1]).splitlines()
    del buffer[: end + 1]
    return [orjson.loads(line) for line in lines if line]


class SupervisorLink:
    """The worker's end: tells the supervisor it is ready, forwards reloads to it, and
    carries out its load / swap / discard orders on the runtime."""

    def __init__(self, sock: socket.socket, answer_timeout_s: float) -> None:
        self._sock = sock
        self._answer_timeout_s = answer_timeout_s
        self._runtime: Runtime | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: dict[int, asyncio.Future[Message]] = {}
        self._refs = itertools.count(1)
        self._loaded: dict[int, ServingModel] = {}

    async def start(self, runtime: Runtime, on_lost: Callable[[], None]) -> None:
        """Say ready (with the version served) and take orders until the channel closes;
        then ``on_lost`` (the worker stops: nobody supervises it)."""
        self._runtime = runtime
        reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=LINE_LIMIT)
        self._reader_task = asyncio.create_task(self._read(reader, runtime, on_lost))
        await self._send({"op": "ready", "version": runtime.model.version})

    async def reload(self, directory: Path | None) -> dict[str, Any]:
        """Ask the supervisor to switch every worker to ``directory`` (default:
        CTR_MODEL_DIR); its answer's body, or the ServiceError it ended with."""
        ref = next(self._refs)
        answer = self._answers[ref] = asyncio.get_running_loop().create_future()
        try:
            target = None if directory is None else str(directory)
            await self._send({"op": "reload", "ref": ref, "model_dir": target})
            async with asyncio.timeout(self._answer_timeout_s):
                message = await answer
        except TimeoutError:
            raise NotReady(
                f"the supervisor did not answer within {self._answer_timeout_s:.0f} s"
            ) from None
        finally:
            self._answers.pop(ref, None)
        status = message["status"]
        if status == 200:
            return message["body"]  # type: ignore[no-any-return]
        raise REFUSALS.get(status, NotReady)(message["detail"])

    async def aclose(self) -> None:
        """Stop taking orders; a model loaded and not swapped yet is dropped (the worker
        stops: a reload under way must not hold up its shutdown)."""
        for task in (self._reader_task, *self._tasks):
            if task is not None:
                task.cancel()
        for future in self._answers.values():
            if not future.done():
                future.set_exception(NotReady("the service is shutting down"))
        while self._loaded and self._runtime is not None:
            _, model = self._loaded.popitem()
            await self._runtime.discard(model)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()

    async def _send(self, message: Message) -> None:
        assert self._writer is not None
        self._writer.write(encode(message))
        await self._writer.drain()

    async def _read(
        self, reader: asyncio.StreamReader, runtime: Runtime, on_lost: Callable[[], None]
    ) -> None:
        try:
            while line := await reader.readline():
                message = orjson.loads(line)
                if message["op"] == "reloaded":
                    answer = self._answers.get(message["ref"])
                    if answer is not None and not answer.done():
                        answer.set_result(message)
                    continue
                # An order runs beside the reader: the answer to this worker's own reload
                # arrives while it loads.
                task = asyncio.create_task(self._obey(message, runtime))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (OSError, ConnectionError):
            pass
        except Exception:  # (a line it cannot read: the channel is no use any more)
            log.exception("the supervisor's channel broke")
        log.warning("the supervisor is gone: stopping")
        on_lost()

    async def _obey(self, order: Message, runtime: Runtime) -> None:
        op, key = order["op"], order["id"]
        if op == "load":
            prepared = Prepared.from_json(order["prepared"])
            failed = {"op": "load_failed", "id": key}
            try:
                self._loaded[key] = await runtime.load(prepared)
            except ServiceError as exc:
                await self._send({**failed, "status": exc.status_code, "detail": exc.detail})
            except Exception as exc:  # (logged by the runtime)
                await self._send({**failed, "status": 503, "detail": repr(exc)})
            else:
                await self._send({"op": "loaded", "id": key})
        elif op == "swap" and key in self._loaded:
            version, _ = await runtime.swap(self._loaded.pop(key))
            await self._send({"op": "swapped", "id": key, "version": version})
        elif op == "discard" and key in self._loaded:
            await runtime.discard(self._loaded.pop(key))

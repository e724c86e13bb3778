"""The prediction log: a sampled record of what was served, one record per scored row,
for joining with the clicks that followed (``python -m model.join``), so that the next
model trains on the features exactly as they were served.

A call is sampled whole, with probability ``CTR_LOG_SAMPLE_RATE`` (0: off, the
default). Each record is one JSON object::

    {"request_id": "...", "row": 0, "time": 1765123456.789, "model_version": "deepfm-...",
     "endpoint": "/predict_many", "features": {"C1": "05db9164", "I1": 3},
     "probability": 0.1408}

``features`` are the row's fields as the caller sent them (for /rank, the context
merged into the candidate); ``row`` is the row's index in the call (the candidate's,
for /rank). Sinks:

- ``CTR_LOG_DIR``: JSON-lines files, ``predictions-<pid>.jsonl`` (one per process: a
  worker never shares a file), rotated by size (``CTR_LOG_MAX_BYTES``) into ``.1``,
  ``.2``, ... keeping ``CTR_LOG_BACKUPS`` of them;
- ``CTR_LOG_STREAM``: a Redis stream (on ``CTR_REDIS_URL``), entries of up to 100
  records under the field ``records`` (JSON lines), holding at most about
  ``CTR_LOG_STREAM_MAXLEN`` records (``StreamSink``);
  ``python -m app.predlog export --out FILE [--after ID]`` appends its records to a
  JSON-lines file ``model.join`` reads.

Logging never blocks or fails a request. The endpoint hands the call to a bounded
buffer per sink (``CTR_LOG_QUEUE_ROWS`` rows) and returns; a thread per sink wakes every
``FLUSH_S`` (not per call: a wake-up per call contends for the GIL with the event loop
at every request), encodes what is queued and writes it in one go. A full buffer, or
a sink that fails (a full or read-only disk, Redis down), drops records, counted in
``ctr_prediction_log_dropped_total{sink,reason}``; the sink is tried again after a
pause.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import numpy.typing as npt
import orjson

from app.config import Settings
from app.metrics import Metrics
from app.store.client import close_sync, connect_sync

log = logging.getLogger(__name__)

Row = Mapping[str, Any]
RETRY_S = 1.0  # how long a failed sink rests before it is tried again
STREAM_TIMEOUT_S = 2.0  # a stream write's socket time-out (the writer thread's, not a call's)
STREAM_FIELD = "records"  # an entry's records, JSON lines
ENTRY_RECORDS = 100  # most records in one stream entry
FLUSH_S = 0.05  # a writer wakes this often (or when its buffer is half full), not per call
EXPORT_PAGE = 10_000  # stream entries read at a time by an export


@dataclass(slots=True)
class Served:
    """One call's rows and answers, as an endpoint hands them over."""

    request_id: str
    time: float
    endpoint: str
    model_version: str
    rows: Sequence[Row]
    probabilities: npt.NDArray[np.float64]
    context: Row | None = None  # /rank: merged into every row
    _records: list[bytes] | None = None

    def records(self) -> list[bytes]:
        """One JSON line (no newline) per row, encoded once for every sink."""
        if self._records is None:
            head = {
                "request_id": self.request_id,
                "time": self.time,
                "model_version": self.model_version,
                "endpoint": self.endpoint,
            }
            context = self.context
            self._records = [
                orjson.dumps(
                    {
                        **head,
                        "row": i,
                        "features": row if context is None else {**context, **row},
                        "probability": probability,
                    }
                )
                for i, (row, probability) in enumerate(
                    zip(self.rows, self.probabilities.tolist(), strict=True)
                )
            ]
        return self._records


class Sink(Protocol):
    name: str

    def write(self, records: list[bytes]) -> None:
        """Write every record, or raise (the caller counts them dropped)."""

    def close(self) -> None: ...


class FileSink:
    """JSON lines in ``directory``/predictions-<pid>.jsonl, rotated by size."""

    name = "file"

    def __init__(self, directory: Path, max_bytes: int, backups: int) -> None:
        self.path = directory / f"predictions-{os.getpid()}.jsonl"
        self._max_bytes = max_bytes
        self._backups = backups
        self._file: IO[bytes] | None = None

    def write(self, records: list[bytes]) -> None:
        """Append whole lines: a write that fails midway (a full disk) is cut back to
        where it began, so no record is left half written and none glued to the next."""
        data = b"".join(record + b"\n" for record in records)
        try:
            if self._file is None:
                self._file = self._open()
            size = os.fstat(self._file.fileno()).st_size
            if size and size + len(data) > self._max_bytes:
                self._rotate()
                size = 0
            assert self._file is not None
            try:
                view = memoryview(data)
                while view:
                    view = view[self._file.write(view) or 0 :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._file.fileno(), size)
                raise
        except OSError:
            self.close()  # (opened again on the next write)
            raise

    def _open(self) -> IO[bytes]:
        """The log file, unbuffered, appending; a last line left unfinished (a process
        killed mid-write, a failed cut) is ended first, so the next record stands alone."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = self.path.open("a+b", buffering=0)
        size = os.fstat(file.fileno()).st_size
        if size:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                file.write(b"\n")
        return file

    def _rotate(self) -> None:
        """predictions.jsonl -> .1 -> .2 ... (the oldest past ``backups`` removed)."""
        self.close()
        for n in range(self._backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            newer = self.path.with_name(f"{self.path.name}.{n - 1}") if n > 1 else self.path
            if newer.exists():
                if n == self._backups:
                    older.unlink(missing_ok=True)
                newer.rename(older)
        if self._backups == 0:
            self.path.unlink(missing_ok=True)
        self._file = self._open()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            # (what it could not flush is counted dropped by the write that failed)
            with contextlib.suppress(OSError):
                file.close()


class StreamSink:
    """A Redis stream of at most about ``maxlen`` records: entries of up to
    ``ENTRY_RECORDS`` records each (JSON lines), so a write is a command per hundred
    records, not per record, and the stream is trimmed (``MAXLEN ~``) to
    ``maxlen / ENTRY_RECORDS`` entries. At low traffic, when an entry holds fewer
    records, the stream keeps fewer; it never holds many more."""

    name = "redis"

    def __init__(self, client: Any, key: str, maxlen: int) -> None:
        self._client = client
        self._key = key
        self._entries = max(1, maxlen // ENTRY_RECORDS)

    def write(self, records: list[bytes]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(records), ENTRY_RECORDS):
            entry = b"\n".join(records[start : start + ENTRY_RECORDS])
            pipe.xadd(self._key, {STREAM_FIELD: entry}, maxlen=self._entries, approximate=True)
        pipe.execute()

    def close(self) -> None:
        close_sync(self._client)


class _Buffer:
    """Calls waiting for a sink, bounded in rows."""

    def __init__(self, capacity_rows: int) -> None:
        self._capacity = capacity_rows
        self._calls: collections.deque[Served] = collections.deque()
        self._rows = 0
        self._closed = False
        self._ready = threading.Condition()

    def put(self, served: Served) -> bool:
        """Queue ``served``; False (nothing queued) when its rows do not fit."""
        with self._ready:
            if self._closed or self._rows + len(served.rows) > self._capacity:
                return False
            self._calls.append(served)
            self._rows += len(served.rows)
            if self._rows * 2 > self._capacity:  # else the writer's next wake-up takes it
                self._ready.notify()
            return True

    def take(self) -> list[Served] | None:
        """Every queued call, after a pause of ``FLUSH_S`` (cut short when the buffer is
        half full or closing); None once closed and empty."""
        with self._ready:
            if not self._closed:
                self._ready.wait(FLUSH_S)
            if not self._calls:
                return None if self._closed else []
            calls = list(self._calls)
            self._calls.clear()
            self._rows = 0
            return calls

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()


class PredictionLog:
    """Samples calls and hands them to every sink's writer thread."""

    def __init__(
        self, sinks: Sequence[Sink], sample_rate: float, queue_rows: int, metrics: Metrics
    ) -> None:
        self.sample_rate = sample_rate if sinks else 0.0
        self._random = random.Random()
        self._written = {s.name: metrics.log_records.labels(s.name) for s in sinks}
        self._dropped = metrics.log_dropped
        self._writers: list[tuple[Sink, _Buffer, threading.Thread]] = []
        for sink in sinks:
            buffer = _Buffer(queue_rows)
            thread = threading.Thread(
                target=self._run, args=(sink, buffer), name=f"log-{sink.name}", daemon=True
            )
            self._writers.append((sink, buffer, thread))
        for _, _, thread in self._writers:
            thread.start()

    def offer(
        self,
        request_id: str,
        endpoint: str,
        model_version: str,
        rows: Sequence[Row],
        probabilities: npt.NDArray[np.float64],
        context: Row | None = None,
    ) -> None:
        """Log a call's rows if it is sampled. Never blocks, never raises for a sink."""
        rate = self.sample_rate
        if rate <= 0.0 or (rate < 1.0 and self._random.random() >= rate):
            return
        served = Served(
            request_id, time.time(), endpoint, model_version, rows, probabilities, context
        )
        for sink, buffer, _ in self._writers:
            if not buffer.put(served):
                self._dropped.labels(sink.name, "queue_full").inc(len(rows))

    def _run(self, sink: Sink, buffer: _Buffer) -> None:
        written = self._written[sink.name]
        resting_until = 0.0
        while (calls := buffer.take()) is not None:
            if not calls:
                continue
            count = sum(len(c.rows) for c in calls)
            if time.monotonic() < resting_until:  # the sink failed a moment ago
                self._dropped.labels(sink.name, "sink_error").inc(count)
                continue
            try:
                sink.write([record for call in calls for record in call.records()])
            except Exception as exc:  # a full disk, Redis down: drop, rest, try again
                self._dropped.labels(sink.name, "sink_error").inc(count)
                resting_until = time.monotonic() + RETRY_S
                log.warning(
                    "prediction log: the %s sink failed (%s: %s); %d records dropped",
                    sink.name,
                    type(exc).__name__,
                    exc,
                    count,
                )
            else:
                written.inc(count)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to ``timeout_s``), then close the sinks."""
        for _, buffer, _ in self._writers:
            buffer.close()
        deadline = time.monotonic() + timeout_s
        for sink, _, thread in self._writers:
            thread.join(max(0.0, deadline - time.monotonic()))
            if not thread.is_alive():
                sink.close()


def open_prediction_log(settings: Settings, metrics: Metrics) -> PredictionLog:
    """The prediction log the settings ask for (with no sinks when it is off)."""
    sinks: list[Sink] = []
    if settings.log_sample_rate > 0:
        if settings.log_dir is not None:
            sinks.append(FileSink(settings.log_dir, settings.log_max_bytes, settings.log_backups))
        if settings.log_stream is not None:
            client = connect_sync(settings, timeout_s=STREAM_TIMEOUT_S)
            sinks.append(StreamSink(client, settings.log_stream, settings.log_stream_maxlen))
    return PredictionLog(sinks, settings.log_sample_rate, settings.log_queue_rows, metrics)


def export_stream(client: Any, key: str, out: Path, after: str | None = None) -> tuple[int, str]:
    """Append the stream's records after entry id ``after`` (all, when None) to the
    JSON-lines file ``out``, which ``model.join`` reads; return how many records, and
    the last entry id (the ``after`` of the next export)."""
    count, last = 0, after or ""
    start = f"({after}" if after else "-"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("ab") as f:
        while entries := client.xrange(key, min=start, count=EXPORT_PAGE):
            for _, fields in entries:
                records = fields[STREAM_FIELD.encode()]
                f.write(records + b"\n")
                count += records.count(b"\n") + 1
            last = entries[-1][0].decode()
            start = f"({last}"
    return count, last


def main(argv: Sequence[str] | None = None) -> None:
    """python -m app.predlog export: the Redis stream sink's records into a file."""
    parser = argparse.ArgumentParser(
        prog="python -m app.predlog",
        description="Export the prediction log's Redis stream (CTR_REDIS_URL, "
        "CTR_LOG_STREAM) to a JSON-lines file that model.join reads.",
    )
    parser.add_argument("command", choices=["export"])
    parser.add_argument("--out", type=Path, required=True, help="JSON-lines file to append to")
    parser.add_argument("--after", default=None, help="export the records after this id only")
    args = parser.parse_args(argv)
    settings = Settings()
    if settings.redis_url is None or settings.log_stream is None:
        parser.error("set CTR_REDIS_URL and CTR_LOG_STREAM")
    client = connect_sync(settings, timeout_s=10.0)
    try:
        count, last = export_stream(client, settings.log_stream, args.out, args.after)
    finally:
        close_sync(client)
    print(f"{count} records appended to {args.out}; next time: --after {last or '<none yet>'}")


if __name__ == "__main__":
    main()

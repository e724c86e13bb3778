"""Prometheus collectors of one app, in a registry of its own (no process-global state).

With several workers (``app.supervisor``) every worker writes its values to files in
one folder (prometheus-client's multiprocess mode, switched on by the supervisor
before anything imports prometheus_client), and ``/metrics`` on any worker reads all
of them: counters and histograms summed over every worker that ever ran (a worker
that exits or is replaced loses nothing), gauges by their ``multiprocess_mode``: the
LRU's rows summed over live workers, "degraded" and the model version as the maximum.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 10000)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # The workers' folder of metric files, in a worker of several (see the module doc).
    multiprocess_dir: Path | None = None

    content_type = CONTENT_TYPE_LATEST

    def exposition(self) -> bytes:
        """The text /metrics answers: this process's, or every worker's."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=str(self.multiprocess_dir))  # type: ignore[no-untyped-call]
        return generate_latest(merged)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("ctr_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "ctr_request_latency_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_calls = Histogram(
            "ctr_batch_calls", "calls per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "ctr_batch_rows", "rows per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.rows_predicted = Counter("ctr_rows_predicted", "rows scored", registry=r)
        self.lookups = Counter(
            "ctr_embedding_lookups", "embedding rows looked up, per tier", ["tier"], registry=r
        )
        self.hits = Counter(
            "ctr_embedding_hits", "embedding rows found, per tier", ["tier"], registry=r
        )
        self.oov = Counter(
            "ctr_embedding_oov", "values looked up and not found: their field's OOV row", registry=r
        )
        self.missing = Counter(
            "ctr_embedding_missing",
            "embedded fields missing or null in a row (their OOV row; not lookups)",
            registry=r,
        )
        self.fallbacks = Counter(
            "ctr_embedding_fallbacks",
            "batches answered by a lower tier after a failure",
            ["reason"],
            registry=r,
        )
        self.redis_latency = Histogram(
            "ctr_redis_lookup_seconds",
            "one batch's Redis round trip (LRU misses), as the forward-pass worker waits for it",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.lru_rows = Gauge(
            "ctr_lru_rows",
            "embedding rows in the in-process LRU (of every worker)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.store_degraded = Gauge(
            "ctr_embedding_store_degraded",
            "1 while the embedding store answers from a lower tier (Redis unavailable)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "ctr_model_reloads", "model reloads, by outcome (ok, failed)", ["outcome"], registry=r
        )
        self.worker_deaths = Counter(
            "ctr_worker_deaths",
            "worker processes that died and were replaced (several workers)",
            registry=r,
        )
        self.overloaded = Counter(
            "ctr_overloaded", "calls refused with 503 because the queue was full", registry=r
        )
        self.errors = Counter("ctr_errors", "errors answered, by kind", ["kind"], registry=r)
        self.log_records = Counter(
            "ctr_prediction_log_records",
            "prediction log records written, by sink",
            ["sink"],
            registry=r,
        )
        self.log_dropped = Counter(
            "ctr_prediction_log_dropped",
            "prediction log records dropped, by sink and reason (queue_full, sink_error)",
            ["sink", "reason"],
            registry=r,
        )
        self.updates_applied = Counter(
            "ctr_model_updates_applied",
            "streamed model updates applied (app.store.updates)",
            registry=r,
        )
        self.updates_refused = Counter(
            "ctr_model_updates_refused",
            "streamed model updates refused (malformed, or not following what is served)",
            registry=r,
        )
        self.update_number = Gauge(
            "ctr_model_update",
            "the update of the base version served (0: the base itself; of the worker "
            "that changed it last)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.published = Gauge(
            "ctr_model_published_timestamp_seconds",
            "when what is served (the base's checkpoint, or its last update applied) was "
            "made: staleness is time() minus this (of the worker that changed it last)",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.rows_ahead = Counter(
            "ctr_embedding_rows_ahead",
            "rows read from Redis newer than the update served, with no older part to use "
            "(a replica two updates behind): from the held tables, else the newest, uncached",
            registry=r,
        )
        self.model_info = Gauge(
            "ctr_model_info",
            "the loaded model's base version (value 1; 0: one served before a reload); "
            "ctr_model_update names the streamed update of it served",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )

    def serving(self, version: str, previous: str | None = None) -> None:
        """``ctr_model_info``: ``version`` is served, ``previous`` no longer (its series
        removed; in a worker's file, where series cannot be removed, set to 0)."""
        if previous is not None and previous != version:
            if self.multiprocess_dir is None:
                with contextlib.suppress(KeyError):
                    self.model_info.remove(previous)
            else:
                self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)


class RequestMetricsMiddleware:
    """Counts requests and times them per endpoint: the matched route's template
    (``/v2/models/{name}/infer``), never a raw URL; "other" when no route matched."""

    def __init__(self, app: ASGIApp, metrics: Metrics, endpoints: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        # Label children bound once (a labels() lookup takes a lock), the request counters'
        # as each (endpoint, status) first occurs.
        self.latency = {e: metrics.latency.labels(e) for e in (*endpoints, "other")}
        self.counters: dict[tuple[str, int], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # The router records the route it matched in the scope; a request refused
            # before routing (the body limit) is known by its path when that is a route's.
            template = getattr(scope.get("route"), "path", None) or scope["path"]
            endpoint = template if template in self.latency else "other"
            self.latency[endpoint].observe(time.perf_counter() - started)
            counter = self.counters.get((endpoint, status))
            if counter is None:
                counter = self.counters[endpoint, status] = self.metrics.requests.labels(
                    endpoint, str(status)
                )
            counter.inc()

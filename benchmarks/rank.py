"""Ranking requests and binary tensors, against the calls they replace, in one run.

    python -m benchmarks.rank [--duration 10] [--repeats 3]

On the service as users start it (``python -m app``, its defaults: a worker per
core), with real Criteo rows:

  1. rows/s of /rank with one context (the 13 dense and 13 of the sparse fields) x
     500 candidates (the other 13 sparse fields), of /predict_many with the same
     rows expanded, and of in-process encode + forward of the expanded rows (no
     HTTP); 4 client threads keep calls in flight. Target: /rank >= 2x /predict_many.
  2. /rank 1 x 100 at 8 connections (wrk): p50 and p99. Target: p99 <= 15 ms.
  3. rows/s of v2 inference, 1,000 rows per call, binary tensors (tritonclient's
     default) against JSON tensors. Target: binary >= 1.5x JSON.

Figures are medians of ``--repeats`` runs. Writes benchmarks/results/rank.{json,md}.
Needs wrk (Debian package wrk).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.client
import json
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from app import kserve
from app.config import Settings
from app.metrics import Metrics
from app.runtime import load_serving_model
from benchmarks import report
from benchmarks.serve import in_process_rows_per_s, sample_rows, service, wrk
from model.checkpoint import load_checkpoint
from model.data import CRITEO_DENSE, CRITEO_SPARSE

CANDIDATES = 500
SMALL_CANDIDATES = 100
V2_ROWS = 1000
CLIENTS = 4
CONTEXT_FIELDS = (*CRITEO_DENSE, *CRITEO_SPARSE[:13])


def ranking(rows: list[dict[str, Any]], candidates: int) -> dict[str, Any]:
    """One context (the first row's context fields, a missing one as null) and the
    candidates' other fields."""
    context = {k: rows[0].get(k) for k in CONTEXT_FIELDS}
    own = [
        {k: v for k, v in rows[i % len(rows)].items() if k not in CONTEXT_FIELDS}
        for i in range(candidates)
    ]
    return {"context": context, "candidates": own}


def v2_body(rows: list[dict[str, Any]], binary: bool) -> tuple[bytes, dict[str, str]]:
    """An inference request of ``rows`` as tritonclient builds it (binary or JSON)."""
    inputs, data = [], []
    for name in (*CRITEO_DENSE, *CRITEO_SPARSE):
        dense = name in CRITEO_DENSE
        numbers = [float(row.get(name) or 0.0) for row in rows] if dense else []
        texts = [] if dense else [str(row.get(name) or "") for row in rows]
        values: list[Any] = numbers if dense else texts
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": "FP32" if dense else "BYTES",
            "shape": [len(rows)],
        }
        if binary:
            raw = (
                struct.pack(f"<{len(numbers)}f", *numbers)
                if dense
                else b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
            )
            tensor["parameters"] = {"binary_data_size": len(raw)}
            data.append(raw)
        else:
            tensor["data"] = values
        inputs.append(tensor)
    request: dict[str, Any] = {"inputs": inputs}
    if binary:
        request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(data), {"Inference-Header-Content-Length": str(len(header))}


def rows_per_s(
    url: str, path: str, body: bytes, headers: dict[str, str], rows: int, seconds: float
) -> float:
    """Rows answered per second by CLIENTS threads, each one call at a time."""
    target = urlsplit(url)
    stop = time.monotonic() + seconds
    counts = [0] * CLIENTS

    def client(i: int) -> None:
        connection = http.client.HTTPConnection(target.netloc, timeout=60)
        while time.monotonic() < stop:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{path}: {response.status}")
            counts[i] += rows
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def v2_costs(rows: list[dict[str, Any]], repeats: int = 50) -> dict[str, float]:
    """In process (on the caller's torch threads): the median ms of reading a v2 call of
    ``rows`` (binary and JSON bodies: parse, validate, decode, columns) and of scoring
    its rows (encode + forward), which both forms share."""
    settings, metrics = Settings(), Metrics()
    checkpoint = load_checkpoint(settings.model_dir, tables=settings.tables_in_process)
    model = asyncio.run(load_serving_model(settings, metrics, checkpoint))

    def median_ms(work: Callable[[], object]) -> float:
        work()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            work()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e3

    costs = {}
    for kind in ("binary", "json"):
        body, headers = v2_body(rows, kind == "binary")
        header = headers.get("Inference-Header-Content-Length")
        read = functools.partial(kserve.read_request, body, header, model, settings)
        costs[f"read {kind}"] = median_ms(read)
    _, columns = kserve.read_request(v2_body(rows, False)[0], None, model, settings)
    costs["score"] = median_ms(lambda: model.predict(columns))
    return costs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = sample_rows()
    rank_body = ranking(rows, CANDIDATES)
    expanded = [{**rank_body["context"], **c} for c in rank_body["candidates"]]
    json_headers = {"Content-Type": "application/json"}
    runs: dict[str, list[float]] = {}

    def measure(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory() as tmp, service({}) as served:
        small = Path(tmp) / "rank100.jsonl"
        small.write_text(json.dumps(ranking(rows, SMALL_CANDIDATES)) + "\n")
        bodies = {
            "/rank": json.dumps(rank_body).encode(),
            "/predict_many": json.dumps({"instances": expanded}).encode(),
        }
        v2_rows = [rows[i % len(rows)] for i in range(V2_ROWS)]
        v2 = {kind: v2_body(v2_rows, kind == "binary") for kind in ("binary", "json")}
        path = "/v2/models/ctr/infer"
        for name, body in bodies.items():  # warm up
            rows_per_s(served.url, name, body, json_headers, CANDIDATES, 1)
        for _ in range(args.repeats):
            for name, body in bodies.items():
                rate = rows_per_s(served.url, name, body, json_headers, CANDIDATES, args.duration)
                measure(name, rate)
            for kind, (body, headers) in v2.items():
                measure(
                    f"v2 {kind}",
                    rows_per_s(served.url, path, body, headers, V2_ROWS, args.duration),
                )
            latency = wrk(served.url, "/rank", small, 8, args.duration)
            measure("rank100 p50_ms", latency["p50_ms"])
            measure("rank100 p99_ms", latency["p99_ms"])
            measure("rank100 rps", latency["rps"])
    torch.set_num_threads(1)  # (as each worker runs: one torch thread)
    ceiling = in_process_rows_per_s(expanded, seconds=args.duration)
    costs = v2_costs(v2_rows)
    figures = {name: statistics.median(values) for name, values in runs.items()}
    figures["in-process rows/s"] = ceiling

    rank_ratio = figures["/rank"] / figures["/predict_many"]
    binary_ratio = figures["v2 binary"] / figures["v2 json"]
    targets = {
        "/rank rows/s / /predict_many rows/s": report.target(rank_ratio, ">= 2.0", rank_ratio >= 2),
        "/rank 1x100 at 8 connections, p99 ms": report.target(
            figures["rank100 p99_ms"], "<= 15", figures["rank100 p99_ms"] <= 15
        ),
        "v2 binary rows/s / JSON rows/s": report.target(
            binary_ratio, ">= 1.5", binary_ratio >= 1.5
        ),
    }
    lines = [
        "# Ranking requests and binary tensors",
        "",
        f"Medians of {args.repeats} runs of {args.duration} s on `python -m app` (defaults), "
        f"{CLIENTS} client threads one call at a time each. "
        "Command: `python -m benchmarks.rank`.",
        "",
        "| case | rows/s |",
        "|---|---|",
        f"| /rank, 1 context x {CANDIDATES} candidates | {figures['/rank']:,.0f} |",
        f"| /predict_many, the same {CANDIDATES} rows expanded | {figures['/predict_many']:,.0f} |",
        f"| in process, one thread: encode + forward of the expanded rows | {ceiling:,.0f} |",
        f"| v2 infer, {V2_ROWS} rows a call, binary tensors | {figures['v2 binary']:,.0f} |",
        f"| v2 infer, {V2_ROWS} rows a call, JSON tensors | {figures['v2 json']:,.0f} |",
        "",
        f"/rank 1 x {SMALL_CANDIDATES} at 8 connections (wrk): "
        f"{figures['rank100 rps']:,.0f} calls/s, p50 {figures['rank100 p50_ms']:.2f} ms, "
        f"p99 {figures['rank100 p99_ms']:.2f} ms.",
        "",
        f"What a v2 call of {V2_ROWS} rows costs, in process on one torch thread (median ms): "
        f"reading a binary body {costs['read binary']:.2f}, a JSON body "
        f"{costs['read json']:.2f}; scoring its rows (encode + forward, the same for both) "
        f"{costs['score']:.2f}. Binary can be at most "
        f"{(costs['read json'] + costs['score']) / costs['score']:.2f}x JSON "
        "if its body cost nothing to read.",
        "",
        *report.targets_table(targets, ".2f"),
    ]
    report.publish(
        "rank", {"figures": figures, "runs": runs, "v2_costs_ms": costs, "targets": targets}, lines
    )


if __name__ == "__main__":
    main()

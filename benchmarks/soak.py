"""Soak: a fixed request rate for minutes against the service in redis mode, with Redis
restarted once in the middle.

    python -m benchmarks.soak [--minutes 10] [--rate 200]

The service (``python -m app``, Redis store, tables not held: the replica that
depends most on Redis) serves the bundled model; a Redis server of the
benchmark's own holds its rows. Requests are sent open-loop at ``--rate`` per
second (each is timed from when it was due, so a stall shows in the latency
rather than slowing the load) from this process with asyncio and httpx: a low,
fixed rate that takes a few percent of a core, not a throughput test. Every other
call carries a value never seen before, so the replica asks Redis all along (a
warm cache would hide the restart) and its cache (20,000 rows, full after the
warm-up) keeps evicting. At half
time Redis is stopped and started again, empty (it keeps nothing on disk): the
service must keep answering and publish its rows again by itself.

Reports errors (any non-200 or transport failure; target 0), p50 and p99 per
10-second window, the store's state over time, and the service's RSS at start
(after a one-minute warm-up that fills its cache) and at the end (target:
growth under 5%). Writes benchmarks/results/soak.{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from typing import Any

import httpx
import numpy as np

from benchmarks import report
from benchmarks.datasets import WORK
from benchmarks.redis_tier import rss_mib
from benchmarks.serve import server
from model import default_model
from model.data import criteo_json_rows
from model.synthetic import generate
from tests.redis_servers import RedisServer

WINDOW_S = 10
CACHE_ROWS = 20_000
WARMUP_S = 60


def traffic_rows(count: int) -> list[dict[str, Any]]:
    """Rows like the default model's training data (most values known), 2% altered to
    values it never saw."""
    path = WORK / "soak" / "rows.tsv"
    if not path.exists():
        generate(path, count, default_model.DATA)
    rows = criteo_json_rows(path)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(rows), len(rows) // 50, replace=False).tolist():
        rows[i]["C1"] = f"unseen-{i}"
    return rows


async def load(
    url: str, rows: list[dict[str, Any]], rate: float, seconds: float, events: dict[str, Any]
) -> list[tuple[float, float, int]]:
    """(due time, latency s, status; 0 for a transport failure) of every request."""
    results: list[tuple[float, float, int]] = []
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:

        async def one(i: int, due: float) -> None:
            row = rows[i % len(rows)]
            if i % 2:  # a value never seen before: a cache miss, so Redis is asked all along
                row = {**row, "C3": f"fresh-{i}"}
            try:
                response = await client.post("/predict", json={"features": row})
                status = response.status_code
            except httpx.TransportError:
                status = 0
            results.append((due - start, time.perf_counter() - due, status))

        tasks = set()
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(i, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            events["sent"] = i + 1
        await asyncio.gather(*tasks)
    return results


async def watch(url: str, pid: int, seconds: float, samples: list[dict[str, Any]]) -> None:
    """The replica's RSS and store state every second."""
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while (elapsed := time.perf_counter() - start) < seconds:
            try:
                state = (await client.get("/readyz")).json()["embedding_store"]["state"]
            except httpx.HTTPError:
                state = "unreachable"
            samples.append({"t": elapsed, "rss_mib": rss_mib(pid), "state": state})
            await asyncio.sleep(1.0)


async def restart_redis(redis: RedisServer, at: float, events: dict[str, Any]) -> None:
    await asyncio.sleep(at)
    events["redis_stopped_at"] = at
    await asyncio.to_thread(redis.stop)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(redis.start)
    events["redis_started_at"] = at + 2.0


def slow_on_the_server(url: str, over_s: float = 0.032) -> dict[str, float]:
    """/predict calls and those slower than ``over_s``, by the server's own histogram."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    bucket = f'ctr_request_latency_seconds_bucket{{endpoint="/predict",le="{over_s}"}} '
    count = 'ctr_request_latency_seconds_count{endpoint="/predict"} '
    within = next(float(line[len(bucket) :]) for line in lines if line.startswith(bucket))
    total = next(float(line[len(count) :]) for line in lines if line.startswith(count))
    return {"requests": total, "over_s": over_s, "slower": total - within}


def windows(results: list[tuple[float, float, int]], seconds: float) -> list[dict[str, float]]:
    out = []
    for start in range(0, int(seconds), WINDOW_S):
        inside = [r for r in results if start <= r[0] < start + WINDOW_S]
        latencies = [lat * 1000 for _, lat, status in inside if status == 200]
        out.append(
            {
                "t": start,
                "requests": len(inside),
                "errors": sum(1 for *_, status in inside if status != 200),
                "p50_ms": float(np.percentile(latencies, 50)) if latencies else float("nan"),
                "p99_ms": float(np.percentile(latencies, 99)) if latencies else float("nan"),
            }
        )
    return out


def plot(per_window: list[dict[str, float]], samples: list[dict[str, Any]], events: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    top.plot([w["t"] for w in per_window], [w["p99_ms"] for w in per_window], "o-", label="p99")
    top.plot([w["t"] for w in per_window], [w["p50_ms"] for w in per_window], ".-", label="p50")
    top.set(ylabel="latency (ms)", title="/predict at a fixed rate, redis mode, no tables")
    bottom.plot([s["t"] for s in samples], [s["rss_mib"] for s in samples])
    bottom.set(xlabel="seconds", ylabel="replica RSS (MiB)")
    for ax in (top, bottom):
        ax.axvspan(events["redis_stopped_at"], events["redis_started_at"], color="red", alpha=0.2)
    top.legend()
    fig.savefig(report.RESULTS / "soak.png", dpi=100)
    plt.close(fig)


async def soak(args: argparse.Namespace) -> None:
    seconds = args.minutes * 60
    rows = traffic_rows(20_000)
    work = WORK / "soak"
    redis = RedisServer(work / "redis").start()
    events: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []
    try:
        env = {
            "CTR_LOG_LEVEL": "warning",
            "CTR_REDIS_URL": redis.url,
            "CTR_HOLD_TABLES": "false",
            # Small enough to fill during the warm-up: then it evicts as it admits.
            "CTR_LOCAL_CACHE_ROWS": str(CACHE_ROWS),
        }
        with server("app.main:create_app", env) as (url, pid):
            # The load generator's own collector pauses would show as latency: off.
            gc.collect()
            gc.disable()
            try:
                results, *_ = await asyncio.gather(
                    load(url, rows, args.rate, seconds, events),
                    watch(url, pid, seconds, samples),
                    restart_redis(redis, seconds / 2, events),
                )
            finally:
                gc.enable()
            server_side = slow_on_the_server(url)
    finally:
        redis.stop()

    per_window = windows(results, seconds)
    errors = sum(1 for *_, status in results if status != 200)
    after_warmup = [s["rss_mib"] for s in samples if s["t"] >= WARMUP_S]
    rss_start, rss_end = after_warmup[0], statistics.median(s["rss_mib"] for s in samples[-10:])
    growth = rss_end / rss_start - 1
    degraded = [s["t"] for s in samples if s["state"] == "degraded"]
    targets = {
        "errors": report.target(errors, "== 0", errors == 0),
        "rss_growth": report.target(growth, "< 0.05", growth < 0.05),
    }
    figures = {
        "minutes": args.minutes,
        "rate": args.rate,
        "requests": len(results),
        "errors": errors,
        "events": events,
        "degraded_seconds": [min(degraded), max(degraded)] if degraded else None,
        "rss_first_mib": samples[0]["rss_mib"],
        "rss_start_mib": rss_start,
        "rss_end_mib": rss_end,
        "windows": per_window,
        "server_side": server_side,
        "targets": targets,
    }
    plot(per_window, samples, events)
    p99s = [w["p99_ms"] for w in per_window]
    lines = [
        "# Soak",
        "",
        f"`python -m benchmarks.soak --minutes {args.minutes} --rate {args.rate}`: "
        f"{len(results):,} /predict calls at {args.rate:.0f}/s (open loop, asyncio + httpx "
        "in the benchmark process) against `python -m app` in redis mode without tables, "
        "the bundled model, rows like its training data (2% unseen values) and, in every "
        "other call, a value never seen before (a cache miss: Redis is asked all along), "
        f"a cache of {CACHE_ROWS:,} rows (full after the warm-up). Redis was "
        f"stopped at {events['redis_stopped_at']:.0f} s and started again, empty, at "
        f"{events['redis_started_at']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests | {len(results):,} |",
        f"| errors (non-200 or transport) | {errors} |",
        f"| p99 per 10 s window, median / max | {np.nanmedian(p99s):.1f} / "
        f"{np.nanmax(p99s):.1f} ms |",
        f"| calls over {server_side['over_s'] * 1000:.0f} ms by the server's own clock | "
        f"{server_side['slower']:.0f} of {server_side['requests']:,.0f} |",
        "| store degraded | "
        + (f"{min(degraded):.0f}-{max(degraded):.0f} s" if degraded else "never")
        + " |",
        f"| RSS at start (after {WARMUP_S} s of warm-up) | {rss_start:.0f} MiB |",
        f"| RSS at the end | {rss_end:.0f} MiB ({growth:+.1%}) |",
        f"| RSS right after start-up | {samples[0]['rss_mib']:.0f} MiB |",
        "",
        *report.targets_table(targets, ".3g"),
        "",
        "![p99 and RSS over time; Redis down in red](soak.png)",
    ]
    report.publish("soak", figures, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=200, help="requests per second")
    asyncio.run(soak(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

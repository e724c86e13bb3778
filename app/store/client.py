"""The Redis clients of the embedding store and the publisher: one server or a cluster.

redis-py, with hiredis parsing the replies (installed with it, picked up by
itself): its asyncio client for the event loop's work (start-up, probes,
publishing), and its synchronous client for a batch's lookups, which the
forward-pass thread sends itself. ``redis://``, ``rediss://`` (TLS) and password
URLs work as redis-py reads them (``rediss://:password@host:6380/0?ssl_ca_certs=...``);
``CTR_REDIS_CLUSTER=true`` reads the URL as one node of a Redis Cluster.

The clients never retry by themselves: the store has a time budget per batch and
its own way back from a failure (see ``app.store.redisstore``).
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.cluster
import redis.retry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.config import Settings

RedisClient = redis.asyncio.Redis | redis.asyncio.RedisCluster
SyncRedisClient = redis.Redis | redis.cluster.RedisCluster


def _url_and_options(settings: Settings, timeout_s: float) -> tuple[str, dict[str, Any]]:
    if settings.redis_url is None:
        raise ValueError("CTR_REDIS_URL is not set")
    options = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    return settings.redis_url.get_secret_value(), options


def connect(settings: Settings, timeout_s: float) -> RedisClient:
    """An asyncio client for ``CTR_REDIS_URL`` whose socket operations give up after
    ``timeout_s``. It connects on first use, and again after a failure, by itself."""
    url, options = _url_and_options(settings, timeout_s)
    options["retry"] = Retry(NoBackoff(), 0)
    if settings.redis_cluster:
        return redis.asyncio.RedisCluster.from_url(url, **options)
    return redis.asyncio.Redis.from_url(url, **options)


def connect_sync(settings: Settings, timeout_s: float) -> SyncRedisClient:
    """The same for threads: a synchronous client (its connection pool is thread-safe)."""
    url, options = _url_and_options(settings, timeout_s)
    options["retry"] = redis.retry.Retry(NoBackoff(), 0)
    if settings.redis_cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def close_sync(client: SyncRedisClient) -> None:
    """Close a synchronous client and its sockets. A cluster client made from a URL
    gives each node a pool that its ``close`` leaves connected (redis-py 8.1)."""
    if isinstance(client, redis.cluster.RedisCluster):
        client.disconnect_connection_pools()  # type: ignore[no-untyped-call]
    client.close()

"""The Redis client of the embedding store and the publisher: one server or a cluster.

redis-py's asyncio client, with hiredis parsing the replies (installed with it,
picked up by itself). ``redis://``, ``rediss://`` (TLS) and password URLs work
as redis-py reads them (``rediss://:password@host:6380/0?ssl_ca_certs=...``);
``CTR_REDIS_CLUSTER=true`` reads the URL as one node of a Redis Cluster.

The client never retries by itself: the store has a time budget per batch and
its own way back from a failure (see ``app.store.redisstore``).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from app.config import Settings

RedisClient = Redis | RedisCluster


def connect(settings: Settings, timeout_s: float) -> RedisClient:
    """A client for ``CTR_REDIS_URL`` whose socket operations give up after ``timeout_s``.

    It connects on first use, and again after a failure, by itself.
    """
    if settings.redis_url is None:
        raise ValueError("CTR_REDIS_URL is not set")
    url = settings.redis_url.get_secret_value()
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, **options)
    return Redis.from_url(url, **options)

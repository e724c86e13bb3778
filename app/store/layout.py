"""The layout of a model's rows in Redis, which readers and the publisher share.

A row is the packed little-endian float32 vector ``[w_f[x], V_f[x]_1..k]``. The
rows of model version ``v``, embedded field number ``j`` (in the spec's order) and
value ``x`` live in the hash

    ctr:rows:{v:f<j>:p<p>}    field key(x) -> row,    p = crc32(key(x)) mod partitions

whose braces are a Redis Cluster hash tag: each partition lives on one node, and
a field's partitions spread over the cluster. ``key(x)`` is the value itself, or
a digest of a long one (``model.features.value_key``). Every partition hash also
holds the field ``SENTINEL``, which no value key can be, read with every lookup:
a hash without it is gone (a cluster node that restarted empty, a flush), and
its values cannot be told absent, so nothing read from it is trusted.

``ctr:manifest:v`` (JSON: key format, fields, partitions, row width, row count)
is written after every row (``app.store.publisher``): a version without it is not
published, whatever rows it has.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.store.client import RedisClient
from model.checkpoint import Checkpoint

ROW_DTYPE = np.dtype("<f4")
SENTINEL = "\n"  # a hash field no value key can be (value keys hold no newline)
# 2: long values by digest, a sentinel in every partition. A version published in
# another format is refused by readers (check_manifest) and must be published anew.
KEY_FORMAT = 2


@dataclass(frozen=True)
class Layout:
    """Where the rows of one model version live."""

    version: str
    partitions: int

    @property
    def manifest_key(self) -> str:
        return f"ctr:manifest:{self.version}"

    @property
    def lock_key(self) -> str:
        return f"ctr:lock:{self.version}"

    def hash_key(self, field: int, key: str) -> str:
        """The hash holding value key ``key`` (``value_key``) of field number ``field``."""
        return self.partition_key(field, zlib.crc32(key.encode()) % self.partitions)

    def partition_key(self, field: int, partition: int) -> str:
        return f"ctr:rows:{{{self.version}:f{field}:p{partition}}}"

    def partition_keys(self, fields: int) -> list[str]:
        return [self.partition_key(j, p) for j in range(fields) for p in range(self.partitions)]


def manifest(checkpoint: Checkpoint, partitions: int) -> dict[str, Any]:
    """What a complete publish of ``checkpoint`` records; readers check it field by field."""
    return {
        "version": checkpoint.version,
        "key_format": KEY_FORMAT,
        "fields": [f.name for f in checkpoint.features.embedded_fields],
        "partitions": partitions,
        "row_floats": 1 + checkpoint.config.embed_dim,
        "rows": sum(size - 1 for size in checkpoint.config.vocab_sizes),
    }


async def read_manifest(client: RedisClient, version: str) -> dict[str, Any] | None:
    """The manifest of ``version``, or None when that version is not (completely) published."""
    raw = await client.get(Layout(version, 0).manifest_key)
    if raw is None:
        return None
    found: dict[str, Any] = orjson.loads(raw)
    return found


async def missing_partitions(client: RedisClient, layout: Layout, fields: int) -> list[str]:
    """The partition hashes of a published version that Redis no longer holds."""
    keys = layout.partition_keys(fields)
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.exists(key)
    found = await pipe.execute()
    return [key for key, there in zip(keys, found, strict=True) if not there]


def check_manifest(found: dict[str, Any], expected: dict[str, Any]) -> None:
    """Raise ValueError when a published manifest does not describe the expected rows.

    The partition count may differ: readers use the manifest's.
    """
    for key, value in expected.items():
        if key != "partitions" and found.get(key) != value:
            raise ValueError(
                f"the published manifest of {expected['version']} has {key}={found.get(key)!r}, "
                f"this checkpoint {value!r}"
            )

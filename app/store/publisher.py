"""Publishing a checkpoint's embedding rows to Redis (``app.store.layout`` has where they go).

``ctr:manifest:v`` (JSON: key format, fields, partitions, row width, row count)
is written after every row: a version without it is not published, whatever
rows it has. ``ctr:lock:v`` keeps two publishers of one version from writing at
once; it expires if its holder dies, and the holder renews it as it writes.
Publishing is idempotent: a complete version (a manifest, and every partition
hash there) is never written again; one whose hashes went missing is written
again under the lock, its manifest removed first.

An *update* (``app.store.updates``) writes only what a checkpoint trained from the
served one with ``--init-from`` changed, for the replicas serving its base to apply
without a reload:

    python -m app.publish [--model-dir DIR]     (CTR_REDIS_URL, CTR_REDIS_CLUSTER)
    python -m app.publish --update --from OLD --to NEW
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from redis.exceptions import LockError, RedisError

from app.config import Settings
from app.store.client import RedisClient, connect
from app.store.layout import (
    ROW_DTYPE,
    SENTINEL,
    Layout,
    check_manifest,
    manifest,
    missing_partitions,
    read_manifest,
)
from app.store.updates import (
    Update,
    UpdateKeys,
    UpdateRefused,
    decode_entry,
    diff,
    entry_fields,
    lineage_key,
    tag_row,
    untag_row,
)
from model.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from model.features import value_key

log = logging.getLogger(__name__)

LOCK_TTL_S = 30.0  # a publisher that died holds the lock this long at most
WRITE_BATCH_ROWS = 20_000  # rows per pipeline round trip while publishing
UPDATES_KEPT = 1000  # the updates a lineage's stream keeps for replicas to catch up


class PublishFailed(Exception):
    """Writing a version's rows failed (its cause says why); nothing was marked complete."""


class MissingHash(Exception):
    """A partition hash an update would write to is gone from Redis."""


async def publish(
    client: RedisClient,
    checkpoint: Checkpoint,
    partitions: int,
    tables: Callable[[], Checkpoint] | None = None,
) -> bool:
    """Make sure ``checkpoint``'s rows are published; True when this call wrote them.

    Waits while another publisher holds the version's lock, and returns as soon as
    the version is complete, whoever completed it. ``tables`` gives the checkpoint
    with its tables when ``checkpoint`` lacks them; it is called (on a thread) only
    once this call holds the lock. Raises PublishFailed when writing fails.
    """
    layout = Layout(checkpoint.version, partitions)
    expected = manifest(checkpoint, partitions)
    fields = len(expected["fields"])
    lock = client.lock(layout.lock_key, timeout=LOCK_TTL_S, blocking=True, thread_local=False)
    while True:
        if (found := await read_manifest(client, layout.version)) is not None:
            check_manifest(found, expected)
            if not await missing_partitions(
                client, Layout(layout.version, found["partitions"]), fields
            ):
                return False
        if await lock.acquire(blocking_timeout=1.0):
            break
    try:
        if (found := await read_manifest(client, layout.version)) is not None:
            check_manifest(found, expected)
            # Published, but some of its hashes are gone: write it again, in the layout
            # the replicas already read (the manifest's partition count), and mark it
            # complete again only once every row is back.
            layout = Layout(layout.version, int(found["partitions"]))
            gone = await missing_partitions(client, layout, fields)
            if not gone:
                return False
            log.warning(
                "%d partition hashes of %s are gone (a node restarted empty?): publishing again",
                len(gone),
                layout.version,
            )
            await client.delete(layout.manifest_key)
            expected["partitions"] = layout.partitions
            only: set[str] | None = set(gone)  # the others keep their rows and updates
        else:
            only = None
        started = time.perf_counter()
        try:
            full = checkpoint if tables is None else await asyncio.to_thread(tables)
            await _write_rows(client, full, layout, lock, only)
            del full
            written = set(layout.partition_keys(fields)) if only is None else only
            await _replay_updates(client, layout, written)
            expected["published_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            await client.set(layout.manifest_key, orjson.dumps(expected))
        except Exception as exc:
            raise PublishFailed(f"{layout.version}: {type(exc).__name__}: {exc}") from exc
        log.info(
            "published %d rows of %s in %.1f s",
            expected["rows"],
            layout.version,
            time.perf_counter() - started,
        )
        return True
    finally:
        try:
            await lock.release()
        except LockError:  # it expired meanwhile; the manifest, if written, still counts
            log.warning("the publish lock of %s expired before its release", layout.version)


async def _write_rows(
    client: RedisClient,
    checkpoint: Checkpoint,
    layout: Layout,
    lock: Any,
    only: set[str] | None = None,
) -> None:
    """Every row (of the partition hashes in ``only``, when given) and the sentinels."""
    targets = [
        key
        for key in layout.partition_keys(len(checkpoint.features.embedded_fields))
        if only is None or key in only
    ]
    pipe = client.pipeline(transaction=False)
    for key in targets:
        pipe.hset(key, SENTINEL, b"1")
    pending = len(targets)
    for j, f in enumerate(checkpoint.features.embedded_fields):
        rows = checkpoint.table_rows(j)[1:].numpy().astype(ROW_DTYPE)
        # Reading the values (a server holds the vocabulary index, not them) and packing
        # are slow: on threads, so a replica publishing keeps answering.
        vocab = await asyncio.to_thread(checkpoint.vocabulary, f.name)
        partitioned = await asyncio.to_thread(_partitions, layout, j, vocab.values, rows)
        del rows, vocab
        for key, mapping in partitioned.items():
            if only is not None and key not in only:
                continue
            values = list(mapping.items())
            for start in range(0, len(values), 1000):
                pipe.hset(key, mapping=dict(values[start : start + 1000]))
            pending += len(values)
            if pending >= WRITE_BATCH_ROWS:
                await pipe.execute()
                await lock.reacquire()  # still ours, for another LOCK_TTL_S
                pending = 0
    await pipe.execute()


def _partitions(
    layout: Layout, field: int, values: Sequence[str], rows: np.ndarray
) -> dict[str, dict[bytes, bytes]]:
    """Hash key -> {value key: packed row} for one field."""
    width = rows.shape[1] * ROW_DTYPE.itemsize
    blob = rows.tobytes()
    out: dict[str, dict[bytes, bytes]] = {}
    for i, value in enumerate(values):
        raw = value_key(value).encode()
        key = layout.partition_key(field, zlib.crc32(raw) % layout.partitions)
        out.setdefault(key, {})[raw] = blob[i * width : (i + 1) * width]
    return out


async def publish_update(
    client: RedisClient, old: Checkpoint, new: Checkpoint, kept: int = UPDATES_KEPT
) -> Update:
    """Publish what ``new`` changed from ``old`` as the next update of ``old``'s lineage.

    ``old`` must be a published base version or the checkpoint of its lineage's last
    update. Raises UpdateRefused (nothing written) when it is not, or when ``new`` is
    no warm start of ``old``; PublishFailed when writing fails midway (the rows written
    are tagged with an update no replica applies until it is announced, and a retry
    first takes back those its update does not write again). Publishing an update
    that is already the lineage's last returns it again.
    """
    base, number = await _lineage_of(client, old)
    keys = UpdateKeys(base)
    base_manifest = await read_manifest(client, base)
    if base_manifest is None:
        raise UpdateRefused(f"the base version {base} is no longer published")
    if base_manifest["row_floats"] != 1 + new.config.embed_dim:
        raise UpdateRefused(
            f"rows of {1 + new.config.embed_dim} floats, the base {base} has "
            f"{base_manifest['row_floats']}"
        )
    layout = Layout(base, int(base_manifest["partitions"]))
    started = time.perf_counter()
    published_at = datetime.now(UTC).isoformat(timespec="milliseconds")
    update = await asyncio.to_thread(diff, base, number, old, new, published_at)
    blob = await asyncio.to_thread(update.to_bytes)
    lock = client.lock(keys.lock, timeout=LOCK_TTL_S, blocking=True, thread_local=False)
    if not await lock.acquire(blocking_timeout=LOCK_TTL_S):
        raise UpdateRefused(f"another update of {base} is being published")
    try:
        head, head_checkpoint = await _head(client, keys)
        if head == number and head_checkpoint == new.version:
            log.info("update %d of %s is %s already", number, base, new.version)
            return update
        if head != number - 1:
            raise UpdateRefused(
                f"{old.version} is update {number - 1} of {base}, but the lineage is at "
                f"update {head}: update from its last checkpoint"
            )
        try:
            failed = await client.get(keys.blob(number))  # an attempt never announced
            if isinstance(failed, bytes):
                await _take_back(client, layout, Update.from_bytes(failed), update)
            await client.set(keys.blob(number), blob)
            await _write_update_rows(client, layout, update, lock)
            await client.set(lineage_key(new.version), f"{base} {number}")
            await client.xadd(keys.stream, entry_fields(update, len(blob)))  # type: ignore[arg-type]
        except Exception as exc:
            raise PublishFailed(f"update {number} of {base}: {type(exc).__name__}: {exc}") from exc
        if number > kept:  # the stream and its blobs keep the last ``kept`` updates
            try:
                await client.xtrim(keys.stream, maxlen=kept, approximate=False)
                await client.delete(keys.blob(number - kept))
            except RedisError as exc:  # (published all the same)
                log.warning("trimming the updates of %s failed: %s", base, exc)
    finally:
        with contextlib.suppress(LockError):
            await lock.release()
    log.info(
        "published update %d of %s (%s): %d rows, %d bytes, in %.2f s",
        number,
        base,
        new.version,
        update.row_count,
        len(blob),
        time.perf_counter() - started,
    )
    return update


async def _lineage_of(client: RedisClient, old: Checkpoint) -> tuple[str, int]:
    """(base, next update number) of the lineage ``old`` is the last checkpoint of: its
    own when it is published as a base version (even if it was an update of another
    before: replicas serving it follow its own), else the one it is an update of."""
    if await read_manifest(client, old.version) is not None:
        return old.version, 1
    found = await client.get(lineage_key(old.version))
    if found is not None:
        base, previous = decode_entry({"lineage": found})["lineage"].split()
        return base, int(previous) + 1
    raise UpdateRefused(
        f"{old.version} is neither a published version nor a published update: publish "
        "it first (python -m app.publish), or update from the lineage's last checkpoint"
    )


async def _head(client: RedisClient, keys: UpdateKeys) -> tuple[int, str | None]:
    """The number and checkpoint of the lineage's last update announced (0: none)."""
    last = await client.xrevrange(keys.stream, count=1)
    if not last:
        return 0, None
    entry = decode_entry(last[0][1] or {})
    return int(entry["number"]), entry.get("checkpoint")


async def _take_back(client: RedisClient, layout: Layout, failed: Update, update: Update) -> None:
    """Undo the rows an unannounced attempt at this update wrote that ``update`` does
    not write again (those it does, ``tag_row`` writes over the same old value)."""
    row_bytes = (update.rows[0].shape[1] if update.rows else 0) * ROW_DTYPE.itemsize
    for j, field_keys in enumerate(failed.keys):
        again = set(update.keys[j]) if j < len(update.keys) else set()
        stale = [key for key in field_keys if key not in again]
        if not stale:
            continue
        hashes = [layout.hash_key(j, key) for key in stale]
        pipe = client.pipeline(transaction=False)
        for hash_key, key in zip(hashes, stale, strict=True):
            pipe.hget(hash_key, key)
        current = await pipe.execute()
        pipe = client.pipeline(transaction=False)
        for hash_key, key, value in zip(hashes, stale, current, strict=True):
            if value is None:
                continue
            before = untag_row(value, failed.number, row_bytes)
            if before is None:
                pipe.hdel(hash_key, key)
            elif before != value:
                pipe.hset(hash_key, key, before)
        await pipe.execute()


async def _replay_updates(client: RedisClient, layout: Layout, written: set[str]) -> None:
    """Write the lineage's updates again into partition hashes just written from the
    checkpoint (a node that lost them, a manifest gone): in order, from their blobs."""
    keys = UpdateKeys(layout.version)
    entries = await client.xrange(keys.stream)
    for _, fields in entries or ():
        number = int(decode_entry(fields or {})["number"])
        blob = await client.get(keys.blob(number))
        if not isinstance(blob, bytes):
            log.error(
                "update %d of %s is gone from Redis: its rows cannot be written again; "
                "replicas serving its lineage need a reload",
                number,
                layout.version,
            )
            return
        update = Update.from_bytes(blob)
        await _write_update_rows(client, layout, update, None, written)
        log.warning("wrote update %d of %s again into the rewritten hashes", number, layout.version)


async def _write_update_rows(
    client: RedisClient,
    layout: Layout,
    update: Update,
    lock: Any,
    only: set[str] | None = None,
) -> None:
    """Each changed or new row (of the hashes in ``only``, when given) into its base
    hash, tagged over the value it replaces: per round trip, one HMGET of the values
    the hashes hold now (and their sentinel: a hash gone is not written), then one
    HSET of their tagged successors (a value whole in one command: never torn)."""
    row_bytes = (update.rows[0].shape[1] if update.rows else 0) * ROW_DTYPE.itemsize
    for j, field_keys in enumerate(update.keys):
        packed = update.rows[j].astype(ROW_DTYPE, copy=False).tobytes()
        for start in range(0, len(field_keys), WRITE_BATCH_ROWS):
            groups: dict[str, list[int]] = {}
            for i in range(start, min(start + WRITE_BATCH_ROWS, len(field_keys))):
                hash_key = layout.hash_key(j, field_keys[i])
                if only is None or hash_key in only:
                    groups.setdefault(hash_key, []).append(i)
            pipe = client.pipeline(transaction=False)
            for hash_key, members in groups.items():
                pipe.hmget(hash_key, [SENTINEL, *(field_keys[i] for i in members)])
            current = await pipe.execute()
            pipe = client.pipeline(transaction=False)
            for (hash_key, members), held in zip(groups.items(), current, strict=True):
                if held[0] is None:
                    raise MissingHash(
                        f"the hash {hash_key} of {layout.version} is gone: publish the "
                        "base again (python -m app.publish), then retry"
                    )
                mapping = {
                    field_keys[i]: tag_row(
                        packed[i * row_bytes : (i + 1) * row_bytes], update.number, old, row_bytes
                    )
                    for i, old in zip(members, held[1:], strict=True)
                }
                pipe.hset(hash_key, mapping=mapping)  # type: ignore[arg-type]
            await pipe.execute()
            if lock is not None:
                await lock.reacquire()


async def _run(
    settings: Settings,
    directories: list[str],
    job: Callable[[RedisClient, list[Checkpoint]], Awaitable[str]],
) -> int:
    """The CLI's frame around ``job``: the checkpoints loaded, a client, every failure
    said in one line and turned into the exit code; ``job``'s answer printed."""
    if settings.redis_url is None:
        log.error("CTR_REDIS_URL is not set: nowhere to publish")
        return 2
    try:
        checkpoints = await asyncio.gather(
            *(asyncio.to_thread(load_checkpoint, directory) for directory in directories)
        )
    except CheckpointError as exc:
        log.error("%s", exc)
        return 1
    client = connect(settings, timeout_s=30.0)
    try:
        print(await job(client, checkpoints))  # noqa: T201
    except (RedisError, OSError, PublishFailed, UpdateRefused, ValueError) as exc:
        # Redis unreachable or refusing, a write failing midway (nothing marked complete
        # or announced), a published manifest that disagrees with the checkpoint, or an
        # update that does not follow the lineage.
        log.error("publishing %s failed: %s", checkpoints[-1].version, exc)
        return 1
    finally:
        await client.aclose()
    return 0


async def _publish_job(client: RedisClient, checkpoints: list[Checkpoint], partitions: int) -> str:
    (checkpoint,) = checkpoints
    wrote = await publish(client, checkpoint, partitions)
    return f"{checkpoint.version}: {'published' if wrote else 'already published'}"


async def _update_job(client: RedisClient, checkpoints: list[Checkpoint]) -> str:
    old, new = checkpoints
    update = await publish_update(client, old, new)
    return f"{new.version}: published as {update.version} ({update.row_count} rows)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="checkpoint to publish (default: CTR_MODEL_DIR)")
    parser.add_argument(
        "--update",
        action="store_true",
        help="publish what --to changed from --from, as the next update of --from's lineage",
    )
    parser.add_argument("--from", dest="old", metavar="OLD", help="the checkpoint served now")
    parser.add_argument("--to", dest="new", metavar="NEW", help="trained with --init-from OLD")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = Settings()
    if args.update:
        if args.old is None or args.new is None or args.model_dir is not None:
            parser.error("--update takes --from OLD and --to NEW (and no --model-dir)")
        return asyncio.run(_run(settings, [args.old, args.new], _update_job))
    if args.old is not None or args.new is not None:
        parser.error("--from and --to go with --update")
    job = functools.partial(_publish_job, partitions=settings.redis_partitions)
    return asyncio.run(_run(settings, [args.model_dir or str(settings.model_dir)], job))


if __name__ == "__main__":
    raise SystemExit(main())

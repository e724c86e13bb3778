"""Streamed model updates: what an update is, how it is written to Redis, how it is read.

A *lineage* starts at a published base version ``b`` (``app.store.publisher``).
Update ``k`` of it is made from two checkpoints: ``old`` (the base, or the
checkpoint of update ``k-1``) and ``new``, trained from ``old`` with
``python -m model.train --init-from old`` (it keeps every index of ``old`` and
appends the values new data brought). It holds only what changed:

- the rows of ``old``'s values whose row changed, and the rows of the new values;
- the dense weights and the fields' OOV rows, when they changed;
- the calibration of ``new``.

In Redis (key names in ``UpdateKeys``):

- ``ctr:update:{b}:u<k>``: the update itself, one safetensors blob (the rows and
  dense weights as tensors; the value keys and the rest as JSON in its header);
- the changed and new rows, written into the base's partition hashes, each value
  *tagged*: ``row_k | k | row_prev | k_prev`` (little-endian, ``k`` a uint32). A base
  row has no tag (it is update 0's); a value new in ``k`` has no previous part (it
  was OOV before). One HSET writes a value whole, so a row is never torn;
- ``ctr:updates:{b}``, a stream with one entry per update (its number, parent,
  checkpoint, time), added last: a replica applies an update when it reads its entry.
- ``ctr:lineage:<checkpoint version>`` -> ``b k``: which update made a checkpoint, so
  the next update can start from it.

A replica serving update ``j`` reads a tagged row through ``pick_row``: the newest
part tagged at most ``j``. An update written but not yet announced, or announced and
not yet applied by this replica, is therefore invisible to it: every answer is
computed by the weights and rows of exactly one update, the one its version names.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from model.checkpoint import TABLES, Checkpoint
from model.features import value_key

TAG = struct.Struct("<I")
FloatRows = npt.NDArray[np.float32]


class UpdateRefused(Exception):
    """An update that does not follow what is served (or is malformed): not applied."""


@dataclass(frozen=True)
class UpdateKeys:
    """Where the updates of base version ``base`` live."""

    base: str

    @property
    def stream(self) -> str:
        return f"ctr:updates:{self.base}"

    @property
    def lock(self) -> str:
        return f"ctr:lock:updates:{self.base}"

    def blob(self, number: int) -> str:
        return f"ctr:update:{self.base}:u{number}"


def lineage_key(checkpoint_version: str) -> str:
    return f"ctr:lineage:{checkpoint_version}"


def served_version(base: str, number: int) -> str:
    """The ``model_version`` of answers computed by update ``number`` of ``base``."""
    return base if number == 0 else f"{base}+u{number}"


@dataclass(frozen=True)
class Update:
    """Update ``number`` of the lineage of ``base``; made from checkpoint ``parent``
    into checkpoint ``checkpoint``."""

    base: str
    number: int
    parent: str
    checkpoint: str
    published_at: str
    # Per embedded field (the spec's order): the value keys whose rows changed or are
    # new, and those rows (``len(keys[j]) x (1+k)``).
    keys: list[list[str]]
    rows: list[FloatRows]
    oov: FloatRows | None  # F x (1+k), when they changed
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # when they changed
    calibration: Any = None  # the checkpoint's calibration (JSON), None for none

    @property
    def version(self) -> str:
        return served_version(self.base, self.number)

    def row_maps(self) -> list[dict[str, FloatRows]]:
        """Per field, value key -> its row (a copy of its own): for a store to merge in
        one step on the worker thread, built before."""
        return [
            dict(zip(keys, rows.copy(), strict=True))
            for keys, rows in zip(self.keys, self.rows, strict=True)
        ]

    @property
    def row_count(self) -> int:
        return sum(len(keys) for keys in self.keys)

    def to_bytes(self) -> bytes:
        tensors = {f"dense.{name}": t.contiguous() for name, t in self.dense.items()}
        for j, rows in enumerate(self.rows):
            tensors[f"rows.{j}"] = torch.from_numpy(np.ascontiguousarray(rows))
        if self.oov is not None:
            tensors["oov"] = torch.from_numpy(np.ascontiguousarray(self.oov))
        header = {
            "base": self.base,
            "number": self.number,
            "parent": self.parent,
            "checkpoint": self.checkpoint,
            "published_at": self.published_at,
            "keys": self.keys,
            "calibration": self.calibration,
        }
        return save_tensors(tensors, metadata={"update": orjson.dumps(header).decode()})

    @classmethod
    def from_bytes(cls, blob: bytes) -> Update:
        """The update in ``blob``; UpdateRefused when it is no well-formed update."""
        try:
            tensors = load_tensors(blob)
            header = orjson.loads(_metadata(blob)["update"])
            keys = [[str(k) for k in field_keys] for field_keys in header["keys"]]
            rows = [tensors[f"rows.{j}"].numpy() for j in range(len(keys))]
            oov = tensors["oov"].numpy() if "oov" in tensors else None
            dense = {
                name.removeprefix("dense."): t
                for name, t in tensors.items()
                if name.startswith("dense.")
            }
            datetime.fromisoformat(str(header["published_at"]))  # (a time, or refused)
            update = cls(
                str(header["base"]),
                int(header["number"]),
                str(header["parent"]),
                str(header["checkpoint"]),
                str(header["published_at"]),
                keys,
                rows,
                oov,
                dense,
                header.get("calibration"),
            )
        except Exception as exc:  # (safetensors, JSON, a key or tensor missing)
            raise UpdateRefused(f"not a well-formed update: {type(exc).__name__}: {exc}") from exc
        for j, (field_keys, field_rows) in enumerate(zip(update.keys, rows, strict=True)):
            if field_rows.ndim != 2 or field_rows.shape[0] != len(field_keys):
                raise UpdateRefused(
                    f"field {j}: {len(field_keys)} value keys but rows of shape "
                    f"{tuple(field_rows.shape)} (truncated?)"
                )
        return update


def _metadata(blob: bytes) -> Mapping[str, str]:
    """The ``__metadata__`` of a safetensors blob's header."""
    (length,) = struct.unpack_from("<Q", blob)
    header: dict[str, Any] = orjson.loads(blob[8 : 8 + length])
    return header["__metadata__"]  # type: ignore[no-any-return]


def diff(base: str, number: int, old: Checkpoint, new: Checkpoint, published_at: str) -> Update:
    """Update ``number`` of ``base``: what ``new`` (trained from ``old`` with
    ``--init-from``) changed. Raises UpdateRefused when ``new`` is no such checkpoint."""
    for what, a, b in (
        ("embedding dimension", old.config.embed_dim, new.config.embed_dim),
        ("hidden units", old.config.hidden_units, new.config.hidden_units),
        ("dense fields", old.config.num_dense, new.config.num_dense),
        (
            "fields",
            [(f.name, f.kind, f.transform, f.stats) for f in old.features.fields],
            [(f.name, f.kind, f.transform, f.stats) for f in new.features.fields],
        ),
    ):
        if a != b:
            raise UpdateRefused(f"{new.version} changes the {what} ({a} -> {b})")
    parent = new.training.get("parent") or {}
    if parent.get("version") != old.version:
        raise UpdateRefused(
            f"{new.version} was not trained from {old.version} (its parent: "
            f"{parent.get('version')}); train it with --init-from {old.path}"
        )
    keys: list[list[str]] = []
    rows: list[FloatRows] = []
    for j, f in enumerate(old.features.embedded_fields):
        before = old.table_rows(j).numpy()
        after = new.table_rows(j).numpy()
        if after.shape[0] < before.shape[0]:
            raise UpdateRefused(
                f"field {f.name!r} lost values ({before.shape[0]} -> {after.shape[0]} rows)"
            )
        old_values = old.vocabulary(f.name).values
        new_values = new.vocabulary(f.name).values
        if new_values[: len(old_values)] != old_values:
            raise UpdateRefused(f"field {f.name!r}: the known values moved (not a warm start)")
        # Row 0 (OOV) goes with the dense weights; index i >= 1 is value i - 1.
        changed = np.flatnonzero((before[1:] != after[1 : before.shape[0]]).any(axis=1))
        added = np.arange(before.shape[0] - 1, after.shape[0] - 1)
        which = np.concatenate((changed, added))
        keys.append([value_key(new_values[i]) for i in which.tolist()])
        rows.append(np.ascontiguousarray(after[which + 1], dtype=np.float32))
    oov = new.oov_rows.numpy().astype(np.float32)
    dense = {name: t for name, t in new.state.items() if name != TABLES}
    dense_changed = any(not torch.equal(t, old.state[name]) for name, t in dense.items())
    return Update(
        base,
        number,
        old.version,
        new.version,
        published_at,
        keys,
        rows,
        None if np.array_equal(oov, old.oov_rows.numpy()) else oov,
        dense if dense_changed else {},
        new.spec.get("calibration"),
    )


# -- tagged rows


def tag_row(row: bytes, number: int, current: bytes | None, row_bytes: int) -> bytes:
    """The hash value of a row written by update ``number``, over the value ``current``
    held (None: the value was absent, i.e. OOV). Writing the same update again keeps
    what it replaced."""
    if current is not None:
        tag = _tag(current, row_bytes)
        if tag == number:  # (a retried publish of this update)
            current = _previous(current, row_bytes)
        else:
            current = current[:row_bytes] + TAG.pack(tag)
    return row + TAG.pack(number) + (current or b"")


def untag_row(value: bytes, number: int, row_bytes: int) -> bytes | None:
    """The value before update ``number`` wrote ``value`` (None: absent), or ``value``
    itself when ``number`` did not write it. A previous part of its own update keeps
    its tag; a base row none."""
    if _tag(value, row_bytes) != number:
        return value
    previous = _previous(value, row_bytes)
    if previous is None or _tag(previous, row_bytes) == 0:
        return previous if previous is None else previous[:row_bytes]
    return previous


def _tag(value: bytes, row_bytes: int) -> int:
    return 0 if len(value) == row_bytes else int(TAG.unpack_from(value, row_bytes)[0])


def _previous(value: bytes, row_bytes: int) -> bytes | None:
    rest = value[row_bytes + TAG.size :]
    return rest or None


AHEAD = b""  # pick_row: only newer parts than the replica serves


def pick_row(value: bytes, row_bytes: int, applied: int) -> bytes | None:
    """The row a replica serving update ``applied`` reads from a hash value: the newest
    part tagged at most ``applied``; None when the value was absent then (OOV);
    ``AHEAD`` when every part is newer (the replica is two or more updates behind).
    Raises ValueError for a value of no valid length."""
    size = len(value)
    if size == row_bytes:
        return value
    if size not in (row_bytes + TAG.size, 2 * (row_bytes + TAG.size)):
        raise ValueError(f"a row of {size} bytes, not {row_bytes} (+ tags)")
    if TAG.unpack_from(value, row_bytes)[0] <= applied:
        return value[:row_bytes]
    if size == row_bytes + TAG.size:
        return None  # new in an update this replica has not applied: OOV to it
    if TAG.unpack_from(value, 2 * row_bytes + TAG.size)[0] <= applied:
        return value[row_bytes + TAG.size : 2 * row_bytes + TAG.size]
    return AHEAD


def entry_fields(update: Update, size: int) -> dict[str, str]:
    """The stream entry announcing ``update`` (a blob of ``size`` bytes)."""
    return {
        "number": str(update.number),
        "parent": update.parent,
        "checkpoint": update.checkpoint,
        "published_at": update.published_at,
        "rows": str(update.row_count),
        "bytes": str(size),
    }


def decode_entry(fields: Mapping[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def keys_by_field(update: Update) -> Sequence[tuple[int, list[str], FloatRows]]:
    return [(j, k, r) for j, (k, r) in enumerate(zip(update.keys, update.rows, strict=True)) if k]

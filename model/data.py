"""Readers of training data, and the encoded on-disk dataset that training reads.

Formats:

- ``criteo``: the raw Criteo Display Advertising Challenge TSV: no header; label,
  I1..I13 (integer counts), C1..C26 (hashed categories as hex); an empty field
  is missing;
- ``csv`` and ``parquet``: files with a header (a schema), where the caller names the
  label, dense and sparse columns.

Files larger than memory are read in chunks, never whole. ``encode_to_disk``
writes the encoded rows to flat files; ``EncodedData.batches`` reads them back
through short-lived memory maps of a few blocks at a time, so the peak memory of
training does not grow with the number of rows.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from model.features import FeatureSpec

Format = Literal["criteo", "csv", "parquet"]
FORMATS: tuple[Format, ...] = ("criteo", "csv", "parquet")

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))


@dataclass(frozen=True)
class Schema:
    """Which columns of a file are the label, the dense and the sparse features."""

    label: str
    dense: tuple[str, ...]
    sparse: tuple[str, ...]

    @property
    def features(self) -> tuple[str, ...]:
        return self.dense + self.sparse


CRITEO_SCHEMA = Schema("label", CRITEO_DENSE, CRITEO_SPARSE)


@dataclass(frozen=True)
class Chunk:
    """A block of rows, columnar: labels and the columns FeatureSpec.encode takes."""

    labels: npt.NDArray[np.float32]
    columns: dict[str, npt.NDArray[Any]]

    def __len__(self) -> int:
        return len(self.labels)

    def slice(self, start: int, stop: int) -> Chunk:
        return Chunk(self.labels[start:stop], {k: v[start:stop] for k, v in self.columns.items()})


def guess_format(path: Path) -> Format:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".csv":
        return "csv"
    return "criteo"


def count_rows(paths: Sequence[Path], fmt: Format) -> int:
    """The number of data rows, without parsing them."""
    total = 0
    for path in paths:
        if fmt == "parquet":
            total += pq.ParquetFile(path).metadata.num_rows
            continue
        # Count the lines that hold something, as the parser does: a line break counts
        # unless it ends an empty line.
        lines, previous = 0, 10
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                data = np.frombuffer(block, dtype=np.uint8)
                breaks = data == 10
                before = np.concatenate(([previous], data[:-1])) != 10
                lines += int(np.count_nonzero(breaks & before))
                previous = int(data[-1])
        lines += previous != 10
        total += lines - (1 if fmt == "csv" and lines else 0)
    return total


def read_chunks(
    paths: Iterable[Path], fmt: Format, schema: Schema, *, block_bytes: int = 16 << 20
) -> Iterator[Chunk]:
    """Stream the rows of ``paths`` in chunks of about ``block_bytes`` of input."""
    for path in paths:
        if fmt == "parquet":
            batches: Iterator[pa.RecordBatch] = pq.ParquetFile(path).iter_batches(
                batch_size=max(1, block_bytes // 256), columns=[schema.label, *schema.features]
            )
        else:
            batches = _open_text(path, fmt, schema, block_bytes)
        for batch in batches:
            if batch.num_rows:
                yield _to_chunk(batch, schema, path)


def _open_text(path: Path, fmt: Format, schema: Schema, block_bytes: int) -> Iterator[Any]:
    types: dict[str, pa.DataType] = {name: pa.float64() for name in schema.dense}
    types.update({name: pa.string() for name in schema.sparse})
    types[schema.label] = pa.float64()
    criteo = fmt == "criteo"
    read = pacsv.ReadOptions(
        block_size=block_bytes,
        column_names=[schema.label, *schema.features] if criteo else None,
    )
    parse = pacsv.ParseOptions(delimiter="\t" if criteo else ",")
    convert = pacsv.ConvertOptions(
        column_types=types,
        include_columns=[schema.label, *schema.features],
        null_values=[""],
        strings_can_be_null=True,
    )
    return iter(pacsv.open_csv(path, read, parse, convert))


def _to_chunk(batch: Any, schema: Schema, path: Path) -> Chunk:
    label = batch.column(schema.label)
    if label.null_count:
        raise ValueError(f"{path}: {label.null_count} rows have no label")
    columns: dict[str, npt.NDArray[Any]] = {}
    for name in schema.dense:
        col = pc.cast(batch.column(name), pa.float64())
        columns[name] = pc.fill_null(col, math.nan).to_numpy(zero_copy_only=False)
    for name in schema.sparse:
        col = pc.cast(batch.column(name), pa.string())
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)  # empty = missing
        columns[name] = col.to_numpy(zero_copy_only=False).astype(object, copy=False)
    labels = pc.cast(label, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float32)
    return Chunk(labels, columns)


def criteo_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a small Criteo TSV as a client would send them: field -> value, counts as
    numbers, categories as strings, empty fields left out (for tests and examples)."""
    rows = []
    for line in path.read_text().splitlines():
        values = line.split("\t")[1:]
        rows.append(
            {
                name: (int(v) if name in CRITEO_DENSE else v)
                for name, v in zip(CRITEO_SCHEMA.features, values, strict=True)
                if v != ""
            }
        )
    return rows


@dataclass(frozen=True)
class EncodedData:
    """Encoded rows on disk: ids (int32), dense (float32) and labels (float32)."""

    directory: Path
    num_rows: int
    num_fields: int
    num_dense: int

    def _read(self, name: str, dtype: Any, width: int, start: int, stop: int) -> npt.NDArray[Any]:
        itemsize = np.dtype(dtype).itemsize * width
        count = stop - start
        if count == 0 or itemsize == 0:
            return np.zeros((count, width), dtype=dtype)
        # Map only the pages that hold these rows, copy them out and unmap, so
        # that the resident memory stays a few blocks whatever the file's size.
        first = start * itemsize
        aligned = first - first % mmap.ALLOCATIONGRANULARITY
        with (
            (self.directory / name).open("rb") as f,
            mmap.mmap(
                f.fileno(),
                first - aligned + count * itemsize,
                access=mmap.ACCESS_READ,
                offset=aligned,
            ) as mm,
        ):
            view = np.frombuffer(mm, dtype=dtype, count=count * width, offset=first - aligned)
            out = view.reshape(count, width).copy()
            del view
        return out

    def rows(
        self, start: int, stop: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        ids = self._read("ids.i32", np.int32, self.num_fields, start, stop).astype(np.int64)
        dense = self._read("dense.f32", np.float32, self.num_dense, start, stop)
        labels = self._read("labels.f32", np.float32, 1, start, stop)[:, 0]
        return ids, dense, labels

    def batches(
        self,
        start: int,
        stop: int,
        batch_size: int,
        *,
        rng: np.random.Generator | None = None,
        block_rows: int = 4096,
        buffer_blocks: int = 64,
        negative_rate: float = 1.0,
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """Batches of rows ``start..stop``; shuffled when ``rng`` is given.

        Shuffling is two-level, as in streaming trainers: blocks of
        ``block_rows`` in random order, ``buffer_blocks`` of them at a time,
        rows shuffled within that buffer. ``negative_rate`` < 1 (with ``rng``): each
        negative row is kept with that probability, every positive one.
        """
        if negative_rate < 1.0 and rng is None:
            raise ValueError("down-sampling negatives needs an rng")
        blocks = [(s, min(s + block_rows, stop)) for s in range(start, stop, block_rows)]
        if rng is not None:
            blocks = [blocks[i] for i in rng.permutation(len(blocks))]
        for g in range(0, len(blocks), buffer_blocks):
            parts = [self.rows(s, e) for s, e in blocks[g : g + buffer_blocks]]
            ids, dense, labels = (np.concatenate(p) for p in zip(*parts, strict=True))
            if rng is not None and negative_rate < 1.0:
                kept = (labels > 0) | (rng.random(len(labels)) < negative_rate)
                ids, dense, labels = ids[kept], dense[kept], labels[kept]
            if rng is not None:
                order = rng.permutation(len(labels))
                ids, dense, labels = ids[order], dense[order], labels[order]
            for b in range(0, len(labels), batch_size):
                yield ids[b : b + batch_size], dense[b : b + batch_size], labels[b : b + batch_size]


def encode_to_disk(chunks: Iterable[Chunk], spec: FeatureSpec, directory: Path) -> EncodedData:
    """Encode every chunk with ``spec`` and append it to flat files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    num_rows = 0
    with (
        (directory / "ids.i32").open("wb") as ids_f,
        (directory / "dense.f32").open("wb") as dense_f,
        (directory / "labels.f32").open("wb") as labels_f,
    ):
        for chunk in chunks:
            ids, dense = spec.encode(chunk.columns, len(chunk))
            ids_f.write(ids.astype(np.int32).tobytes())
            dense_f.write(dense.tobytes())
            labels_f.write(chunk.labels.astype(np.float32).tobytes())
            num_rows += len(chunk)
    return EncodedData(directory, num_rows, len(spec.embedded_fields), len(spec.dense_fields))


def take_rows(chunks: Iterable[Chunk], start: int, stop: int) -> Iterator[Chunk]:
    """The rows ``start..stop`` of a stream of chunks, still in chunks."""
    seen = 0
    for chunk in chunks:
        lo, hi = max(start - seen, 0), min(stop - seen, len(chunk))
        seen += len(chunk)
        if lo < hi:
            yield chunk if (lo, hi) == (0, len(chunk)) else chunk.slice(lo, hi)
        if seen >= stop:
            return

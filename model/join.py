"""Join the prediction log with the clicks that followed: training data with the
features exactly as they were served, and the served model's quality on that traffic.

    python -m model.join --log logs/ --labels clicks.jsonl --checkpoint models/default \\
        --out joined.parquet

``--log``: the prediction log's files (``app.predlog``: JSON lines, one record per
served row), or folders of them (every ``predictions-*.jsonl*``). ``--labels``: what
happened to served rows, JSON lines ``{"request_id": "...", "row": 0, "label": 1}``
(``row`` defaults to 0, the row of a /predict call) or a CSV file with a header holding
those columns. A logged row with no label is a negative (no click came), unless
``--unlabelled drop``; a key logged twice (a caller that reused its request id) is
joined once, the first time. ``--checkpoint``: a model with the served fields, for which of
them are dense and which sparse.

The output is a Parquet file with a ``label`` column and one column per field (dense:
float64, sparse: string; missing: null), in time order (the files of several
processes merged); the command it prints trains on it as it is. Per model version it
prints the rows, clicks, AUC, logloss, normalized entropy and calibration ratio of the
probabilities served (``--json`` writes them).
"""

from __future__ import annotations

import argparse
import csv
import heapq
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.checkpoint import load_checkpoint
from model.evaluate import auc, calibration_ratio, logloss, normalized_entropy
from model.features import FeatureSpec

log = logging.getLogger(__name__)
Key = tuple[str, int]  # (request id, row)
LABEL = "label"
BATCH_ROWS = 65_536


def log_files(paths: Iterable[Path]) -> list[Path]:
    """The log files named, and those in the folders named, oldest rotation first."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        files = [p for p in path.iterdir() if p.name.startswith("predictions-")]
        # predictions-<pid>.jsonl.2 (older) before .1 before .jsonl (newest)
        out += sorted(files, key=lambda p: (p.name.split(".jsonl")[0], -_rotation(p)))
    return out


def _rotation(path: Path) -> int:
    suffix = path.name.rsplit(".jsonl", 1)[-1].lstrip(".")
    return int(suffix) if suffix.isdigit() else 0


def read_labels(paths: Iterable[Path]) -> dict[Key, float]:
    """(request id, row) -> label, from JSON-lines or CSV files; a later one wins."""
    labels: dict[Key, float] = {}
    for path in paths:
        with path.open(newline="") as f:
            if path.suffix.lower() == ".csv":
                entries: Iterable[Mapping[str, Any]] = csv.DictReader(f)
            else:
                entries = (json.loads(line) for line in f if line.strip())
            for n, entry in enumerate(entries, start=1):
                try:
                    key = (str(entry["request_id"]), int(entry.get("row") or 0))
                    label = float(entry[LABEL])
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}: entry {n} is no label ({exc!r})") from None
                if label not in (0.0, 1.0):
                    raise ValueError(f"{path}: entry {n} has label {label}, not 0 or 1")
                labels[key] = label
    return labels


def read_log(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every record of the log files in time order (each process's file is in time
    order; theirs are merged). A line that is no record (the partial last line of a
    process killed mid-write) is skipped."""
    return heapq.merge(*(_records(path) for path in paths), key=lambda r: r["time"])


def _records(path: Path) -> Iterator[dict[str, Any]]:
    needed = {"request_id", "row", "features", "probability", "time"}
    with path.open("rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and needed <= record.keys():
                yield record


def join(
    logs: Sequence[Path],
    labels: Mapping[Key, float],
    spec: FeatureSpec,
    out: Path,
    *,
    unlabelled: Literal["negative", "drop"] = "negative",
) -> dict[str, dict[str, float]]:
    """Write the labelled log rows to ``out`` (Parquet) and return the served model
    versions' metrics on them."""
    schema = pa.schema(
        [
            pa.field(LABEL, pa.float64()),
            *(
                pa.field(f.name, pa.string() if f.kind == "sparse" else pa.float64())
                for f in spec.fields
            ),
        ]
    )
    duplicates = 0
    served: dict[str, tuple[list[float], list[float]]] = {}
    batch: list[dict[str, Any]] = []
    seen: set[Key] = set()  # a caller that reused a request id logged a key twice
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out, schema) as writer:
        for record in read_log(log_files(logs)):
            key = (str(record["request_id"]), int(record["row"]))
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            label = labels.get(key)
            if label is None:
                if unlabelled == "drop":
                    continue
                label = 0.0
            row: dict[str, Any] = {LABEL: label}
            features = record["features"]
            for f in spec.fields:
                value = features.get(f.name)
                if value is None:
                    row[f.name] = None
                elif f.kind == "sparse":
                    row[f.name] = value if isinstance(value, str) else str(value)
                else:
                    row[f.name] = float(value)
            batch.append(row)
            ys, ps = served.setdefault(str(record.get("model_version")), ([], []))
            ys.append(label)
            ps.append(float(record["probability"]))
            if len(batch) >= BATCH_ROWS:
                writer.write_table(pa.Table.from_pylist(batch, schema))
                batch = []
        if batch:
            writer.write_table(pa.Table.from_pylist(batch, schema))
    if duplicates:
        log.warning(
            "%d logged rows repeat a (request id, row) seen before (a client reusing its "
            "X-Request-ID): only the first was joined",
            duplicates,
        )
    return {version: _quality(np.array(y), np.array(p)) for version, (y, p) in served.items()}


def _quality(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    out = {"rows": float(len(labels)), "clicks": float(labels.sum())}
    if 0 < labels.sum() < len(labels):
        out["auc"] = auc(labels, probs)
        out["logloss"] = logloss(labels, probs)
        out["ne"] = normalized_entropy(labels, probs)
    if labels.sum():
        out["calibration_ratio"] = calibration_ratio(labels, probs)
    return out


def train_command(out: Path, spec: FeatureSpec) -> str:
    dense = ",".join(f.name for f in spec.fields if f.kind == "dense")
    sparse = ",".join(f.name for f in spec.fields if f.kind == "sparse")
    flags = f"--label {LABEL}" + (f" --dense {dense}" if dense else "") + f" --sparse {sparse}"
    return f"python -m model.train --data {out} {flags} --out models/next"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", type=Path, nargs="+", required=True, help="log files or folders")
    parser.add_argument("--labels", type=Path, nargs="+", required=True)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a model of these fields")
    parser.add_argument("--out", type=Path, required=True, help="the Parquet file to write")
    parser.add_argument("--unlabelled", choices=("negative", "drop"), default="negative")
    parser.add_argument("--json", type=Path, default=None, help="write the metrics here")
    args = parser.parse_args(argv)
    spec = load_checkpoint(args.checkpoint, tables=False).features
    quality = join(args.log, read_labels(args.labels), spec, args.out, unlabelled=args.unlabelled)
    rows = sum(int(q["rows"]) for q in quality.values())
    print(f"{rows} rows written to {args.out}; train on them with")
    print(f"  {train_command(args.out, spec)}")
    print("served quality, per model version:")
    for version, q in sorted(quality.items()):
        measured = "  ".join(
            f"{name} {q[name]:.4f}"
            for name in ("auc", "logloss", "ne", "calibration_ratio")
            if name in q
        )
        print(f"  {version}: {int(q['rows'])} rows, {int(q['clicks'])} clicks  {measured}")
    if args.json:
        args.json.write_text(json.dumps(quality, indent=2) + "\n")


if __name__ == "__main__":
    main()

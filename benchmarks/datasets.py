"""Generated data sets for the benchmarks, made once and kept under benchmarks/work/."""

from __future__ import annotations

import hashlib
from pathlib import Path

from model.synthetic import SyntheticConfig, generate, truth_path

WORK = Path(__file__).resolve().parent / "work"


def generated(rows: int, config: SyntheticConfig | None = None) -> Path:
    """A Criteo-shaped TSV of ``rows`` generated rows (with ``.truth`` beside it)."""
    config = config or SyntheticConfig()
    path = WORK / f"synthetic-{rows}-seed{config.seed}-{hash_config(config):x}.tsv"
    if not (path.is_file() and truth_path(path).is_file()):
        partial = path.with_name(path.name + ".partial")
        generate(partial, rows, config)
        truth_path(partial).rename(truth_path(path))
        partial.rename(path)
    return path


def hash_config(config: SyntheticConfig) -> int:
    """A stable short hash of the generator's settings (Python's hash() is not stable)."""
    return int(hashlib.sha256(repr(config).encode()).hexdigest()[:10], 16)

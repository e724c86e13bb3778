"""Fixtures shared by every test: the sample data files and a tiny trained DeepFM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from model.checkpoint import Checkpoint, load_checkpoint
from model.data import CRITEO_SCHEMA
from model.synthetic import SyntheticConfig, generate
from model.train import TrainConfig, train

DATA = Path(__file__).parent / "data"

# Small enough to train in a couple of seconds, large enough to learn something.
TINY_DATA = SyntheticConfig(seed=7, max_cardinality=300)
GENERATED_ROWS = 40_000
TINY_TRAIN = TrainConfig(
    epochs=2,
    batch_size=512,
    lr=5e-3,
    min_count=3,
    embed_dim=8,
    hidden_units=(32, 16),
    valid_fraction=0.2,
    seed=3,
)


@pytest.fixture(scope="session")
def criteo_tsv() -> Path:
    return DATA / "criteo_sample.tsv"


@pytest.fixture(scope="session")
def criteo_csv() -> Path:
    return DATA / "criteo_sample.csv"


@pytest.fixture(scope="session")
def generated_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40,000 generated Criteo-shaped rows, with their true probabilities beside them."""
    path = tmp_path_factory.mktemp("generated") / "data.tsv"
    generate(path, GENERATED_ROWS, TINY_DATA)
    return path


@pytest.fixture(scope="session")
def day2_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """New traffic for the models of ``generated_tsv``: the same fields, new values."""
    path = tmp_path_factory.mktemp("day2") / "data.tsv"
    generate(path, 8_000, replace(TINY_DATA, seed=8))
    return path


def trained(directory: Path, data: Path, config: TrainConfig) -> Checkpoint:
    """The checkpoint of ``config`` trained on ``data`` (a generated Criteo TSV)."""
    created_at = "2026-01-01T00:00:00+00:00"
    train([data], "criteo", CRITEO_SCHEMA, directory, config, progress=False, created_at=created_at)
    return load_checkpoint(directory)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, generated_tsv: Path) -> Checkpoint:
    return trained(tmp_path_factory.mktemp("checkpoint") / "tiny", generated_tsv, TINY_TRAIN)


# Negative down-sampling on a planted truth (tests/model/test_calibration.py and
# tests/app/test_calibrated_serving.py): enough rows that the 10% of negatives kept
# pin the mean to well under 2%.
PLANTED_ROWS = 200_000
PLANTED_HELD_OUT = 0.2  # the last 20%: held out; the 20% before them validate
SAMPLED_TRAIN = replace(
    TINY_TRAIN, negative_rate=0.1, valid_fraction=0.2, test_fraction=PLANTED_HELD_OUT
)


@pytest.fixture(scope="session")
def planted_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200,000 generated rows at a 10% click rate, with their true probabilities."""
    path = tmp_path_factory.mktemp("planted") / "data.tsv"
    generate(path, PLANTED_ROWS, SyntheticConfig(seed=11, max_cardinality=300, base_ctr=0.1))
    return path


@pytest.fixture(scope="session")
def sampled_checkpoint(tmp_path_factory: pytest.TempPathFactory, planted_tsv: Path) -> Checkpoint:
    """A model trained on every positive and 10% of the negatives of ``planted_tsv``."""
    return trained(tmp_path_factory.mktemp("sampled") / "model", planted_tsv, SAMPLED_TRAIN)

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from model.checkpoint import Checkpoint, load_checkpoint
from model.data import CRITEO_SCHEMA, read_chunks
from model.evaluate import auc
from model.predict import Predictor
from model.synthetic import SyntheticConfig, generate, read_truth
from model.train import TABLE_L2, TrainConfig, main, recorded_config, train
from tests.conftest import GENERATED_ROWS, TINY_TRAIN

TRAIN_ROWS = round(GENERATED_ROWS * (1 - TINY_TRAIN.valid_fraction))


def test_training_learns_the_planted_signal(
    tiny_checkpoint: Checkpoint, generated_tsv: Path
) -> None:
    history = tiny_checkpoint.training["history"]
    assert len(history) == 2
    assert history[0]["train_loss"] > history[1]["train_loss"]
    # Validation rows are the last 20%; the oracle reaches its AUC from the truth.
    chunks = list(read_chunks([generated_tsv], "criteo", CRITEO_SCHEMA))
    labels = np.concatenate([c.labels for c in chunks])[TRAIN_ROWS:]
    oracle = auc(labels, read_truth(generated_tsv)[TRAIN_ROWS:])
    assert tiny_checkpoint.metrics["valid_auc"] > 0.68
    assert tiny_checkpoint.metrics["valid_auc"] > oracle - 0.08


def test_checkpoint_keeps_the_best_epoch(tiny_checkpoint: Checkpoint, generated_tsv: Path) -> None:
    history = tiny_checkpoint.training["history"]
    best = max(history, key=lambda h: h["valid_auc"])
    assert tiny_checkpoint.metrics["best_epoch"] == best["epoch"]
    chunks = list(read_chunks([generated_tsv], "criteo", CRITEO_SCHEMA))
    labels = np.concatenate([c.labels for c in chunks])[TRAIN_ROWS:]
    columns = {
        k: np.concatenate([c.columns[k] for c in chunks])[TRAIN_ROWS:] for k in chunks[0].columns
    }
    probs = Predictor(tiny_checkpoint).predict_columns(columns, len(labels))
    assert auc(labels, probs) == pytest.approx(best["valid_auc"], abs=1e-9)


def test_checkpoint_records_data_and_config(tiny_checkpoint: Checkpoint) -> None:
    t = tiny_checkpoint.training
    assert t["data"]["rows"] == GENERATED_ROWS and t["data"]["files"][0]["name"] == "data.tsv"
    assert len(t["data"]["files"][0]["sha256"]) == 64
    assert t["splits"] == {"train": TRAIN_ROWS, "valid": GENERATED_ROWS - TRAIN_ROWS, "test": 0}
    assert t["config"]["hidden_units"] == [32, 16]


def test_same_seed_same_weights(
    generated_tsv: Path, tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    again = train(
        [generated_tsv],
        "criteo",
        CRITEO_SCHEMA,
        tmp_path / "again",
        TINY_TRAIN,
        progress=False,
        created_at=tiny_checkpoint.created_at,
    )
    assert again.version == tiny_checkpoint.version
    assert (tmp_path / "again" / "weights.safetensors").read_bytes() == (
        tiny_checkpoint.path / "weights.safetensors"
    ).read_bytes()


def test_another_seed_other_weights(
    generated_tsv: Path, tmp_path: Path, tiny_checkpoint: Checkpoint
) -> None:
    config = TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 4, "epochs": 1})
    other = train(
        [generated_tsv],
        "criteo",
        CRITEO_SCHEMA,
        tmp_path / "other",
        config,
        progress=False,
        created_at=tiny_checkpoint.created_at,
    )
    assert other.version != tiny_checkpoint.version


def cli(*args: object) -> None:
    """``python -m model.train`` with these arguments (split on spaces), quietly."""
    main([*" ".join(map(str, args)).split(), "--quiet"])


def test_cli_trains_on_csv_with_named_columns_and_bucketing(
    criteo_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "csv-model"
    cli(
        f"--data {criteo_csv} --label label --dense {','.join(CRITEO_SCHEMA.dense)}",
        f"--sparse {','.join(CRITEO_SCHEMA.sparse)} --bucketize I1,I2",
        "--dense-transform standard --min-count 2 --epochs 2 --batch-size 64",
        "--hidden-units 8 --embed-dim 4 --valid-fraction 0.25 --test-fraction 0.25",
        f"--optimizer adagrad --out {out}",
    )
    printed = capsys.readouterr().out
    checkpoint = load_checkpoint(out)
    assert checkpoint.version in printed and "test_auc" in printed
    kinds = {f.name: (f.kind, f.transform) for f in checkpoint.features.fields}
    assert kinds["I1"] == ("dense", "bucket") and kinds["I3"] == ("dense", "standard")
    assert kinds["C1"] == ("sparse", "category")
    spec = json.loads((out / "spec.json").read_text())
    assert spec["training"]["splits"] == {"train": 100, "valid": 50, "test": 50}
    assert spec["training"]["config"]["min_count"] == 2


def test_cli_refuses_bad_arguments(criteo_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "x"
    with pytest.raises(SystemExit):
        cli(f"--data {criteo_csv} --out {out}")  # csv needs columns
    with pytest.raises(ValueError, match="not dense"):
        cli(f"--data {criteo_csv} --label label --dense I1 --sparse C1 --bucketize C1 --out {out}")
    with pytest.raises(ValueError, match="no training or validation rows"):
        cli(f"--data {criteo_csv} --label label --sparse C1 --valid-fraction 0 --out {out}")


RARE_DATA = SyntheticConfig(seed=5, max_cardinality=5000)  # long tails: values seen once
RARE_ROWS, RARE_VALID = 20_000, 5_000


@pytest.fixture(scope="module")
def rare_tsv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rare") / "data.tsv"
    generate(path, RARE_ROWS, RARE_DATA)
    return path


def norms_by_count(checkpoint: Checkpoint, data: Path) -> dict[str, np.ndarray]:
    """Embedding norms of the values seen once or twice in training, and of those seen
    at least 100 times."""
    num_train = RARE_ROWS - RARE_VALID
    chunks = list(read_chunks([data], "criteo", CRITEO_SCHEMA))
    columns = {
        k: np.concatenate([c.columns[k] for c in chunks])[:num_train] for k in chunks[0].columns
    }
    ids, _ = checkpoint.features.encode(columns, num_train)
    out: dict[str, list[np.ndarray]] = {"rare": [], "frequent": []}
    for j, size in enumerate(checkpoint.features.vocab_sizes):
        counts = np.bincount(ids[:, j], minlength=size)
        counts[0] = 0  # row 0 is OOV and missing, not a value
        norms = checkpoint.table_rows(j)[:, 1:].norm(dim=1).numpy()
        out["rare"].append(norms[(counts >= 1) & (counts <= 2)])
        out["frequent"].append(norms[counts >= 100])
    return {k: np.concatenate(v) for k, v in out.items()}


def test_table_l2_shrinks_rare_rows_and_beats_no_regularisation(
    rare_tsv: Path, tmp_path: Path
) -> None:
    # The same small run with the table-wide L2 and without any regulariser; min_count 1,
    # so that values seen once or twice have rows of their own to overfit.
    base = TrainConfig(
        epochs=3,
        batch_size=256,
        lr=5e-3,
        min_count=1,
        embed_dim=8,
        hidden_units=(32, 16),
        valid_fraction=RARE_VALID / RARE_ROWS,
        lr_decay=1.0,
        l2_embedding=0.0,
        seed=3,
        threads=1,
    )
    runs = {}
    for name, l2 in (("l2", 1e-2), ("none", 0.0)):
        config = dataclasses.replace(base, embedding_l2=l2)
        train([rare_tsv], "criteo", CRITEO_SCHEMA, tmp_path / name, config, progress=False)
        runs[name] = load_checkpoint(tmp_path / name)
    assert runs["l2"].metrics["valid_auc"] > runs["none"].metrics["valid_auc"] + 0.01

    regularised, free = norms_by_count(runs["l2"], rare_tsv), norms_by_count(runs["none"], rare_tsv)
    assert len(regularised["rare"]) > 1000 and len(regularised["frequent"]) > 100
    # Rare values' rows are pulled to (near) zero; frequent ones are held by their data.
    assert regularised["rare"].mean() < 0.05 * regularised["frequent"].mean()
    # Without the regulariser, rare rows keep their size (initial N(0, 0.01) plus what
    # their one or two rows taught them).
    assert regularised["rare"].mean() < 0.05 * free["rare"].mean()
    assert free["rare"].mean() > 0.5 * free["frequent"].mean()


def test_recorded_config_leaves_out_options_at_off() -> None:
    off = TrainConfig(embedding_l2=0.0, lr_decay=1.0)
    assert "embedding_l2" not in recorded_config(off) and "lr_decay" not in recorded_config(off)
    on_by_default = recorded_config(TrainConfig())
    assert on_by_default["embedding_l2"] > 0 and on_by_default["lr_decay"] < 1
    on = recorded_config(dataclasses.replace(TrainConfig(), **TABLE_L2))
    assert on["embedding_l2"] == 0.01 and on["lr_decay"] == 0.1


def test_table_l2_needs_adam(criteo_csv: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="optimizer adam"):
        cli(
            f"--data {criteo_csv} --label label --sparse C1 --optimizer sgd",
            f"--embedding-l2 0.01 --out {tmp_path / 'x'}",
        )

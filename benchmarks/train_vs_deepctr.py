"""Training throughput and test AUC: this project's DeepFM against DeepCTR-Torch's DeepFM.

Both models train on the same generated Criteo-shaped file (``model.synthetic``), split
80/10/10 in file order (train / valid / test), with the same encoded features, one after
the other in the same process:

- ours: ``model.train.train``; throughput is its ``samples_per_s`` (rows per second of
  the training loop, validation excluded);
- DeepCTR-Torch 0.3.0: ``deepctr_torch.models.DeepFM`` on the ids and dense values that
  our checkpoint's FeatureSpec gives (fitted on the training rows only); throughput is
  training rows x epochs over the wall time of its ``fit`` calls (one epoch per call,
  validation between the calls and outside the timer).

Both keep the weights of the epoch with the best validation AUC and are scored once on
the test rows (sklearn's ``roc_auc_score``). Same embedding dim, DNN widths, batch size,
Adam and learning rate, no dropout, same epochs, 2 torch threads, CPU. Each library
keeps its own regularisation defaults (reported in the output).

Run from the repository root (needs ``pip install deepctr-torch==0.3.0 requests``):

    python -m benchmarks.train_vs_deepctr                           # 1,000,000 rows
    python -m benchmarks.train_vs_deepctr --rows 60000 --epochs 1   # smoke test

It prints a table and writes ``train_vs_deepctr.json`` and ``train_vs_deepctr.md`` to
``--results``. The data file and our checkpoint go to ``benchmarks/work/`` (gitignored);
a data file with the requested row count is reused.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import os
import platform
import shlex
import sys
import time
import types
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks import report
from benchmarks.datasets import WORK, generated
from model.checkpoint import load_checkpoint
from model.data import CRITEO_SCHEMA, read_chunks
from model.evaluate import logloss
from model.features import FeatureSpec
from model.train import TrainConfig, train

THREADS = 2
VALID_FRACTION = 0.1
TEST_FRACTION = 0.1
PREDICT_BATCH = 65536
TARGET_RATIO = 1.5  # ours / theirs, rows per second
TARGET_AUC_MARGIN = 0.002  # ours >= theirs - margin
NAME = "train_vs_deepctr"


@dataclass(frozen=True)
class Settings:
    """What both runs share."""

    rows: int
    epochs: int
    batch_size: int
    lr: float
    embed_dim: int
    hidden_units: tuple[int, ...]
    dropout: float = 0.0
    optimizer: str = "torch.optim.Adam"
    threads: int = THREADS
    device: str = "cpu"


@dataclass(frozen=True)
class Splits:
    train: int
    valid: int
    test: int


@dataclass(frozen=True)
class RunResult:
    """One model's figures."""

    rows_per_s: float
    train_seconds: float
    best_epoch: int
    valid_auc: float
    test_auc: float
    test_logloss: float


@dataclass(frozen=True)
class Encoded:
    """Every row of the file, encoded: ids ``N x F``, dense ``N x D``, labels ``N``."""

    ids: np.ndarray
    dense: np.ndarray
    labels: np.ndarray


# --- data -------------------------------------------------------------------------------


def split_sizes(num_rows: int) -> Splits:
    """The split ``model.train.train`` makes: train, then valid, then test, in file order."""
    num_test = round(num_rows * TEST_FRACTION)
    num_valid = round(num_rows * VALID_FRACTION)
    return Splits(num_rows - num_valid - num_test, num_valid, num_test)


def encode_file(path: Path, features: FeatureSpec) -> Encoded:
    """Encode the whole file with ``features``, as our trainer does."""
    ids, dense, labels = [], [], []
    for chunk in read_chunks([path], "criteo", CRITEO_SCHEMA):
        chunk_ids, chunk_dense = features.encode(chunk.columns, len(chunk))
        ids.append(chunk_ids)
        dense.append(chunk_dense)
        labels.append(chunk.labels)
    return Encoded(np.concatenate(ids), np.concatenate(dense), np.concatenate(labels))


# --- ours -------------------------------------------------------------------------------


def run_ours(path: Path, settings: Settings, checkpoint: Path) -> RunResult:
    """Train this project's DeepFM with ``model.train.train``."""
    config = TrainConfig(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer="adam",
        embed_dim=settings.embed_dim,
        hidden_units=settings.hidden_units,
        dropout=settings.dropout,
        valid_fraction=VALID_FRACTION,
        test_fraction=TEST_FRACTION,
        patience=settings.epochs,  # never stop early: both train every epoch
        threads=settings.threads,
    )
    result = train(
        [path], "criteo", CRITEO_SCHEMA, checkpoint, config, workdir=WORK, progress=False
    )
    rows_trained = split_sizes(settings.rows).train * len(result.history)
    return RunResult(
        rows_per_s=result.samples_per_s,
        train_seconds=rows_trained / result.samples_per_s,
        best_epoch=int(result.metrics["best_epoch"]),
        valid_auc=result.metrics["valid_auc"],
        test_auc=result.metrics["test_auc"],
        test_logloss=result.metrics["test_logloss"],
    )


def ours_regularisation() -> dict[str, Any]:
    d = TrainConfig()
    return {
        "embedding_l2": d.embedding_l2,
        "l2_embedding": d.l2_embedding,
        "lr_decay": d.lr_decay,
        "form": "embedding_l2/2 * sum of squares of every row of the embedding tables, "
        "added to the mean BCE loss and optimised by Adam lazily (model.lazy_adam); "
        "l2_embedding * sum of squares of the batch's gathered rows / batch size; "
        "the learning rate times lr_decay after an epoch without a better valid AUC",
    }


# --- DeepCTR-Torch ----------------------------------------------------------------------


def import_deepctr() -> types.SimpleNamespace:
    """Import deepctr_torch without its import-time version check.

    ``deepctr_torch/__init__.py`` starts a thread that GETs PyPI's JSON API (no timeout)
    to warn about newer releases; a stub ``deepctr_torch.utils`` (only ``__init__`` uses
    it) keeps the benchmark offline and free of that thread.
    """
    stub = types.ModuleType("deepctr_torch.utils")
    stub.check_version = lambda version: None  # type: ignore[attr-defined]
    sys.modules.setdefault("deepctr_torch.utils", stub)
    import deepctr_torch
    from deepctr_torch.inputs import DenseFeat, SparseFeat
    from deepctr_torch.models import DeepFM

    return types.SimpleNamespace(
        version=deepctr_torch.__version__, DeepFM=DeepFM, SparseFeat=SparseFeat, DenseFeat=DenseFeat
    )


def deepctr_defaults(deepctr: types.SimpleNamespace) -> dict[str, Any]:
    """The DeepFM constructor defaults we leave alone (regularisation, init, seed)."""
    params = inspect.signature(deepctr.DeepFM.__init__).parameters
    keys = ("l2_reg_linear", "l2_reg_embedding", "l2_reg_dnn", "init_std", "seed", "dnn_use_bn")
    return {k: params[k].default for k in keys}


def build_deepctr(deepctr: types.SimpleNamespace, features: FeatureSpec, settings: Settings) -> Any:
    """DeepCTR's DeepFM on our fields: one SparseFeat per embedded, one DenseFeat per dense."""
    columns = [
        deepctr.SparseFeat(f.name, vocabulary_size=f.vocab_size, embedding_dim=settings.embed_dim)
        for f in features.embedded_fields
    ]
    columns += [deepctr.DenseFeat(f.name, 1) for f in features.dense_fields]
    model = deepctr.DeepFM(
        columns,
        columns,
        dnn_hidden_units=settings.hidden_units,
        dnn_dropout=settings.dropout,
        task="binary",
        device=settings.device,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    model.compile(optimizer, "binary_crossentropy")
    return model


def deepctr_inputs(
    features: FeatureSpec,
    data: Encoded,
    start: int,
    stop: int,
) -> dict[str, np.ndarray]:
    """Rows ``start..stop`` as DeepCTR's input dict, float32 (it casts to float anyway)."""
    if max(features.vocab_sizes) >= 1 << 24:
        raise ValueError("ids above 2**24 are not exact in float32")
    out = {
        f.name: data.ids[start:stop, j].astype(np.float32)
        for j, f in enumerate(features.embedded_fields)
    }
    out.update({f.name: data.dense[start:stop, j] for j, f in enumerate(features.dense_fields)})
    return out


def predict(model: Any, x: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=PREDICT_BATCH)).reshape(-1)


def run_deepctr(
    deepctr: types.SimpleNamespace, features: FeatureSpec, data: Encoded, settings: Settings
) -> RunResult:
    """Train DeepCTR's DeepFM one epoch per ``fit`` call; only ``fit`` is timed."""
    splits = split_sizes(settings.rows)
    train_x = deepctr_inputs(features, data, 0, splits.train)
    train_y = data.labels[: splits.train]
    valid_end = splits.train + splits.valid
    valid_x = deepctr_inputs(features, data, splits.train, valid_end)
    valid_y = data.labels[splits.train : valid_end]
    model = build_deepctr(deepctr, features, settings)
    seconds, best_auc, best_epoch, best_state = 0.0, -1.0, 0, None
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints its device and sizes
            model.fit(
                train_x,
                train_y,
                batch_size=settings.batch_size,
                epochs=1,
                verbose=0,
                validation_data=None,
                shuffle=True,
            )
        seconds += time.perf_counter() - started
        valid_auc = float(roc_auc_score(valid_y, predict(model, valid_x)))
        if valid_auc > best_auc:
            best_auc, best_epoch = valid_auc, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    test_y = data.labels[valid_end:]
    test_p = predict(model, deepctr_inputs(features, data, valid_end, len(data.labels)))
    return RunResult(
        rows_per_s=splits.train * settings.epochs / seconds,
        train_seconds=seconds,
        best_epoch=best_epoch,
        valid_auc=best_auc,
        test_auc=float(roc_auc_score(test_y, test_p)),
        test_logloss=logloss(test_y, test_p),
    )


# --- report -----------------------------------------------------------------------------


def summarise(
    settings: Settings,
    ours: RunResult,
    theirs: RunResult,
    deepctr: types.SimpleNamespace,
    command: str,
) -> dict[str, Any]:
    ratio = ours.rows_per_s / theirs.rows_per_s
    auc_diff = ours.test_auc - theirs.test_auc
    return {
        "benchmark": NAME,
        "command": command,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepctr_torch": deepctr.version,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
        "data": {
            "generator": "model.synthetic.generate with SyntheticConfig() defaults",
            "rows": settings.rows,
            "splits": asdict(split_sizes(settings.rows)),
        },
        "settings": {
            **asdict(settings),
            "hidden_units": list(settings.hidden_units),
            "selection": "weights of the epoch with the best valid AUC, scored once on test",
            "ours_regularisation": ours_regularisation(),
            "deepctr_defaults": deepctr_defaults(deepctr),
        },
        "results": {"ours": asdict(ours), "deepctr_torch": asdict(theirs)},
        "comparison": {"throughput_ratio": ratio, "test_auc_difference": auc_diff},
        "targets": {
            "throughput_ratio": {"target": f">= {TARGET_RATIO}", "met": ratio >= TARGET_RATIO},
            "test_auc": {
                "target": f"ours >= deepctr - {TARGET_AUC_MARGIN}",
                "met": auc_diff >= -TARGET_AUC_MARGIN,
            },
        },
    }


def table_rows(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    ours, theirs = summary["results"]["ours"], summary["results"]["deepctr_torch"]
    return [
        ("training rows/s", f"{ours['rows_per_s']:,.0f}", f"{theirs['rows_per_s']:,.0f}"),
        ("training seconds", f"{ours['train_seconds']:.1f}", f"{theirs['train_seconds']:.1f}"),
        ("best epoch (valid AUC)", str(ours["best_epoch"]), str(theirs["best_epoch"])),
        ("valid AUC", f"{ours['valid_auc']:.4f}", f"{theirs['valid_auc']:.4f}"),
        ("test AUC", f"{ours['test_auc']:.4f}", f"{theirs['test_auc']:.4f}"),
        ("test logloss", f"{ours['test_logloss']:.4f}", f"{theirs['test_logloss']:.4f}"),
    ]


def verdicts(summary: dict[str, Any]) -> list[str]:
    comparison, targets = summary["comparison"], summary["targets"]
    ratio, diff = comparison["throughput_ratio"], comparison["test_auc_difference"]
    met = {True: "met", False: "MISSED"}
    return [
        f"throughput ratio ours/deepctr: {ratio:.2f}x "
        f"(target {targets['throughput_ratio']['target']}: "
        f"{met[targets['throughput_ratio']['met']]})",
        f"test AUC ours - deepctr: {diff:+.4f} "
        f"(target {targets['test_auc']['target']}: {met[targets['test_auc']['met']]})",
    ]


def print_report(summary: dict[str, Any]) -> None:
    print()
    print(f"{'':24}{'ours':>14}{'deepctr-torch':>16}")
    for label, ours, theirs in table_rows(summary):
        print(f"{label:24}{ours:>14}{theirs:>16}")
    print()
    for line in verdicts(summary):
        print(line)


def settings_lines(summary: dict[str, Any]) -> list[str]:
    s, data, env = summary["settings"], summary["data"], summary["environment"]
    splits = data["splits"]
    return [
        f"- data: {data['rows']:,} rows from {data['generator']}; split in file order "
        f"train {splits['train']:,} / valid {splits['valid']:,} / test {splits['test']:,}",
        "- features: our FeatureSpec fitted on the training rows (log dense transform, "
        "min_count 1); DeepCTR gets the same ids (SparseFeat per sparse field, "
        "vocabulary_size = our vocab size incl. OOV row 0) and the same dense values "
        "(DenseFeat, dim 1)",
        f"- embed dim {s['embed_dim']}, DNN {s['hidden_units']}, dropout {s['dropout']}, "
        f"batch {s['batch_size']}, {s['optimizer']} lr {s['lr']}, epochs {s['epochs']}, "
        f"torch threads {env['torch_threads']}, device {s['device']}, "
        f"deterministic algorithms {env['torch_deterministic_algorithms']} (both)",
        f"- model selection: {s['selection']}",
        f"- ours (model.train's defaults): table L2 {s['ours_regularisation']['embedding_l2']}, "
        f"per-batch L2 {s['ours_regularisation']['l2_embedding']}, lr decay "
        f"{s['ours_regularisation']['lr_decay']} ({s['ours_regularisation']['form']})",
        f"- DeepCTR-Torch: regularisation and init left at its defaults {s['deepctr_defaults']} "
        "(its L2 terms are summed over the whole embedding and linear tables every step, "
        "added to a loss summed over the batch)",
        "- throughput: ours = model.train's training-loop rows/s (validation excluded); "
        "DeepCTR = training rows x epochs / wall time of its fit calls (verbose=0, "
        "validation_data=None; validation between calls, untimed)",
        f"- environment: Python {env['python']}, torch {env['torch']}, deepctr-torch "
        f"{env['deepctr_torch']}, {env['cpu_count']} CPUs ({env['machine']})",
    ]


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Training: this project's DeepFM vs DeepCTR-Torch's DeepFM",
        "",
        f"Run {summary['created_at']}. Reproduce from the repository root with:",
        "",
        f"    {summary['command']}",
        "",
        "| | ours | deepctr-torch |",
        "|---|---:|---:|",
        *(f"| {label} | {ours} | {theirs} |" for label, ours, theirs in table_rows(summary)),
        "",
        "## Targets",
        "",
        *(f"- {line}" for line in verdicts(summary)),
        "",
        "## Settings",
        "",
        *settings_lines(summary),
        "",
    ]
    if summary["data"]["rows"] < 1_000_000:
        lines += [
            f"Note: a {summary['data']['rows']:,}-row run is a smoke test, "
            "not the benchmark (default 1,000,000 rows).",
            "",
        ]
    return "\n".join(lines)


def write_results(summary: dict[str, Any], directory: Path) -> None:
    path = report.write(NAME, summary, markdown(summary), directory)
    print(f"\nwrote {path} and its JSON beside it")


# --- main -------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig().lr)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument(
        "--hidden-units",
        default="256,128",
        help="comma-separated widths of the DNN's hidden layers",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=report.RESULTS,
        help="directory for the JSON and markdown results",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    settings = Settings(
        rows=args.rows,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        embed_dim=args.embed_dim,
        hidden_units=tuple(int(h) for h in args.hidden_units.split(",") if h.strip()),
    )
    deepctr = import_deepctr()
    path = generated(settings.rows)
    checkpoint = WORK / "ours-checkpoint"

    print(f"training ours on {split_sizes(settings.rows).train:,} rows ...")
    ours = run_ours(path, settings, checkpoint)

    print("encoding the file with our checkpoint's FeatureSpec ...")
    features = load_checkpoint(checkpoint).features
    data = encode_file(path, features)
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)  # as model.train.train runs ours
    print(f"training deepctr-torch {deepctr.version} on the same rows ...")
    theirs = run_deepctr(deepctr, features, data, settings)

    command = shlex.join(["python", "-m", f"benchmarks.{NAME}", *argv])
    summary = summarise(settings, ours, theirs, deepctr, command)
    print_report(summary)
    write_results(summary, args.results)


if __name__ == "__main__":
    main()

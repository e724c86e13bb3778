"""Train a DeepFM and write its checkpoint.

    python -m model.train --data train.tsv --out models/mine

The data is read twice, in chunks: once to learn the vocabularies and dense
statistics on the training rows, once to encode every row to flat files in a
work directory; training reads shuffled batches back from those files. Memory
therefore depends on the vocabularies and the model, not on the number of rows.
Rows are split in file order: the first rows train, the next ``--valid-fraction``
validate (early stopping on AUC) and the last ``--test-fraction`` are held out
and scored once with the best weights.

``--init-from CHECKPOINT`` trains on from a checkpoint (``model.warmstart``): its
vocabularies kept and extended with the new data's values, its architecture, dense
statistics and weights; the new checkpoint records its parent's version.

By default the embedding tables carry an L2 term over every row
(``--embedding-l2``), optimised by Adam lazily (``model.lazy_adam``): a step
costs the batch's rows, not the whole table. The learning rate is multiplied by
``--lr-decay`` after each epoch whose validation AUC is no better than the best.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.calibration import METHODS, Calibration, Method
from model.checkpoint import load_checkpoint, save_checkpoint
from model.cli import add_data_arguments, data_format, names, schema_from_args
from model.data import (
    EncodedData,
    Format,
    Schema,
    count_rows,
    encode_to_disk,
    read_chunks,
    take_rows,
)
from model.deepfm import DeepFM, DeepFMConfig
from model.evaluate import auc, logloss
from model.features import SpecFitter, Transform
from model.lazy_adam import LazyL2Adam
from model.predict import EVAL_BATCH, predict_logits
from model.warmstart import extend_model, extend_spec

OPTIMIZERS = ("adam", "adamw", "adagrad", "sgd")
TABLES = "sparse_rows.weight"
ALL_THREADS = torch.get_num_threads()  # torch's default, before any run changes it
# Options added after checkpoints began recording their config, at the value that
# means "off": left out of the record, so that a run without them records (and
# hashes to) what it did before they existed.
RECORDED_WHEN_ON: dict[str, Any] = {
    "embedding_l2": 0.0,
    "lr_decay": 1.0,
    "negative_rate": 1.0,
    "calibration": "none",
}


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 10
    batch_size: int = 512
    lr: float = 5e-4
    optimizer: str = "adam"
    embed_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    # The table-wide L2 (lazy, DESIGN §2) with reduce-on-plateau, chosen on the project's
    # own data (benchmarks/train_quality, 1M rows, min count 10): test AUC gap to the
    # oracle 0.040 with no table L2, 0.0435 at 1e-2 (TABLE_L2), 0.033 at 1e-3, 0.029 at
    # 3e-4 and 1e-4. It replaces the per-batch L2 (l2_embedding), which adds nothing on
    # top of it.
    l2_embedding: float = 0.0
    embedding_l2: float = 3e-4
    lr_decay: float = 0.1
    min_count: int = 1
    max_vocab: int | None = None
    dense_transform: Transform = "log"
    bucketize: tuple[str, ...] = ()
    valid_fraction: float = 0.1
    test_fraction: float = 0.0
    patience: int = 2
    seed: int = 0
    threads: int | None = None
    # Negative down-sampling: keep each training negative with this probability (every
    # positive is kept); served probabilities are corrected back (model.calibration).
    negative_rate: float = 1.0
    # A calibration map fitted on the validation rows after training (model.calibration).
    calibration: Method = "none"


# The stronger table-wide L2 that beat FuxiCTR on its field-aware set (DESIGN §2): what
# benchmarks/train_vs_fuxictr runs, `--embedding-l2 0.01 --lr-decay 0.1 --l2-embedding 0`
# on the command line (the defaults but a stronger L2).
TABLE_L2 = {"embedding_l2": 1e-2, "lr_decay": 0.1, "l2_embedding": 0.0}


@dataclass(frozen=True)
class TrainResult:
    version: str
    metrics: dict[str, float]
    history: list[dict[str, float]]
    samples_per_s: float


def transforms_for(schema: Schema, config: TrainConfig) -> dict[str, Transform]:
    unknown = set(config.bucketize) - set(schema.dense)
    if unknown:
        raise ValueError(f"--bucketize names columns that are not dense: {sorted(unknown)}")
    out: dict[str, Transform] = {}
    for name in schema.dense:
        out[name] = "bucket" if name in config.bucketize else config.dense_transform
    for name in schema.sparse:
        out[name] = "category"
    return out


def fingerprint(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Name, size and SHA-256 of every data file (names only: paths differ by machine)."""
    out = []
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
        out.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
    return out


def recorded_config(config: TrainConfig) -> dict[str, Any]:
    """The config as the checkpoint records it (see ``RECORDED_WHEN_ON``)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    return {k: v for k, v in out.items() if RECORDED_WHEN_ON.get(k, object()) != v}


def make_optimizer(name: str, params: Any, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def logits_of(
    model: DeepFM, data: EncodedData, start: int, stop: int
) -> tuple[np.ndarray, np.ndarray]:
    """The logits and labels of rows ``start..stop``, read in batches."""
    model.eval()
    labels, logits = [], []
    for ids, dense, y in data.batches(start, stop, EVAL_BATCH):
        labels.append(y)
        logits.append(predict_logits(model, ids, dense))
    return np.concatenate(logits), np.concatenate(labels)


def score(
    model: DeepFM,
    data: EncodedData,
    start: int,
    stop: int,
    calibration: Calibration | None = None,
) -> dict[str, float]:
    """AUC and logloss of rows ``start..stop`` with the probabilities ``calibration``
    serves (default: sigmoid of the logits)."""
    logits, y = logits_of(model, data, start, stop)
    p = (calibration or Calibration()).probabilities(logits)
    return {"auc": auc(y, p), "logloss": logloss(y, p)}


def train(
    paths: Sequence[Path],
    fmt: Format,
    schema: Schema,
    out: Path,
    config: TrainConfig,
    *,
    created_at: str | None = None,
    workdir: Path | None = None,
    progress: bool = True,
    init_from: Path | None = None,
) -> TrainResult:
    """Train on ``paths`` and write the best model's checkpoint to ``out``.

    ``init_from``: a checkpoint to start from (``model.warmstart``): its vocabularies,
    extended with the new data's values, its transforms, architecture and weights; the
    new checkpoint records it as its parent."""
    Calibration(config.negative_rate)  # (a rate outside (0, 1] fails now, not after encoding)
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    # Always set: float sums depend on the thread count, and an earlier run in the same
    # process may have changed it; "all" is torch's own default for this machine.
    torch.set_num_threads(config.threads or ALL_THREADS)
    num_rows = count_rows(paths, fmt)
    num_test = round(num_rows * config.test_fraction)
    num_valid = round(num_rows * config.valid_fraction)
    num_train = num_rows - num_valid - num_test
    if num_train < 1 or num_valid < 1:
        raise ValueError(f"{num_rows} rows leave no training or validation rows")

    parent = load_checkpoint(init_from) if init_from is not None else None
    if parent is not None:
        config = dataclasses.replace(
            config,
            embed_dim=parent.config.embed_dim,
            hidden_units=parent.config.hidden_units,
            dropout=parent.config.dropout,
        )
        parent_spec = parent.read_features()
        transforms = {f.name: f.transform for f in parent_spec.fields}
        kinds = {f.name: f.kind for f in parent_spec.fields}
        given = {name: "dense" for name in schema.dense} | {n: "sparse" for n in schema.sparse}
        if given != kinds:
            raise ValueError(
                f"the data's columns {given} are not the fields of {init_from} {kinds} "
                "(the same names, dense and sparse alike)"
            )
    else:
        transforms = transforms_for(schema, config)
    fitter = SpecFitter(transforms, config.min_count, config.max_vocab)
    for chunk in take_rows(read_chunks(paths, fmt, schema), 0, num_train):
        fitter.update(chunk.columns)
    features = fitter.finish()
    if parent is not None:
        features = extend_spec(parent_spec, features)

    with tempfile.TemporaryDirectory(prefix="ctr-train-", dir=workdir) as tmp:
        data = encode_to_disk(read_chunks(paths, fmt, schema), features, Path(tmp))
        if data.num_rows != num_rows:
            raise ValueError(f"counted {num_rows} rows but read {data.num_rows}")
        if parent is not None:
            model = extend_model(parent.build_model(), parent_spec, features)
        else:
            model = DeepFM(
                DeepFMConfig(
                    vocab_sizes=features.vocab_sizes,
                    num_dense=len(features.dense_fields),
                    embed_dim=config.embed_dim,
                    hidden_units=config.hidden_units,
                    dropout=config.dropout,
                )
            )
        history, best, best_state, samples_per_s = _fit(
            model, data, num_train, num_valid, config, progress
        )
        model.load_state_dict(best_state)
        metrics = {f"valid_{k}": v for k, v in best.items() if k in ("auc", "logloss")}
        metrics["best_epoch"] = best["epoch"]
        calibration = Calibration(config.negative_rate)
        if config.calibration != "none":
            # Fitted on the validation rows (never down-sampled), after the correction.
            logits, labels = logits_of(model, data, num_train, num_train + num_valid)
            calibration = calibration.with_method(config.calibration, logits, labels)
            metrics["valid_logloss_calibrated"] = logloss(labels, calibration.probabilities(logits))
        if num_test:
            test = score(model, data, num_train + num_valid, num_rows, calibration)
            metrics.update({f"test_{k}": v for k, v in test.items()})

    training = {
        "data": {
            "format": fmt,
            "files": fingerprint(paths),
            "rows": num_rows,
            "schema": asdict(schema),
        },
        "splits": {"train": num_train, "valid": num_valid, "test": num_test},
        "config": recorded_config(config),
        "history": history,
    }
    if parent is not None:
        training["parent"] = {
            "version": parent.version,
            "new_values": sum(features.vocab_sizes) - sum(parent.config.vocab_sizes),
        }
    version = save_checkpoint(
        out,
        model,
        features,
        created_at=created_at or datetime.now(UTC).isoformat(timespec="seconds"),
        metrics=metrics,
        training=training,
        calibration=calibration,
    )
    return TrainResult(version, metrics, history, samples_per_s)


class Stepper:
    """One training step: the loss of a batch, backward, the optimisers' steps.

    Without ``embedding_l2`` one optimiser takes every parameter, the tables
    densely. With it, the tables' rows go through ``LazyL2Adam`` (only the batch's
    rows are gathered, differentiated and updated) and the rest through Adam.
    """

    def __init__(self, model: DeepFM, config: TrainConfig) -> None:
        self.model = model
        self.config = config
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.tables: LazyL2Adam | None = None
        if config.embedding_l2 and model.sparse_rows is not None:
            if config.optimizer != "adam":
                raise ValueError(
                    "--embedding-l2 is optimised by Adam: use --optimizer adam, or --embedding-l2 0"
                )
            self.tables = LazyL2Adam(model.sparse_rows.weight, lr=config.lr, l2=config.embedding_l2)
            rest = [p for name, p in model.named_parameters() if name != TABLES]
            self.optimizer = make_optimizer(config.optimizer, rest, config.lr)
        else:
            self.optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.tables is not None:
            self.tables.lr = lr

    def finish_epoch(self) -> None:
        """Bring every lazily updated row up to date (before validation or saving)."""
        if self.tables is not None:
            self.tables.catch_up_all()

    def __call__(
        self,
        ids: np.ndarray,
        dense: np.ndarray,
        labels: np.ndarray,
    ) -> float:
        """Train on one batch; return its mean loss (without the regulariser)."""
        y = torch.from_numpy(labels)
        if self.tables is None:
            rows = self.model.gather(torch.from_numpy(ids))
        else:
            flat = torch.from_numpy(ids) + self.model.offsets
            unique, inverse = torch.unique(flat, return_inverse=True)
            leaf = self.tables.fetch(unique).requires_grad_()
            rows = leaf[inverse]
        embeddings = rows[..., 1:]
        logits = self.model.forward_rows(rows[..., 0], embeddings, torch.from_numpy(dense))
        loss = self.loss_fn(logits, y)
        objective = loss
        if self.config.l2_embedding:
            objective = loss + self.config.l2_embedding * embeddings.square().sum() / len(labels)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        self.optimizer.step()
        if self.tables is not None:
            assert leaf.grad is not None
            self.tables.step(unique, leaf.grad)
        return float(loss.item())


def _fit(
    model: DeepFM,
    data: EncodedData,
    num_train: int,
    num_valid: int,
    config: TrainConfig,
    progress: bool,
) -> tuple[list[dict[str, float]], dict[str, float], dict[str, torch.Tensor], float]:
    stepper = Stepper(model, config)
    rng = np.random.default_rng(config.seed)
    correction = Calibration(config.negative_rate)  # (validation rows are all kept)
    history: list[dict[str, float]] = []
    best: dict[str, float] = {"auc": -1.0}
    best_state: dict[str, torch.Tensor] = {}
    total_samples, total_seconds = 0, 0.0
    lr = config.lr
    for epoch in range(1, config.epochs + 1):
        model.train()
        started = time.perf_counter()
        loss_sum, seen = 0.0, 0
        bar = tqdm(
            total=num_train,
            desc=f"epoch {epoch}",
            unit="row",
            unit_scale=True,
            disable=not progress,
            leave=False,
        )
        batches = data.batches(
            0, num_train, config.batch_size, rng=rng, negative_rate=config.negative_rate
        )
        for ids, dense, labels in batches:
            loss_sum += stepper(ids, dense, labels) * len(labels)
            seen += len(labels)
            bar.update(len(labels))
            if bar.n % (config.batch_size * 20) < config.batch_size:
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", rows_s=f"{seen / elapsed:,.0f}")
        stepper.finish_epoch()
        bar.close()
        seconds = time.perf_counter() - started
        total_samples, total_seconds = total_samples + seen, total_seconds + seconds
        valid = score(model, data, num_train, num_train + num_valid, correction)
        # No timings in the record: it goes into the checkpoint, whose bytes (and so its
        # version) must depend only on the data, the code and the seed.
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "valid_auc": valid["auc"],
            "valid_logloss": valid["logloss"],
        }
        if config.lr_decay != 1.0:
            record["lr"] = lr
        history.append(record)
        if progress:
            print(
                f"epoch {epoch}: train loss {record['train_loss']:.4f}  valid AUC "
                f"{valid['auc']:.4f}  logloss {valid['logloss']:.4f}  {seen / seconds:,.0f} rows/s"
            )
        if valid["auc"] > best["auc"]:
            best = {**valid, "epoch": epoch}
            best_state = copy.deepcopy(model.state_dict())
        elif epoch - best["epoch"] >= config.patience:
            if progress:
                print(f"early stop: no better valid AUC for {config.patience} epochs")
            break
        else:
            # Reduce on plateau, as FuxiCTR and Keras do: the next epoch takes smaller steps
            # from where this one ended.
            lr *= config.lr_decay
            stepper.set_lr(lr)
    return history, best, best_state, total_samples / total_seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    d = TrainConfig()
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    parser.add_argument("--embed-dim", type=int, default=None, help=f"default: {d.embed_dim}")
    parser.add_argument(
        "--hidden-units",
        default=None,
        help="comma-separated widths of the DNN's hidden layers (default: "
        f"{','.join(map(str, d.hidden_units))})",
    )
    parser.add_argument("--dropout", type=float, default=None, help=f"default: {d.dropout}")
    parser.add_argument(
        "--l2-embedding",
        type=float,
        default=d.l2_embedding,
        help="L2 penalty on the embedding rows of each batch (the older regulariser; "
        f"default: {d.l2_embedding}, off since --embedding-l2 is on)",
    )
    parser.add_argument(
        "--embedding-l2",
        type=float,
        default=None,
        help="L2 over the whole embedding tables, l2/2 ||W||^2, applied lazily with Adam "
        f"(default: {d.embedding_l2} with --optimizer adam, else 0; 0.01 is the recipe that "
        "beat FuxiCTR); 0: off, the tables take dense steps",
    )
    parser.add_argument(
        "--lr-decay",
        type=float,
        default=d.lr_decay,
        help="multiply the learning rate by this after an epoch without a better valid AUC "
        f"(default: {d.lr_decay}; 1: constant)",
    )
    parser.add_argument(
        "--min-count",
        type=int,
        default=d.min_count,
        help="a value seen fewer times in training is OOV (Criteo practice: 10)",
    )
    parser.add_argument(
        "--max-vocab",
        type=int,
        default=None,
        help="keep at most this many values per field, most frequent first",
    )
    parser.add_argument(
        "--dense-transform",
        choices=("log", "standard"),
        default=None,
        help=f"default: {d.dense_transform}",
    )
    parser.add_argument(
        "--bucketize",
        default="",
        help="comma-separated dense columns to bucket into categories "
        "(floor(ln(x)^2)); 'all' for every dense column",
    )
    parser.add_argument("--valid-fraction", type=float, default=d.valid_fraction)
    parser.add_argument("--test-fraction", type=float, default=d.test_fraction)
    parser.add_argument(
        "--patience",
        type=int,
        default=d.patience,
        help="stop after this many epochs without a better valid AUC",
    )
    parser.add_argument(
        "--negative-rate",
        type=float,
        default=d.negative_rate,
        help="keep each training negative with this probability (seeded; every positive is "
        "kept); the checkpoint records it and serving corrects the probabilities back",
    )
    parser.add_argument(
        "--calibration",
        choices=METHODS,
        default=d.calibration,
        help="fit a calibration map on the validation rows after training (default: none)",
    )
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--created-at",
        default=None,
        help="timestamp to record (for reproducible checkpoints); default: now",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the encoded rows are written while training",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this checkpoint (incremental training): its vocabularies, extended "
        "with the new data's values, its architecture, transforms and weights",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    schema = schema_from_args(args, parser)
    if args.init_from is not None:
        given = [
            flag
            for flag, value in (
                ("--embed-dim", args.embed_dim),
                ("--hidden-units", args.hidden_units),
                ("--dropout", args.dropout),
                ("--dense-transform", args.dense_transform),
                ("--bucketize", args.bucketize or None),
            )
            if value is not None
        ]
        if given:
            parser.error(
                "--init-from keeps the checkpoint's architecture and transforms: "
                f"drop {', '.join(given)}"
            )
    bucketize = schema.dense if args.bucketize == "all" else names(args.bucketize)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        embed_dim=d.embed_dim if args.embed_dim is None else args.embed_dim,
        hidden_units=(
            d.hidden_units
            if args.hidden_units is None
            else tuple(int(h) for h in names(args.hidden_units))
        ),
        dropout=d.dropout if args.dropout is None else args.dropout,
        l2_embedding=args.l2_embedding,
        embedding_l2=(
            args.embedding_l2
            if args.embedding_l2 is not None
            else (d.embedding_l2 if args.optimizer == "adam" else 0.0)
        ),
        lr_decay=args.lr_decay,
        min_count=args.min_count,
        max_vocab=args.max_vocab,
        dense_transform=args.dense_transform or d.dense_transform,
        bucketize=bucketize,
        valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction,
        patience=args.patience,
        negative_rate=args.negative_rate,
        calibration=args.calibration,
        seed=args.seed,
        threads=args.threads,
    )
    started = time.perf_counter()
    result = train(
        args.data,
        data_format(args),
        schema,
        args.out,
        config,
        created_at=args.created_at,
        workdir=args.workdir,
        progress=not args.quiet,
        init_from=args.init_from,
    )
    print(f"wrote {args.out} ({result.version}) in {time.perf_counter() - started:.1f} s")
    for key, value in result.metrics.items():
        print(f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  training throughput: {result.samples_per_s:,.0f} rows/s")


if __name__ == "__main__":
    main()

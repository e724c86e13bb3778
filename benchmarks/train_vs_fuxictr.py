"""Test AUC, logloss and training speed: this project's table L2 recipe against FuxiCTR's DeepFM.

FuxiCTR 2.3.10 is the implementation behind the BARS open CTR benchmark. Both train, in
one run, on the same generated rows (``model.synthetic`` with a field-aware pairwise
truth, a three-way term and vocabularies up to 200,000 values), split in file order
into train / valid / test (400,000 / 100,000 / 100,000 by default):

- ours: ``model.train.train`` with the table L2 recipe (``TABLE_L2``) and the
  dimensions both share (DNN 256-128, batch 1024, Adam at lr 1e-3, embedding dim);
  throughput is its training loop's rows per second (validation excluded);
- FuxiCTR: its DeepFM, built from its own layers as ``model_zoo/DeepFM`` does (the
  wheel does not ship the model zoo), on its own data pipeline (dense fields bucketed
  by floor(ln(x)^2), min count 10, parquet through Ray Data), its ``fit`` (early
  stopping on validation AUC with patience 2, reduce-on-plateau, best weights kept),
  once per ``embedding_regularizer`` setting; throughput is training rows over the wall
  time of its training steps (its per-epoch validation excluded).

Rows/s to the best epoch: rows trained up to the end of the best epoch over the
training time they took. Targets: our test AUC >= FuxiCTR's best - 0.001, at >= 2x its
rows/s to its best epoch (against the setting with the best test AUC).

    python -m benchmarks.train_vs_fuxictr                              # 600,000 rows
    python -m benchmarks.train_vs_fuxictr --rows 60000 --max-epochs 2  # smoke test

Needs ``pip install -e '.[bench]'``. Writes ``train_vs_fuxictr.{json,md}`` to
benchmarks/results/; the data and FuxiCTR's parquet go to benchmarks/work/.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import report
from benchmarks.datasets import WORK, generated
from model.data import CRITEO_DENSE, CRITEO_SCHEMA, CRITEO_SPARSE
from model.synthetic import SyntheticConfig, read_truth
from model.train import TABLE_L2, TrainConfig, recorded_config, train

NAME = "train_vs_fuxictr"
THREADS = 2
DATA = SyntheticConfig(seed=18, max_cardinality=200_000, field_aware=True, three_way_std=0.3)
FUXI_REGULARISERS = (1e-5, 1e-4, 1e-2)
AUC_MARGIN = 0.001  # ours >= FuxiCTR's best - margin
SPEED_RATIO = 2.0  # ours / FuxiCTR's, rows/s to the best epoch


@dataclass(frozen=True)
class Shared:
    """What both trainers share."""

    rows: int
    embed_dim: int
    hidden_units: tuple[int, ...] = (256, 128)
    batch_size: int = 1024
    lr: float = 1e-3
    max_epochs: int = 10
    threads: int = THREADS

    @property
    def split(self) -> tuple[int, int, int]:
        """Train, valid and test rows: the last two sixths validate and test."""
        valid = test = self.rows // 6
        return self.rows - valid - test, valid, test


@dataclass(frozen=True)
class Run:
    """One trainer's figures on the test rows."""

    name: str
    test_auc: float
    test_logloss: float
    best_epoch: int
    epochs: int
    train_seconds: float  # training steps of every epoch, validation excluded
    seconds_to_best: float  # training steps up to the end of the best epoch
    rows_per_s_to_best: float
    valid_auc: list[float]


# --- ours -------------------------------------------------------------------------------


def ours_config(shared: Shared) -> TrainConfig:
    _, valid, test = shared.split
    return TrainConfig(
        epochs=shared.max_epochs,
        batch_size=shared.batch_size,
        lr=shared.lr,
        embed_dim=shared.embed_dim,
        hidden_units=shared.hidden_units,
        valid_fraction=valid / shared.rows,
        test_fraction=test / shared.rows,
        threads=shared.threads,
        **TABLE_L2,  # type: ignore[arg-type]
    )


def run_ours(path: Path, shared: Shared) -> Run:
    config = ours_config(shared)
    with tempfile.TemporaryDirectory(prefix="bench-fuxictr-ours-", dir=WORK) as tmp:
        result = train(
            [path], "criteo", CRITEO_SCHEMA, Path(tmp) / "model", config, workdir=Path(tmp)
        )
    train_rows = shared.split[0]
    epochs = len(result.history)
    best = int(result.metrics["best_epoch"])
    seconds = train_rows * epochs / result.samples_per_s
    return Run(
        name="ctr-serve model.train (--embedding-l2 0.01 --lr-decay 0.1)",
        test_auc=result.metrics["test_auc"],
        test_logloss=result.metrics["test_logloss"],
        best_epoch=best,
        epochs=epochs,
        train_seconds=seconds,
        seconds_to_best=seconds * best / epochs,
        rows_per_s_to_best=result.samples_per_s,
        valid_auc=[h["valid_auc"] for h in result.history],
    )


# --- FuxiCTR ----------------------------------------------------------------------------


def fuxictr_csvs(path: Path, shared: Shared, directory: Path) -> dict[str, Path]:
    """The generated TSV split in file order into three TSVs with a header, as FuxiCTR
    reads them (its reader wants column names)."""
    train_rows, valid, _ = shared.split
    header = "\t".join(("label", *CRITEO_DENSE, *CRITEO_SPARSE)) + "\n"
    bounds = {"train": (0, train_rows), "valid": (train_rows, train_rows + valid)}
    bounds["test"] = (train_rows + valid, shared.rows)
    directory.mkdir(parents=True, exist_ok=True)
    out = {name: directory / f"{name}.csv" for name in bounds}
    files = {name: p.open("w") for name, p in out.items()}
    try:
        for f in files.values():
            f.write(header)
        with path.open() as lines:
            for i, line in enumerate(lines):
                for name, (lo, hi) in bounds.items():
                    if lo <= i < hi:
                        files[name].write(line)
    finally:
        for f in files.values():
            f.close()
    return out


def fuxictr_dataset(path: Path, shared: Shared) -> tuple[Any, dict[str, str], float]:
    """FuxiCTR's feature map and parquet splits, built by its own pipeline (cached)."""
    from fuxictr.datasets.criteo import CustomizedFeatureProcessor
    from fuxictr.features import FeatureMap
    from fuxictr.preprocess import build_dataset

    root = WORK / "fuxictr"
    dataset_id = path.stem
    data_dir = root / dataset_id
    started = time.perf_counter()
    if not (data_dir / "feature_map.json").is_file():
        shutil.rmtree(data_dir, ignore_errors=True)
        csvs = fuxictr_csvs(path, shared, root / f"{dataset_id}-csv")
        processor = CustomizedFeatureProcessor(
            feature_cols=[
                {
                    "name": list(CRITEO_DENSE),
                    "active": True,
                    "dtype": "float",
                    "type": "categorical",
                    "preprocess": "convert_to_bucket",
                    "fill_na": 0,
                },
                {
                    "name": list(CRITEO_SPARSE),
                    "active": True,
                    "dtype": "str",
                    "type": "categorical",
                },
            ],
            label_col={"name": "label", "dtype": "float"},
            dataset_id=dataset_id,
            data_root=str(root),
        )
        build_dataset(
            processor,
            train_data=str(csvs["train"]),
            valid_data=str(csvs["valid"]),
            test_data=str(csvs["test"]),
            data_format="csv",
            sep="\t",
            min_categr_count=10,
        )
        shutil.rmtree(root / f"{dataset_id}-csv")
    feature_map = FeatureMap(dataset_id, str(data_dir))
    feature_map.load(str(data_dir / "feature_map.json"), {"embedding_dim": shared.embed_dim})
    splits = {s: str(data_dir / f"{s}.parquet") for s in ("train", "valid", "test")}
    return feature_map, splits, time.perf_counter() - started


def fuxictr_deepfm(feature_map: Any, shared: Shared, regulariser: float, model_root: Path) -> Any:
    """FuxiCTR's DeepFM, built from its layers exactly as its ``model_zoo/DeepFM`` does,
    with timers around its training steps and validations."""
    from fuxictr.pytorch.layers import FactorizationMachine, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel

    class DeepFM(BaseModel):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(
                feature_map,
                model_id="DeepFM",
                gpu=-1,
                embedding_regularizer=regulariser,
                net_regularizer=0,
                verbose=0,
                model_root=str(model_root),
                metrics=["logloss", "AUC"],
                monitor="AUC",
                monitor_mode="max",
                early_stop_patience=2,
                save_best_only=True,
            )
            self.embedding_layer = FeatureEmbedding(feature_map, shared.embed_dim)
            self.fm = FactorizationMachine(feature_map)
            self.mlp = MLP_Block(
                input_dim=feature_map.sum_emb_out_dim(),
                output_dim=1,
                hidden_units=list(shared.hidden_units),
                hidden_activations="ReLU",
                output_activation=None,
                dropout_rates=0,
                batch_norm=False,
            )
            self.compile("adam", "binary_crossentropy", shared.lr)
            self.reset_parameters()
            self.model_to_device()
            self.epoch_ends: list[float] = []  # training seconds at the end of each epoch
            self.valid_auc: list[float] = []
            self._eval_seconds = 0.0
            self._started = 0.0

        def forward(self, inputs: Any) -> dict[str, Any]:
            x = self.get_inputs(inputs)
            feature_emb = self.embedding_layer(x)
            y_pred = self.fm(x, feature_emb)
            y_pred += self.mlp(feature_emb.flatten(start_dim=1))
            return {"y_pred": self.output_activation(y_pred)}

        def fit(self, *args: Any, **kwargs: Any) -> None:
            self._started = time.perf_counter()
            super().fit(*args, **kwargs)

        def eval_step(self) -> None:
            started = time.perf_counter()
            self.epoch_ends.append(started - self._started - self._eval_seconds)
            super().eval_step()
            self._eval_seconds += time.perf_counter() - started

        def checkpoint_and_earlystop(self, logs: dict[str, float], min_delta: float = 1e-6) -> None:
            self.valid_auc.append(float(logs["AUC"]))
            super().checkpoint_and_earlystop(logs, min_delta)

    return DeepFM()


def run_fuxictr(feature_map: Any, splits: dict[str, str], shared: Shared, reg: float) -> Run:
    from fuxictr.pytorch.dataloaders import RankDataLoader
    from fuxictr.pytorch.torch_utils import seed_everything

    seed_everything(2019)
    torch.set_num_threads(shared.threads)
    with tempfile.TemporaryDirectory(prefix="bench-fuxictr-", dir=WORK) as tmp:
        model = fuxictr_deepfm(feature_map, shared, reg, Path(tmp))
        Path(model.model_dir).mkdir(parents=True, exist_ok=True)  # where fit saves the best
        train_gen, valid_gen = RankDataLoader(
            feature_map,
            stage="train",
            train_data=splits["train"],
            valid_data=splits["valid"],
            batch_size=shared.batch_size,
            shuffle=True,
            data_format="parquet",
        )
        model.fit(train_gen, epochs=shared.max_epochs, validation_data=valid_gen)
        test_gen = RankDataLoader(
            feature_map,
            stage="test",
            test_data=splits["test"],
            batch_size=shared.batch_size,
            shuffle=False,
            data_format="parquet",
        )
        logs = model.evaluate(test_gen, metrics=["logloss", "AUC"])
    best = int(np.argmax(model.valid_auc)) + 1
    epochs = len(model.epoch_ends)
    to_best = model.epoch_ends[best - 1]
    return Run(
        name=f"FuxiCTR {fuxictr_version()}, embedding_regularizer {reg:g}",
        test_auc=float(logs["AUC"]),
        test_logloss=float(logs["logloss"]),
        best_epoch=best,
        epochs=epochs,
        train_seconds=model.epoch_ends[-1],
        seconds_to_best=to_best,
        rows_per_s_to_best=shared.split[0] * best / to_best,
        valid_auc=model.valid_auc,
    )


def fuxictr_version() -> str:
    from fuxictr.version import __version__

    return str(__version__)


# --- speed, interleaved -----------------------------------------------------------------


def interleaved_speed(
    path: Path, shared: Shared, reg: float, rounds: int, steps: int
) -> dict[str, Any]:
    """Training rows/s of both, measured in alternating blocks of ``steps`` batches, so
    that both see the same load on a shared machine (each side's data loading included:
    ours reads its encoded files, FuxiCTR iterates its Ray Data loader)."""
    from fuxictr.pytorch.dataloaders import RankDataLoader

    from model.data import encode_to_disk, read_chunks, take_rows
    from model.deepfm import DeepFM, DeepFMConfig
    from model.features import SpecFitter
    from model.train import Stepper, transforms_for

    config = ours_config(shared)
    train_rows = shared.split[0]
    torch.manual_seed(0)
    torch.set_num_threads(shared.threads)
    fitter = SpecFitter(transforms_for(CRITEO_SCHEMA, config), config.min_count, config.max_vocab)
    for chunk in take_rows(read_chunks([path], "criteo", CRITEO_SCHEMA), 0, train_rows):
        fitter.update(chunk.columns)
    features = fitter.finish()
    feature_map, splits, _ = fuxictr_dataset(path, shared)
    with tempfile.TemporaryDirectory(prefix="bench-fuxictr-speed-", dir=WORK) as tmp:
        data = encode_to_disk(
            take_rows(read_chunks([path], "criteo", CRITEO_SCHEMA), 0, train_rows),
            features,
            Path(tmp),
        )
        ours = DeepFM(
            DeepFMConfig(
                features.vocab_sizes,
                len(features.dense_fields),
                config.embed_dim,
                config.hidden_units,
            )
        )
        stepper = Stepper(ours, config)
        rng = np.random.default_rng(0)
        theirs = fuxictr_deepfm(feature_map, shared, reg, Path(tmp))
        theirs._max_gradient_norm = 10.0  # as its fit sets it
        train_gen, _ = RankDataLoader(
            feature_map,
            stage="train",
            train_data=splits["train"],
            batch_size=shared.batch_size,
            shuffle=True,
            data_format="parquet",
        )

        def our_batches() -> Any:
            while True:
                yield from data.batches(0, train_rows, shared.batch_size, rng=rng)

        def their_batches() -> Any:
            while True:
                yield from train_gen

        mine, other = our_batches(), their_batches()
        ours.train()
        theirs.train()
        seconds = {"ours": 0.0, "fuxictr": 0.0}
        rows = {"ours": 0, "fuxictr": 0}
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(steps):
                ids, dense, labels = next(mine)
                stepper(ids, dense, labels)
                rows["ours"] += len(labels)
            seconds["ours"] += time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(steps):
                batch = next(other)
                theirs.train_step(batch)
                rows["fuxictr"] += len(batch["label"])
            seconds["fuxictr"] += time.perf_counter() - started
    speed = {k: rows[k] / seconds[k] for k in rows}
    return {
        "embedding_regularizer": reg,
        "rounds": rounds,
        "steps_per_block": steps,
        "rows_per_s": speed,
        "ratio": speed["ours"] / speed["fuxictr"],
    }


# --- report -----------------------------------------------------------------------------


def summarise(
    shared: Shared, ours: Run, theirs: list[Run], oracle: dict[str, float], prep: float
) -> dict[str, Any]:
    best = max(theirs, key=lambda r: r.test_auc)
    auc_diff = ours.test_auc - best.test_auc
    speed = ours.rows_per_s_to_best / best.rows_per_s_to_best
    train_rows, valid, test = shared.split
    return {
        "data": {
            "generator": asdict(DATA),
            "rows": shared.rows,
            "split": {"train": train_rows, "valid": valid, "test": test},
            "oracle_test": oracle,
        },
        "shared": {**asdict(shared), "hidden_units": list(shared.hidden_units)},
        "ours_config": recorded_config(ours_config(shared)),
        "fuxictr_data_prep_seconds": prep,
        "runs": [asdict(r) for r in (ours, *theirs)],
        "fuxictr_best": best.name,
        "targets": {
            "test_auc_vs_fuxictr_best": report.target(
                auc_diff, f">= -{AUC_MARGIN}", auc_diff >= -AUC_MARGIN
            ),
            "speed_ratio_to_best_epoch": report.target(
                speed, f">= {SPEED_RATIO}", speed >= SPEED_RATIO
            ),
        },
    }


def markdown(summary: dict[str, Any], command: str) -> list[str]:
    data, shared = summary["data"], summary["shared"]
    split, oracle = data["split"], data["oracle_test"]
    lines = [
        "# Training: this project's table L2 recipe against FuxiCTR's DeepFM",
        "",
        f"`{command}`: {data['rows']:,} generated rows (field-aware pairwise truth, a "
        "three-way term, vocabularies up to 200,000), split in file order "
        f"{split['train']:,} / {split['valid']:,} / {split['test']:,}; embedding dim "
        f"{shared['embed_dim']}, DNN {shared['hidden_units']}, batch {shared['batch_size']}, "
        f"Adam lr {shared['lr']}, at most {shared['max_epochs']} epochs, early stopping on "
        f"valid AUC with the best weights kept, {shared['threads']} torch threads, one after "
        "the other in one process. The oracle (the true probabilities) scores "
        f"AUC {oracle['auc']:.4f}, logloss {oracle['logloss']:.4f} on the test rows.",
        "",
        "| trainer | test AUC | test logloss | best epoch / run | training time | "
        "time to best | rows/s to best |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['name']} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | "
            f"{r['best_epoch']} / {r['epochs']} | {r['train_seconds']:.0f} s | "
            f"{r['seconds_to_best']:.0f} s | {r['rows_per_s_to_best']:,.0f} |"
            for r in summary["runs"]
        ),
        "",
        f"Against FuxiCTR's best here ({summary['fuxictr_best']}):",
        "",
        *report.targets_table(summary["targets"], ".4f"),
        "",
        "Valid AUC per epoch:",
        "",
        *(
            f"- {r['name']}: " + ", ".join(f"{a:.4f}" for a in r["valid_auc"])
            for r in summary["runs"]
        ),
        "",
        f"- ours: `{summary['ours_config']}`",
        "- FuxiCTR: dense fields bucketed by floor(ln(x)^2) (CustomizedFeatureProcessor of "
        "fuxictr.datasets.criteo), min_categr_count 10, embedding init N(0, 1e-4), Xavier "
        "for the MLP, Adam, clipping at norm 10, lr x0.1 on a plateau, early_stop_patience "
        "2, seed 2019; its data preparation (CSV to parquet through Ray Data) took "
        f"{summary['fuxictr_data_prep_seconds']:.0f} s and is in neither time.",
        "- Training time excludes validation for both: ours is the training loop's time "
        "(model.train's rows/s); FuxiCTR's is fit's wall time less its validations.",
        "- The CPU is shared with other work: the times are one run's, the ratios are "
        "what to read.",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=600_000)
    parser.add_argument("--embed-dim", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=10)
    parser.add_argument(
        "--regularisers",
        default=",".join(f"{r:g}" for r in FUXI_REGULARISERS),
        help="FuxiCTR embedding_regularizer settings to run",
    )
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="only the interleaved throughput check (writes train_vs_fuxictr_speed.*)",
    )
    parser.add_argument("--rounds", type=int, default=20, help="speed check: blocks per side")
    parser.add_argument("--steps", type=int, default=10, help="speed check: batches per block")
    args = parser.parse_args(argv)
    shared = Shared(rows=args.rows, embed_dim=args.embed_dim, max_epochs=args.max_epochs)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(shared.threads)
    path = generated(shared.rows, DATA)
    if args.speed_only:
        import ray

        ray.init(num_cpus=shared.threads, include_dashboard=False, logging_level=logging.ERROR)
        reg = FUXI_REGULARISERS[-1]
        figures = interleaved_speed(path, shared, reg, args.rounds, args.steps)
        ray.shutdown()
        command = shlex.join(["python", "-m", f"benchmarks.{NAME}", *argv])
        speed = figures["rows_per_s"]
        report.publish(
            f"{NAME}_speed",
            {**figures, "command": command, "shared": asdict(shared)},
            [
                "# Training speed, interleaved: ours against FuxiCTR's DeepFM",
                "",
                f"`{command}`: {args.rounds} blocks of {args.steps} training batches "
                f"(batch {shared.batch_size}) each, alternating between the two in one "
                "process so that both see the same load on this shared machine; each "
                "side's data loading included. FuxiCTR with embedding_regularizer "
                f"{reg:g} (its dense L2 over the tables at every step); ours with "
                "--embedding-l2 at the same strength (the same L2, applied lazily).",
                "",
                "| trainer | training rows/s |",
                "|---|---:|",
                f"| ctr-serve (table L2) | {speed['ours']:,.0f} |",
                f"| FuxiCTR, embedding_regularizer {reg:g} | {speed['fuxictr']:,.0f} |",
                "",
                f"Ratio ours / FuxiCTR: {figures['ratio']:.2f}x.",
            ],
        )
        return
    train_rows, valid, _ = shared.split
    labels = np.loadtxt(path, usecols=0, dtype=np.float64)[train_rows + valid :]
    from model.evaluate import metrics

    oracle = metrics(labels, read_truth(path)[train_rows + valid :])

    print(f"ours on {train_rows:,} rows ...")
    ours = run_ours(path, shared)
    print(f"  test AUC {ours.test_auc:.4f}, best epoch {ours.best_epoch}")

    import ray

    ray.init(num_cpus=shared.threads, include_dashboard=False, logging_level=logging.ERROR)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    feature_map, splits, prep = fuxictr_dataset(path, shared)
    theirs = []
    for reg in (float(r) for r in args.regularisers.split(",")):
        print(f"FuxiCTR, embedding_regularizer {reg:g} ...")
        theirs.append(run_fuxictr(feature_map, splits, shared, reg))
        print(f"  test AUC {theirs[-1].test_auc:.4f}, best epoch {theirs[-1].best_epoch}")
    ray.shutdown()

    summary = summarise(shared, ours, theirs, oracle, prep)
    command = shlex.join(["python", "-m", f"benchmarks.{NAME}", *argv])
    report.publish(NAME, {**summary, "command": command}, markdown(summary, command))


if __name__ == "__main__":
    main()

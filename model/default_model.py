"""The recipe of the bundled default model, the one the service serves when no model is set.

    python -m model.default_model            # rewrites models/default

It trains a small DeepFM on generated Criteo-shaped data (fields I1..I13 dense,
C1..C26 sparse). Everything is fixed: the data's seed, the training seed, one
torch thread and the recorded timestamp, so the same code on the same CPU
rebuilds the same bytes and therefore the same version. (Another processor's
kernels round training's floats differently: the same data and vocabularies,
weights a few 1e-3 apart.)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from model.data import CRITEO_SCHEMA
from model.synthetic import SyntheticConfig, generate
from model.train import TrainConfig, TrainResult, train

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "default"

ROWS = 200_000
DATA = SyntheticConfig(seed=2026, max_cardinality=1000)
# The recipe as it was first written, whatever TrainConfig's defaults have become
# since: the regulariser (per-batch L2 1e-6, no table L2) and a constant learning
# rate are pinned, so models/default keeps its bytes and its version.
TRAINING = TrainConfig(
    epochs=3,
    batch_size=1024,
    lr=1e-3,
    optimizer="adam",
    embed_dim=16,
    hidden_units=(128, 64),
    dropout=0.0,
    l2_embedding=1e-6,
    embedding_l2=0.0,
    lr_decay=1.0,
    min_count=5,
    max_vocab=None,
    dense_transform="log",
    bucketize=(),
    valid_fraction=0.1,
    test_fraction=0.1,
    patience=2,
    seed=0,
    threads=1,
)
CREATED_AT = "2026-11-29T00:00:00+00:00"


def build(out: Path, *, progress: bool = False) -> TrainResult:
    with tempfile.TemporaryDirectory(prefix="ctr-default-model-") as tmp:
        data = Path(tmp) / "synthetic.tsv"
        generate(data, ROWS, DATA)
        return train(
            [data],
            "criteo",
            CRITEO_SCHEMA,
            out,
            TRAINING,
            created_at=CREATED_AT,
            workdir=Path(tmp),
            progress=progress,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args(argv)
    result = build(args.out, progress=True)
    print(f"wrote {args.out} ({result.version}): {result.metrics}")


if __name__ == "__main__":
    main()

"""Small checkpoints of chosen fields with random weights, saved and loaded for real."""

from __future__ import annotations

from pathlib import Path

import torch

from model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Field


def random_checkpoint(
    directory: Path, fields: tuple[Field, ...], *, seed: int, scale: float = 0.5
) -> Checkpoint:
    """A DeepFM of ``fields`` (one dense field at most), embedding 4, rows drawn from
    N(0, ``scale``), saved to ``directory`` and loaded back."""
    features = FeatureSpec(fields)
    torch.manual_seed(seed)
    config = DeepFMConfig(
        features.vocab_sizes,
        num_dense=len(features.dense_fields),
        embed_dim=4,
        hidden_units=(8,),
    )
    model = DeepFM(config)
    assert model.sparse_rows is not None
    with torch.no_grad():
        model.sparse_rows.weight.normal_(0.0, scale)
    save_checkpoint(directory, model, features, created_at="2026-11-30T00:00:00+00:00")
    return load_checkpoint(directory)

"""Warm start: a model to train further from a trained checkpoint, on new data.

The checkpoint's vocabularies are kept, so every value it knows keeps its index and
its row; the values the new data brings (those reaching the minimum count) are
appended after them, most frequent first, with fresh rows. Every other weight, the
dense transforms' statistics and the architecture are the checkpoint's. Before any
training step the extended model therefore scores every row exactly as the
checkpoint does, except rows holding a new value, which the checkpoint scored with
its OOV row.

``python -m model.train --init-from CHECKPOINT --data NEW...`` trains this way and
records the parent's version in the new checkpoint.
"""

from __future__ import annotations

import torch

from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Field, Vocabulary

TABLES = "sparse_rows.weight"


def extend_spec(parent: FeatureSpec, fitted: FeatureSpec) -> FeatureSpec:
    """``parent``'s fields, each embedded field's vocabulary followed by the values of
    ``fitted`` (the same fields, learned on new data) it does not hold yet."""
    if [(f.name, f.transform) for f in parent.fields] != [
        (f.name, f.transform) for f in fitted.fields
    ]:
        raise ValueError("the new data's fields and transforms differ from the checkpoint's")
    fields = []
    for old, new in zip(parent.fields, fitted.fields, strict=True):
        if not old.embedded:
            fields.append(old)  # its statistics stay the parent's: answers must not move
            continue
        if old.vocab is None or new.vocab is None:
            raise ValueError(f"field {old.name!r}: its vocabulary is not loaded")
        known = set(old.vocab.values)
        added = tuple(v for v in new.vocab.values if v not in known)
        fields.append(
            Field(old.name, old.transform, old.stats, Vocabulary(old.vocab.values + added))
        )
    return FeatureSpec(tuple(fields))


def extend_model(parent: DeepFM, parent_spec: FeatureSpec, spec: FeatureSpec) -> DeepFM:
    """A DeepFM for ``spec`` (``extend_spec`` of ``parent_spec``) holding ``parent``'s
    weights: each field's known rows copied, its new rows freshly initialised."""
    config = parent.config
    extended = DeepFM(
        DeepFMConfig(
            vocab_sizes=spec.vocab_sizes,
            num_dense=config.num_dense,
            embed_dim=config.embed_dim,
            hidden_units=config.hidden_units,
            dropout=config.dropout,
        )
    )
    state = {k: v for k, v in parent.state_dict().items() if k != TABLES}
    extended.load_state_dict(state, strict=False)
    assert extended.sparse_rows is not None and parent.sparse_rows is not None
    old_table, new_table = parent.sparse_rows.weight, extended.sparse_rows.weight
    old_start = new_start = 0
    with torch.no_grad():
        for old_size, new_size in zip(parent_spec.vocab_sizes, spec.vocab_sizes, strict=True):
            new_table[new_start : new_start + old_size] = old_table[
                old_start : old_start + old_size
            ]
            old_start, new_start = old_start + old_size, new_start + new_size
    return extended

import json
import shutil
from pathlib import Path

import pytest
import torch

from model.checkpoint import (
    SPEC_FILE,
    TABLES,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    compute_version,
    load_checkpoint,
    save_checkpoint,
)


@pytest.fixture
def copy(tiny_checkpoint: Checkpoint, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint.path, target)
    return target


def test_round_trip_gives_identical_logits(tiny_checkpoint: Checkpoint, tmp_path: Path) -> None:
    model = tiny_checkpoint.build_model()
    version = save_checkpoint(
        tmp_path / "again",
        model,
        tiny_checkpoint.features,
        created_at=tiny_checkpoint.created_at,
        metrics=tiny_checkpoint.metrics,
        training=tiny_checkpoint.training,
    )
    assert version == tiny_checkpoint.version  # same content, same version
    again = load_checkpoint(tmp_path / "again").build_model()
    ids = torch.randint(0, 3, (64, len(tiny_checkpoint.config.vocab_sizes)))
    dense = torch.randn(64, tiny_checkpoint.config.num_dense)
    with torch.inference_mode():
        assert torch.equal(model(ids, dense), again(ids, dense))


def test_layout_and_version_format(tiny_checkpoint: Checkpoint) -> None:
    path = tiny_checkpoint.path
    spec = json.loads((path / SPEC_FILE).read_text())
    assert spec["version"] == tiny_checkpoint.version
    assert tiny_checkpoint.version.startswith("deepfm-") and len(tiny_checkpoint.version) == 19
    assert {p.name for p in path.iterdir()} == {WEIGHTS_FILE, SPEC_FILE, "vocab"}
    assert sorted(p.stem for p in (path / "vocab").iterdir()) == sorted(
        f.name for f in tiny_checkpoint.features.embedded_fields
    )
    # safetensors: an 8-byte header length, then a JSON header; no pickle anywhere.
    head = (path / WEIGHTS_FILE).read_bytes()[:9]
    assert head[8:9] == b"{"


def test_loading_without_tables_verifies_the_same_and_keeps_the_dense_part(
    tiny_checkpoint: Checkpoint,
) -> None:
    light = load_checkpoint(tiny_checkpoint.path, tables=False)
    assert light.version == tiny_checkpoint.version
    assert TABLES not in light.state and TABLES in tiny_checkpoint.state
    assert all(f.vocab is None for f in light.features.embedded_fields)
    assert light.features.vocab_sizes == tiny_checkpoint.features.vocab_sizes
    offsets = [sum(light.config.vocab_sizes[:j]) for j in range(light.config.num_fields)]
    assert torch.equal(light.oov_rows, tiny_checkpoint.state[TABLES][offsets])
    full, dense_only = tiny_checkpoint.build_model(), light.build_model()
    assert dense_only.sparse_rows is None
    ids = torch.randint(0, 3, (32, light.config.num_fields))
    dense = torch.randn(32, light.config.num_dense)
    with torch.inference_mode():
        rows = full.gather(ids)
        assert torch.equal(
            full(ids, dense), dense_only.forward_rows(rows[..., 0], rows[..., 1:], dense)
        )
        with pytest.raises(RuntimeError, match="without its tables"):
            dense_only.gather(ids)


@pytest.mark.parametrize("tables", [True, False])
def test_tampered_weights_are_refused_with_or_without_tables(copy: Path, tables: bool) -> None:
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its version"):
        load_checkpoint(copy, tables=tables)


def test_tampered_weights_are_refused(copy: Path) -> None:
    data = bytearray((copy / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01
    (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its version"):
        load_checkpoint(copy)


def test_truncated_weights_are_refused(copy: Path) -> None:
    data = (copy / WEIGHTS_FILE).read_bytes()
    (copy / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="does not match its version"):
        load_checkpoint(copy)


def test_tampered_spec_is_refused(copy: Path) -> None:
    spec = json.loads((copy / SPEC_FILE).read_text())
    spec["features"][0]["stats"] = {"missing": 1.0}
    (copy / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="does not match its version"):
        load_checkpoint(copy)


def test_tampered_vocabulary_is_refused(copy: Path) -> None:
    vocab = next((copy / "vocab").iterdir())
    lines = vocab.read_text().splitlines()
    vocab.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(CheckpointError, match=f"vocab/{vocab.name} does not match"):
        load_checkpoint(copy)


def test_missing_vocabulary_is_refused(copy: Path) -> None:
    next((copy / "vocab").iterdir()).unlink()
    with pytest.raises(CheckpointError, match="vocabulary of"):
        load_checkpoint(copy)


def test_missing_weights_are_refused(copy: Path) -> None:
    (copy / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing"):
        load_checkpoint(copy)


def test_foreign_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a ctr-serve checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / SPEC_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path)


def test_a_spec_that_hashes_right_but_does_not_fit_is_refused(copy: Path) -> None:
    """A hand-made spec whose model config disagrees with the weights, re-hashed."""
    spec = json.loads((copy / SPEC_FILE).read_text())
    spec["model"]["hidden_units"] = [7]
    spec["version"] = compute_version(copy / WEIGHTS_FILE, spec)
    (copy / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="do not fit the model config"):
        load_checkpoint(copy)


def test_save_replaces_an_existing_checkpoint_whole(
    tiny_checkpoint: Checkpoint, copy: Path
) -> None:
    (copy / "stray.txt").write_text("left over")
    save_checkpoint(
        copy,
        tiny_checkpoint.build_model(),
        tiny_checkpoint.features,
        created_at="2026-02-02T00:00:00+00:00",
    )
    assert not (copy / "stray.txt").exists()
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(copy).created_at == "2026-02-02T00:00:00+00:00"


def test_a_spec_whose_dense_fields_disagree_with_the_model_is_refused(copy: Path) -> None:
    spec = json.loads((copy / SPEC_FILE).read_text())
    spec["features"] = [f for f in spec["features"] if f["name"] != "I1"]
    spec["version"] = compute_version(copy / WEIGHTS_FILE, spec)
    (copy / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="12 dense fields, the model 13"):
        load_checkpoint(copy)


def test_values_with_carriage_returns_survive_a_round_trip(tmp_path: Path) -> None:
    """read_text turned "\\r" into a line break and the checkpoint no longer loaded."""
    import numpy as np

    from model.deepfm import DeepFM, DeepFMConfig
    from model.features import SpecFitter

    fitter = SpecFitter({"c": "category"})
    values = np.empty(3, dtype=object)
    values[:] = ["a\rb", "c", "a\rb"]
    fitter.update({"c": values})
    features = fitter.finish()
    model = DeepFM(DeepFMConfig(vocab_sizes=features.vocab_sizes, num_dense=0, hidden_units=(2,)))
    save_checkpoint(tmp_path / "cr", model, features, created_at="2026-01-01T00:00:00+00:00")
    vocab = load_checkpoint(tmp_path / "cr").features.by_name["c"].vocab
    assert vocab is not None and vocab.values == ("a\rb", "c")

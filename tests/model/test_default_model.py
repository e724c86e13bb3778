from pathlib import Path

import pytest

from model.checkpoint import load_checkpoint
from model.data import CRITEO_DENSE, CRITEO_SPARSE
from model.default_model import DEFAULT_MODEL_DIR, build


def test_bundled_model_loads_and_its_version_matches_its_content() -> None:
    checkpoint = load_checkpoint(DEFAULT_MODEL_DIR)  # verifies the content hash
    fields = {f.name: f.kind for f in checkpoint.features.fields}
    assert fields == {**{n: "dense" for n in CRITEO_DENSE}, **{n: "sparse" for n in CRITEO_SPARSE}}
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file())
    assert size < 4 << 20
    assert checkpoint.metrics["test_auc"] > 0.7


@pytest.mark.slow
def test_bundled_model_is_rebuilt_bit_for_bit(tmp_path: Path) -> None:
    result = build(tmp_path / "default")
    assert result.version == load_checkpoint(DEFAULT_MODEL_DIR).version
    for path in DEFAULT_MODEL_DIR.rglob("*"):
        if path.is_file():
            rebuilt = tmp_path / "default" / path.relative_to(DEFAULT_MODEL_DIR)
            assert rebuilt.read_bytes() == path.read_bytes(), path

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from model.checkpoint import (
    SPEC_FILE,
    TABLES,
    WEIGHTS_FILE,
    Checkpoint,
    CheckpointError,
    Prepared,
    compute_version,
    load_checkpoint,
    prepare_checkpoint,
    save_checkpoint,
)
from model.data import criteo_json_rows
from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Field, Vocabulary
from model.predict import Predictor
from model.vocabindex import VocabIndex


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
        tiny_checkpoint.read_features(),
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
        tiny_checkpoint.read_features(),
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
    loaded = load_checkpoint(tmp_path / "cr")
    assert loaded.vocabulary("c").values == ("a\rb", "c")
    assert loaded.features.encode_rows([{"c": "a\rb"}, {"c": "c"}])[0].tolist() == [[1], [2]]


# -- verify once, load many


ROWS_FILE = Path(__file__).parents[1] / "data" / "criteo_sample.tsv"


def prepared_copy(copy: Path, tmp_path: Path) -> Prepared:
    return prepare_checkpoint(copy, tmp_path / "index", tables=True)


def test_a_prepared_load_equals_a_verified_one(tiny_checkpoint: Checkpoint, copy: Path) -> None:
    prepared = prepare_checkpoint(copy, copy.parent / "index", tables=True)
    assert prepared.index is not None and prepared.weights is not None
    assert prepared.index.name == f"{tiny_checkpoint.version}.vocabindex"
    assert prepared.weights.read_bytes() == (copy / WEIGHTS_FILE).read_bytes()
    assert Prepared.from_json(json.loads(json.dumps(prepared.to_json()))) == prepared
    assert {name for name, *_ in prepared.identity} == {
        WEIGHTS_FILE,
        SPEC_FILE,
        *(f"vocab/{f.name}.txt" for f in tiny_checkpoint.features.embedded_fields),
    }
    loaded = load_checkpoint(prepared)
    assert loaded.version == tiny_checkpoint.version
    rows = criteo_json_rows(ROWS_FILE)
    expected = Predictor(tiny_checkpoint).predict_rows(rows)
    np.testing.assert_array_equal(Predictor(loaded).predict_rows(rows), expected)
    # Again: the index is kept, the weights copied and verified anew.
    index_stat = prepared.index.stat()
    again = prepare_checkpoint(copy, copy.parent / "index", tables=True)
    assert again == prepared and prepared.index.stat().st_ino == index_stat.st_ino
    assert sorted(p.name for p in (copy.parent / "index").iterdir()) == sorted(
        [prepared.index.name, prepared.weights.name]
    )


def test_a_prepared_load_without_tables(tiny_checkpoint: Checkpoint, copy: Path) -> None:
    prepared = prepare_checkpoint(copy, copy.parent / "index", tables=False)
    assert prepared.index is None and prepared.weights is None
    assert {name for name, *_ in prepared.identity} == {WEIGHTS_FILE, SPEC_FILE}
    light = load_checkpoint(prepared, tables=False)
    assert TABLES not in light.state and light.features.index is None
    assert torch.equal(light.oov_rows, tiny_checkpoint.oov_rows)
    with pytest.raises(ValueError, match="without its tables"):
        load_checkpoint(prepared)


PREDICT_IN_CHILD = """
import json, sys
from model.checkpoint import Prepared, load_checkpoint
from model.predict import Predictor

prepared = Prepared.from_json(json.loads(sys.argv[1]))
rows = json.loads(sys.stdin.read())
checkpoint = load_checkpoint(prepared)
print(json.dumps(Predictor(checkpoint).predict_rows(rows).tolist()))
"""


def test_another_process_loads_the_prepared_checkpoint_and_predicts_the_same(
    tiny_checkpoint: Checkpoint, copy: Path
) -> None:
    prepared = prepare_checkpoint(copy, copy.parent / "index", tables=True)
    rows = criteo_json_rows(ROWS_FILE)
    child = subprocess.run(
        [sys.executable, "-c", PREDICT_IN_CHILD, json.dumps(prepared.to_json())],
        input=json.dumps(rows),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    got = json.loads(child.stdout)
    expected = Predictor(tiny_checkpoint).predict_rows(rows)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert len(set(got)) > 10  # rows that differ, not one constant


def flip_weights(path: Path) -> None:
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0x01
    (path / WEIGHTS_FILE).write_bytes(bytes(data))


def truncate_weights(path: Path) -> None:
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def reverse_a_vocabulary(path: Path) -> None:
    vocab = sorted((path / "vocab").iterdir())[0]
    lines = vocab.read_text().splitlines()
    vocab.write_text("\n".join(reversed(lines)) + "\n")


def rehash(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    spec = json.loads((path / SPEC_FILE).read_text())
    change(spec)
    spec["version"] = compute_version(path / WEIGHTS_FILE, spec)
    (path / SPEC_FILE).write_text(json.dumps(spec))


def tamper_spec(path: Path) -> None:
    spec = json.loads((path / SPEC_FILE).read_text())
    spec["features"][0]["stats"] = {"missing": 1.0}
    (path / SPEC_FILE).write_text(json.dumps(spec))


TAMPERINGS: dict[str, Callable[[Path], None]] = {
    "flipped weights": flip_weights,
    "truncated weights": truncate_weights,
    "empty weights": lambda path: (path / WEIGHTS_FILE).write_bytes(b""),
    "missing weights": lambda path: (path / WEIGHTS_FILE).unlink(),
    "tampered spec": tamper_spec,
    "reversed vocabulary": reverse_a_vocabulary,
    "missing vocabulary": lambda path: sorted((path / "vocab").iterdir())[0].unlink(),
    "hidden units": lambda path: rehash(path, lambda s: s["model"].update(hidden_units=[7])),
    "dense fields": lambda path: rehash(
        path, lambda s: s.update(features=[f for f in s["features"] if f["name"] != "I1"])
    ),
    "malformed features": lambda path: rehash(path, lambda s: s["features"][0].pop("name")),
}


@pytest.mark.parametrize("tables", [True, False])
@pytest.mark.parametrize("tampering", TAMPERINGS)
def test_prepare_refuses_what_loading_refuses_with_the_same_message(
    copy: Path, tmp_path: Path, tampering: str, tables: bool
) -> None:
    TAMPERINGS[tampering](copy)
    if "vocabulary" in tampering and not tables:  # neither reads the vocabularies
        prepare_checkpoint(copy, tmp_path / "index", tables=tables)
        load_checkpoint(copy, tables=tables)
        return
    with pytest.raises(CheckpointError) as loading:
        load_checkpoint(copy, tables=tables)
    with pytest.raises(CheckpointError) as preparing:
        prepare_checkpoint(copy, tmp_path / "index", tables=tables)
    assert str(preparing.value) == str(loading.value)
    assert not [p for p in (tmp_path / "index").glob("*") if not p.name.endswith(".vocabindex")]


def test_a_header_that_does_not_fit_is_refused_without_torch(copy: Path, tmp_path: Path) -> None:
    """A re-hashed weights file whose tensor has another shape: refused by prepare from
    the header alone, with load_checkpoint's message."""
    weights = copy / WEIGHTS_FILE
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["bias"]["shape"], header["bias"]["dtype"] = [1, 1], "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    weights.write_bytes(data[:8] + text + data[8 + length :])
    rehash(copy, lambda spec: None)
    with pytest.raises(CheckpointError, match="do not fit the model config: bias: I32") as a:
        prepare_checkpoint(copy, tmp_path / "index", tables=True)
    with pytest.raises(CheckpointError) as b:
        load_checkpoint(copy)
    assert str(a.value) == str(b.value)


def touch_a_vocabulary(path: Path) -> None:
    vocab = sorted((path / "vocab").iterdir())[0]
    os.utime(vocab, ns=(vocab.stat().st_atime_ns, vocab.stat().st_mtime_ns + 1_000_000))


def rewrite_weights_as_they_are(path: Path) -> None:
    (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes())
    os.utime(path / WEIGHTS_FILE, ns=(0, 1_000_000_000))


def replace_with_a_copy(path: Path) -> None:
    staged = path.with_name("staged")
    shutil.copytree(path, staged)
    shutil.rmtree(path)
    staged.rename(path)


CHANGES: dict[str, Callable[[Path], None]] = {
    "a vocabulary touched": touch_a_vocabulary,
    "the weights rewritten": rewrite_weights_as_they_are,
    "the directory replaced by a copy": replace_with_a_copy,
    "the spec rewritten": lambda path: (path / SPEC_FILE).write_text(
        (path / SPEC_FILE).read_text() + " "
    ),
    "a vocabulary removed": lambda path: sorted((path / "vocab").iterdir())[0].unlink(),
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_prepared_load_refuses_files_changed_since(
    copy: Path, tmp_path: Path, change: str
) -> None:
    prepared = prepare_checkpoint(copy, tmp_path / "index", tables=True)
    CHANGES[change](copy)
    with pytest.raises(CheckpointError, match="changed since it was verified"):
        load_checkpoint(prepared)


def test_a_prepared_load_refuses_a_broken_or_foreign_index(copy: Path, tmp_path: Path) -> None:
    prepared = prepare_checkpoint(copy, tmp_path / "index", tables=True)
    assert prepared.index is not None
    VocabIndex.build([["a"]], label=prepared.version).save(prepared.index)
    with pytest.raises(CheckpointError, match="is not this checkpoint's index"):
        load_checkpoint(prepared)
    prepared.index.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a vocabulary index"):
        load_checkpoint(prepared)
    # prepare builds it again: a broken index is no reason to refuse the checkpoint.
    again = prepare_checkpoint(copy, tmp_path / "index", tables=True)
    assert load_checkpoint(again).version == prepared.version


def test_weights_overwritten_in_place_never_reach_a_loaded_model(
    tiny_checkpoint: Checkpoint, copy: Path, tmp_path: Path
) -> None:
    """A mapping of the checkpoint's own file would die of SIGBUS (and take the test
    process with it) once the file is truncated: loads hold a copy, private or prepared."""
    prepared = prepare_checkpoint(copy, tmp_path / "index", tables=True)
    models = [load_checkpoint(copy).build_model(), load_checkpoint(prepared)]
    predictors = [Predictor(load_checkpoint(copy)), Predictor(models[1])]
    (copy / WEIGHTS_FILE).write_bytes(b"garbage")
    rows = criteo_json_rows(ROWS_FILE)
    expected = Predictor(tiny_checkpoint).predict_rows(rows)
    for predictor in predictors:
        np.testing.assert_array_equal(predictor.predict_rows(rows), expected)


def test_a_built_model_holds_the_checkpoint_tensors_themselves(
    tiny_checkpoint: Checkpoint,
) -> None:
    model = tiny_checkpoint.build_model()
    assert model.sparse_rows is not None
    assert model.sparse_rows.weight.data_ptr() == tiny_checkpoint.state[TABLES].data_ptr()
    assert model.offsets.device.type == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())


THREADS_IN_CHILD = """
import os, sys
from pathlib import Path
import torch
from model.checkpoint import prepare_checkpoint

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
prepare_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), tables=True)
after = threads()
x = torch.ones(1000, 1000)
float((x @ x).sum())
print(before, after, threads(), torch.get_num_threads())
"""


def test_prepare_starts_no_torch_thread_pool(copy: Path, tmp_path: Path) -> None:
    """A supervisor prepares, then forks: torch's pools would not survive the fork."""
    child = subprocess.run(
        [sys.executable, "-c", THREADS_IN_CHILD, str(copy), str(tmp_path / "index")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    before, after, after_torch, torch_threads = map(int, child.stdout.split())
    assert after == before
    if torch_threads > 1:  # the count does see a pool when there is one
        assert after_torch > after

    class NoTorch(TorchFunctionMode):
        def __torch_function__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"prepare_checkpoint called {func}")

    with NoTorch():
        prepare_checkpoint(copy, tmp_path / "index", tables=True)


# -- one copy per machine

MB = 1 << 20

HOLD_IN_CHILD = """
import json, sys
from model.checkpoint import Prepared, load_checkpoint

def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out

before = rollup()
if sys.argv[1] == "prepared":
    prepared = Prepared.from_json(json.loads(sys.argv[2]))
    checkpoint = load_checkpoint(prepared)
else:
    checkpoint = load_checkpoint(sys.argv[2])
model = checkpoint.build_model()
index = checkpoint.features.vocab_index
# Every page of the tables and of the index, read.
float(model.sparse_rows.weight.detach().sum())
int(index.hi.max()), int(index.lo.max()), int(index.ids.max())
print(json.dumps({"before": before, "after": rollup()}), flush=True)
sys.stdin.read()
"""


def file_memory(pid: int, paths: set[str]) -> tuple[int, int]:
    """Rss and Pss (bytes) of the mappings of ``paths`` in process ``pid``."""
    rss = pss = 0
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            current = parts[5] if len(parts) > 5 else ""
        elif current in paths and parts[0] in ("Rss:", "Pss:"):
            if parts[0] == "Rss:":
                rss += int(parts[1]) * 1024
            else:
                pss += int(parts[1]) * 1024
    return rss, pss


@pytest.fixture(scope="module")
def million_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of 1,000,003 rows of 17 floats: 68 MB of tables, a 20 MB index."""
    features = FeatureSpec(
        (
            Field("C1", "category", vocab=Vocabulary(tuple(f"{i:x}" for i in range(1_000_000)))),
            Field("C2", "category", vocab=Vocabulary(("a", "b"))),
            Field("I1", "log", {"missing": 0.0}),
        )
    )
    config = DeepFMConfig(features.vocab_sizes, num_dense=1, embed_dim=16, hidden_units=(8,))
    directory = tmp_path_factory.mktemp("million") / "ckpt"
    save_checkpoint(directory, DeepFM(config), features, created_at="2026-01-01T00:00:00+00:00")
    return directory


@pytest.mark.slow
def test_processes_share_one_copy_of_the_tables_and_the_index(
    million_rows: Path, tmp_path: Path
) -> None:
    prepared = prepare_checkpoint(million_rows, tmp_path / "index", tables=True)
    assert prepared.index is not None and prepared.weights is not None
    tables = 1_000_003 * 17 * 4
    shared = tables + 20 * 1_000_002
    paths = {str(prepared.weights), str(prepared.index)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", HOLD_IN_CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for args in (
            ("prepared", json.dumps(prepared.to_json())),
            ("prepared", json.dumps(prepared.to_json())),
            ("private", str(million_rows)),
        )
    ]
    try:
        reports = [json.loads(child.stdout.readline()) for child in children]  # type: ignore[union-attr]
        memory = [file_memory(child.pid, paths) for child in children[:2]]
    finally:
        for child in children:
            child.communicate(timeout=60)
    anonymous = [r["after"]["Anonymous"] - r["before"]["Anonymous"] for r in reports]
    for (rss, _), private in zip(memory, anonymous[:2], strict=True):
        assert rss > 0.95 * shared  # every page read, through the files
        assert private < 0.1 * shared  # and none of them copied
    (rss, pss_a), (_, pss_b) = memory
    assert pss_a + pss_b < 1.3 * rss
    # The measure sees a private copy: without prepare, the tables are read into memory.
    assert anonymous[2] > tables

"""The checkpoint directory: weights (safetensors), spec (JSON) and vocabularies (text).

    <dir>/weights.safetensors   every tensor of the DeepFM
    <dir>/spec.json             format_version, model config, feature spec, training
                                record, metrics, created_at, version
    <dir>/vocab/<field>.txt     one value per line; line i is index i (1-based; 0 is OOV)

``version`` is ``deepfm-`` plus the first 12 hex digits of a SHA-256 over the
weights file and the canonical JSON of the spec without its ``version``. The
spec holds each vocabulary's SHA-256, so the version covers the vocabularies
too. Loading recomputes all of it and refuses a directory that does not match.
Nothing in a checkpoint is ever executed: no pickle.

``load_checkpoint(dir, tables=False)`` verifies the same way but reads neither
the embedding tables nor the vocabularies into memory: only the dense part and
each field's OOV row, for a server that reads its rows from Redis.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Vocabulary

FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
VOCAB_DIR = "vocab"
VERSION_PREFIX = "deepfm-"
TABLES = "sparse_rows.weight"  # the one tensor that grows with the vocabularies


class CheckpointError(Exception):
    """A checkpoint directory is missing, incomplete, modified or not a checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint, ready to build its model."""

    path: Path
    version: str
    config: DeepFMConfig
    features: FeatureSpec
    state: Mapping[str, torch.Tensor]
    spec: Mapping[str, Any]
    oov_rows: torch.Tensor  # F x (1+k): each embedded field's row 0
    tables: bool = True  # False: ``state`` lacks the tables, ``features`` the vocabularies

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.spec.get("metrics", {})  # type: ignore[no-any-return]

    @property
    def training(self) -> Mapping[str, Any]:
        return self.spec.get("training", {})  # type: ignore[no-any-return]

    @property
    def created_at(self) -> str:
        return str(self.spec.get("created_at", ""))

    def build_model(self) -> DeepFM:
        """The DeepFM with this checkpoint's weights, in eval mode."""
        model = DeepFM(self.config, tables=self.tables)
        model.load_state_dict(dict(self.state), strict=True)
        return model.eval()

    def table_rows(self, field: int) -> torch.Tensor:
        """The rows of embedded field ``field``: ``vocab_size x (1+k)``, row 0 is OOV."""
        if not self.tables:
            raise RuntimeError(f"{self.path}: loaded without its tables")
        start = sum(self.config.vocab_sizes[:field])
        return self.state[TABLES][start : start + self.config.vocab_sizes[field]]


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_version(weights: bytes | Iterable[bytes], spec: Mapping[str, Any]) -> str:
    """The version a checkpoint with these weights bytes (or chunks) and spec must carry."""
    digest = hashlib.sha256()
    for chunk in [weights] if isinstance(weights, bytes) else weights:
        digest.update(chunk)
    digest.update(b"\n")
    digest.update(canonical_json({k: v for k, v in spec.items() if k != "version"}))
    return VERSION_PREFIX + digest.hexdigest()[:12]


def compute_version(weights_path: Path, spec: Mapping[str, Any]) -> str:
    """``content_version`` of a weights file, read in chunks (memory does not grow with it)."""
    with weights_path.open("rb") as f:
        return content_version(iter(lambda: f.read(1 << 20), b""), spec)


def save_checkpoint(
    directory: Path,
    model: DeepFM,
    features: FeatureSpec,
    *,
    created_at: str,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint to ``directory`` (replacing one there) and return its version.

    The directory is written beside its destination and moved into place, so a
    reader never sees a half-written checkpoint.
    """
    if model.config.vocab_sizes != features.vocab_sizes:
        raise ValueError("the model's vocab sizes do not match the feature spec's")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / VOCAB_DIR).mkdir()
        for f in features.embedded_fields:
            assert f.vocab is not None
            (tmp / VOCAB_DIR / f"{f.name}.txt").write_bytes(f.vocab.to_text().encode("utf-8"))
        spec: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "model": model.config.to_json(),
            "features": features.to_json(),
            "training": dict(training or {}),
            "metrics": dict(metrics or {}),
            "created_at": created_at,
        }
        spec["version"] = compute_version(tmp / WEIGHTS_FILE, spec)
        (tmp / SPEC_FILE).write_text(
            json.dumps(spec, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        # mkdtemp and safetensors make owner-only files; a checkpoint is meant to be read
        # by other users too (a server running as its own user).
        for path in (tmp, tmp / VOCAB_DIR):
            path.chmod(0o755)
        for path in (*tmp.iterdir(), *(tmp / VOCAB_DIR).iterdir()):
            if path.is_file():
                path.chmod(0o644)
        # Swap by renames: a reader sees the old checkpoint or the new one, never a mix.
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            directory.rename(old / directory.name)
        tmp.rename(directory)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(spec["version"])


def load_checkpoint(directory: Path | str, *, tables: bool = True) -> Checkpoint:
    """Load and verify a checkpoint; raise CheckpointError saying what is wrong.

    ``tables=False``: the dense part and the OOV rows only (see the module doc).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    spec = _read_spec(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    # With the tables, read once: the bytes verified are the bytes loaded.
    data = weights.read_bytes() if tables else None
    claimed = spec.get("version")
    actual = content_version(data, spec) if data is not None else compute_version(weights, spec)
    if claimed != actual:
        raise CheckpointError(
            f"{directory}: content does not match its version {claimed!r} (the content hashes "
            f"to {actual!r}): the weights or spec.json were modified or are incomplete"
        )
    try:
        config = DeepFMConfig.from_json(spec["model"])
        vocabs = _read_vocabs(directory, spec["features"]) if tables else {}
        features = FeatureSpec.from_json(spec["features"], vocabs)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: {SPEC_FILE} is malformed: {exc}") from None
    if features.vocab_sizes != config.vocab_sizes:
        raise CheckpointError(f"{directory}: vocab sizes in the feature spec and model disagree")
    if len(features.dense_fields) != config.num_dense:
        raise CheckpointError(
            f"{directory}: the feature spec has {len(features.dense_fields)} dense fields, "
            f"the model {config.num_dense}"
        )
    offsets = [sum(config.vocab_sizes[:f]) for f in range(config.num_fields)]
    try:
        if data is not None:
            state = load(data)
            oov_rows = state[TABLES][offsets].clone() if TABLES in state else None
        else:
            state, oov_rows = _read_dense_part(weights, offsets)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is unreadable: {exc}") from None
    if oov_rows is None:
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} has no {TABLES}")
    checkpoint = Checkpoint(directory, actual, config, features, state, spec, oov_rows, tables)
    try:
        checkpoint.build_model()
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model config: {exc}") from None
    return checkpoint


def _read_dense_part(
    weights: Path, offsets: list[int]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every tensor but the tables, and the tables' rows at ``offsets``, through a memory
    map: the tables' pages are never all read."""
    with safe_open(str(weights), framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys() if name != TABLES}  # noqa: SIM118
        if TABLES not in f.keys():  # noqa: SIM118 (a safe_open handle is no dict)
            return state, None
        tables = f.get_slice(TABLES)
        rows = [tables[offset : offset + 1] for offset in offsets]
    return state, torch.cat(rows).clone()


def _read_spec(directory: Path) -> dict[str, Any]:
    path = directory / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {SPEC_FILE}; not a ctr-serve checkpoint")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: {SPEC_FILE} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format_version") != FORMAT_VERSION:
        found = spec.get("format_version") if isinstance(spec, dict) else None
        raise CheckpointError(
            f"{directory}: {SPEC_FILE} has format_version {found!r}, expected {FORMAT_VERSION}"
        )
    return spec


def _read_vocabs(directory: Path, fields: list[dict[str, Any]]) -> dict[str, Vocabulary]:
    vocabs = {}
    for f in fields:
        if "vocab_sha256" not in f:
            continue
        path = directory / VOCAB_DIR / f"{f['name']}.txt"
        try:
            # Bytes, decoded as they are: read_text would turn a "\r" inside a value into
            # a line break.
            vocab = Vocabulary.from_text(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{directory}: vocabulary of {f['name']!r}: {exc}") from None
        if vocab.sha256() != f["vocab_sha256"] or len(vocab) + 1 != f["vocab_size"]:
            raise CheckpointError(
                f"{directory}: {VOCAB_DIR}/{f['name']}.txt does not match spec.json "
                "(modified or truncated)"
            )
        vocabs[f["name"]] = vocab
    return vocabs

"""The checkpoint directory: weights (safetensors), spec (JSON) and vocabularies (text).

    <dir>/weights.safetensors   every tensor of the DeepFM
    <dir>/spec.json             format_version, model config, feature spec, training
                                record, metrics, created_at, calibration (when
                                not the identity: ``model.calibration``), version
    <dir>/vocab/<field>.txt     one value per line; line i is index i (1-based; 0 is OOV)

``version`` is ``deepfm-`` plus the first 12 hex digits of a SHA-256 over the
weights file and the canonical JSON of the spec without its ``version``. The
spec holds each vocabulary's SHA-256, so the version covers the vocabularies
too. Loading recomputes all of it and refuses a directory that does not match.
Nothing in a checkpoint is ever executed: no pickle.

The weights become tensors without a copy: ``load_checkpoint`` parses the
safetensors header itself and makes every tensor a view on a mapping of the
weights, the hash is taken over that mapping (the bytes verified are the bytes
used), and ``Checkpoint.build_model`` builds the DeepFM around those tensors
(``load_state_dict(assign=True)``; its own tables never allocated). The
vocabularies are read to be verified and turned into one
``model.vocabindex.VocabIndex`` (``features.index``); their values are not kept
(``Checkpoint.vocabulary`` reads one again, for a publisher).

Verify once, load many: ``prepare_checkpoint`` verifies a directory as loading
does, with no torch operation (a supervisor runs it, then forks workers), and
writes to its ``index_dir`` the vocabulary index and a copy of the weights it
verified. Each worker loads with ``load_checkpoint(p)``: nothing
hashed again, provided every checkpoint file is still the one verified (device,
inode, size, mtime: a checkpoint is replaced by a rename), and both files are
memory maps (the weights' copy-on-write, ``MAP_PRIVATE``, the index read-only),
whose pages are the page cache's, shared by every worker. A worker pays
privately for the dense part and the OOV rows only; the tables (4(1+k) bytes a
value) and the index (20 bytes a value) are paid once per machine.

Why a copy and not the checkpoint's own file: a mapped file truncated in place
(a bad deploy writing over it) kills every process that touches a lost page
with SIGBUS. The copy in ``index_dir`` belongs to the service and is never
written again (a new one is renamed over it). For the same reason a load
without ``prepared`` reads the weights into private anonymous memory: one
process, one copy, as before.

``load_checkpoint(dir, tables=False)`` verifies the same way but keeps neither
the embedding tables nor a vocabulary index: only the dense part and each
field's OOV row, for a server that reads its rows from Redis.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from model.calibration import Calibration
from model.deepfm import DeepFM, DeepFMConfig
from model.features import FeatureSpec, Vocabulary, lookup_keys
from model.tensorfile import Entry, header, views
from model.vocabindex import IndexFileError, VocabIndex

FORMAT_VERSION = 1
# A checkpoint carrying a calibration is format 2: a loader that predates calibrations
# (format 1 only) refuses it instead of serving uncorrected probabilities.
CALIBRATED_FORMAT_VERSION = 2
FORMAT_VERSIONS = (FORMAT_VERSION, CALIBRATED_FORMAT_VERSION)
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
VOCAB_DIR = "vocab"
VERSION_PREFIX = "deepfm-"
TABLES = "sparse_rows.weight"  # the one tensor that grows with the vocabularies
INDEX_SUFFIX = ".vocabindex"  # <index_dir>/<version>.vocabindex
WEIGHTS_SUFFIX = ".safetensors"  # <index_dir>/<version>.safetensors, the verified copy
WEIGHTS_DTYPE = "F32"  # every tensor: what the module's parameters are, so none is cast

# What names a file's content without reading it: (path in the checkpoint, st_dev,
# st_ino, st_size, st_mtime_ns). A checkpoint is replaced by a rename, never in place.
FileIdentity = tuple[str, int, int, int, int]


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
    tables: bool = True  # False: ``state`` lacks the tables, ``features`` the index

    @property
    def metrics(self) -> Mapping[str, Any]:
        return self.spec.get("metrics", {})  # type: ignore[no-any-return]

    @property
    def training(self) -> Mapping[str, Any]:
        return self.spec.get("training", {})  # type: ignore[no-any-return]

    @property
    def created_at(self) -> str:
        return str(self.spec.get("created_at", ""))

    @property
    def calibration(self) -> Calibration:
        """How its logits become the probabilities served (``model.calibration``)."""
        return Calibration.from_json(self.spec.get("calibration"))

    def build_model(self) -> DeepFM:
        """The DeepFM with this checkpoint's weights, in eval mode.

        Its parameters are this checkpoint's tensors themselves (views on the weights
        file's mapping), not copies: nothing may write to them in place. The module is
        built around the tables, so it never allocates or initialises its own. (Not on
        the meta device: the first module built there costs ~65 MB of private memory.)
        """
        table = self.state.get(TABLES) if self.tables else None
        model = DeepFM(self.config, tables=False, table=table)
        model.load_state_dict(dict(self.state), strict=True, assign=True)
        return model.eval()

    def read_features(self) -> FeatureSpec:
        """The feature spec with every vocabulary's values, read from the directory (to
        save the model again): ``features`` has the index instead."""
        vocabs = {f.name: self.vocabulary(f.name) for f in self.features.embedded_fields}
        return FeatureSpec.from_json(self.spec["features"], vocabs)

    def vocabulary(self, name: str) -> Vocabulary:
        """The vocabulary of embedded field ``name``, read from the directory and checked
        against the spec: a loaded checkpoint keeps its index, not the values."""
        for entry in self.spec["features"]:
            if entry["name"] == name and "vocab_sha256" in entry:
                return _read_vocab(self.path, entry, {})
        raise KeyError(f"{name!r} is no embedded field of {self.path}")

    def table_rows(self, field: int) -> torch.Tensor:
        """The rows of embedded field ``field``: ``vocab_size x (1+k)``, row 0 is OOV."""
        if not self.tables:
            raise RuntimeError(f"{self.path}: loaded without its tables")
        start = sum(self.config.vocab_sizes[:field])
        return self.state[TABLES][start : start + self.config.vocab_sizes[field]]


@dataclass(frozen=True)
class Prepared:
    """A checkpoint verified once, for processes that load it without hashing it again."""

    directory: Path
    version: str
    # Of weights.safetensors, spec.json and (with the tables) every vocabulary file.
    identity: tuple[FileIdentity, ...]
    index: Path | None  # the vocabulary index file (None when prepared without tables)
    weights: Path | None = None  # the verified copy of the weights the workers map (idem)

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "version": self.version,
            "identity": [list(entry) for entry in self.identity],
            "index": None if self.index is None else str(self.index),
            "weights": None if self.weights is None else str(self.weights),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prepared:
        return cls(
            directory=Path(data["directory"]),
            version=str(data["version"]),
            identity=tuple(
                (str(name), int(dev), int(ino), int(size), int(mtime))
                for name, dev, ino, size, mtime in data["identity"]
            ),
            index=None if data["index"] is None else Path(data["index"]),
            weights=None if data["weights"] is None else Path(data["weights"]),
        )


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_version(weights: bytes | mmap.mmap | Iterable[bytes], spec: Mapping[str, Any]) -> str:
    """The version a checkpoint with these weights bytes (or chunks) and spec must carry."""
    digest = hashlib.sha256()
    for chunk in [weights] if isinstance(weights, bytes | mmap.mmap) else weights:
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
    calibration: Calibration | None = None,
) -> str:
    """Write a checkpoint to ``directory`` (replacing one there) and return its version.

    ``calibration`` goes into spec.json, and so into the version, unless it is the
    identity (a checkpoint without one serves sigmoid(logit), as before it existed).

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
        if calibration is not None and not calibration.identity:
            spec["calibration"] = calibration.to_json()
            spec["format_version"] = CALIBRATED_FORMAT_VERSION
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


def prepare_checkpoint(directory: Path | str, index_dir: Path, *, tables: bool) -> Prepared:
    """Verify a checkpoint as ``load_checkpoint`` does (raising the same CheckpointError)
    for ``load_checkpoint(prepared)``. With ``tables``, also write to ``index_dir``
    the vocabulary index (``<version>.vocabindex``, kept when a valid one is there) and
    the weights verified (``<version>.safetensors``, copied, then hashed), which the
    workers map: a weights file changed in place in the checkpoint directory (truncated,
    overwritten) cannot reach them.

    Runs no torch operation: NumPy, xxhash and hashlib only, so that a process may call
    it and fork afterwards (torch's thread pools do not survive a fork).
    """
    directory = Path(directory)
    index_dir = Path(index_dir)
    seen: dict[str, tuple[int, int, int, int]] = {}
    copy = _copy_weights(directory, index_dir, seen) if tables else None
    try:
        opened = _open(directory, seen, copy)
        _verify_version(opened)
        _check(opened)
        index = weights = None
        if tables:
            index = index_dir / f"{opened.version}{INDEX_SUFFIX}"
            keys = _vocab_keys(opened, seen)
            if _index_fits(index, opened):
                for _ in keys:  # verified all the same
                    pass
            else:
                VocabIndex.build(keys, label=opened.version).save(index)
            assert copy is not None
            weights = copy.replace(index_dir / f"{opened.version}{WEIGHTS_SUFFIX}")
        identity = _identity(seen)
        if _stat(directory, seen) != identity:
            raise CheckpointError(f"{directory}: changed while it was being verified")
    finally:
        if copy is not None:
            copy.unlink(missing_ok=True)
    return Prepared(directory, opened.version, identity, index, weights)


def load_checkpoint(source: Path | str | Prepared, *, tables: bool = True) -> Checkpoint:
    """Load and verify a checkpoint, from its directory or from what ``prepare_checkpoint``
    made of it; raise CheckpointError saying what is wrong.

    ``tables=False``: the dense part and the OOV rows only (see the module doc).
    A ``Prepared`` source is not hashed again, but its files must still be the ones it
    verified (else CheckpointError: changed since it was verified); the tables are views
    on its copy of the weights and the vocabulary index is its file, both memory-mapped
    and shared. From a directory, the weights are read into this process's memory (a
    mapping of the checkpoint's own file would die of SIGBUS were the file truncated in
    place) and the index is built.
    """
    prepared: Prepared | None
    if isinstance(source, Prepared):
        prepared, directory = source, source.directory
    else:
        prepared, directory = None, Path(source)
    weights = None
    if prepared is not None:
        if tables and (prepared.index is None or prepared.weights is None):
            raise ValueError(f"{directory}: prepared without its tables")
        weights = prepared.weights if tables else None
    seen: dict[str, tuple[int, int, int, int]] = {}
    opened = _open(directory, seen, weights, private=tables and prepared is None)
    if prepared is None:
        _verify_version(opened)
    else:
        # The files read (spec.json, the weights unless copied) by their descriptors, so
        # what is used is what was verified; the others by name.
        now = _stat(directory, [entry[0] for entry in prepared.identity if entry[0] not in seen])
        if now is None or tuple(sorted(_identity(seen) + now)) != prepared.identity:
            raise CheckpointError(f"{directory}: changed since it was verified")
        if opened.spec.get("version") != prepared.version:
            raise CheckpointError(f"{directory}: changed since it was verified")
    _check(opened)
    index = None
    if tables and prepared is not None:
        assert prepared.index is not None
        try:
            index = VocabIndex.open(prepared.index)
        except IndexFileError as exc:
            raise CheckpointError(f"{directory}: {exc}") from None
        if not _index_matches(index, opened):
            raise CheckpointError(f"{directory}: {prepared.index} is not this checkpoint's index")
    elif tables:
        index = VocabIndex.build(_vocab_keys(opened, seen), label=opened.version)
    assert opened.config is not None
    features = FeatureSpec.from_json(opened.spec["features"], {}, index)
    config = opened.config
    offsets = [sum(config.vocab_sizes[:f]) for f in range(config.num_fields)]
    assert opened.entries is not None and opened.mapping is not None
    state = views(opened.mapping, opened.entries)
    oov_rows = state[TABLES][offsets].clone()
    if not tables:
        # Copies of the small part; the mapping goes with the last view on it.
        state = {name: t.clone() for name, t in state.items() if name != TABLES}
    checkpoint = Checkpoint(
        directory, opened.version, config, features, state, opened.spec, oov_rows, tables
    )
    try:
        checkpoint.build_model()
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit the model config: {exc}") from None
    return checkpoint


@dataclass
class _Opened:
    """A checkpoint directory: its spec read, its weights mapped; then checked (``_check``)."""

    directory: Path
    spec: dict[str, Any]
    mapping: mmap.mmap | None  # the weights file (None: an empty file)
    config: DeepFMConfig | None = None
    features: FeatureSpec | None = None  # sizes only, no vocabulary
    entries: dict[str, Entry] | None = None

    @property
    def version(self) -> str:
        return str(self.spec["version"])


def _open(
    directory: Path,
    seen: dict[str, tuple[int, int, int, int]],
    source: Path | None = None,
    *,
    private: bool = False,
) -> _Opened:
    """Read spec.json and map the weights (``source``: a copy of them), noting the
    identity of the files read in ``seen``. ``private``: read the weights into anonymous
    memory instead of mapping the file."""
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    spec = _read_spec(directory, seen)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        with (source or weights).open("rb") as f:
            stat = os.fstat(f.fileno())
            if source is None:
                seen[WEIGHTS_FILE] = _file_identity(stat)
            if not stat.st_size:
                return _Opened(directory, spec, None)
            if private:
                flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                mapping = mmap.mmap(-1, stat.st_size, flags=flags)
                if f.readinto(mapping) != stat.st_size:
                    raise OSError(f"{weights}: shorter than when it was opened")
                return _Opened(directory, spec, mapping)
            # Copy-on-write, so tensors can be views (torch wants a writable buffer) and a
            # write, were there one, would stay in this process, never reach the file.
            return _Opened(directory, spec, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY))
    except OSError as exc:
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is unreadable: {exc}") from None


def _copy_weights(
    directory: Path, index_dir: Path, seen: dict[str, tuple[int, int, int, int]]
) -> Path | None:
    """A copy of the weights file in ``index_dir`` (a temporary name), its source's
    identity in ``seen``; None when there is no weights file (``_open`` says so)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    try:
        src = (directory / WEIGHTS_FILE).open("rb")
    except OSError:
        return None
    with src:
        seen[WEIGHTS_FILE] = _file_identity(os.fstat(src.fileno()))
        fd, name = tempfile.mkstemp(prefix=f".{WEIGHTS_FILE}.", dir=index_dir)
        with os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    copy = Path(name)
    copy.chmod(0o644)  # mkstemp's 0600: workers may run as another user
    return copy


def _verify_version(opened: _Opened) -> None:
    """Hash the mapped weights and the spec: the version they must carry."""
    claimed = opened.spec.get("version")
    actual = content_version(b"" if opened.mapping is None else opened.mapping, opened.spec)
    if claimed != actual:
        raise CheckpointError(
            f"{opened.directory}: content does not match its version {claimed!r} (the content "
            f"hashes to {actual!r}): the weights or spec.json were modified or are incomplete"
        )


def _check(opened: _Opened) -> None:
    """Parse the model config, the feature spec and the weights' header, and check that
    they fit one another, with no torch operation."""
    directory, spec = opened.directory, opened.spec
    try:
        config = DeepFMConfig.from_json(spec["model"])
        features = FeatureSpec.from_json(spec["features"], {})
        Calibration.from_json(spec.get("calibration"))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory}: {SPEC_FILE} is malformed: {exc}") from None
    if features.vocab_sizes != config.vocab_sizes:
        raise CheckpointError(f"{directory}: vocab sizes in the feature spec and model disagree")
    if len(features.dense_fields) != config.num_dense:
        raise CheckpointError(
            f"{directory}: the feature spec has {len(features.dense_fields)} dense fields, "
            f"the model {config.num_dense}"
        )
    try:
        entries = header(opened.mapping)
    except ValueError as exc:
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is unreadable: {exc}") from None
    if TABLES not in entries:
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} has no {TABLES}")
    expected = config.state_shapes()
    misfits = [
        f"{name}: {entry.dtype} {list(entry.shape)}, expected "
        + (f"{WEIGHTS_DTYPE} {list(expected[name])}" if name in expected else "none")
        for name, entry in entries.items()
        if name not in expected or (entry.dtype, entry.shape) != (WEIGHTS_DTYPE, expected[name])
    ] + [f"{name}: missing" for name in expected if name not in entries]
    if misfits:
        raise CheckpointError(
            f"{directory}: weights do not fit the model config: {'; '.join(misfits)}"
        )
    opened.config, opened.features, opened.entries = config, features, entries


def _vocab_keys(opened: _Opened, seen: dict[str, tuple[int, int, int, int]]) -> Iterator[list[str]]:
    """Every embedded field's lookup keys, in order, one field at a time, each vocabulary
    verified against the spec as it is read."""
    assert opened.features is not None
    entries = {entry["name"]: entry for entry in opened.spec["features"]}
    for f in opened.features.embedded_fields:
        yield lookup_keys(_read_vocab(opened.directory, entries[f.name], seen).values)


def _read_vocab(
    directory: Path, entry: Mapping[str, Any], seen: dict[str, tuple[int, int, int, int]]
) -> Vocabulary:
    name = f"{VOCAB_DIR}/{entry['name']}.txt"
    try:
        # Bytes, decoded as they are: read_text would turn a "\r" inside a value into a
        # line break.
        vocab = Vocabulary.from_text(_read(directory, name, seen).decode("utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{directory}: vocabulary of {entry['name']!r}: {exc}") from None
    if vocab.sha256() != entry["vocab_sha256"] or len(vocab) + 1 != entry["vocab_size"]:
        raise CheckpointError(
            f"{directory}: {name} does not match spec.json (modified or truncated)"
        )
    return vocab


def _index_fits(path: Path, opened: _Opened) -> bool:
    """Whether ``path`` holds a readable index of this checkpoint's vocabularies."""
    try:
        return _index_matches(VocabIndex.open(path), opened)
    except IndexFileError:
        return False


def _index_matches(index: VocabIndex, opened: _Opened) -> bool:
    assert opened.features is not None
    sizes = tuple(size - 1 for size in opened.features.vocab_sizes)
    return index.label == opened.version and index.sizes == sizes


def _read_spec(directory: Path, seen: dict[str, tuple[int, int, int, int]]) -> dict[str, Any]:
    if not (directory / SPEC_FILE).is_file():
        raise CheckpointError(f"{directory}: no {SPEC_FILE}; not a ctr-serve checkpoint")
    try:
        spec = json.loads(_read(directory, SPEC_FILE, seen).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory}: {SPEC_FILE} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or spec.get("format_version") not in FORMAT_VERSIONS:
        found = spec.get("format_version") if isinstance(spec, dict) else None
        raise CheckpointError(
            f"{directory}: {SPEC_FILE} has format_version {found!r}, expected one of "
            f"{list(FORMAT_VERSIONS)}"
        )
    return spec


def _read(directory: Path, name: str, seen: dict[str, tuple[int, int, int, int]]) -> bytes:
    """The bytes of ``directory/name``, its identity noted in ``seen`` (of the file read,
    whatever the name points to afterwards)."""
    with (directory / name).open("rb") as f:
        seen[name] = _file_identity(os.fstat(f.fileno()))
        return f.read()


def _file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _identity(seen: Mapping[str, tuple[int, int, int, int]]) -> tuple[FileIdentity, ...]:
    return tuple((name, *ident) for name, ident in sorted(seen.items()))


def _stat(directory: Path, names: Iterable[str]) -> tuple[FileIdentity, ...] | None:
    """The identity the files ``names`` have now (None when one is gone)."""
    try:
        return _identity({name: _file_identity((directory / name).stat()) for name in names})
    except OSError:
        return None

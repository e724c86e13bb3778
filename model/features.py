"""The feature spec: fields, vocabularies and dense transforms; raw columns -> tensors.

Training and serving encode through one core here, so there is no train/serve
skew. A batch comes as columns (training: input column name -> NumPy array,
float64 with NaN for a missing dense value, object ``str`` or ``None`` for a
sparse one; ``FeatureSpec.keys``) or as rows (serving: field name -> raw value;
``FeatureSpec.row_keys``). Either becomes a ``Keyed`` batch: every embedded
value's lookup key (``lookup_keys``) and the float32 dense input ``B x D``.
``FeatureSpec.ids`` looks the keys up, giving int64 ids ``B x F`` (one per
embedded field, 0 = OOV or missing); ``encode`` and ``encode_rows`` are the two
steps together. A server that reads rows by value (the Redis tier) takes the
keys as they are.

Every input column is one field, with a transform:

- ``category`` (sparse input): index in a vocabulary learned on training data;
- ``bucket`` (dense input): the Criteo winners' bucketing of a count into a
  category, ``floor(ln(x)^2)`` for ``x > 2``, else ``floor(x)``, then a vocabulary;
- ``log`` (dense input): ``sign(x) * log1p(|x|)``;
- ``standard`` (dense input): ``(x - mean) / std`` with statistics learned on
  training data.

A missing dense value becomes the field's ``missing`` value (0.0: the mean after
``standard``, a count of zero after ``log``); a missing or unseen sparse value
is index 0.

A category value of any length is valid. Values longer than ``KEY_CHARS`` are
looked up by a fixed-size digest (``value_key``), in the vocabulary as in a
server's row cache and in Redis, so what a looked-up value costs to keep is
bounded whatever its length (URLs, user agents, search queries).

Ids are looked up through one ``model.vocabindex.VocabIndex`` of every embedded
field (``FeatureSpec.vocab_index``): the checkpoint's (``FeatureSpec.index``,
maybe a memory map shared by worker processes), else one built from the fields'
vocabularies when first needed. A spec with the index needs no vocabulary
values at all (``Field.vocab`` None, ``Field.num_values`` its size); it gives
exactly the ids the per-field dicts of before gave (``tests/model/
test_vocabindex.py`` keeps that reference). The index is keyed by ``value_key``,
so a server that holds lookup keys (the Redis tier) looks them up as they are.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import chain, repeat
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from model.vocabindex import NOT_A_KEY, VocabIndex

Transform = Literal["category", "bucket", "log", "standard"]
EMBEDDED_TRANSFORMS: frozenset[str] = frozenset({"category", "bucket"})
DENSE_TRANSFORMS: frozenset[str] = frozenset({"log", "standard"})
SPARSE_INPUT_TRANSFORMS: frozenset[str] = frozenset({"category"})

KEY_CHARS = 64  # a longer category value is looked up by its digest
# A vocabulary holds one value a line, so no value contains "\n": no value is a digest key.
DIGEST_MARK = "\n#"

FloatArray = npt.NDArray[np.float64]
ObjectArray = npt.NDArray[np.object_]
Columns = Mapping[str, npt.NDArray[Any]]
# Per dense field: uses log?, mean, std, missing value.
DenseParams = tuple[npt.NDArray[np.bool_], FloatArray, FloatArray, FloatArray]
# A column as a server may hold it (app.columnar): an array, or a list of raw values.
Column = npt.NDArray[Any] | Sequence[Any]


def value_key(value: str) -> str:
    """How a category value is looked up: itself, or past ``KEY_CHARS`` characters a
    128-bit digest of it (34 characters, whatever the value's length)."""
    if len(value) <= KEY_CHARS:
        return value
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16)
    return DIGEST_MARK + digest.hexdigest()


def lookup_keys(values: Iterable[Any]) -> list[str]:
    """The lookup key of every category value (str, int or None): a string is ``value_key``
    of itself, an integer that of its decimal string, and a missing value (None or the
    empty string) is ``NOT_A_KEY``, which no vocabulary holds. Every encoding path keys
    its values here."""
    return _keys_in_place(list(values))


def _keys_in_place(values: list[Any]) -> list[str]:
    """``lookup_keys``, overwriting ``values``: the loops run in C, Python only for the
    few values that are not short strings."""
    count = len(values)
    strings = np.fromiter(map(operator.is_, map(type, values), repeat(str)), bool, count=count)
    if not strings.all():
        for i in np.flatnonzero(~strings).tolist():
            value = values[i]
            values[i] = NOT_A_KEY if value is None else str(value)
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=count)
    for i in np.flatnonzero(lengths > KEY_CHARS).tolist():
        values[i] = value_key(values[i])
    for i in np.flatnonzero(lengths == 0).tolist():
        values[i] = NOT_A_KEY  # (an empty value is missing, as in the data files)
    return values


@dataclass(frozen=True)
class Keyed:
    """A batch as every encoding path sees it: per embedded field, every row's lookup key
    (``NOT_A_KEY`` where the value is missing), and the model's dense input ``B x D``.

    Ids are these keys looked up in the vocabulary index (``FeatureSpec.ids``); a server
    that reads embedding rows by value (the Redis tier) uses the keys as they are."""

    columns: list[list[str]]
    dense: npt.NDArray[np.float32]
    # The embedded fields (positions) of ``columns``, and the dense fields (positions) of
    # ``dense``'s columns: some of the model's fields (a ``RowPlan``'s), or, None, all.
    fields: tuple[int, ...] | None = None
    dense_positions: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dense)

    def field_positions(self) -> range | tuple[int, ...]:
        """The embedded field of each column."""
        return range(len(self.columns)) if self.fields is None else self.fields

    def __getitem__(self, rows: slice) -> Keyed:
        """The keys of a slice of the batch's rows."""
        return Keyed([c[rows] for c in self.columns], self.dense[rows], *self._parts)

    @property
    def _parts(self) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
        return self.fields, self.dense_positions

    @staticmethod
    def concat(batches: Sequence[Keyed]) -> Keyed:
        """One batch of the rows of ``batches`` (of the same fields), in order."""
        if len(batches) == 1:
            return batches[0]
        first = batches[0]
        if any(b._parts != first._parts for b in batches):
            raise ValueError("batches of different fields")
        columns = [
            list(chain.from_iterable(cs)) for cs in zip(*(b.columns for b in batches), strict=True)
        ]
        return Keyed(columns, np.concatenate([b.dense for b in batches]), *first._parts)

    @property
    def missing(self) -> int:
        """How many embedded values are missing (absent or null)."""
        return sum(column.count(NOT_A_KEY) for column in self.columns)


@dataclass(frozen=True)
class Vocabulary:
    """The values of one embedded field; value ``values[i]`` has index ``i + 1``."""

    values: tuple[str, ...]

    @cached_property
    def _index(self) -> VocabIndex:
        return VocabIndex.build([lookup_keys(self.values)])

    def __len__(self) -> int:
        return len(self.values)

    def lookup(self, values: ObjectArray) -> npt.NDArray[np.int64]:
        """Indices of ``values`` (str or None); unseen and missing give 0."""
        return self._index.lookup(0, lookup_keys(values.tolist()))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_text().encode()).hexdigest()

    def to_text(self) -> str:
        return "".join(f"{value}\n" for value in self.values)

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        values = text.split("\n")
        if values[-1] == "":
            values.pop()
        return cls(tuple(values))


@dataclass(frozen=True)
class Field:
    """One input column and how it becomes model input."""

    name: str
    transform: Transform
    stats: Mapping[str, float] = field(default_factory=dict)
    vocab: Vocabulary | None = None
    # The vocabulary's length when it is not loaded: a server that reads embedding
    # rows by raw value (from Redis) needs the field, not its values.
    num_values: int | None = None

    def __post_init__(self) -> None:
        if self.transform not in EMBEDDED_TRANSFORMS | DENSE_TRANSFORMS:
            raise ValueError(f"field {self.name!r}: unknown transform {self.transform!r}")
        if self.embedded and self.vocab is None and self.num_values is None:
            raise ValueError(f"field {self.name!r}: transform {self.transform!r} needs a vocab")

    @property
    def embedded(self) -> bool:
        """True when the model sees this field through an embedding row."""
        return self.transform in EMBEDDED_TRANSFORMS

    @property
    def kind(self) -> Literal["dense", "sparse"]:
        """What a client sends: a number (dense) or a category (sparse)."""
        return "sparse" if self.transform in SPARSE_INPUT_TRANSFORMS else "dense"

    @property
    def vocab_size(self) -> int:
        """Rows in this field's table, including the OOV row 0."""
        if self.vocab is not None:
            return len(self.vocab) + 1
        return self.num_values + 1 if self.num_values is not None else 0

    def categories(self, raw: Column) -> ObjectArray:
        """The category string of every raw value (None where missing)."""
        return categories(self.transform, raw)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "transform": self.transform}
        if self.stats:
            out["stats"] = dict(self.stats)
        if self.embedded:
            if self.vocab is None:
                raise ValueError(f"field {self.name!r}: its vocabulary is not loaded")
            out["vocab_size"] = self.vocab_size
            out["vocab_sha256"] = self.vocab.sha256()
        return out


def categories(transform: Transform, raw: Column) -> ObjectArray:
    """Raw values of an embedded field -> category strings (None where missing)."""
    if transform == "bucket":
        return bucketize(np.asarray(raw, dtype=np.float64))
    return np.asarray(raw, dtype=object)


def bucketize(x: FloatArray) -> ObjectArray:
    """Criteo winners' bucketing: ``floor(ln(x)^2)`` for ``x > 2``, else ``floor(x)``."""
    out = np.full(x.shape, None, dtype=object)
    present = ~np.isnan(x)
    v = x[present]
    with np.errstate(divide="ignore", invalid="ignore"):
        big = np.floor(np.log(np.where(v > 2, v, 3.0)) ** 2)
    buckets = np.where(v > 2, big, np.floor(v)).astype(np.int64)
    out[present] = list(map(str, buckets.tolist()))
    return out


@dataclass(frozen=True)
class FeatureSpec:
    """All input fields, in input order, and the encoding shared by training and serving."""

    fields: tuple[Field, ...]
    # The embedded fields' vocabulary index (a checkpoint's, maybe memory-mapped); None:
    # built from the fields' vocabularies when first needed.
    index: VocabIndex | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in {names}")
        if not self.embedded_fields:
            raise ValueError("a DeepFM needs at least one sparse (embedded) field")
        sizes = tuple(size - 1 for size in self.vocab_sizes)
        if self.index is not None and self.index.sizes != sizes:
            raise ValueError(f"the index holds {self.index.sizes} values, the fields {sizes}")

    @cached_property
    def vocab_index(self) -> VocabIndex:
        """The index every id lookup goes through: ``index``, else one built from the
        fields' vocabularies (RuntimeError when they are not loaded)."""
        if self.index is not None:
            return self.index
        for f in self.embedded_fields:
            if f.vocab is None:
                raise RuntimeError(f"field {f.name!r}: the vocabulary is not loaded")
        return VocabIndex.build(
            lookup_keys(f.vocab.values) for f in self.embedded_fields if f.vocab is not None
        )

    @cached_property
    def embedded_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.embedded)

    @cached_property
    def dense_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.embedded)

    @cached_property
    def by_name(self) -> dict[str, Field]:
        return {f.name: f for f in self.fields}

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(f.vocab_size for f in self.embedded_fields)

    @cached_property
    def _dense_params(self) -> DenseParams:
        """Per dense field: uses log?, mean, std, missing value (vectors of length D)."""
        fields = self.dense_fields
        return (
            np.array([f.transform == "log" for f in fields], dtype=bool),
            np.array([f.stats.get("mean", 0.0) for f in fields]),
            np.array([f.stats.get("std", 1.0) for f in fields]),
            np.array([f.stats.get("missing", 0.0) for f in fields]),
        )

    def transform_dense(
        self, raw: FloatArray, params: DenseParams | None = None
    ) -> npt.NDArray[np.float32]:
        """Raw dense values ``B x D`` (NaN = missing) -> model input ``B x D`` float32;
        ``params``: of the columns' dense fields (a ``RowPlan``'s), by default all.

        All fields at once, so the cost per call does not grow with the field count.
        """
        log, mean, std, missing = self._dense_params if params is None else params
        with np.errstate(invalid="ignore"):
            z = np.where(log, np.sign(raw) * np.log1p(np.abs(raw)), (raw - mean) / std)
        return np.where(np.isnan(z), missing, z).astype(np.float32)

    def keys(self, columns: Mapping[str, Column], num_rows: int) -> Keyed:
        """Columns (training's form; or lists of raw values) -> the batch's lookup keys
        and dense input. A column absent from ``columns`` is missing in every row."""
        keyed = []
        for f in self.embedded_fields:
            raw = columns.get(f.name)
            keyed.append(
                [NOT_A_KEY] * num_rows
                if raw is None
                else _keys_in_place(f.categories(raw).tolist())
            )
        raw_dense = np.full((num_rows, len(self.dense_fields)), np.nan)
        for j, f in enumerate(self.dense_fields):
            if f.name in columns:
                raw_dense[:, j] = columns[f.name]
        return Keyed(keyed, self.transform_dense(raw_dense))

    def row_keys(self, rows: Sequence[Mapping[str, Any]], plan: RowPlan | None = None) -> Keyed:
        """Rows of raw values (field name -> value; serving's form) -> the same as
        ``keys`` of the same data in columns, which the tests hold it to. An integer
        sparse value is the same value as its decimal string; None or an absent field
        is missing. ``plan``: read only some of the fields (``plan(names)``); the keys
        are then of those fields alone (``Keyed.fields``).

        Every category value of every row is read in one comprehension and keyed in
        one pass, instead of one NumPy call per field: most of a small batch's cost.
        """
        if plan is None:
            plan = self._row_plan
        raw_dense = self._raw_dense(rows, plan.dense_inputs)
        columns: list[list[str]] = [[] for _ in plan.fields]
        names = plan.category_names
        if names and rows:
            flat = _keys_in_place([row.get(name) for row in rows for name in names])
            for k, j in enumerate(plan.category_columns):
                columns[j] = flat[k :: len(names)]
        for j, position in plan.bucket_columns:
            columns[j] = _keys_in_place(bucketize(raw_dense[:, position]).tolist())
        dense = self.transform_dense(raw_dense[:, plan.dense_columns], plan.dense_params)
        if plan.whole:
            return Keyed(columns, dense)
        return Keyed(columns, dense, plan.fields, plan.dense_positions)

    def ids(self, keyed: Keyed) -> npt.NDArray[np.int64]:
        """The ids ``B x F`` of a batch's keys, in one search of the vocabulary index;
        0 where a value is missing or unseen."""
        num_rows, width = len(keyed), len(keyed.columns)
        found = self.vocab_index.find(
            list(chain.from_iterable(keyed.columns)),
            chain.from_iterable(repeat(j, num_rows) for j in keyed.field_positions()),
        )
        return np.ascontiguousarray(found.reshape(width, num_rows).T)

    def encode(
        self, columns: Columns, num_rows: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Columns -> (ids ``B x F`` int64, dense ``B x D`` float32)."""
        keyed = self.keys(columns, num_rows)
        return self.ids(keyed), keyed.dense

    def encode_rows(
        self, rows: Sequence[Mapping[str, Any]]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Rows of raw values -> (ids, dense), as ``encode`` (see ``row_keys``)."""
        keyed = self.row_keys(rows)
        return self.ids(keyed), keyed.dense

    @cached_property
    def _row_plan(self) -> RowPlan:
        return self.plan()

    def plan(self, names: Collection[str] | None = None) -> RowPlan:
        """How rows holding the fields ``names`` (default: all) are read: a ranking
        request's context and candidates each hold some of the fields."""
        chosen = {f.name for f in self.fields if names is None or f.name in names}
        embedded = [j for j, f in enumerate(self.embedded_fields) if f.name in chosen]
        dense = [j for j, f in enumerate(self.dense_fields) if f.name in chosen]
        dense_inputs = tuple(f.name for f in self.fields if f.name in chosen and f.kind == "dense")
        position = {name: i for i, name in enumerate(dense_inputs)}
        fields = [self.embedded_fields[j] for j in embedded]
        categories = [c for c, f in enumerate(fields) if f.transform == "category"]
        return RowPlan(
            fields=tuple(embedded),
            dense_positions=tuple(dense),
            whole=names is None,
            dense_inputs=dense_inputs,
            category_columns=tuple(categories),
            category_names=tuple(fields[c].name for c in categories),
            bucket_columns=tuple(
                (c, position[f.name]) for c, f in enumerate(fields) if f.transform == "bucket"
            ),
            dense_columns=[position[self.dense_fields[j].name] for j in dense],
            dense_params=tuple(param[dense] for param in self._dense_params),  # type: ignore[arg-type]
        )

    @staticmethod
    def _raw_dense(rows: Sequence[Mapping[str, Any]], inputs: Sequence[str]) -> FloatArray:
        """The dense-kind ``inputs`` of ``rows``, ``B x len(inputs)``; None becomes NaN."""
        if not inputs:
            return np.empty((len(rows), 0))
        flat = [row.get(name) for row in rows for name in inputs]  # (one comprehension)
        return np.array(flat, dtype=np.float64).reshape(len(rows), len(inputs))

    def to_json(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.fields]

    @classmethod
    def from_json(
        cls,
        fields: Iterable[Mapping[str, Any]],
        vocabs: Mapping[str, Vocabulary],
        index: VocabIndex | None = None,
    ) -> FeatureSpec:
        """The spec of ``fields`` (spec.json); an embedded field absent from ``vocabs``
        keeps only its size (see ``Field.num_values``). ``index``: the fields' vocabulary
        index, which lets a spec without the vocabularies look ids up."""
        built = []
        for f in fields:
            embedded = f["transform"] in EMBEDDED_TRANSFORMS
            vocab = vocabs.get(f["name"]) if embedded else None
            built.append(
                Field(
                    name=f["name"],
                    transform=f["transform"],
                    stats={k: float(v) for k, v in f.get("stats", {}).items()},
                    vocab=vocab,
                    num_values=int(f["vocab_size"]) - 1 if embedded and vocab is None else None,
                )
            )
        return cls(tuple(built), index)


@dataclass(frozen=True)
class RowPlan:
    """Where each field of a raw row goes, worked out once for a set of fields
    (``FeatureSpec.plan``)."""

    fields: tuple[int, ...]  # the embedded fields read (positions), one key column each
    dense_positions: tuple[int, ...]  # the dense fields read, one dense column each
    whole: bool  # every field of the spec
    dense_inputs: tuple[str, ...]  # every dense-kind input read, in field order
    category_columns: tuple[int, ...]  # key columns filled from category fields
    category_names: tuple[str, ...]  # the category fields, in category_columns order
    bucket_columns: tuple[tuple[int, int], ...]  # (key column, dense input position)
    dense_columns: list[int]  # dense input positions of the dense fields read
    dense_params: DenseParams = field(compare=False)  # theirs (FeatureSpec._dense_params)


@dataclass
class SpecFitter:
    """Learns vocabularies and dense statistics from training chunks, one pass.

    Memory grows with the number of distinct values, never with the rows.
    """

    transforms: Mapping[str, Transform]
    min_count: int = 1
    max_vocab: int | None = None
    _counts: dict[str, dict[str, int]] = field(default_factory=dict)
    _moments: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError("min_count must be at least 1")
        for name, transform in self.transforms.items():
            if transform in EMBEDDED_TRANSFORMS:
                self._counts[name] = {}
            elif transform == "standard":
                self._moments[name] = [0.0, 0.0, 0.0]

    def update(self, columns: Columns) -> None:
        for name, counts in self._counts.items():
            cats = categories(self.transforms[name], columns[name])
            cats = cats[cats != None]  # noqa: E711 (elementwise comparison)
            if len(cats) == 0:
                continue
            values, freq = np.unique(cats.astype(str), return_counts=True)
            for value, n in zip(values.tolist(), freq.tolist(), strict=True):
                # Empty is missing; a vocabulary file holds one value a line.
                if value and "\n" not in value:
                    counts[value] = counts.get(value, 0) + n
        for name, moments in self._moments.items():
            x = np.asarray(columns[name], dtype=np.float64)
            x = x[~np.isnan(x)]
            moments[0] += len(x)
            moments[1] += float(x.sum())
            moments[2] += float(np.square(x).sum())

    def finish(self) -> FeatureSpec:
        fields = []
        for name, transform in self.transforms.items():
            if name in self._counts:
                kept = [(v, n) for v, n in self._counts[name].items() if n >= self.min_count]
                # Most frequent first; ties by value, so the order is deterministic.
                kept.sort(key=lambda vn: (-vn[1], vn[0]))
                if self.max_vocab is not None:
                    kept = kept[: self.max_vocab]
                vocab = Vocabulary(tuple(v for v, _ in kept))
                fields.append(Field(name, transform, vocab=vocab))
            elif name in self._moments:
                n, s, ss = self._moments[name]
                mean = s / n if n else 0.0
                var = max(ss / n - mean * mean, 0.0) if n else 0.0
                std = math.sqrt(var) if var > 0 else 1.0
                fields.append(Field(name, transform, {"mean": mean, "std": std, "missing": 0.0}))
            else:
                fields.append(Field(name, transform, {"missing": 0.0}))
        return FeatureSpec(tuple(fields))

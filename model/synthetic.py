"""Criteo-shaped synthetic data with a planted ground truth.

Each row has 13 count-like dense values (heavy-tailed, some missing) and 26
categorical values (8-hex-digit strings drawn from a Zipf law over a field's
cardinality, some fields often missing). Its true logit is

    bias + sum_f a_f[x_f]                            first-order effects
         + sum_{f<g} <u_f[x_f], u_g[x_g]>            low-rank pairwise interactions
         + sum_j v_j tanh(W_j . slog1p(x) + c_j)      a non-linear dense term
         + sum_d m_d [x_d missing]

with each term scaled to a configured std, and a few fields (a Dirichlet draw)
carrying most of the first-order and pairwise signal, as in real logs.

Two options make the truth harder for a DeepFM (both off by default, and drawn
from random streams of their own, so a configuration without them writes the
same bytes as before they existed):

- ``field_aware=True``: each pair of fields interacts through its own matrix,
  ``<u_f[x_f], A_fg u_g[x_g]>`` (as in FFM or FwFM), which shared embeddings
  can only approximate;
- ``three_way_std > 0``: a three-way term ``sum_{f<g<h} sum_r t_fr t_gr t_hr``
  over factors ``t_f[x_f]`` of its own, scaled to that std.

A third option, ``day`` (0 by default), makes the world drift as real traffic
does: day d replaces a share of each field's values with new ones and moves the
effects of the rest (``SyntheticConfig``), for incremental training's benchmarks.

and its label is a Bernoulli draw of sigmoid(logit). The bias is solved so the
mean click rate is ``base_ctr``. The generator writes the labels and features in
the raw Criteo TSV format and, beside them (``<file>.truth``), the true click
probability of every row, line for line, so that the oracle's AUC and logloss,
the best any model can reach, can be computed.

    python -m model.synthetic --rows 1000000 --out data/train.tsv
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv

from model.data import CRITEO_DENSE, CRITEO_SPARSE

FloatArray = npt.NDArray[np.float64]
CHUNK_ROWS = 100_000


@dataclass(frozen=True)
class SyntheticConfig:
    """The shape and strength of the planted truth; the seed fixes all of it."""

    seed: int = 0
    min_cardinality: int = 4
    max_cardinality: int = 20_000
    zipf_exponent: float = 1.2
    interaction_rank: int = 4
    first_order_std: float = 0.8  # std of the summed first-order effects
    interaction_std: float = 0.5  # std of the summed pairwise interactions
    dense_std: float = 0.5  # std of the non-linear dense term
    base_ctr: float = 0.1
    field_concentration: float = 0.5  # Dirichlet alpha of the fields' shares of the signal
    field_aware: bool = False  # pairwise through a matrix per pair of fields
    three_way_std: float = 0.0  # std of the three-way term (0: none)
    # A later day of the same world (0: the first). Day d redraws, per field, the values
    # of a share ``new_values`` of the ranks (new ads, users, queries, with effects of
    # their own) and moves every other value's effect: e' = sqrt(1 - drift^2) e + drift z.
    # Its rows are new draws too.
    day: int = 0
    drift: float = 0.3
    new_values: float = 0.2

    def __post_init__(self) -> None:
        if not 0.03 <= self.base_ctr <= 0.25:
            raise ValueError("base_ctr must be a realistic rate between 0.03 and 0.25")
        if not 1 < self.min_cardinality <= self.max_cardinality:
            raise ValueError("need 1 < min_cardinality <= max_cardinality")
        if self.three_way_std < 0:
            raise ValueError("three_way_std must be >= 0")
        if self.day < 0 or not 0 <= self.drift <= 1 or not 0 <= self.new_values <= 1:
            raise ValueError("need day >= 0, 0 <= drift <= 1 and 0 <= new_values <= 1")

    def rows_seed(self, chunk: int) -> list[int]:
        """The seed of a chunk of rows (day 0's as before days existed)."""
        return [self.seed, 1, chunk] if self.day == 0 else [self.seed, 1, chunk, self.day]


@dataclass(frozen=True)
class _SparseTruth:
    values: npt.NDArray[np.str_]  # cardinality
    cdf: FloatArray  # Zipf law over ranks
    missing_rate: float
    effect: FloatArray  # cardinality + 1 (the last is "missing")
    factors: FloatArray  # (cardinality + 1) x rank


@dataclass(frozen=True)
class _DenseTruth:
    mu: float
    sigma: float
    missing_rate: float
    missing_effect: float


class GroundTruth:
    """The planted model; ``sample`` draws rows and their true click probabilities."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        rng = np.random.default_rng([config.seed, 0])
        num_sparse, num_dense = len(CRITEO_SPARSE), len(CRITEO_DENSE)
        cards = np.geomspace(config.min_cardinality, config.max_cardinality, num_sparse)
        cards = rng.permutation(np.round(cards).astype(np.int64))
        missing = np.where(rng.random(num_sparse) < 0.3, rng.uniform(0.2, 0.45, num_sparse), 0.0)
        # As in real logs, a few fields carry most of the signal: each field's share
        # of the effect variance is a Dirichlet draw.
        share = rng.dirichlet(np.full(num_sparse, config.field_concentration))
        self.sparse = []
        for card, miss, w in zip(cards.tolist(), missing.tolist(), share.tolist(), strict=True):
            codes = rng.choice(1 << 32, size=card, replace=False)
            weights = np.arange(1, card + 1, dtype=np.float64) ** -config.zipf_exponent
            self.sparse.append(
                _SparseTruth(
                    values=np.array([f"{c:08x}" for c in codes.tolist()]),
                    cdf=np.cumsum(weights) / weights.sum(),
                    missing_rate=miss,
                    effect=rng.normal(0.0, math.sqrt(w), card + 1),
                    factors=rng.normal(0.0, w**0.25, (card + 1, config.interaction_rank)),
                )
            )
        self.dense = [
            _DenseTruth(
                mu=float(rng.uniform(0.0, 4.0)),
                sigma=float(rng.uniform(0.5, 1.8)),
                missing_rate=float(rng.choice([0.0, 0.05, 0.2, 0.45])),
                missing_effect=float(rng.normal(0.0, 0.15)),
            )
            for _ in range(num_dense)
        ]
        hidden = 8
        self.w = rng.normal(0.0, 0.6, (num_dense, hidden))
        self.c = rng.normal(0.0, 1.0, hidden)
        self.v = rng.normal(0.0, 1.0, hidden)
        for day in range(1, config.day + 1):  # each day from the one before
            self._next_day(np.random.default_rng([config.seed, 4, day]))
        # The options draw from a stream of their own: the draws above stay as they were.
        extra = np.random.default_rng([config.seed, 3])
        rank = config.interaction_rank
        self.pair_matrices = (
            extra.normal(0.0, rank**-0.5, (num_sparse, num_sparse, rank, rank))
            if config.field_aware
            else None
        )
        self.three_way = (
            [extra.normal(0.0, s.factors.std(), s.factors.shape) for s in self.sparse]
            if config.three_way_std > 0
            else None
        )
        # Scale each term to its configured std, then solve the bias for the base rate.
        self.scale = np.ones(4 if self.three_way is not None else 3)
        self.bias = 0.0
        terms = self._terms(np.random.default_rng([config.seed, 2]), 50_000)[0]
        targets: tuple[float, ...] = (
            config.first_order_std,
            config.interaction_std,
            config.dense_std,
        )
        if self.three_way is not None:
            targets += (config.three_way_std,)
        self.scale = np.array(targets) / np.maximum(terms.std(axis=0), 1e-9)
        logits = self._terms(np.random.default_rng([config.seed, 2]), 50_000)[0].sum(axis=1)
        self.bias = _solve_bias(logits, config.base_ctr)

    def _next_day(self, rng: np.random.Generator) -> None:
        """The world a day later (see ``SyntheticConfig.day``)."""
        keep = math.sqrt(1 - self.config.drift**2)
        for j, s in enumerate(self.sparse):
            card = len(s.values)
            scale = float(s.effect.std()) or 1.0
            effect = keep * s.effect + self.config.drift * rng.normal(0.0, scale, card + 1)
            factors = s.factors.copy()
            values = s.values.copy()
            fresh = rng.random(card) < self.config.new_values
            count = int(fresh.sum())
            if count:
                taken = {int(v, 16) for v in values.tolist()}
                codes: list[int] = []
                while len(codes) < count:
                    code = int(rng.integers(1 << 32))
                    if code not in taken:
                        taken.add(code)
                        codes.append(code)
                values[fresh] = [f"{c:08x}" for c in codes]
                effect[:card][fresh] = rng.normal(0.0, scale, count)
                factors[:card][fresh] = rng.normal(
                    0.0, float(s.factors.std()), (count, factors.shape[1])
                )
            self.sparse[j] = _SparseTruth(values, s.cdf, s.missing_rate, effect, factors)

    @staticmethod
    def _draw_dense(rng: np.random.Generator, d: _DenseTruth, n: int) -> FloatArray:
        x = np.floor(np.exp(rng.normal(d.mu, d.sigma, n))) - 1.0
        x[rng.random(n) < d.missing_rate] = math.nan
        return x

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """Raw dense values ``n x 13`` (NaN = missing) and value indices ``n x 26`` (the
        last index of a field, its cardinality, is "missing")."""
        dense = np.column_stack([self._draw_dense(rng, d, n) for d in self.dense])
        idx = np.empty((n, len(self.sparse)), dtype=np.int64)
        for j, s in enumerate(self.sparse):
            idx[:, j] = np.minimum(np.searchsorted(s.cdf, rng.random(n)), len(s.values) - 1)
            idx[rng.random(n) < s.missing_rate, j] = len(s.values)
        return dense, idx

    def terms(
        self,
        dense: FloatArray,
        idx: npt.NDArray[np.int64],
        known: Sequence[npt.NDArray[np.bool_]] | None = None,
    ) -> FloatArray:
        """The rows' logit terms ``n x 3``: first-order, pairwise and dense, scaled
        (``n x 4`` with the three-way term last when the config has one).

        ``known`` (one mask over each field's values) zeroes the effects of the values
        it leaves out: the truth as seen by someone who knows only those values.
        """
        n = len(idx)
        first = np.zeros(n)
        for d, x in zip(self.dense, dense.T, strict=True):
            first += np.where(np.isnan(x), d.missing_effect, 0.0)
        dense_term = np.tanh(_squash(dense) @ self.w + self.c) @ self.v
        factor_sum = np.zeros((n, self.config.interaction_rank))
        factor_sq = np.zeros(n)
        gathered = []
        power_sums = np.zeros((3, n, self.config.interaction_rank))  # sum_f t_f^p, p = 1..3
        for j, s in enumerate(self.sparse):
            keep = 1.0 if known is None else known[j][idx[:, j]].astype(np.float64)
            first += s.effect[idx[:, j]] * keep
            u = s.factors[idx[:, j]] * np.reshape(keep, (-1, 1))
            factor_sum += u
            factor_sq += np.square(u).sum(axis=1)
            gathered.append(u)
            if self.three_way is not None:
                t = self.three_way[j][idx[:, j]] * np.reshape(keep, (-1, 1))
                power_sums += np.stack((t, t**2, t**3))
        if self.pair_matrices is None:
            pairwise = 0.5 * (np.square(factor_sum).sum(axis=1) - factor_sq)
        else:
            pairwise = np.zeros(n)
            for f in range(len(gathered)):
                for g in range(f + 1, len(gathered)):
                    pairwise += ((gathered[f] @ self.pair_matrices[f, g]) * gathered[g]).sum(axis=1)
        columns = [first, pairwise, dense_term]
        if self.three_way is not None:
            # The third elementary symmetric polynomial of the fields' factors, from power
            # sums (Newton's identities): sum over f<g<h without the triple loop.
            p1, p2, p3 = power_sums
            columns.append(((p1**3 - 3 * p1 * p2 + 2 * p3) / 6).sum(axis=1))
        terms: FloatArray = np.column_stack(columns) * self.scale
        return terms

    def _terms(
        self, rng: np.random.Generator, n: int
    ) -> tuple[FloatArray, dict[str, npt.NDArray[Any]]]:
        """New rows' logit terms ``n x 3`` and their raw columns."""
        dense, idx = self._draw(rng, n)
        columns: dict[str, npt.NDArray[Any]] = dict(zip(CRITEO_DENSE, dense.T, strict=True))
        for j, (name, s) in enumerate(zip(CRITEO_SPARSE, self.sparse, strict=True)):
            col = np.full(n, None, dtype=object)
            present = idx[:, j] < len(s.values)
            col[present] = s.values[idx[present, j]].astype(object)
            columns[name] = col
        return self.terms(dense, idx), columns

    def replay(self, rows: int) -> tuple[FloatArray, npt.NDArray[np.int64]]:
        """The raw dense values and value indices of the rows ``generate`` writes."""
        parts = [
            self._draw(
                np.random.default_rng(self.config.rows_seed(i)), min(CHUNK_ROWS, rows - start)
            )
            for i, start in enumerate(range(0, rows, CHUNK_ROWS))
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def sample(
        self, rng: np.random.Generator, n: int
    ) -> tuple[npt.NDArray[np.int64], FloatArray, dict[str, npt.NDArray[Any]]]:
        """Labels, true probabilities and raw columns of ``n`` new rows."""
        terms, columns = self._terms(rng, n)
        proba = 1.0 / (1.0 + np.exp(-(self.bias + terms.sum(axis=1))))
        labels = (rng.random(n) < proba).astype(np.int64)
        return labels, proba, columns


def _squash(x: FloatArray) -> FloatArray:
    x = np.nan_to_num(x)
    return np.sign(x) * np.log1p(np.abs(x))


def _solve_bias(logits: FloatArray, target: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(np.mean(1.0 / (1.0 + np.exp(-(logits + mid))))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def truth_path(path: Path) -> Path:
    """Where the true probabilities of a generated file are written."""
    return path.with_name(path.name + ".truth")


def generate(path: Path, rows: int, config: SyntheticConfig) -> Path:
    """Write ``rows`` rows in Criteo TSV to ``path`` and their probabilities beside it."""
    truth = GroundTruth(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with path.open("wb") as data_f, truth_path(path).open("w") as truth_f:
        for i, start in enumerate(range(0, rows, CHUNK_ROWS)):
            n = min(CHUNK_ROWS, rows - start)
            labels, proba, columns = truth.sample(np.random.default_rng(config.rows_seed(i)), n)
            arrays = [pa.array(labels)]
            for name in CRITEO_DENSE:
                x = columns[name]
                missing = np.isnan(x)
                arrays.append(pa.array(np.where(missing, 0, x).astype(np.int64), mask=missing))
            arrays += [pa.array(columns[name], type=pa.string()) for name in CRITEO_SPARSE]
            table = pa.Table.from_arrays(arrays, names=["label", *CRITEO_DENSE, *CRITEO_SPARSE])
            pacsv.write_csv(table, data_f, options)
            truth_f.write("".join(f"{p:.9f}\n" for p in proba.tolist()))
    return truth_path(path)


def read_truth(path: Path) -> FloatArray:
    """The true probabilities written beside a generated file."""
    return np.loadtxt(truth_path(path), dtype=np.float64, ndmin=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the Criteo TSV to write")
    defaults = SyntheticConfig()
    for name in ("seed", "min_cardinality", "max_cardinality", "interaction_rank"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    for name in (
        "zipf_exponent",
        "first_order_std",
        "interaction_std",
        "dense_std",
        "base_ctr",
        "field_concentration",
    ):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name)
        )
    parser.add_argument("--field-aware", action="store_true", help="a matrix per field pair")
    parser.add_argument("--three-way-std", type=float, default=defaults.three_way_std)
    parser.add_argument(
        "--day", type=int, default=0, help="a later day of the same world (drifted truth)"
    )
    parser.add_argument("--drift", type=float, default=defaults.drift)
    parser.add_argument("--new-values", type=float, default=defaults.new_values)
    args = parser.parse_args(argv)
    config = SyntheticConfig(**{k: v for k, v in vars(args).items() if k not in ("rows", "out")})
    written = generate(args.out, args.rows, config)
    print(f"wrote {args.rows} rows to {args.out} and their true probabilities to {written}")


if __name__ == "__main__":
    main()

"""DeepFM (Guo et al. 2017): a linear part, a factorization machine and a DNN over shared
embeddings, summed into one logit.

Notation: B rows, F embedded (sparse) fields, D dense fields, k embedding dim.

    y_lin = b + sum_f w_f[x_f] + sum_d u_d z_d
    e_f   = V_f[x_f]                                  (shared by FM and DNN)
    y_fm  = 1/2 sum_k [(sum_f e_fk)^2 - sum_f e_fk^2]  (O(kF))
    y_dnn = MLP(concat(e_1..e_F, z_1..z_D))
    logit = y_lin + y_fm + y_dnn

Every field's table lives in one matrix ``sparse_rows`` of shape
``sum_f V_f x (1 + k)``: row ``offset_f + x`` is ``[w_f[x], V_f[x]_1..k]``, the
same layout the service stores and ships as one packed row. ``forward`` gathers
rows from it; ``forward_rows`` starts from rows gathered elsewhere (an
embedding store), so a server need not hold the tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class DeepFMConfig:
    """Everything needed to rebuild the module (its weights come from the checkpoint)."""

    vocab_sizes: tuple[int, ...]
    num_dense: int
    embed_dim: int = 16
    hidden_units: tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.vocab_sizes or min(self.vocab_sizes) < 1:
            raise ValueError(f"vocab_sizes must be non-empty and positive: {self.vocab_sizes}")
        if self.num_dense < 0 or self.embed_dim < 1:
            raise ValueError("num_dense must be >= 0 and embed_dim >= 1")
        if any(h < 1 for h in self.hidden_units):
            raise ValueError(f"hidden_units must be positive: {self.hidden_units}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1): {self.dropout}")

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor of the module's state dict, without building it
        (no torch operation: a process that forks workers may check a checkpoint)."""
        k = self.embed_dim
        shapes = {
            "sparse_rows.weight": (sum(self.vocab_sizes), 1 + k),
            "bias": (1,),
            "dense_weight": (self.num_dense,),
        }
        width, layer = self.num_fields * k + self.num_dense, 0
        for units in (*self.hidden_units, 1):
            shapes[f"deep.mlp.{layer}.weight"] = (units, width)
            shapes[f"deep.mlp.{layer}.bias"] = (units,)
            width, layer = units, layer + (3 if self.dropout > 0 else 2)  # Linear, ReLU[, Dropout]
        return shapes

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["vocab_sizes"] = list(self.vocab_sizes)
        out["hidden_units"] = list(self.hidden_units)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeepFMConfig:
        return cls(
            vocab_sizes=tuple(int(v) for v in data["vocab_sizes"]),
            num_dense=int(data["num_dense"]),
            embed_dim=int(data["embed_dim"]),
            hidden_units=tuple(int(h) for h in data["hidden_units"]),
            dropout=float(data["dropout"]),
        )


class Split(NamedTuple):
    """How a ranking request's context divides a DeepFM's input (``DeepFM.split``), and
    the weights of each side, taken out once: valid for the weights it was made from."""

    context_fields: Tensor  # embedded positions the context holds
    context_dense: Tensor  # dense positions the context holds
    other_fields: Tensor  # the rest, the candidates'
    other_dense: Tensor
    context_weight: Tensor  # the DNN's first layer's columns of the context's values
    other_weight_t: Tensor  # (transposed, contiguous) the candidates' values' columns
    context_dense_weight: Tensor  # u of the context's dense fields
    other_dense_weight: Tensor


class FactorizationMachine(nn.Module):
    """Second-order FM term over field embeddings: ``B x F x k -> B``."""

    def forward(self, embeddings: Tensor) -> Tensor:
        square_of_sum = embeddings.sum(dim=1).square()
        sum_of_squares = embeddings.square().sum(dim=1)
        return 0.5 * (square_of_sum - sum_of_squares).sum(dim=1)


class DeepArch(nn.Module):
    """The DNN: ``B x (F*k + D) -> B``, ReLU hidden layers with dropout, linear out."""

    def __init__(self, in_features: int, hidden_units: tuple[int, ...], dropout: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for units in hidden_units:
            layers += [nn.Linear(width, units), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = units
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.mlp(x)
        return out.squeeze(-1)


class DeepFM(nn.Module):
    """DeepFM returning logits; apply a sigmoid for probabilities."""

    offsets: Tensor
    sparse_rows: nn.Embedding | None

    def __init__(
        self, config: DeepFMConfig, *, tables: bool = True, table: Tensor | None = None
    ) -> None:
        """``tables=False`` builds the dense part only (``forward_rows``, no ``gather``):
        a server reading its rows from an embedding store needs no table in memory.

        ``table``: the tables to hold (``sum_f V_f x (1 + k)``), as they are: no copy, no
        initialisation, never written (a checkpoint's, mapped from a file and shared).
        """
        super().__init__()
        self.config = config
        k = config.embed_dim
        rows = sum(config.vocab_sizes)
        if table is not None and tuple(table.shape) != (rows, 1 + k):
            raise ValueError(f"table of shape {tuple(table.shape)}, expected {(rows, 1 + k)}")
        self.sparse_rows = nn.Embedding(rows, 1 + k) if tables and table is None else None
        offsets = torch.tensor((0, *config.vocab_sizes[:-1]), dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.bias = nn.Parameter(torch.zeros(1))
        self.dense_weight = nn.Parameter(torch.zeros(config.num_dense))
        self.fm = FactorizationMachine()
        self.deep = DeepArch(
            config.num_fields * k + config.num_dense, config.hidden_units, config.dropout
        )
        self.reset_parameters()
        if table is not None:  # after reset_parameters, which would write to it
            self.sparse_rows = nn.Embedding(rows, 1 + k, _weight=table)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.sparse_rows is not None:
                self.sparse_rows.weight[:, 0].zero_()
                self.sparse_rows.weight[:, 1:].normal_(0.0, 0.01)
            self.dense_weight.zero_()
            self.bias.zero_()

    def gather(self, ids: Tensor, fields: Tensor | None = None) -> Tensor:
        """Rows ``[w, e_1..e_k]`` of every field: ids ``B x F`` int64 -> ``B x F x (1+k)``;
        ``fields``: the ids' columns are of these fields (positions) only."""
        if self.sparse_rows is None:
            raise RuntimeError("this DeepFM was built without its tables")
        offsets = self.offsets if fields is None else self.offsets[fields]
        rows: Tensor = self.sparse_rows(ids + offsets)
        return rows

    def forward(self, ids: Tensor, dense: Tensor) -> Tensor:
        """Logits ``B`` from ids ``B x F`` (int64, 0 = OOV) and dense ``B x D`` float32."""
        rows = self.gather(ids)
        return self.forward_rows(rows[..., 0], rows[..., 1:], dense)

    def explain_rows(
        self, first_order: Tensor, embeddings: Tensor, dense: Tensor
    ) -> dict[str, Tensor]:
        """The logit of gathered rows split into parts that sum to it.

        bias ``B``; first_order ``B x F`` (w_f[x_f]); dense_linear ``B x D`` (u_d z_d);
        fm ``B x F``: each field's share of the FM term, half its pairwise interactions
        with every other field, ``1/2 <e_f, sum_g e_g - e_f>``, so the shares sum to
        ``y_fm`` exactly; dnn ``B``; and logit ``B`` (``forward_rows``'s value).
        """
        total = embeddings.sum(dim=1, keepdim=True)
        fm = 0.5 * (embeddings * (total - embeddings)).sum(dim=2)
        dnn: Tensor = self.deep(torch.cat((embeddings.flatten(1), dense), dim=1))
        # The logit as forward_rows computes it, from the same terms: equal to it.
        y_lin = self.bias + first_order.sum(dim=1) + dense @ self.dense_weight
        y_fm: Tensor = self.fm(embeddings)
        return {
            "bias": self.bias.expand(first_order.shape[0]),
            "first_order": first_order,
            "dense_linear": dense * self.dense_weight,
            "fm": fm,
            "dnn": dnn,
            "logit": y_lin + y_fm + dnn,
        }

    @torch.no_grad()
    def split(self, context_fields: Tensor, context_dense: Tensor) -> Split:
        """How a context holding the embedded fields ``context_fields`` and the dense
        fields ``context_dense`` (int64 positions, ascending) divides this model's
        input, worked out once for ``forward_shared`` (for these weights)."""
        fields, k = self.config.num_fields, self.config.embed_dim
        other_fields = complement(context_fields, fields)
        other_dense = complement(context_dense, self.config.num_dense)
        columns = torch.arange(fields * k).view(fields, k)
        context_columns = torch.cat((columns[context_fields].flatten(), fields * k + context_dense))
        other_columns = torch.cat((columns[other_fields].flatten(), fields * k + other_dense))
        first = self.deep.mlp[0]
        assert isinstance(first, nn.Linear)
        u = self.dense_weight
        return Split(
            context_fields,
            context_dense,
            other_fields,
            other_dense,
            first.weight[:, context_columns].contiguous(),
            first.weight[:, other_columns].T.contiguous(),
            u[context_dense].contiguous(),
            u[other_dense].contiguous(),
        )

    def forward_shared(
        self,
        context: tuple[Tensor, Tensor, Tensor],
        candidates: tuple[Tensor, Tensor, Tensor],
        split: Split,
    ) -> Tensor:
        """Logits ``N`` of N candidates that share one context (a ranking request): equal
        to ``forward_rows`` on the rows with the context merged into each, but the
        context's share of every term is computed once.

        context: (first_order ``Fc``, embeddings ``Fc x k``, dense ``Dc``) of the context's
        fields; candidates: (first_order ``N x Fn``, embeddings ``N x Fn x k``, dense
        ``N x Dn``) of the others, in ``split``'s order (``DeepFM.split``, made from this
        model's current weights).

            y_lin = [b + sum_c w_c + u_c.z_c] + sum_n w_n + u_n.z_n
            y_fm  = 1/2 sum_k [(S_c + S_n)^2 - (Q_c + Q_n)],  S = sum of e, Q = sum of e^2
            h_1   = [W_c x_c + b_1] + W_n x_n    (the DNN's first layer; the rest per row)
        """
        c_first, c_emb, c_dense = context
        n_first, n_emb, n_dense = candidates
        shared_lin = self.bias + c_first.sum() + c_dense @ split.context_dense_weight
        y_lin = shared_lin + n_first.sum(dim=1) + n_dense @ split.other_dense_weight
        s = c_emb.sum(dim=0) + n_emb.sum(dim=1)  # N x k
        q = c_emb.square().sum(dim=0) + n_emb.square().sum(dim=1)
        y_fm = 0.5 * (s.square() - q).sum(dim=1)
        first, *rest = self.deep.mlp
        assert isinstance(first, nn.Linear)
        shared_h = torch.addmv(
            first.bias, split.context_weight, torch.cat((c_emb.flatten(), c_dense))
        )
        other_x = torch.cat((n_emb.flatten(1), n_dense), dim=1)
        h = torch.addmm(shared_h, other_x, split.other_weight_t)
        for layer in rest:
            h = layer(h)
        return y_lin + y_fm + h.squeeze(-1)

    def forward_rows(self, first_order: Tensor, embeddings: Tensor, dense: Tensor) -> Tensor:
        """Logits ``B`` from gathered rows.

        first_order: ``B x F`` (w_f[x_f]); embeddings: ``B x F x k`` (e_f); dense: ``B x D``.
        """
        y_lin = self.bias + first_order.sum(dim=1) + dense @ self.dense_weight
        y_fm: Tensor = self.fm(embeddings)
        y_dnn: Tensor = self.deep(torch.cat((embeddings.flatten(1), dense), dim=1))
        return y_lin + y_fm + y_dnn


def complement(positions: Tensor, size: int) -> Tensor:
    """The positions of ``range(size)`` not in ``positions``, ascending."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[positions] = False
    return torch.arange(size)[keep]

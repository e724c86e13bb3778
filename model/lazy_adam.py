"""Adam on an embedding table's touched rows, with an L2 term over the whole table
applied lazily: a row gets the decay of the steps it missed when it is next touched.

The objective is the batch loss plus ``l2/2 * ||W||^2`` over every row of the table,
as in FuxiCTR's ``embedding_regularizer``. Optimised densely by Adam, every row
gets the gradient ``l2 * w`` at every step, in the batch or not, and Adam
normalises it: a row the data rarely touches is pulled toward zero by up to
``lr`` per step, while a frequent row, whose second moment its data gradients
keep large, barely moves. Doing that densely costs a pass over the whole table
(and its two moments) per step. Here a step costs only the rows of the batch.

For a row last brought up to date at step ``t0`` and touched again at step
``t``, the ``n = t - 1 - t0`` steps it missed had no data gradient, only
``g = l2 * w``. Holding ``w`` at its value ``w0`` for the rates (``c = (l2 w0)^2``,
``a = v0``, ``k = -ln beta2``), Adam's step at missed step ``s`` is
``lr * sqrt(c) / sqrt(a beta2^s + c)``, and their sum has a closed form:

    D = lr * (n + (2/k) * ln((sqrt(a beta2^n + c) + sqrt(c)) / (sqrt(a + c) + sqrt(c))))

``0 <= D <= lr*n``: ``lr*n`` for a row whose second moment has faded (a rare
row), near 0 for a row whose data gradients dominate it. The row then moves
toward zero by ``D``, per coordinate, never past zero (dense Adam would oscillate
around zero there, at the scale of ``lr``):

    w  <- sign(w0) * max(|w0| - D, 0)
    m  <- beta1^n m0 + (1 - beta1^n) * l2 * w0
    v  <- beta2^n v0 + (1 - beta2^n) * c

and then takes the usual Adam step with ``g = grad + l2 * w``. Momentum from
before the gap is not coasted (as in lazy or sparse Adam). ``catch_up_all`` brings
every row up to date, before the table is evaluated or saved.

Memory: the table's two moments and one step counter per row, as dense Adam's
state: it depends on the vocabularies, not on the number of rows trained on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CATCH_UP_CHUNK = 1 << 16  # rows per block when the whole table is brought up to date


class LazyL2Adam:
    """Adam for the rows of ``table`` (``R x d``), with the L2 term ``l2/2 ||table||^2``."""

    def __init__(
        self,
        table: Tensor,
        *,
        lr: float,
        l2: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        if table.dim() != 2:
            raise ValueError(f"table must be R x d, got shape {tuple(table.shape)}")
        if lr <= 0 or l2 < 0:
            raise ValueError(f"need lr > 0 and l2 >= 0, got lr={lr}, l2={l2}")
        self.table = table
        self.lr = lr
        self.l2 = l2
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.steps = 0
        self.m = torch.zeros_like(table)
        self.v = torch.zeros_like(table)
        self.last = torch.zeros(table.shape[0], dtype=torch.int64)

    @torch.no_grad()
    def fetch(self, rows: Tensor) -> Tensor:
        """Bring ``rows`` (unique int64 indices) up to the step about to be taken; return
        their weights ``len(rows) x d`` (a copy, to gather from and differentiate)."""
        self._catch_up(rows, self.steps)
        return self.table.index_select(0, rows)

    @torch.no_grad()
    def step(self, rows: Tensor, grad: Tensor) -> None:
        """One Adam step on ``rows`` (as passed to ``fetch``) with their data gradient."""
        self.steps += 1
        t = self.steps
        w = self.table.index_select(0, rows)
        g = grad + self.l2 * w
        m = self.m.index_select(0, rows).mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v = self.v.index_select(0, rows).mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        step_size = self.lr / (1 - self.beta1**t)
        denom = (v / (1 - self.beta2**t)).sqrt_().add_(self.eps)
        w.addcdiv_(m, denom, value=-step_size)
        self.table.index_copy_(0, rows, w)
        self.m.index_copy_(0, rows, m)
        self.v.index_copy_(0, rows, v)
        self.last.index_fill_(0, rows, t)

    @torch.no_grad()
    def catch_up_all(self) -> None:
        """Bring every row up to date (before evaluating or saving the table)."""
        for start in range(0, self.table.shape[0], CATCH_UP_CHUNK):
            rows = torch.arange(start, min(start + CATCH_UP_CHUNK, self.table.shape[0]))
            self._catch_up(rows, self.steps)

    def _catch_up(self, rows: Tensor, now: int) -> None:
        """Apply to ``rows`` the decay of the steps after their last one, up to ``now``."""
        missed = now - self.last.index_select(0, rows)
        if self.l2 == 0 or missed.numel() == 0 or int(missed.max()) == 0:
            self.last.index_fill_(0, rows, now)
            return
        n = missed.to(self.table.dtype).unsqueeze(1)
        w0 = self.table.index_select(0, rows)
        m0 = self.m.index_select(0, rows)
        v0 = self.v.index_select(0, rows)
        kappa = -math.log(self.beta2)
        c = (self.l2 * w0).square()
        root_c = c.sqrt()
        fade2 = torch.exp(-kappa * n)  # beta2^n
        fade1 = torch.exp(math.log(self.beta1) * n)  # beta1^n
        tiny = torch.finfo(w0.dtype).tiny
        ratio = ((v0 * fade2 + c).sqrt() + root_c + tiny) / ((v0 + c).sqrt() + root_c + tiny)
        shrink = (self.lr * (n + (2 / kappa) * ratio.log())).clamp_(min=0.0)
        w = w0.sign() * (w0.abs() - shrink).clamp_(min=0.0)
        m = m0 * fade1 + (1 - fade1) * self.l2 * w0
        v = v0 * fade2 + (1 - fade2) * c
        self.table.index_copy_(0, rows, w)
        self.m.index_copy_(0, rows, m)
        self.v.index_copy_(0, rows, v)
        self.last.index_fill_(0, rows, now)

import pytest
import torch

from model.lazy_adam import LazyL2Adam

LR, L2 = 1e-2, 1e-2


def dense_adam_l2(table: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """torch's Adam on ``loss + l2/2 ||table||^2`` with these data gradients."""
    weight = torch.nn.Parameter(table.clone())
    optimizer = torch.optim.Adam([weight], lr=LR)
    for grad in grads:
        optimizer.zero_grad()
        weight.grad = grad + L2 * weight.detach()
        optimizer.step()
    return weight.detach()


def test_rows_touched_every_step_take_dense_adam_steps_on_the_l2_objective() -> None:
    torch.manual_seed(0)
    table = torch.randn(6, 3)
    grads = [torch.randn(6, 3) for _ in range(25)]
    lazy = LazyL2Adam(table.clone(), lr=LR, l2=L2)
    rows = torch.arange(6)
    for grad in grads:
        lazy.fetch(rows)
        lazy.step(rows, grad)
    torch.testing.assert_close(lazy.table, dense_adam_l2(table, grads), rtol=1e-5, atol=1e-6)


def test_a_fresh_row_left_out_decays_as_dense_adam_moves_it_lr_per_step() -> None:
    # A row with no data gradient and no history: dense Adam's normalised step on l2*w is
    # lr per step, toward zero; the catch-up gives the same when the row is next touched.
    table = torch.tensor([[0.5, -0.3, 0.0], [0.02, -0.015, 0.4]])
    lazy = LazyL2Adam(table.clone(), lr=LR, l2=L2)
    for _ in range(20):
        lazy.fetch(torch.tensor([], dtype=torch.int64))
        lazy.step(torch.tensor([], dtype=torch.int64), torch.zeros(0, 3))
    caught_up = lazy.fetch(torch.tensor([0, 1]))
    dense = dense_adam_l2(table, [torch.zeros(2, 3)] * 20)
    expected = torch.tensor([[0.3, -0.1, 0.0], [0.0, 0.0, 0.2]])  # never past zero
    torch.testing.assert_close(caught_up, expected, rtol=0, atol=1e-5)
    # Dense Adam's gradient shrinks with w over the gap, its steps a little with it, and
    # near zero it oscillates at the scale of lr: the catch-up (w held at w0 for the
    # rates, stopped at zero) is within a tenth of dense Adam's movement, or within lr.
    moved_dense = (table - dense).abs()
    assert ((caught_up - dense).abs() <= torch.clamp(0.1 * moved_dense, min=LR)).all()


def test_a_row_its_data_holds_decays_less_than_a_forgotten_one() -> None:
    # Two rows with the same weight; one had large data gradients just before the gap
    # (a large second moment), the other none. Over the same gap the first barely
    # moves and the second loses lr per missed step.
    table = torch.tensor([[0.5], [0.5]])
    lazy = LazyL2Adam(table, lr=LR, l2=L2)
    lazy.fetch(torch.tensor([0]))
    lazy.step(torch.tensor([0]), torch.tensor([[0.0]]))
    lazy.v[0] = 1.0  # as if its data gradients had been of size ~30 (>> l2 * w)
    lazy.table[0] = 0.5
    for _ in range(10):
        lazy.step(torch.tensor([], dtype=torch.int64), torch.zeros(0, 1))
    held, forgotten = lazy.fetch(torch.tensor([0, 1]))[:, 0].tolist()
    assert 0.5 - held < 1e-3
    assert forgotten == pytest.approx(0.5 - 11 * LR, abs=1e-5)


def test_catch_up_all_brings_every_row_to_the_current_step() -> None:
    lazy = LazyL2Adam(torch.full((5, 2), 0.2), lr=LR, l2=L2)
    for _ in range(3):
        lazy.step(torch.tensor([0]), torch.zeros(1, 2))
    lazy.catch_up_all()
    assert lazy.last.tolist() == [3, 3, 3, 3, 3]
    torch.testing.assert_close(lazy.table[1:], torch.full((4, 2), 0.2 - 3 * LR))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="R x d"):
        LazyL2Adam(torch.zeros(3), lr=LR, l2=L2)
    with pytest.raises(ValueError, match="lr > 0"):
        LazyL2Adam(torch.zeros(3, 2), lr=0.0, l2=L2)

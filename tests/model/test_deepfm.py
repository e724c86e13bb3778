import itertools

import pytest
import torch

from model.deepfm import DeepFM, DeepFMConfig, FactorizationMachine

CONFIG = DeepFMConfig(vocab_sizes=(5, 9, 3, 12), num_dense=3, embed_dim=6, hidden_units=(16, 8))


def random_inputs(config: DeepFMConfig, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in config.vocab_sizes], 1)
    return ids, torch.randn(batch, config.num_dense, generator=g)


@pytest.mark.parametrize("seed", range(5))
def test_fm_term_equals_the_naive_pairwise_sum(seed: int) -> None:
    e = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    naive = sum((e[:, i] * e[:, j]).sum(dim=1) for i, j in itertools.combinations(range(5), 2))
    torch.testing.assert_close(FactorizationMachine()(e), naive)


def test_forward_and_forward_rows_give_identical_logits() -> None:
    torch.manual_seed(0)
    model = DeepFM(CONFIG).eval()
    with torch.no_grad():
        model.sparse_rows.weight.normal_()  # make every term count
    ids, dense = random_inputs(CONFIG, 32, seed=1)
    rows = model.sparse_rows.weight[ids + model.offsets]
    with torch.no_grad():
        assert torch.equal(
            model(ids, dense), model.forward_rows(rows[..., 0], rows[..., 1:], dense)
        )


def test_logit_is_the_sum_of_linear_fm_and_dnn_parts() -> None:
    torch.manual_seed(0)
    model = DeepFM(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    ids, dense = random_inputs(CONFIG, 4, seed=2)
    with torch.no_grad():
        rows = model.gather(ids)
        w, e = rows[..., 0], rows[..., 1:]
        linear = model.bias + w.sum(1) + dense @ model.dense_weight
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(1)
        dnn = model.deep(torch.cat((e.flatten(1), dense), 1))
        torch.testing.assert_close(model(ids, dense), linear + fm + dnn)


def test_rows_of_each_field_are_separate() -> None:
    model = DeepFM(CONFIG)
    assert model.sparse_rows.weight.shape == (sum(CONFIG.vocab_sizes), 1 + CONFIG.embed_dim)
    assert model.offsets.tolist() == [0, 5, 14, 17]


def test_no_dense_fields() -> None:
    config = DeepFMConfig(vocab_sizes=(4, 4), num_dense=0, embed_dim=2, hidden_units=(4,))
    ids, dense = random_inputs(config, 3, seed=0)
    assert DeepFM(config)(ids, dense).shape == (3,)


def test_config_round_trips_and_checks_itself() -> None:
    assert DeepFMConfig.from_json(CONFIG.to_json()) == CONFIG
    with pytest.raises(ValueError):
        DeepFMConfig(vocab_sizes=(), num_dense=1)
    with pytest.raises(ValueError):
        DeepFMConfig(vocab_sizes=(3,), num_dense=1, dropout=1.0)
    with pytest.raises(ValueError):
        DeepFMConfig(vocab_sizes=(3,), num_dense=1, hidden_units=(0,))


def test_forward_shared_equals_forward_rows_for_every_split() -> None:
    """Every way of splitting 4 embedded and 3 dense fields between a context and its
    candidates: the logits equal forward_rows of the merged rows."""
    torch.manual_seed(0)
    model = DeepFM(DeepFMConfig((5, 7, 3, 4), num_dense=3, embed_dim=4, hidden_units=(16, 8)))
    model.eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.5)
    ids, dense = torch.randint(0, 3, (6, 4)), torch.randn(6, 3)

    def subsets(n: int) -> list[tuple[int, ...]]:
        return [c for r in range(n + 1) for c in itertools.combinations(range(n), r)]

    for shared, shared_dense in itertools.product(subsets(4), subsets(3)):
        merged_ids, merged_dense = ids.clone(), dense.clone()  # the context: row 0's
        merged_ids[:, list(shared)] = ids[0, list(shared)]
        merged_dense[:, list(shared_dense)] = dense[0, list(shared_dense)]
        rows = model.gather(merged_ids)
        others = [f for f in range(4) if f not in shared]
        other_dense = [d for d in range(3) if d not in shared_dense]
        # (a gather of some fields' ids is those fields' rows)
        some = model.gather(merged_ids[:, others], torch.tensor(others, dtype=torch.int64))
        torch.testing.assert_close(some, rows[:, others], rtol=0, atol=0)
        with torch.inference_mode():
            expected = model.forward_rows(rows[..., 0], rows[..., 1:], merged_dense)
            split = model.split(
                torch.tensor(shared, dtype=torch.int64),
                torch.tensor(shared_dense, dtype=torch.int64),
            )
            assert split.other_fields.tolist() == others
            assert split.other_dense.tolist() == other_dense
            got = model.forward_shared(
                (rows[0, shared, 0], rows[0, shared, 1:], merged_dense[0, shared_dense]),
                (rows[:, others, 0], rows[:, others, 1:], merged_dense[:, other_dense]),
                split,
            )
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_state_shapes_are_the_modules_without_building_it(dropout: float) -> None:
    config = DeepFMConfig((5, 3, 7), num_dense=2, embed_dim=4, hidden_units=(6, 5), dropout=dropout)
    shapes = {name: tuple(t.shape) for name, t in DeepFM(config).state_dict().items()}
    assert config.state_shapes() == shapes


def test_a_given_table_is_held_as_it_is() -> None:
    config = DeepFMConfig((5, 3), num_dense=1, embed_dim=4, hidden_units=(6,))
    table = torch.arange(8 * 5, dtype=torch.float32).view(8, 5)
    model = DeepFM(config, tables=False, table=table)
    assert model.sparse_rows is not None
    assert model.sparse_rows.weight.data_ptr() == table.data_ptr()
    assert torch.equal(table, torch.arange(8 * 5, dtype=torch.float32).view(8, 5))  # not reset
    with pytest.raises(ValueError, match="expected"):
        DeepFM(config, table=table[:7])

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

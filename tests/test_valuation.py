"""Exact modality Shapley values: the game-theoretic axioms, the official two-modality closed form, and the
fast (feature-dropping) and input-dropping paths against running the model on every subset by hand."""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from torch import nn

from balance.models import (
    ConcatFusion,
    FiLMFusion,
    GatedFusion,
    LateFusion,
    MLPEncoder,
    MultimodalModel,
    SmallCNNEncoder,
    SumFusion,
)
from balance.valuation import (
    ValuationTable,
    ZeroInputCache,
    coalition_benefit,
    modality_shapley,
    shapley_values,
    shapley_weights,
    subset_masks,
    subset_values,
    subset_values_from_inputs,
    value_dataloader,
)
from datamodules.synthetic import SyntheticDataModule

OFFICIAL_TWO_MODALITY_VALUES = {-0.5, 0.0, 0.5, 1.0, 1.5}


def brute_force_shapley(values: torch.Tensor) -> torch.Tensor:
    """Marginal contributions averaged over all M! orders in which the modalities join."""
    num_modalities = values.shape[-1].bit_length() - 1
    phi = torch.zeros(*values.shape[:-1], num_modalities, dtype=values.dtype)
    orders = list(itertools.permutations(range(num_modalities)))
    for order in orders:
        coalition = 0
        for m in order:
            phi[..., m] += values[..., coalition | (1 << m)] - values[..., coalition]
            coalition |= 1 << m
    return phi / len(orders)


def closed_form_two(values: torch.Tensor) -> torch.Tensor:
    """The official code's ``phi_a = (v_a + v_all - v_v) / 2`` (and symmetrically for v), with v(empty) = 0."""
    v_a, v_v, v_all = values[..., 1], values[..., 2], values[..., 3]
    return torch.stack([(v_a + v_all - v_v) / 2, (v_v + v_all - v_a) / 2], dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Coalitions and Shapley values


@pytest.mark.parametrize("num_modalities", [1, 2, 3, 4])
def test_subset_masks_are_bitmasks(num_modalities):
    masks = subset_masks(num_modalities)
    assert masks.shape == (2**num_modalities, num_modalities) and masks.dtype == torch.bool
    for s in range(2**num_modalities):
        assert masks[s].tolist() == [bool(s >> i & 1) for i in range(num_modalities)]
    assert not masks[0].any() and masks[-1].all()
    masks[0, 0] = True  # a copy: the cached masks stay intact
    assert not subset_masks(num_modalities)[0].any()


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_shapley_matches_brute_force_over_permutations(num_modalities):
    generator = torch.Generator().manual_seed(num_modalities)
    values = torch.randn(50, 2**num_modalities, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(shapley_values(values), brute_force_shapley(values))
    # Any leading shape, one matmul.
    torch.testing.assert_close(shapley_values(values.view(5, 10, -1)), brute_force_shapley(values).view(5, 10, -1))


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_shapley_weights_are_the_formula(num_modalities):
    weights = shapley_weights(num_modalities, torch.float64)
    masks = subset_masks(num_modalities)
    for m in range(num_modalities):
        for s in range(2**num_modalities):
            if masks[s, m]:
                continue
            size = int(masks[s].sum())
            w = math.factorial(size) * math.factorial(num_modalities - size - 1) / math.factorial(num_modalities)
            assert weights[s | (1 << m), m].item() == pytest.approx(w)
            assert weights[s, m].item() == pytest.approx(-w)


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_efficiency(num_modalities):
    values = torch.randn(20, 2**num_modalities, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(shapley_values(values).sum(-1), values[:, -1] - values[:, 0])
    values[:, 0] = 0  # the convention v(empty) = 0: the values share out v(all)
    torch.testing.assert_close(shapley_values(values).sum(-1), values[:, -1])


def test_symmetry_and_null_player():
    # Four modalities; modalities 1 and 2 are interchangeable, modality 3 never changes the value.
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(8, generator=generator, dtype=torch.float64)  # a game on modalities {0, 1, 2}

    def swap_1_2(s: int) -> int:
        b1, b2 = s >> 1 & 1, s >> 2 & 1
        return (s & ~0b110) | (b2 << 1) | (b1 << 2)

    symmetric = torch.stack([(base[s] + base[swap_1_2(s)]) / 2 for s in range(8)])
    symmetric[0] = 0
    values = torch.stack([symmetric[s & 0b111] for s in range(16)])
    phi = shapley_values(values)
    assert phi[1].item() == pytest.approx(phi[2].item())
    assert phi[3].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(phi[:3], shapley_values(symmetric))


def test_rejects_a_table_that_is_not_two_to_the_m():
    with pytest.raises(ValueError, match="2\\^M"):
        shapley_values(torch.zeros(3, 6))


def test_two_modality_closed_form():
    values = torch.randn(100, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    values[:, 0] = 0
    torch.testing.assert_close(shapley_values(values), closed_form_two(values))


def test_official_benefit_two_modalities_every_correctness_pattern():
    seen = set()
    for correct_a, correct_v, correct_all in itertools.product([0, 1], repeat=3):
        # Logits of the subsets {a}, {v}, {a, v} for one sample of label 0: correct iff class 0 wins.
        logits = torch.tensor([[[1.0, 0.0]] if c else [[0.0, 1.0]] for c in (correct_a, correct_v, correct_all)])
        benefit = coalition_benefit(logits, torch.tensor([0]), torch.tensor([1, 1, 2]))
        assert benefit.flatten().tolist() == [correct_a, correct_v, 2 * correct_all]
        values = torch.tensor([[0.0, correct_a, correct_v, 2.0 * correct_all]])
        phi = shapley_values(values)
        torch.testing.assert_close(phi, closed_form_two(values))
        expected_a = (correct_a + 2 * correct_all - correct_v) / 2
        assert phi[0, 0].item() == expected_a
        seen.update(phi.flatten().tolist())
    assert seen <= OFFICIAL_TWO_MODALITY_VALUES
    assert seen == OFFICIAL_TWO_MODALITY_VALUES  # every value occurs for some pattern


def test_benefits():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]], [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]])  # [K=2, B=2, C]
    labels = torch.tensor([0, 2])
    sizes = torch.tensor([1, 3])
    assert coalition_benefit(logits, labels, sizes, "official").tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert coalition_benefit(logits, labels, sizes, "correct").tolist() == [[1.0, 1.0], [0.0, 0.0]]
    expected = logits.softmax(-1)[:, [0, 1], labels]
    torch.testing.assert_close(coalition_benefit(logits, labels, sizes, "true_prob"), expected)
    logits[1, 0] = torch.tensor([3.0, 0.0, 0.0])
    assert coalition_benefit(logits, labels, sizes, "official").tolist() == [[1.0, 1.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match="benefit"):
        coalition_benefit(logits, labels, sizes, "accuracy")


# ---------------------------------------------------------------------------------------------------------------
# Coalition values from a model

FUSIONS = {
    "concat": ConcatFusion,
    "sum": SumFusion,
    "late": LateFusion,
    "gated": partial(GatedFusion, hidden_dim=16),
    "film": partial(FiLMFusion, hidden_dim=16),
}


def mlp_model(num_modalities: int, fusion=ConcatFusion, in_dim: int = 6, num_classes: int = 5) -> MultimodalModel:
    encoders = {f"m{i}": MLPEncoder(in_dim + i, hidden_dims=(12,), out_dim=8 + i) for i in range(num_modalities)}
    return MultimodalModel(encoders, partial(fusion), num_classes=num_classes).eval()


def random_inputs(model: MultimodalModel, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch_size, enc.net[0].in_features, generator=generator)
            for m, enc in model.encoders.items()}


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_fast_path_equals_every_subset_by_hand(num_modalities, fusion):
    torch.manual_seed(0)
    model = mlp_model(num_modalities, FUSIONS[fusion])
    inputs = random_inputs(model, 7)
    labels = torch.randint(5, (7,))
    features = model.encode(inputs)
    masks = subset_masks(num_modalities)
    with torch.no_grad():
        by_fuse = [model.fuse(features, keep=masks[s].expand(7, -1)) for s in range(1, 2**num_modalities)]
        by_hand = [
            model.fusion({m: f if masks[s, i] else torch.zeros_like(f) for i, (m, f) in enumerate(features.items())})
            for s in range(1, 2**num_modalities)
        ]
    sizes = masks.sum(1)[1:]
    for benefit in ("official", "correct", "true_prob"):
        fast = subset_values(model, features, labels, benefit)
        assert fast.shape == (7, 2**num_modalities)
        assert (fast[:, 0] == 0).all()
        for logits in (by_fuse, by_hand):
            expected = coalition_benefit(torch.stack(logits), labels, sizes, benefit).T
            torch.testing.assert_close(fast[:, 1:], expected)


def test_fast_path_runs_the_fusion_head_once():
    model = mlp_model(3)
    calls = []
    model.fusion.register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    subset_values(model, model.encode(random_inputs(model, 4)), torch.zeros(4, dtype=torch.long))
    assert calls == [7 * 4]


@pytest.mark.parametrize("benefit", ["official", "correct", "true_prob"])
def test_missing_modality_is_a_null_player(benefit):
    model = mlp_model(3)
    inputs = random_inputs(model, 6)
    present = torch.ones(6, 3, dtype=torch.bool)
    present[:3, 1] = False
    present[4, 0] = present[4, 2] = False  # only modality 1 is there
    labels = torch.randint(5, (6,))
    batch = {"inputs": inputs, "label": labels, "index": torch.arange(6), "present": present}
    full = model.fuse(model.encode(inputs), keep=present).detach()
    for drop, cache in (("features", None), ("inputs", None), ("inputs", ZeroInputCache())):
        result = modality_shapley(model, batch, benefit, drop=drop, cache=cache)
        torch.testing.assert_close(result["phi"][~present], torch.zeros(int((~present).sum())), atol=1e-6, rtol=0)
        assert result["correct"].tolist() == (full.argmax(-1) == labels).tolist()
        v_all = coalition_benefit(full.unsqueeze(0), labels, present.sum(1).unsqueeze(0), benefit)[0]
        torch.testing.assert_close(result["phi"].sum(-1), v_all)
    # The present modalities of the first rows play the two-modality game of the model without modality 1.
    values = subset_values(model, model.encode(inputs), labels, benefit, present=present)
    phi_two = shapley_values(values[:3][:, [0, 1, 4, 5]])  # subsets {}, {0}, {2}, {0, 2}
    torch.testing.assert_close(shapley_values(values)[:3][:, [0, 2]], phi_two)


class PairEncoder(nn.Module):
    """An encoder whose input is a dict of tensors, like a tokenizer's ``input_ids`` and ``attention_mask``."""

    out_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(3, 8)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tanh(self.a(x["a"]) + self.b(x["b"]))


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_inputs_path_cache_equals_no_cache(num_modalities, fusion):
    torch.manual_seed(1)
    model = mlp_model(num_modalities, FUSIONS[fusion])
    inputs = random_inputs(model, 9)
    labels = torch.randint(5, (9,))
    cache = ZeroInputCache()
    for benefit in ("official", "true_prob"):
        plain = subset_values_from_inputs(model, inputs, labels, benefit)
        cached = subset_values_from_inputs(model, inputs, labels, benefit, cache=cache)
        torch.testing.assert_close(cached, plain)
    assert len(cache.features) == 1  # filled once, reused
    # Zeroing inputs is not zeroing features (biases): the two paths differ in general.
    assert not torch.allclose(subset_values_from_inputs(model, inputs, labels, "true_prob"),
                              subset_values(model, model.encode(inputs), labels, "true_prob"))


def test_inputs_path_cache_with_batchnorm_cnn_and_dict_inputs():
    torch.manual_seed(2)
    encoders = {"image": SmallCNNEncoder(1, channels=(4, 8), out_dim=8), "pair": PairEncoder(),
                "vector": MLPEncoder(5, (8,), 8)}
    model = MultimodalModel(encoders, partial(ConcatFusion), num_classes=3)
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        model.encoders["image"](torch.randn(16, 1, 8, 8) * 3 + 1)
    model.eval()
    inputs = {"image": torch.randn(6, 1, 8, 8), "pair": {"a": torch.randn(6, 4), "b": torch.randn(6, 3)},
              "vector": torch.randn(6, 5)}
    labels = torch.randint(3, (6,))
    cache = ZeroInputCache()
    torch.testing.assert_close(subset_values_from_inputs(model, inputs, labels, "true_prob", cache=cache),
                               subset_values_from_inputs(model, inputs, labels, "true_prob"))
    # Another image size is another zero-input signature.
    inputs["image"] = torch.randn(6, 1, 12, 12)
    torch.testing.assert_close(subset_values_from_inputs(model, inputs, labels, "true_prob", cache=cache),
                               subset_values_from_inputs(model, inputs, labels, "true_prob"))
    assert len(cache.features) == 2


@pytest.mark.parametrize("drop", ["features", "inputs"])
def test_modality_shapley_on_a_batch(drop):
    model = mlp_model(3)
    inputs = random_inputs(model, 10)
    batch = {"inputs": inputs, "label": torch.randint(5, (10,)), "index": torch.arange(10, 20)}
    result = modality_shapley(model, batch, drop=drop)
    assert result["phi"].shape == (10, 3)
    assert result["index"].tolist() == list(range(10, 20))
    correct = model(inputs).argmax(-1) == batch["label"]
    assert result["correct"].tolist() == correct.tolist()
    torch.testing.assert_close(result["phi"].sum(-1), 3.0 * correct.float())  # official: v(all) = M * correct
    torch.testing.assert_close(result["phi"], shapley_values(result["values"]))
    with pytest.raises(ValueError, match="drop"):
        modality_shapley(model, batch, drop="outputs")


# ---------------------------------------------------------------------------------------------------------------
# A whole split


def synthetic(informativeness=(2.0, 0.0), num_samples=1200) -> SyntheticDataModule:
    data = SyntheticDataModule(informativeness=list(informativeness), num_samples=num_samples, batch_size=64,
                               eval_batch_size=50)
    data.setup()
    return data


def synthetic_model(data: SyntheticDataModule) -> MultimodalModel:
    encoders = {m: MLPEncoder(data.feature_dim, (32,), 16) for m in data.modalities}
    return MultimodalModel(encoders, partial(ConcatFusion), num_classes=data.num_classes)


def test_value_dataloader_covers_the_split_and_restores_modes():
    data = synthetic(num_samples=600)
    model = synthetic_model(data)
    model.train()
    model.encoders["m1"].eval()  # a frozen encoder keeps its own mode
    table = value_dataloader(model, data.val_dataloader(), benefit="correct")
    assert isinstance(table, ValuationTable)
    n = len(data.datasets["val"])
    assert table.index.tolist() == list(range(n))
    assert table.phi.shape == (n, 2) and table.correct.dtype == torch.bool and len(table) == n
    assert model.training and model.encoders["m0"].training and not model.encoders["m1"].training
    assert table.modalities == ["m0", "m1"]
    rows = table.to_rows()
    assert len(rows) == n and set(rows[0]) == {"index", "label", "correct", "phi_m0", "phi_m1"}
    assert rows[3]["phi_m1"] == pytest.approx(table.phi[3, 1].item())
    assert set(table.mean()) == {"m0", "m1"}
    # The inputs path: cached and uncached passes agree.
    cached = value_dataloader(model, data.val_dataloader(), benefit="true_prob", drop="inputs")
    plain = value_dataloader(model, data.val_dataloader(), benefit="true_prob", drop="inputs", cache_zero_inputs=False)
    torch.testing.assert_close(cached.phi, plain.phi)


def test_informative_modality_gets_the_larger_contribution():
    torch.manual_seed(0)
    data = synthetic()
    model = synthetic_model(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    step = 0
    while step < 300:
        for batch in data.train_dataloader():
            loss = nn.functional.cross_entropy(model(batch["inputs"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    table = value_dataloader(model, data.val_dataloader())
    mean = table.mean()
    assert table.correct.float().mean() > 0.8
    assert set(table.phi.unique().tolist()) <= OFFICIAL_TWO_MODALITY_VALUES
    # Official benefit: noise next to a modality that is right alone still earns (0 + 2 - 1) / 2 = 0.5.
    assert mean["m0"] > 1.2 and mean["m0"] - mean["m1"] > 0.5, mean
    mean = value_dataloader(model, data.val_dataloader(), benefit="correct").mean()
    assert mean["m0"] > 0.7 and mean["m1"] < 0.2, mean

"""Resampling plans: copy counts follow the thresholds, the modality-level count follows the formula, and a
planned copy really keeps only its modality."""

import math

import pytest
import torch

from balance.resampling import (
    estimate_mean_contribution,
    modality_level_extra,
    plan_from_copies,
    plan_from_extra,
    sample_level_copies,
)
from datamodules.synthetic import SyntheticDataModule


def test_sample_level_copies_follow_official_thresholds():
    # The five values the official benefit allows for M = 2, and the copies the official code makes for each.
    phi = torch.tensor([[-0.5, 0.0], [0.5, 1.0], [1.5, -0.1], [0.4, 0.41]])
    assert sample_level_copies(phi).tolist() == [[3, 2], [1, 0], [0, 3], [2, 1]]


def test_thresholds_scale_with_benefit():
    phi = torch.tensor([[0.5, 0.2, -0.02, -0.05]])  # `correct` benefit, M = 3: a full contributor is worth 1/3
    assert sample_level_copies(phi, scale=1 / 3).tolist() == [[0, 1, 2, 3]]  # thresholds -1/30, 2/15, 1/3
    with pytest.raises(ValueError, match="ascending"):
        sample_level_copies(phi, thresholds=(0.4, -0.1, 1.0))


def test_plan_from_copies():
    copies = torch.tensor([[0, 2], [1, 0], [0, 0]])
    indices, keep = plan_from_copies(copies)
    assert indices.tolist() == [0, 1, 2, 0, 0, 1]
    assert keep.tolist() == [[True, True]] * 3 + [[False, True], [False, True], [True, False]]


@pytest.mark.parametrize("variant", ["linear", "tanh", "power"])
def test_modality_level_count_follows_formula(variant):
    contrib_a, contrib_v, n, alpha = 0.3, 0.9, 1000, 0.8
    gap_a, gap_v = 1.0 - contrib_a, 1.0 - contrib_v
    base = abs(gap_a - gap_v) / 3 * 2
    expected = {"linear": base * alpha, "tanh": math.tanh(base * alpha), "power": base**1.5 * alpha}[variant]
    extra = modality_level_extra(torch.tensor([contrib_a, contrib_v], dtype=torch.float64), n, alpha, variant)
    assert extra.tolist() == [int(expected * n), 0]  # only the weaker modality (audio here) gets copies


def test_modality_level_three_modalities_compare_with_strongest():
    extra = modality_level_extra(torch.tensor([1.0, 0.7, 0.4], dtype=torch.float64), 300)
    gaps = [1.0 - 1.0, 1.0 - 0.7, 1.0 - 0.4]
    assert extra.tolist() == [int(abs(g - gaps[0]) / 3 * 2 * 1.0 * 300) for g in gaps]


def test_mean_contribution_estimate_and_extra_plan():
    generator = torch.Generator().manual_seed(0)
    phi = torch.tensor([[1.0, 0.0]] * 50 + [[0.0, 1.0]] * 50)
    mean = estimate_mean_contribution(phi, 0.2, generator)
    assert mean.shape == (2,) and torch.allclose(mean.sum(), torch.tensor(1.0))
    indices, keep = plan_from_extra(torch.tensor([0, 7]), 100, generator)
    assert len(indices) == 107 and indices[:100].tolist() == list(range(100))
    assert keep[100:].tolist() == [[False, True]] * 7 and indices[100:].max() < 100


def test_planned_copy_keeps_only_its_modality():
    dm = SyntheticDataModule(num_samples=200, batch_size=8)
    dm.setup()
    indices, keep = plan_from_copies(torch.tensor([[0, 1]] + [[0, 0]] * (len(dm.datasets["train"]) - 1)))
    dm.train_plan.set(indices, keep)
    copy = dm.train_dataset()[len(dm.datasets["train"])]
    original = dm.datasets["train"][0]
    assert copy["index"] == 0 and copy["present"].tolist() == [False, True]
    assert torch.equal(copy["inputs"]["m0"], original["inputs"]["m0"])  # features are dropped by the model
    dm.train_plan.set(indices, keep, zero_inputs=True)
    copy = dm.train_dataset()[len(dm.datasets["train"])]
    assert not copy["inputs"]["m0"].any() and torch.equal(copy["inputs"]["m1"], original["inputs"]["m1"])
    assert len(dm.train_dataloader().dataset) == len(dm.datasets["train"]) + 1
    dm.train_plan.clear()
    assert len(dm.train_dataloader().dataset) == len(dm.datasets["train"])

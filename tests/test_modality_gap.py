"""Modality gap: 0 for identical features, hand-computed values, growth with separation, pairwise keys for
M = 3, missing modalities left out, a clear error for features of different sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from balance.diagnostics.modality_gap import ModalityGap
from diagnostic_fixtures import Identity, joint_method
from balance.methods.joint import JointTraining
from balance.models import MLPEncoder

CONF = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"


def identity_method(dims: dict[str, int], feature_dim: int | None = None) -> JointTraining:
    return joint_method({m: Identity(d) for m, d in dims.items()}, num_classes=2, feature_dim=feature_dim)


def batches_of(features: dict[str, torch.Tensor], batch_size: int = 4, present: torch.Tensor | None = None):
    n = len(next(iter(features.values())))
    out = []
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        batch = {"inputs": {m: x[rows] for m, x in features.items()}, "label": torch.zeros(n, dtype=torch.long)[rows],
                 "index": torch.arange(n)[rows]}
        if present is not None:
            batch["present"] = present[rows]
        out.append(batch)
    return out


def test_identical_features_have_no_gap():
    x = torch.randn(10, 3)
    result = ModalityGap().compute(identity_method({"a": 3, "b": 3}), batches_of({"a": x, "b": 2 * x}))
    assert result["gap"]["a-b"] == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_gap():
    # a: half the samples along e1, half along e2 (any length) -> centroid (0.5, 0.5); b: all along e1 -> (1, 0).
    a = torch.tensor([[3.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.0, 7.0]])
    b = torch.tensor([[2.0, 0.0], [0.1, 0.0], [5.0, 0.0], [1.0, 0.0]])
    result = ModalityGap().compute(identity_method({"a": 2, "b": 2}), batches_of({"a": a, "b": b}, batch_size=3))
    assert result["gap"]["a-b"] == pytest.approx(math.sqrt(0.5))
    assert result["centroid_norm"] == pytest.approx({"a": math.sqrt(0.5), "b": 1.0})
    # Opposite directions: the largest gap, 2.
    result = ModalityGap().compute(identity_method({"a": 2, "b": 2}), batches_of({"a": b, "b": -b}))
    assert result["gap"]["a-b"] == pytest.approx(2.0)


def test_gap_grows_as_the_clouds_separate():
    base = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    direction = torch.zeros(5)
    direction[0] = 1.0
    method = identity_method({"a": 5, "b": 5})
    gaps = [ModalityGap().compute(method, batches_of({"a": base + s * direction, "b": base - s * direction}))["gap"]
            ["a-b"] for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert gaps[0] == pytest.approx(0.0, abs=1e-12)
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:]))


def test_three_modalities_give_every_pair():
    x = torch.randn(9, 4)
    gap = ModalityGap()
    result = gap.compute(identity_method({"a": 4, "b": 4, "c": 4}), batches_of({"a": x, "b": x, "c": -x}))
    assert set(result["gap"]) == {"a-b", "a-c", "b-c"}
    assert result["gap"]["a-b"] == pytest.approx(0.0, abs=1e-12)
    assert result["gap"]["a-c"] == pytest.approx(2 * result["centroid_norm"]["a"])
    assert set(gap.scalars(result)) == {"gap/a-b", "gap/a-c", "gap/b-c", "centroid_norm/a", "centroid_norm/b",
                                        "centroid_norm/c"}


def test_missing_modalities_are_left_out():
    a = torch.tensor([[1.0, 0.0]] * 6)
    b = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 2)  # the last two b's are zeroed inputs' features
    present = torch.ones(6, 2, dtype=torch.bool)
    present[4:, 1] = False
    result = ModalityGap().compute(identity_method({"a": 2, "b": 2}), batches_of({"a": a, "b": b}, present=present))
    assert result["gap"]["a-b"] == pytest.approx(0.0, abs=1e-12)
    assert result["num_samples"] == {"a": 6, "b": 4}


def test_different_feature_sizes_raise_unless_projected():
    features = {"a": torch.randn(6, 3), "b": torch.randn(6, 5)}
    with pytest.raises(ValueError, match=r"'a': 3, 'b': 5.*feature_dim"):
        ModalityGap().compute(identity_method({"a": 3, "b": 5}), batches_of(features))
    result = ModalityGap().compute(identity_method({"a": 3, "b": 5}, feature_dim=4), batches_of(features))
    assert result["feature_dim"] == 4


def test_scatter_is_subsampled_and_drawn():
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(6, hidden_dims=(8,), out_dim=4) for m in ("a", "b")}
    method = joint_method(encoders, num_classes=2)
    method.train()
    data = batches_of({"a": torch.randn(30, 6), "b": torch.randn(30, 6) + 2}, batch_size=8)
    gap = ModalityGap(plot_samples=12)
    result = gap.compute(method, data)
    assert method.training
    json.dumps(result)
    assert [len(p) for p in result["pca"]["points"].values()] == [12, 12]
    assert result["pca"]["centroids"]["a"][0] >= 0  # signs fixed: the first centroid on the positive side
    assert "| a-b |" in gap.summary(result)
    figures = gap.figures(result)
    assert set(figures) == {"pca"}
    plt.close(figures["pca"])
    assert gap.compute(method, data) == result  # seeded
    without = ModalityGap(plot_samples=0).compute(method, data)
    assert "pca" not in without and ModalityGap().figures(without) == {}


def test_config_instantiates():
    cfg = OmegaConf.load(CONF / "modality_gap.yaml")
    gap = instantiate(cfg.modality_gap)
    assert isinstance(gap, ModalityGap) and gap.name == "modality_gap"

"""EMAP: additive heads are their own projection, pure interactions project to a constant, the M-modality
formula against a brute-force loop, the inputs path against the features path, chunking, subsampling."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from balance.diagnostics.emap import EMAP, additive_projection
from diagnostic_fixtures import Identity, make_batches
from balance.methods.joint import JointTraining
from balance.models import ConcatFusion, FusionHead, GatedFusion, LateFusion, MLPEncoder, MultimodalModel, SumFusion

CONF = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"


class ProductHead(FusionHead):
    """A pure interaction: logit_c = (t A)_c * (v B)_c, no additive part."""

    def __init__(self, feature_dims, num_classes):
        super().__init__(feature_dims, num_classes)
        t, v = (feature_dims[m] for m in self.modalities)
        self.a = nn.Linear(t, num_classes, bias=False)
        self.b = nn.Linear(v, num_classes, bias=False)

    def forward(self, features):
        t, v = (features[m] for m in self.modalities)
        return self.a(t) * self.b(v)


class BilinearHead(FusionHead):
    """logit_0 = t^T table v, logit_1 = 0: with one-hot features, f(t_i, v_j) = table[i, j]."""

    def __init__(self, feature_dims, num_classes, table):
        super().__init__(feature_dims, num_classes)
        self.table = nn.Parameter(table, requires_grad=False)  # batches() finds the device from a parameter

    def forward(self, features):
        t, v = (features[m] for m in self.modalities)
        score = ((t @ self.table) * v).sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def method_of(model: nn.Module) -> JointTraining:
    return JointTraining(model=model, optimizer=partial(torch.optim.SGD, lr=0.1))


def mlp_method(fusion, num_modalities: int = 2, in_dim: int = 5, num_classes: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    encoders = {f"m{i}": MLPEncoder(in_dim, hidden_dims=(8,), out_dim=4 + i) for i in range(num_modalities)}
    return method_of(MultimodalModel(encoders, fusion, num_classes=num_classes))


def identity_method(head, dims: dict[str, int], num_classes: int) -> JointTraining:
    return method_of(MultimodalModel({m: Identity(d) for m, d in dims.items()}, head, num_classes=num_classes))


def random_batches(num_samples: int, num_modalities: int = 2, in_dim: int = 5, num_classes: int = 3,
                   batch_size: int = 7, seed: int = 1, present: torch.Tensor | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    inputs = {f"m{i}": torch.randn(num_samples, in_dim, generator=generator) for i in range(num_modalities)}
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    return make_batches(inputs, labels, batch_size, present)


@pytest.mark.parametrize("fusion", [ConcatFusion, SumFusion, LateFusion])
def test_linear_head_projection_is_the_model(fusion):
    method = mlp_method(partial(fusion))
    data = random_batches(23)
    projection = EMAP().project(method, data)
    torch.testing.assert_close(projection.projected, projection.logits.double(), atol=1e-5, rtol=1e-5)
    result = EMAP().compute(method, data)
    assert result["model"] == result["emap"]
    assert result["gap"] == {"acc": 0.0, "f1": 0.0}
    assert result["agreement"] == 1.0


def test_linear_head_projection_is_the_model_for_three_modalities():
    method = mlp_method(partial(ConcatFusion), num_modalities=3)
    projection = EMAP().project(method, random_batches(11, num_modalities=3))
    torch.testing.assert_close(projection.projected, projection.logits.double(), atol=1e-5, rtol=1e-5)


def test_pure_interaction_projects_to_a_constant_per_class():
    torch.manual_seed(0)
    method = identity_method(partial(ProductHead), {"t": 4, "v": 3}, num_classes=3)
    t, v = torch.randn(12, 4), torch.randn(12, 3)
    data = make_batches({"t": t - t.mean(0), "v": v - v.mean(0)}, torch.randint(3, (12,)), batch_size=5)
    projection = EMAP().project(method, data)
    assert projection.logits.std(dim=0).min() > 0.05  # the model's logits do vary across samples
    torch.testing.assert_close(projection.projected, projection.projected[:1].expand(12, -1), atol=1e-6, rtol=0)


def test_paper_worked_example():
    # Hessel & Lee's appendix example: f(t_i, v_j) for three samples; by hand, row means (-0.4, 49/30, 17/30),
    # column means (0.2, 16/15, 8/15), overall mean 0.6.
    table = torch.tensor([[-1.3, 0.3, -0.2], [0.8, 3.0, 1.1], [1.1, -0.1, 0.7]], dtype=torch.float64)
    method = identity_method(partial(BilinearHead, table=table), {"t": 3, "v": 3}, num_classes=2).double()
    eye = torch.eye(3, dtype=torch.float64)
    projection = EMAP().project(method, make_batches({"t": eye, "v": eye}, torch.zeros(3, dtype=torch.long), 2))
    torch.testing.assert_close(projection.logits[:, 0], torch.tensor([-1.3, 3.0, 0.7]))
    torch.testing.assert_close(projection.projected[:, 0], torch.tensor([-0.8, 2.1, 0.5], dtype=torch.float64))


def brute_force(method, data, present=None):
    """f_hat(x_i) = sum_m mean_j f(x_m^i, x_-m^j) - (M - 1) * mean of every cross evaluation, one pair at a time."""
    method.eval()
    modalities = method.modalities
    with torch.no_grad():
        features = method.model.encode({m: torch.cat([b["inputs"][m] for b in data]) for m in modalities})
        n, num_modalities = len(features[modalities[0]]), len(modalities)
        cross = torch.zeros(num_modalities, n, n, method.model.num_classes, dtype=torch.float64)
        for m in range(num_modalities):
            for i in range(n):
                for j in range(n):
                    sources = [i if k == m else j for k in range(num_modalities)]
                    pair = {mod: features[mod][s:s + 1] for mod, s in zip(modalities, sources)}
                    keep = None if present is None else torch.stack([present[s, k] for k, s in enumerate(sources)])
                    cross[m, i, j] = method.fused_logits(pair, None if keep is None else keep[None])[0].double()
    return cross.mean(dim=2).sum(dim=0) - (num_modalities - 1) * cross.mean(dim=(0, 1, 2))


@pytest.mark.parametrize("with_present", [False, True])
def test_three_modalities_match_brute_force(with_present):
    method = mlp_method(partial(GatedFusion, hidden_dim=6), num_modalities=3)
    present = None
    if with_present:
        present = torch.ones(7, 3, dtype=torch.bool)
        present[[1, 4], [0, 2]] = False
    data = random_batches(7, num_modalities=3, batch_size=3, present=present)
    projection = EMAP().project(method, data)
    torch.testing.assert_close(projection.projected, brute_force(method, data, present), atol=1e-5, rtol=1e-5)
    # A non-additive head: the projection is not the model.
    assert (projection.projected - projection.logits.double()).abs().max() > 1e-3


def test_two_modalities_match_brute_force():
    method = mlp_method(partial(GatedFusion, hidden_dim=6))
    data = random_batches(6, batch_size=4)
    torch.testing.assert_close(EMAP().project(method, data).projected, brute_force(method, data),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_modalities,fusion", [(2, partial(LateFusion)), (2, partial(GatedFusion, hidden_dim=6)),
                                                   (3, partial(ConcatFusion))])
def test_inputs_path_with_every_partner_equals_features_path(num_modalities, fusion):
    method = mlp_method(fusion, num_modalities=num_modalities)
    data = random_batches(9, num_modalities=num_modalities)
    fast = EMAP().project(method, data)
    general = EMAP(path="inputs", partners=9, batch_size=10).project(method, data)
    assert general.partners == fast.partners == 9
    torch.testing.assert_close(general.projected, fast.projected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(general.logits, fast.logits)


def test_sampled_partners_are_seeded():
    method = mlp_method(partial(GatedFusion, hidden_dim=6))
    data = random_batches(10)
    one = EMAP(path="inputs", partners=3, seed=5).project(method, data)
    again = EMAP(path="inputs", partners=3, seed=5).project(method, data)
    other = EMAP(path="inputs", partners=3, seed=6).project(method, data)
    assert one.partners == 3
    torch.testing.assert_close(one.projected, again.projected, atol=0, rtol=0)
    assert not torch.allclose(one.projected, other.projected)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_chunking_gives_the_same_projection(num_modalities):
    method = mlp_method(partial(GatedFusion, hidden_dim=6), num_modalities=num_modalities)
    data = random_batches(10, num_modalities=num_modalities)
    whole = EMAP(chunk_size=10_000).project(method, data).projected
    for chunk_size in (1, 7, 64):
        torch.testing.assert_close(EMAP(chunk_size=chunk_size).project(method, data).projected, whole,
                                   atol=1e-6, rtol=1e-6)


def test_additive_projection_on_a_table():
    # evaluate(m, i, j) reads f(x_m^i, x_-m^j) off a table: for M = 2 only m = 0 is needed (the grid read both ways).
    table = torch.randn(5, 5, 2, dtype=torch.float64)
    calls = []

    def evaluate(m, i, j):
        calls.append(m)
        return table[i, j]

    projected = additive_projection(evaluate, 5, 2, chunk_size=4)
    expected = table.mean(dim=1) + table.mean(dim=0) - table.mean(dim=(0, 1))
    torch.testing.assert_close(projected, expected)
    assert set(calls) == {0}


def test_max_samples_takes_a_seeded_subset_of_indices():
    method = mlp_method(partial(ConcatFusion))
    data = random_batches(20, batch_size=6)
    one = EMAP(max_samples=8, seed=3).project(method, data)
    assert len(one.index) == 8 and one.index.unique().numel() == 8
    assert torch.equal(one.index, EMAP(max_samples=8, seed=3).project(method, list(reversed(data))).index)
    assert not torch.equal(one.index, EMAP(max_samples=8, seed=4).project(method, data).index)
    assert len(EMAP(max_samples=50).project(method, data).index) == 20


def test_result_is_json_and_renders():
    method = mlp_method(partial(GatedFusion, hidden_dim=6))
    method.train()
    diagnostic = EMAP()
    result = diagnostic.compute(method, random_batches(12))
    assert method.training  # mode restored
    json.dumps(result)
    assert result["num_samples"] == 12 and result["partners"] == 12
    assert sum(result["per_class"]["support"]) == 12
    assert result["gap"]["acc"] == pytest.approx(result["model"]["acc"] - result["emap"]["acc"])
    assert set(diagnostic.scalars(result)) == {"acc_model", "acc_emap", "acc_gap", "f1_model", "f1_emap", "f1_gap",
                                               "agreement"}
    assert "| accuracy |" in diagnostic.summary(result)
    figures = diagnostic.figures(result)
    assert set(figures) == {"per_class_accuracy"}
    plt.close(figures["per_class_accuracy"])


def test_options_are_checked():
    with pytest.raises(ValueError, match="path"):
        EMAP(path="pairs")
    with pytest.raises(ValueError, match="partners"):
        EMAP(partners=3)
    with pytest.raises(ValueError, match="max_samples"):
        EMAP(max_samples=0)


def test_config_instantiates():
    cfg = OmegaConf.load(CONF / "emap.yaml")
    diagnostic = instantiate(cfg.emap)
    assert isinstance(diagnostic, EMAP) and diagnostic.name == "emap" and diagnostic.path == "features"

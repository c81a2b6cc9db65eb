"""Linear probes: the fit against a brute-force optimum and on separable data, informative against noise
modalities, concat against the single modalities, missing modalities zeroed, the training subset, a clear error
without the training split, determinism and model/RNG neutrality, and a training run with the diagnostic."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from balance.diagnostics.linear_probe import CONCAT, LinearProbe, encode_split, fit_linear_probe
from balance.run import build, train
from compose import SYNTHETIC, compose_train
from diagnostic_fixtures import Identity, joint_method, make_batches

CONF = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"


class FeatureSplit(Dataset):
    """Items ``{"inputs": {m: x}, "label", "index"}`` (and ``present``) of given feature vectors."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor,
                 present: torch.Tensor | None = None) -> None:
        self.features, self.labels, self.present = features, labels, present

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"inputs": {m: x[i] for m, x in self.features.items()}, "label": self.labels[i], "index": i}
        if self.present is not None:
            item["present"] = self.present[i]
        return item


class FeatureDataModule:
    """What the diagnostic reads of a datamodule: ``setup``, ``evaluation_view``, the loaders' settings."""

    eval_batch_size = 32
    num_workers = 0

    def __init__(self, splits: dict[str, FeatureSplit]) -> None:
        self.splits = splits

    def setup(self, stage: str | None = None) -> None:
        pass

    def evaluation_view(self, split: str) -> FeatureSplit:
        return self.splits[split]


def make_split(n: int, seed: int, make) -> FeatureSplit:
    """``make(n, generator)`` -> ``(features, labels)``, seeded per split."""
    return FeatureSplit(*make(n, torch.Generator().manual_seed(seed)))


def datamodule_of(make, sizes=(300, 200, 200)) -> FeatureDataModule:
    return FeatureDataModule({split: make_split(n, seed, make)
                              for seed, (split, n) in enumerate(zip(("train", "val", "test"), sizes))})


def signal_and_noise(n: int, generator: torch.Generator):
    """Two classes: ``signal`` is the label's centre (+-2 on the first axis) plus noise, ``noise`` is noise."""
    labels = torch.randint(2, (n,), generator=generator)
    signal = torch.randn(n, 4, generator=generator)
    signal[:, 0] += 4.0 * labels - 2.0
    return {"signal": signal, "noise": torch.randn(n, 4, generator=generator)}, labels


def two_bits(n: int, generator: torch.Generator):
    """Four classes; ``a`` shows the label's low bit, ``b`` its high bit: each alone tells half the label."""
    labels = torch.randint(4, (n,), generator=generator)
    a = torch.randn(n, 3, generator=generator) * 0.3
    b = torch.randn(n, 3, generator=generator) * 0.3
    a[:, 0] += 2.0 * (labels % 2) - 1.0
    b[:, 0] += 2.0 * (labels // 2) - 1.0
    return {"a": a, "b": b}, labels


def identity_method(dims: dict[str, int], num_classes: int):
    return joint_method({m: Identity(d) for m, d in dims.items()}, num_classes=num_classes)


def run_probe(probe: LinearProbe, method, datamodule) -> dict:
    """Prepares and computes on the test split, read with a local generator (a loader draws its workers' seeds
    from the global one otherwise)."""
    probe.prepare(method, datamodule)
    loader = DataLoader(datamodule.evaluation_view("test"), batch_size=datamodule.eval_batch_size,
                        generator=torch.Generator())
    return probe.compute(method, loader)


def test_separable_features_are_fitted_exactly():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    x = centres[labels] + torch.randn(30, 2, generator=generator)
    probe = fit_linear_probe(x, labels, num_classes=3)
    assert probe.accuracy(x, labels) == 1.0
    # Standardised with the training data's own statistics.
    torch.testing.assert_close(probe.mean, x.double().mean(0))
    torch.testing.assert_close(probe.scale, x.double().std(0, unbiased=False))


def test_fit_matches_a_brute_force_optimum():
    # Two classes on one feature: the multinomial objective reduces to a logistic regression in the logit
    # difference s = w x + c with penalty weight_decay / 4 * w^2 (the optimal W is (-w/2, w/2)); grid-search it.
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(2, (40,), generator=generator)
    x = (labels.double() + torch.randn(40, generator=generator, dtype=torch.float64)).unsqueeze(1)
    weight_decay = 0.2
    probe = fit_linear_probe(x, labels, num_classes=2, weight_decay=weight_decay)
    z = ((x - x.mean()) / x.std(unbiased=False)).squeeze(1)
    grid = torch.linspace(-4, 4, 401, dtype=torch.float64)
    w, c = grid.view(-1, 1, 1), grid.view(1, -1, 1)
    sign = 2.0 * labels.double() - 1.0
    objective = torch.nn.functional.softplus(-sign * (w * z + c)).mean(-1) + weight_decay / 4 * w.squeeze(-1) ** 2
    best = torch.nonzero(objective == objective.min())[0]
    assert float(probe.weight[0, 1] - probe.weight[0, 0]) == pytest.approx(float(grid[best[0]]), abs=0.021)
    assert float(probe.bias[1] - probe.bias[0]) == pytest.approx(float(grid[best[1]]), abs=0.021)
    assert float(probe.weight.sum()) == pytest.approx(0.0, abs=1e-6)


def test_informative_modality_above_chance_and_noise_at_chance(caplog):
    datamodule = datamodule_of(signal_and_noise)
    with caplog.at_level(logging.INFO, logger="balance.diagnostics.linear_probe"):
        result = run_probe(LinearProbe(), identity_method({"signal": 4, "noise": 4}, 2), datamodule)
    assert "linear probe concat: fitted on 300 samples x 8 features" in caplog.text
    probes = result["probes"]
    assert list(probes) == ["signal", "noise", CONCAT]
    assert probes["signal"]["acc"] > 0.9 and probes["signal"]["val_acc"] > 0.9
    assert abs(probes["noise"]["acc"] - 0.5) < 0.12 and abs(probes["noise"]["val_acc"] - 0.5) < 0.12
    assert probes[CONCAT]["num_features"] == 8
    assert result["num_samples"] == {"train": 300, "val": 200, "evaluated": 200}


def test_concat_probe_combines_the_modalities():
    datamodule = datamodule_of(two_bits)
    result = run_probe(LinearProbe(), identity_method({"a": 3, "b": 3}, 4), datamodule)
    probes = result["probes"]
    best_single = max(probes["a"]["train_acc"], probes["b"]["train_acc"])
    assert probes[CONCAT]["train_acc"] >= best_single
    # Each modality tells two of the four classes apart, together they tell all four.
    assert best_single < 0.6 and probes[CONCAT]["acc"] > 0.9


def test_missing_modalities_are_zeroed():
    features = {"a": torch.ones(6, 2), "b": torch.full((6, 3), 2.0)}
    present = torch.ones(6, 2, dtype=torch.bool)
    present[[1, 4], 1] = False
    encoded = encode_split(identity_method({"a": 2, "b": 3}, 2),
                           make_batches(features, torch.zeros(6, dtype=torch.long), 4, present))
    assert torch.equal(encoded.features["a"], features["a"])
    assert encoded.features["b"][[1, 4]].abs().sum() == 0 and torch.equal(encoded.features["b"][0], features["b"][0])
    assert encoded.probe_inputs()[CONCAT].shape == (6, 5)


def test_training_subset_is_seeded():
    datamodule = datamodule_of(signal_and_noise)
    method = identity_method({"signal": 4, "noise": 4}, 2)
    first = run_probe(LinearProbe(max_train_samples=50, seed=3), method, datamodule)
    assert first["num_samples"]["train"] == 50
    assert run_probe(LinearProbe(max_train_samples=50, seed=3), method, datamodule) == first
    assert run_probe(LinearProbe(max_train_samples=50, seed=4), method, datamodule) != first


def test_compute_without_the_training_split_raises():
    method = identity_method({"a": 3, "b": 3}, 4)
    with pytest.raises(ValueError, match="training split.*prepare"):
        LinearProbe().compute(method, make_batches(*two_bits(8, torch.Generator()), 4))
    with pytest.raises(ValueError, match=r"diagnostics.linear_probe.max_train_samples must be an integer >= 1 or null"):
        LinearProbe(max_train_samples=0)
    with pytest.raises(ValueError, match=r"diagnostics.linear_probe.weight_decay must be a number >= 0"):
        LinearProbe(weight_decay=-1.0)


def test_deterministic_and_leaves_model_and_rng_alone():
    # A real datamodule and model from the config (untrained: what is checked is that the probe changes nothing).
    datamodule, method = build(compose_train([*SYNTHETIC, "data.num_samples=300"]))
    method.train()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    rng = torch.get_rng_state()
    probe = LinearProbe(max_train_samples=100)
    first = run_probe(probe, method, datamodule)
    assert run_probe(probe, method, datamodule) == first
    assert torch.equal(torch.get_rng_state(), rng)
    assert method.training and all(m.training for m in method.modules())
    after = method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in method.parameters())
    json.dumps(first)
    assert set(probe.scalars(first)) == {f"{prefix}acc_{p}" for prefix in ("", "train_", "val_")
                                         for p in ("m0", "m1", CONCAT)}
    summary = probe.summary(first)
    assert "| concat | 64 |" in summary
    figures = probe.figures(first)
    assert set(figures) == {"accuracy"}
    plt.close(figures["accuracy"])


def test_in_a_training_run(tmp_path):
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=1", "data.num_samples=300", "diagnostics=[linear_probe]",
                         "diagnose.every_n_epochs=1"], run_dir=tmp_path)
    results = train(cfg)
    report = json.loads((tmp_path / "diagnostics.json").read_text())["linear_probe"]
    assert "error" not in report and set(report["probes"]) == {"m0", "m1", CONCAT}
    for name, probe in report["probes"].items():
        for key in ("train_acc", "val_acc", "acc"):
            assert 0.0 <= probe[key] <= 1.0
        assert results["test"][f"linear_probe/acc_{name}"] == pytest.approx(probe["acc"])
    # The informative modality (m0) is far above chance (4 classes) after an epoch.
    assert report["probes"]["m0"]["acc"] > 0.5
    assert "## linear_probe" in (tmp_path / "diagnostics.md").read_text()
    assert (tmp_path / "diagnostics" / "linear_probe_accuracy.png").stat().st_size > 0
    during = json.loads((tmp_path / "diagnostics" / "val_epoch000.json").read_text())["linear_probe"]
    assert "error" not in during
    # On validation, the evaluated split is the validation split.
    assert all(p["acc"] == p["val_acc"] for p in during["probes"].values())


def test_config_instantiates():
    probe = instantiate(OmegaConf.load(CONF / "linear_probe.yaml").linear_probe)
    assert isinstance(probe, LinearProbe) and probe.name == "linear_probe"
    assert (probe.weight_decay, probe.max_iter, probe.max_train_samples) == (1e-4, 200, None)

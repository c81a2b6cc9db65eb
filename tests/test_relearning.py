"""Diagnosing and Re-learning: purity, weights, blend and schedule by hand; the re-initialisation of a built method
against an independent computation; learning with two and three modalities, with the logged quantities; an
encoder that memorises a training-only shortcut is re-initialised and the other modality learns more than under
joint training; exact resume across a re-learning epoch; refused options."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from balance.methods.relearning import (
    INITIAL_WEIGHTS_KEY, SplitFeatures, blend, cluster_purity, purity, reinit_weight, relearning_epochs)
from balance.run import build, train
from compose import compose_train, fit_briefly, held_out_accuracy, train_interrupted_and_resumed
from datamodules.base import InMemoryDataset
from datamodules.synthetic import SyntheticDataModule

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.contributions=null"]
VECTORS = ["data=synthetic", "model=mlp", "data.num_samples=400", "data.batch_size=32", *QUIET, "method=relearning"]


class ShortcutDataModule(SyntheticDataModule):
    """Synthetic data whose modality m0 carries, in the training split only, a strong extra class signal (a
    shortcut an encoder memorises but that does not generalise): m0's clusters are pure on the training split and
    poor on the validation split, a wide purity gap.

    Args:
        shortcut: the scale of the training-only class prototypes added to m0.
        **kwargs: the synthetic datamodule's arguments.
    """

    def __init__(self, shortcut: float = 3.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shortcut = shortcut

    def build_datasets(self):
        datasets = super().build_datasets()
        train_split = datasets["train"]
        prototypes = torch.from_numpy(np.random.default_rng(self.seed + 1).standard_normal(
            (self.num_classes, self.feature_dim))).float()
        inputs = dict(train_split.inputs)
        inputs["m0"] = inputs["m0"] + self.shortcut * prototypes[train_split.labels]
        datasets["train"] = InMemoryDataset(inputs, train_split.labels)
        return datasets


# -- the formulas ------------------------------------------------------------------------------------------------


def _brute_force_purity(labels, clusters):
    """Per cluster, the count of its most frequent label, by explicit loops; summed and divided by N."""
    total = 0
    for c in set(clusters):
        members = [y for y, k in zip(labels, clusters) if k == c]
        total += max(members.count(y) for y in set(members))
    return total / len(labels)


def test_purity_counts_each_cluster_majority():
    labels = np.array([0, 0, 2, 2, 2, 5, 5, 0])  # labels need not be contiguous (the official code renumbers)
    clusters = np.array([7, 7, 7, 1, 1, 1, 3, 3])
    # cluster 7: {0, 0, 2} -> 2; cluster 1: {2, 2, 5} -> 2; cluster 3: {5, 0} -> 1
    assert purity(labels, clusters) == pytest.approx(5 / 8)
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels, clusters = rng.integers(4, size=50), rng.integers(6, size=50)
        assert purity(labels, clusters) == pytest.approx(_brute_force_purity(labels.tolist(), clusters.tolist()))


def test_cluster_purity_on_separated_blobs_and_after_rescaling():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = centres[labels] + rng.normal(scale=0.5, size=(60, 2))
    assert cluster_purity(features, labels, 3, seed=0, n_init=10) == 1.0
    # Min-max scaling on the split itself: a per-dimension affine change leaves the clustering alone.
    stretched = features * np.array([1000.0, 0.01]) + np.array([5.0, -3.0])
    assert cluster_purity(stretched, labels, 3, seed=0, n_init=10) == 1.0
    # Random labels on the same features: the clusters cannot be pure.
    assert cluster_purity(features, rng.permutation(labels) % 2, 3, seed=0, n_init=10) < 1.0
    # Fewer samples than classes: one cluster per sample.
    assert cluster_purity(features[:2], labels[:2], 3, seed=0, n_init=1) == 1.0


def test_weight_blend_and_schedule_by_hand():
    assert reinit_weight(0.9, 0.7, 3.0) == pytest.approx(math.tanh(0.6))
    assert reinit_weight(0.7, 0.9, 3.0) == pytest.approx(math.tanh(0.6))  # the gap's absolute value
    assert reinit_weight(0.8, 0.8, 3.0) == 0.0
    initial, current = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])
    assert blend(initial, current, 0.25).tolist() == [2.5, 1.0]  # 0.25 * init + 0.75 * current
    assert blend(initial, current, 0.0).tolist() == current.tolist()
    # The official schedule: after the 0-based epochs 20, 40, 60, i.e. at the start of epochs 21, 41, 61.
    assert relearning_epochs(21, 20, 3) == [21, 41, 61]
    assert relearning_epochs(1, 2, 2) == [1, 3] and relearning_epochs(5, 20, 0) == []


def test_the_default_schedule_is_the_official_one():
    _, method = build(compose_train(VECTORS))
    assert method.relearning_epochs == [21, 41, 61]


def test_diagnosis_clusters_only_the_samples_that_have_the_modality():
    _, method = build(compose_train(VECTORS))
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.repeat(np.arange(4), 10))
    clean = torch.from_numpy(np.eye(4)[labels] * 10 + rng.normal(scale=0.1, size=(40, 4))).float()
    garbage = torch.from_numpy(rng.normal(scale=50.0, size=(8, 4))).float()
    # m0 lacks 8 extra samples whose features are noise; m1 has every sample (noise everywhere).
    features = {"m0": torch.cat([clean, garbage]), "m1": torch.cat([garbage, clean])}
    present = torch.ones(48, 2, dtype=torch.bool)
    present[40:, 0] = False
    split = SplitFeatures(features, torch.cat([labels, torch.zeros(8, dtype=torch.long)]), present)
    purities = method.diagnose(split, split)
    assert purities["m0"] == (1.0, 1.0)
    assert purities["m1"][0] == cluster_purity(features["m1"].numpy(), split.labels.numpy(), 4, 0, 10) < 1.0


# -- the method ----------------------------------------------------------------------------------------------------


def test_relearning_blends_each_encoder_towards_its_initial_weights(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # the clustering's seed; an earlier run in this process may set another
    datamodule, method = build(compose_train([*VECTORS, "method.strength=3.0"]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # world size 1
    initial = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    with torch.no_grad():  # stands for training: move every parameter away from its initial value
        for p in method.model.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    # The diagnosis, independently: every split's features encoded by hand, clustered with the run's seed.
    expected = {}
    with torch.no_grad():
        for split in ("train", "val"):
            dataset = datamodule.evaluation_view(split)
            batch = {"inputs": {m: x for m, x in dataset.dataset.inputs.items()}}
            features = method.model.encode(batch["inputs"])
            for m in method.modalities:
                expected[split, m] = cluster_purity(features[m].numpy(), dataset.dataset.labels.numpy(), 4, 0, 10)
    monkeypatch.setattr(datamodule, "test_dataloader", lambda: pytest.fail("the test split was read"))
    method.train()
    method.relearn(datamodule)
    assert method.model.training
    for m in method.modalities:
        weight = reinit_weight(expected["train", m], expected["val", m], 3.0)
        assert 0 < weight < 1
        assert float(method.train_method_metrics[f"reinit_{m}"].compute()) == pytest.approx(weight, abs=1e-6)
        assert float(method.train_method_metrics[f"purity_val_{m}"].compute()) == pytest.approx(expected["val", m])
    for name, p in method.model.named_parameters():
        modality = name.split(".")[1]
        if name.startswith("encoders."):
            weight = reinit_weight(expected["train", modality], expected["val", modality], 3.0)
            assert torch.allclose(p, weight * initial[name] + (1 - weight) * before[name], atol=1e-6), name
        else:  # the fusion head is kept
            assert torch.equal(p, before[name]), name


def _metrics_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.4]"), ("[m0,m1,m2]", "[2.0,0.4,0.4]")])
def test_learns_and_logs_purities_in_the_relearning_epochs(modalities, informativeness, tmp_path):
    names = modalities.strip("[]").split(",")
    results = train(compose_train([*VECTORS, f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                   "trainer.max_epochs=4", "method.warmup_epochs=1", "method.relearn_every=2",
                                   "method.relearn_times=2", "method.optimizer.lr=1.0e-2"], run_dir=tmp_path))
    assert results["test"]["acc"] > 0.6, results["test"]  # 4 classes: chance 0.25
    logged = {int(r["epoch"]): r for r in _metrics_rows(tmp_path) if r.get(f"train/reinit_{names[0]}")}
    assert sorted(logged) == [1, 3]  # the epochs that start with a re-learning
    for row in logged.values():
        for m in names:
            assert 0 <= float(row[f"train/purity_train_{m}"]) <= 1 and 0 <= float(row[f"train/purity_val_{m}"]) <= 1
            gap = abs(float(row[f"train/purity_train_{m}"]) - float(row[f"train/purity_val_{m}"]))
            assert float(row[f"train/reinit_{m}"]) == pytest.approx(math.tanh(3.0 * gap), abs=1e-5)


def test_a_memorised_shortcut_is_reinitialised_and_the_other_modality_learns_more(tmp_path):
    # m0 dominates training through a training-only shortcut; m1 carries the signal that generalises. Under joint
    # training m1 barely learns; re-learning sees m0's purity gap, pulls m0 back to its start, and m1 learns.
    data = ["data._target_=test_relearning.ShortcutDataModule", "data.num_samples=600",
            "data.informativeness=[0.3,0.6]"]
    accuracy, logged = {}, {}
    for method in ("joint", "relearning"):
        extra = ["method.warmup_epochs=3", "method.relearn_every=3", "method.relearn_times=3"] * (method != "joint")
        trainer, datamodule, module = fit_briefly([*VECTORS, *data, f"method={method}", *extra], epochs=12,
                                                  run_dir=tmp_path / method)
        accuracy[method] = held_out_accuracy(datamodule, module, "m1")
        logged[method] = {k: float(v) for k, v in trainer.logged_metrics.items()}
    diagnosed = logged["relearning"]
    assert diagnosed["train/purity_train_m0"] == 1.0 and diagnosed["train/purity_val_m0"] < 0.5
    assert diagnosed["train/reinit_m0"] > 0.8, diagnosed
    assert diagnosed["train/reinit_m0"] > diagnosed["train/reinit_m1"] + 0.3, diagnosed
    assert accuracy["relearning"] > accuracy["joint"] + 0.05, accuracy


def test_resumes_exactly_across_a_relearning_epoch(tmp_path):
    # The run stops after epoch 1; epoch 2 starts with a re-learning, which the resumed run must do alike.
    overrides = [*VECTORS, "method.warmup_epochs=2", "method.optimizer.lr=1.0e-2"]
    a, b = train_interrupted_and_resumed(overrides, tmp_path, stop_after=2, epochs=3)
    assert a["epoch"] == b["epoch"] == 2
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    # The initial weights are the model's weights before training (here: the freshly built model's).
    pl.seed_everything(0)
    _, fresh = build(compose_train(overrides))
    for name, value in a[INITIAL_WEIGHTS_KEY].items():
        assert torch.equal(value, fresh.model.get_parameter(name)) and torch.equal(value, b[INITIAL_WEIGHTS_KEY][name])
    relearned = [int(r["epoch"]) for path in sorted((tmp_path / "part" / "csv").glob("*/metrics.csv"))
                 for r in csv.DictReader(path.open()) if r.get("train/reinit_m0")]
    assert relearned == [2]  # done by the resumed run


@pytest.mark.parametrize("option,value,message", [
    ("strength", -1.0, "method.strength must be a number >= 0"),
    ("relearn_every", 0, "method.relearn_every must be an integer >= 1"),
    ("relearn_times", -1, "method.relearn_times must be an integer >= 0"),
    ("warmup_epochs", -1, "method.warmup_epochs must be an integer >= 0"),
    ("kmeans_n_init", 0, "method.kmeans_n_init must be an integer >= 1"),
])
def test_invalid_options_are_refused(option, value, message):
    with pytest.raises(Exception, match=message):  # Hydra wraps the ValueError
        build(compose_train([*VECTORS, f"method.{option}={value}"]))

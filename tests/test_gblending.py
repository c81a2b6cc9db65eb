"""G-Blending: the overfitting-to-generalisation weights by hand, the clones' batches, the blended loss (M = 2 and
3), both estimates against brute force on a real fit (the main model untouched, the test split never read),
learning, the intended direction, the refusals, the logged weights, and exact resume across estimates."""

import csv
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.gblending import blending_weights, epoch_batches, overfitting_and_gain
from balance.run import build, train
from compose import SYNTHETIC, assert_identical, compose_train, fit_briefly, train_interrupted_and_resumed

pytestmark = pytest.mark.usefixtures("one_thread")

GB = [*SYNTHETIC, "method=gblending", "data.num_samples=400", "data.batch_size=32", "callbacks.contributions=null"]
# Checkpoint entries a resumed run writes differently (loop progress, callbacks' bookkeeping).
PROGRESS_KEYS = {"loops", "callbacks", "hyper_parameters", "hparams_name"}


def test_overfitting_and_gain_by_hand():
    # Head 0 overfits more (gap 0.3 -> 0.7) while its validation loss falls 1.5 -> 1.2.
    delta_o, delta_g = overfitting_and_gain(train_start=torch.tensor([1.2, 2.0]), val_start=torch.tensor([1.5, 2.1]),
                                            train_end=torch.tensor([0.5, 1.0]), val_end=torch.tensor([1.2, 1.6]))
    assert delta_o.tolist() == pytest.approx([(1.2 - 0.5) - (1.5 - 1.2), (1.6 - 1.0) - (2.1 - 2.0)])
    assert delta_g.tolist() == pytest.approx([0.3, 0.5])


def test_blending_weights_by_hand():
    previous = torch.full((3,), 1 / 3)
    delta_o, delta_g = torch.tensor([0.1, 0.2, 0.5]), torch.tensor([0.05, -0.2, 0.1])
    raw = [0.05 / 0.01, 0.2 / 0.04, 0.1 / 0.25]  # |dG| / dO^2: a loss of generalisation counts by its size
    assert blending_weights(delta_o, delta_g, previous).tolist() == pytest.approx([r / sum(raw) for r in raw])
    # A head whose overfitting did not move takes (almost) all the weight instead of an infinite one.
    weights = blending_weights(torch.tensor([0.0, 0.2, 0.5]), delta_g, previous)
    assert float(weights[0]) == pytest.approx(1.0) and float(weights.sum()) == pytest.approx(1.0)
    # Nothing generalised, or a non-finite loss: the previous weights stay.
    assert torch.equal(blending_weights(delta_o, torch.zeros(3), previous), previous)
    assert torch.equal(blending_weights(delta_o, torch.tensor([math.nan, 0.1, 0.1]), previous), previous)


def test_epoch_batches_cover_the_split_and_shard_it_evenly():
    batches = epoch_batches(65, 32, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [32, 33]  # the lone last sample joins the batch before
    assert sorted(i for b in batches for i in b) == list(range(65))
    shards = [epoch_batches(65, 8, torch.Generator().manual_seed(0), rank, 2) for rank in (0, 1)]
    flat = [[i for b in shard for i in b] for shard in shards]
    assert len(flat[0]) == len(flat[1]) == 33 and len(shards[0]) == len(shards[1])  # padded: no rank waits
    assert set(flat[0]) | set(flat[1]) == set(range(65))


@pytest.mark.parametrize("modalities", ["[m0,m1]", "[m0,m1,m2]"])
def test_the_loss_weighs_each_head_by_its_blending_weight(modalities):
    _, method = build(compose_train([*GB, f"data.modalities={modalities}",
                                     f"data.informativeness=[{','.join(['1.0'] * len(modalities.split(',')))}]"]))
    weights = torch.arange(1.0, len(method.heads) + 1)
    method.blend_weights.copy_(weights / weights.sum())
    batch = {"inputs": {m: torch.randn(6, 16) for m in method.modalities}, "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    step = method.forward_step(batch, 0)
    features = {m: method.model.encoders[m](batch["inputs"][m]) for m in method.modalities}
    expected = {"fused": float(method.blend_weights[-1]) * float(F.cross_entropy(method.model.fuse(features),
                                                                                 batch["label"]))}
    for i, m in enumerate(method.modalities):  # each modality's own linear head, not the concat block
        head = method.unimodal_heads[m]
        logits = features[m] @ head.weight.T + head.bias
        expected[f"unimodal_{m}"] = float(method.blend_weights[i]) * float(F.cross_entropy(logits, batch["label"]))
    assert {k: float(v) for k, v in step.losses.items()} == pytest.approx(expected, rel=1e-5)


def _brute_force_split_losses(method, datamodule):
    """``[2, K]``: each head's mean cross-entropy over the training split (evaluation view) and the validation split,
    one sample at a time in eval mode (the modalities' heads, then the fused head)."""
    was_training = method.training
    method.eval()
    rows = []
    with torch.no_grad():
        for dataset in (datamodule.evaluation_view("train"), datamodule.datasets["val"]):
            totals = torch.zeros(len(method.heads))
            for i in range(len(dataset)):
                sample = dataset[i]
                inputs = {m: x.unsqueeze(0) for m, x in sample["inputs"].items()}
                label = torch.tensor([sample["label"]])
                features = method.model.encode(inputs)
                logits = [*method.unimodal_logits(features).values(), method.fused_logits(features)]
                totals += torch.stack([F.cross_entropy(z, label) for z in logits])
            rows.append(totals / len(dataset))
    method.train(was_training)
    return torch.stack(rows)


def _refuse(*args):
    raise AssertionError("G-Blending read the test split")


class _Refused:
    """Stands in for the test split: any read fails the test."""

    __getitem__ = __len__ = _refuse


class _EstimateProbe(pl.Callback):
    """At each epoch's start (callbacks run before the method's own hook, so before the estimate): the brute-force
    losses of the main model's heads and its parameters; at the epoch's first batch, the parameters again."""

    def __init__(self, datamodule):
        self.datamodule = datamodule
        self.losses, self.before, self.after, self.weights = [], [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.losses.append(_brute_force_split_losses(pl_module, self.datamodule))
        self.before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.after.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})
            self.weights.append(pl_module.blend_weights.clone())


def _probed_fit(overrides, epochs):
    pl.seed_everything(0)
    datamodule, method = build(compose_train([*GB, *overrides]))
    datamodule.datasets["test"] = _Refused()
    datamodule.test_dataloader = _refuse
    probe = _EstimateProbe(datamodule)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[probe])
    return trainer, method, probe


def test_the_clone_estimate_blends_by_the_clones_losses_and_leaves_the_main_model_alone():
    trainer, method, probe = _probed_fit(["method.super_epoch=1", "method.estimate_epochs=2",
                                          "data.informativeness=[2.0,0.4]"], epochs=2)
    ends = []
    clone_end_losses = method._clone_end_losses
    method._clone_end_losses = lambda head: ends.append(clone_end_losses(head)) or ends[-1]
    trainer.fit(method, datamodule=probe.datamodule)
    assert len(ends) == 2 * len(method.heads)  # every head's clone, at both boundaries
    for epoch in range(2):
        start = probe.losses[epoch]
        heads = len(method.heads)
        end = torch.stack(ends[epoch * heads:(epoch + 1) * heads], dim=1)
        expected = blending_weights(*overfitting_and_gain(start[0], start[1], end[0], end[1]), torch.zeros(3))
        assert torch.allclose(probe.weights[epoch], expected, rtol=1e-3, atol=1e-4), (epoch, expected)
        assert bool((end[0] < start[0]).all())  # every clone trained: its training loss fell
        for name, value in probe.before[epoch].items():  # the clones were copies
            assert torch.equal(probe.after[epoch][name], value), name
    assert float(probe.weights[0].sum()) == pytest.approx(1.0)


def test_the_online_estimate_compares_the_main_heads_at_consecutive_boundaries():
    trainer, method, probe = _probed_fit(["method.estimate=online", "method.super_epoch=1"], epochs=3)
    boundaries = []
    estimate = method._estimate_weights
    method._estimate_weights = lambda: (estimate(), boundaries.append(method.boundary_losses.clone()))
    trainer.fit(method, datamodule=probe.datamodule)
    for epoch in range(3):
        assert torch.allclose(boundaries[epoch], probe.losses[epoch], atol=1e-5)
    assert torch.equal(probe.weights[0], torch.full((3,), 1 / 3))  # no earlier boundary to compare with
    for epoch in (1, 2):
        start, end = probe.losses[epoch - 1], probe.losses[epoch]
        expected = blending_weights(*overfitting_and_gain(start[0], start[1], end[0], end[1]), torch.zeros(3))
        assert torch.allclose(probe.weights[epoch], expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[1.0,0.6]"), ("[m0,m1,m2]", "[1.0,0.6,0.6]")])
def test_it_learns_and_logs_the_weights_every_epoch(modalities, informativeness, tmp_path):
    results = train(compose_train([*GB, f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                   "trainer.max_epochs=3", "method.super_epoch=2", "method.estimate_epochs=2"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.6, results["test"]  # 4 classes: chance 0.25
    heads = [*modalities.strip("[]").split(","), "fused"]
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open())
            if r.get("train/weight_fused")]
    assert len(rows) == 3
    for row in rows:
        assert sum(float(row[f"train/weight_{k}"]) for k in heads) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(rows[0]["train/weight_fused"]) - 1 / len(heads)) > 1e-3  # estimated at epoch 0


@pytest.mark.parametrize("estimate", [["method.super_epoch=2"], ["method.estimate=online", "method.super_epoch=2"]])
def test_the_dominated_modality_gets_the_least_weight(estimate):
    # m0 dominates: m1's head gains little on validation for what it overfits, so G-Blend gives it the smallest
    # weight (the paper's Kinetics weights put 0.014 on audio), leaving the loss to the heads that generalise.
    _, _, method = fit_briefly([*GB, "data.num_samples=600", "data.informativeness=[2.0,0.4]", *estimate], epochs=4)
    weights = dict(zip(method.heads, method.blend_weights.tolist()))
    assert weights["m1"] < min(weights["m0"], weights["fused"]) and weights["m1"] < 1 / 3, weights


def test_a_modality_without_signal_gets_almost_no_weight():
    # m1 is pure noise: its head overfits without generalising, so its ratio |dG| / dO^2 is the smallest.
    _, _, method = fit_briefly([*GB, "data.informativeness=[1.0,0.0]", "method.super_epoch=1",
                                "method.estimate_epochs=3"], epochs=2)
    weights = dict(zip(method.heads, method.blend_weights.tolist()))
    assert weights["m1"] < 0.1 and weights["m1"] < min(weights["m0"], weights["fused"]), weights


@pytest.mark.parametrize("override,message", [
    ("method.estimate=offline", "method.estimate must be one of"),
    ("method.super_epoch=0", "method.super_epoch must be an integer >= 1"),
    ("method.estimate_epochs=0", "method.estimate_epochs must be an integer >= 1"),
])
def test_bad_options_are_refused(override, message):
    with pytest.raises(Exception, match=message):
        build(compose_train([*GB, override]))


def test_clone_epochs_without_clones_and_linked_encoders_are_refused():
    with pytest.raises(Exception, match="method.estimate_epochs must be null with method.estimate=online"):
        build(compose_train([*GB, "method.estimate=online", "method.estimate_epochs=2"]))
    with pytest.raises(Exception, match="model.mmtm=null"):
        build(compose_train(["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "method=gblending",
                             "+model/mmtm=default"]))


@pytest.mark.parametrize("estimate", [["method.estimate_epochs=1"], ["method.estimate=online"]])
def test_a_run_resumed_between_estimates_continues_exactly(estimate, tmp_path):
    overrides = [*GB, "method.super_epoch=1", *estimate, "data.num_samples=200"]
    a, b = train_interrupted_and_resumed(overrides, tmp_path, stop_after=2, epochs=4)
    assert not torch.equal(a["state_dict"]["blend_weights"], torch.full((3,), 1 / 3))  # estimated after resuming
    assert_identical(*({k: v for k, v in c.items() if k not in PROGRESS_KEYS} for c in (a, b)))

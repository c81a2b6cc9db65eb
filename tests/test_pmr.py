"""PMR: prototypes, scores and coefficients against hand computation, the loss on a built method (M = 2 and 3),
the prototype pass, the refusals, and the intended direction (the weak modality learns more)."""

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.ogm_ge import confidence_scores
from balance.methods.pmr import PMR, pce_coefficients, prototype_logits, update_prototypes
from balance.models import MLPEncoder, MultimodalModel
from balance.models.fusion import ConcatFusion
from balance.run import build, train
from compose import compose_train, fit_briefly

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.contributions=null"]
VECTORS = ["data=synthetic", "model=mlp", "data.num_samples=400", "data.batch_size=32", *QUIET]


def test_prototype_logits_are_negative_euclidean_distances():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    prototypes = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    assert prototype_logits(features, prototypes).tolist() == [[0.0, -3.0, -4.0], [-5.0, -4.0, -3.0]]


def test_scores_sum_the_true_class_probability():
    logits = {"a": torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), "v": torch.tensor([[2.0, 2.0], [0.0, -9.0]])}
    labels = torch.tensor([1, 1])
    expected = [0.75 + 0.5, 0.5 + 1 / (1 + math.exp(9.0))]
    assert confidence_scores(logits, labels).tolist() == pytest.approx(expected)


def test_coefficients_follow_the_official_rule_and_generalise():
    # Two modalities: rho = s_0 / s_1 > 1 stimulates modality 1, < 1 modality 0, a tie neither.
    assert pce_coefficients(torch.tensor([30.0, 10.0]), alpha=2.0).tolist() == [0.0, 2.0]
    assert pce_coefficients(torch.tensor([10.0, 30.0]), alpha=2.0).tolist() == [2.0, 0.0]
    assert pce_coefficients(torch.tensor([5.0, 5.0]), alpha=2.0).tolist() == [0.0, 0.0]
    # Three: every modality below the most confident one.
    assert pce_coefficients(torch.tensor([30.0, 10.0, 20.0]), alpha=1.0).tolist() == [0.0, 1.0, 1.0]
    assert pce_coefficients(torch.tensor([30.0, 30.0, 20.0]), alpha=1.0).tolist() == [0.0, 0.0, 1.0]


def test_prototype_update_blends_class_means_and_keeps_unseen_classes():
    previous = torch.tensor([[1.0, 1.0], [2.0, 2.0], [7.0, 7.0]])
    sums = torch.tensor([[4.0, 0.0], [3.0, 3.0], [0.0, 0.0]])
    counts = torch.tensor([2.0, 1.0, 0.0])  # class 2 absent from the pass
    assert update_prototypes(previous, sums, counts, 0.0).tolist() == [[2.0, 0.0], [3.0, 3.0], [7.0, 7.0]]
    blended = update_prototypes(previous, sums, counts, 0.25)  # 0.75 * mean + 0.25 * previous
    assert torch.allclose(blended, torch.tensor([[1.75, 0.25], [2.75, 2.75], [7.0, 7.0]]))


def _method(overrides):
    datamodule, method = build(compose_train([*VECTORS, "method=pmr", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


def _brute_force_prototypes(method, batches):
    """Per modality, the class means of the given batches' features, by explicit loops."""
    prototypes = {}
    with torch.no_grad():
        features = [method.model.encode(b["inputs"]) for b in batches]
    labels = torch.cat([b["label"] for b in batches])
    for m in method.modalities:
        rows = torch.cat([f[m] for f in features])
        prototypes[m] = torch.stack([rows[labels == k].mean(0) for k in range(method.model.num_classes)])
    return prototypes


def test_the_prototype_pass_averages_each_class_in_eval_mode():
    datamodule, method = _method([])
    loader = datamodule.unshuffled_train_dataloader()
    batches = [b for _, b in zip(range(3), loader)]
    method.train()
    sums, counts = method._class_sums(loader, 3)
    assert method.model.training  # the pass restores the training mode
    expected = _brute_force_prototypes(method, batches)
    for m in method.modalities:
        assert torch.allclose(sums[m] / counts[m].unsqueeze(1), expected[m], atol=1e-5)
        assert counts[m].sum() == sum(len(b["label"]) for b in batches)


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.6]"), ("[m0,m1,m2]", "[2.0,0.6,0.6]")])
def test_loss_adds_the_prototypical_cross_entropy_of_the_less_confident_modalities(modalities, informativeness):
    datamodule, method = _method([f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                  "method.alpha=2.0"])
    batch = next(iter(datamodule.unshuffled_train_dataloader()))
    for m, c in _brute_force_prototypes(method, [batch]).items():
        method.prototypes(m).copy_(c)
    step = method.forward_step(batch, 0)
    with torch.no_grad():
        features = method.model.encode(batch["inputs"])
    y = batch["label"]
    ce, scores = {}, {}
    for m in method.modalities:  # -||h_i - c_k|| one pair at a time
        c = method.prototypes(m)
        logits = torch.tensor([[-float((features[m][i] - c[k]).norm()) for k in range(len(c))] for i in range(len(y))])
        ce[m] = float(F.cross_entropy(logits, y))
        scores[m] = float(sum(F.softmax(logits[i], 0)[y[i]] for i in range(len(y))))
    best = max(scores, key=scores.get)
    assert set(step.losses) == {"fused"} | {f"pce_{m}" for m in method.modalities if m != best}
    assert step.losses["fused"].item() == pytest.approx(F.cross_entropy(step.logits, y).item())
    for m in method.modalities:
        if m != best:
            assert step.losses[f"pce_{m}"].item() == pytest.approx(2.0 * ce[m], rel=1e-5)
    # A modality's prototypical term trains its own encoder only (the prototypes are constants).
    weak = next(m for m in method.modalities if m != best)
    method.zero_grad()
    step.losses[f"pce_{weak}"].backward()
    for name, p in method.named_parameters():
        moved = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert moved == name.startswith(f"model.encoders.{weak}."), name


def test_no_prototypical_loss_outside_the_modulation_epochs():
    datamodule, method = _method(["method.modulation_starts=1", "method.modulation_ends=3"])
    step = method.forward_step(next(iter(datamodule.train_dataloader())), 0)  # epoch 0
    assert set(step.losses) == {"fused"}


@pytest.mark.parametrize("option,value,message", [
    ("alpha", 0.0, "method.alpha must be a number > 0"),
    ("prototype_momentum", 1.0, r"method.prototype_momentum must be a number in \[0, 1\)"),
    ("prototype_fraction", 0.0, r"method.prototype_fraction must be a number in \(0, 1\]"),
    ("modulation_ends", -1, "ends at an epoch >= its start"),
])
def test_invalid_options_are_refused(option, value, message):
    with pytest.raises(Exception, match=message):
        build(compose_train([*VECTORS, "method=pmr", f"method.{option}={value}"]))


def test_one_modality_is_refused():
    model = MultimodalModel({"m0": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=8)}, partial(ConcatFusion), 3)
    with pytest.raises(ValueError, match="needs at least two"):
        PMR(model=model, optimizer=torch.optim.SGD)


def _train_set_prototype_fit(datamodule, method, modality):
    """(training-set prototypical CE, held-out nearest-prototype accuracy) of ``modality`` with class means of
    the whole training split: how well its features cluster by class."""
    method.eval()
    with torch.no_grad():
        train_batches = list(datamodule.unshuffled_train_dataloader())
        held_out = list(datamodule.val_dataloader()) + list(datamodule.test_dataloader())
        prototypes = _brute_force_prototypes(method, train_batches)[modality]
        fit = [(prototype_logits(torch.cat([method.model.encode(b["inputs"])[modality] for b in bs]), prototypes),
                torch.cat([b["label"] for b in bs])) for bs in (train_batches, held_out)]
    return float(F.cross_entropy(*fit[0])), float((fit[1][0].argmax(1) == fit[1][1]).float().mean())


def test_weak_modality_clusters_better_than_under_joint_training(tmp_path):
    # The same seed, data, batches and optimizer: m0 dominates; PMR pulls m1's features to its prototypes.
    fit = {}
    for method in ("joint", "pmr"):
        trainer, datamodule, module = fit_briefly([*VECTORS, "data.informativeness=[2.0,0.6]", f"method={method}",
                                                   "optimizer=sgd", "method.optimizer.lr=5.0e-2"], epochs=4,
                                                  run_dir=tmp_path / method)
        fit[method] = _train_set_prototype_fit(datamodule, module, "m1")
        if method == "pmr":
            assert int(module.prototype_passes) == 5  # before training and after each of the 4 epochs
            logged = trainer.logged_metrics
            assert float(logged["train/coeff_m0"]) == 0.0 and float(logged["train/coeff_m1"]) == 1.0
            assert float(logged["train/proto_score_m0"]) > float(logged["train/proto_score_m1"])
    assert fit["pmr"][0] < 0.6 * fit["joint"][0], fit  # training-set prototypical CE of m1
    assert fit["pmr"][1] > fit["joint"][1], fit  # held-out nearest-prototype accuracy of m1


def test_logged_quantities_reach_the_results(tmp_path):
    results = train(compose_train([*VECTORS, "method=pmr", "trainer.max_epochs=2", "method.optimizer.lr=5.0e-2"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.25 and 0 <= results["test"]["proto_acc_m1"] <= 1
    columns = set((tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(","))
    assert {f"{stage}/proto_acc_{m}" for stage in ("train", "val", "test") for m in ("m0", "m1")} <= columns
    assert {"train/coeff_m0", "train/coeff_m1", "train/proto_score_m0", "train/proto_score_m1"} <= columns

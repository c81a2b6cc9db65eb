"""QMF: energy confidence, confidence-weighted fusion, the history ranking loss against a literal simulation of
the official pairs, learning, and the history kept on every rank's samples."""

import math

import pytest
import torch
from torch import nn

from balance.methods.qmf import energy_confidence, history_ranking_loss
from balance.run import build
from compose import SYNTHETIC, compose_train, fit_briefly

QMF = [*SYNTHETIC, "method=qmf", "data.num_samples=600", "data.informativeness=[2.0,0.4]"]


def test_energy_confidence_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = [math.log(math.e + math.e ** 2 + math.e ** 3) / 10, math.log(3) / 10]
    assert energy_confidence(logits, 10.0).tolist() == pytest.approx(expected)


def _official_ranking(confidence, history, index):
    """The official pairs, written out: sample k against sample k+1 (cyclically), MarginRankingLoss(margin=0) with
    target -sign(h_k - h_k+1) on conf_k and conf_k+1 + |h_k - h_k+1| / sign (sign 0 counted as 1)."""
    low, high = min(history), max(history)
    normal = [(h - low) / (high - low) for h in history]
    total = 0.0
    for k in range(len(index)):
        i, j = index[k], index[(k + 1) % len(index)]
        t = (normal[i] > normal[j]) - (normal[i] < normal[j])
        second = confidence[(k + 1) % len(index)] + abs(normal[i] - normal[j]) / (t if t != 0 else 1)
        total += max(0.0, -(-t) * (confidence[k] - second))
    return total / len(index)


def test_the_ranking_loss_matches_the_official_pairs():
    generator = torch.Generator().manual_seed(0)
    history = torch.rand(20, generator=generator) * 5
    history[3] = history[7]  # a tie: target 0
    index = torch.tensor([3, 7, 0, 12, 5, 19, 8])
    confidence = torch.randn(7, generator=generator)
    loss = history_ranking_loss(confidence, history, index)
    assert float(loss) == pytest.approx(_official_ranking(confidence.tolist(), history.tolist(), index.tolist()))
    assert float(loss) > 0
    # Only pairs where both samples have the modality count.
    mask = torch.tensor([True, True, False, True, True, True, True])
    masked = history_ranking_loss(confidence, history, index, mask)
    assert float(masked) != pytest.approx(float(loss))


@pytest.mark.parametrize("margin, confidence, expected", [
    ("official", [2.0, 0.5], 0.5),   # both orders of the pair: relu(t (c_0 - c_1) - 1) = relu(1.5 - 1)
    ("official", [1.0, 0.5], 0.0),   # more confident by less than the history difference: no loss
    ("gap", [1.0, 0.5], 1.5),        # both orders: relu(t (c_0 - c_1) + 1) = relu(0.5 + 1)
])
def test_the_ranking_loss_pushes_the_historically_worse_sample_below(margin, confidence, expected):
    history = torch.tensor([4.0, 0.0])  # sample 0 has lost more so far: normalised histories 1 and 0
    confidence = torch.tensor(confidence, requires_grad=True)
    loss = history_ranking_loss(confidence, history, torch.tensor([0, 1]), margin=margin)
    assert float(loss) == pytest.approx(expected)
    if expected:
        loss.backward()
        assert confidence.grad[0] > 0 and confidence.grad[1] < 0  # descent lowers conf_0, raises conf_1


def test_fusion_weighs_each_modality_by_its_detached_confidence():
    _, method = build(compose_train(QMF))
    features = {m: torch.randn(4, method.model.fusion.feature_dims[m], requires_grad=True) for m in method.modalities}
    unimodal = method.model.unimodal_logits(features)
    by_hand = sum(energy_confidence(z, 10.0).unsqueeze(1) * z for z in unimodal.values())
    assert torch.allclose(method.fuse(features), by_hand, atol=1e-6)
    keep = torch.tensor([[True, False]] * 4)
    only_m0 = energy_confidence(unimodal["m0"], 10.0).unsqueeze(1) * unimodal["m0"]
    assert torch.allclose(method.fused_logits(features, keep), only_m0, atol=1e-6)
    # The weights are detached: d(sum z)/d z_m is conf_m, with no term through the confidence itself.
    logits = {m: z.detach().requires_grad_() for m, z in unimodal.items()}
    fused = sum(energy_confidence(z, 10.0).detach().unsqueeze(1) * z for z in logits.values())
    fused.sum().backward()
    for z in logits.values():
        assert torch.allclose(z.grad, energy_confidence(z, 10.0).detach().unsqueeze(1).expand_as(z))


def test_it_learns_and_keeps_every_training_sample_in_the_history(tmp_path):
    trainer, datamodule, method = fit_briefly(QMF, epochs=3, run_dir=tmp_path)
    history = method.loss_history
    assert history.shape == (len(datamodule.datasets["train"]), 2)
    assert bool((history > 0).all())  # every sample's loss was added in every epoch
    metrics = trainer.callback_metrics
    assert float(metrics["train/acc"]) > 0.7
    assert float(metrics["train/confidence_m0"]) > float(metrics["train/confidence_m1"])  # the strong modality


def test_a_head_without_per_modality_classifiers_is_refused():
    with pytest.raises(Exception, match="QMF weighs each modality's own classifier"):
        build(compose_train([*QMF, "model/fusion=concat"]))


@pytest.mark.parametrize("override, match", [("method.temperature=0", "method.temperature must be a number > 0"),
                                             ("method.rank_weight=-1", "method.rank_weight must be a number >= 0")])
def test_bad_options_are_refused(override, match):
    with pytest.raises(Exception, match=match):
        build(compose_train([*QMF, override]))

"""AGM: the Shapley responses and coefficients against hand computation and brute force, the loss and clipping on a
built method, three modalities, the refusals, and the intended direction on data with a dominant modality."""

import itertools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.agm import modulation_coefficients, response_losses, shapley_matrix
from balance.run import build
from compose import compose_train, fit_and_measure_encoders

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=400",
          "data.batch_size=32", "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "callbacks.contributions=null"]
THREE = ["data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.6,0.6]"]


def test_shapley_matrix_is_the_official_two_and_three_modality_formulas():
    # Subsets as bit masks (bit j: modality j present); column 0 is the empty subset.
    # Two (CREMAD_net.py): m_a = (z(a,v) - z(0,v) + z(a,0)) / 2.
    assert shapley_matrix(2).tolist() == [[0, 0.5, -0.5, 0.5], [0, -0.5, 0.5, 0.5]]
    # Three (URFunny_net.py): m_a = (z(avt) - z(vt) + z(a)) / 3 + (z(at) - z(v) + z(av) - z(t)) / 6.
    a, v, t = 1, 2, 4
    expected = torch.zeros(8, dtype=torch.float64)
    for subset, weight in ((a | v | t, 1 / 3), (v | t, -1 / 3), (a, 1 / 3), (a | t, 1 / 6), (v, -1 / 6),
                           (a | v, 1 / 6), (t, -1 / 6)):
        expected[subset] = weight
    assert torch.allclose(shapley_matrix(3)[0], expected)


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_responses_are_shapley_values_plus_an_equal_share_of_the_empty_prediction(num_modalities):
    # Brute force: phi_i = sum over orderings of the marginal gain when i joins, on random subset values.
    values = torch.randn(1 << num_modalities, 5, dtype=torch.float64)
    phi = torch.zeros(num_modalities, 5, dtype=torch.float64)
    orders = list(itertools.permutations(range(num_modalities)))
    for order in orders:
        present = 0
        for i in order:
            phi[i] += (values[present | 1 << i] - values[present]) / len(orders)
            present |= 1 << i
    responses = torch.einsum("ms,sc->mc", shapley_matrix(num_modalities), values)
    assert torch.allclose(responses, phi + values[0] / num_modalities)
    assert torch.allclose(responses.sum(0), values[-1])  # they add up to the full model's logits


def test_scores_are_the_clamped_cross_entropy_of_each_response():
    responses = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]],     # p_y = 3/4, 1/2
                              [[0.0, -100.0], [5.0, 5.0]]])            # p_y < 1e-8 counts as 1e-8, 1/2
    labels = torch.tensor([1, 0])
    losses = response_losses(responses, labels)
    assert losses.tolist() == pytest.approx([-math.log(0.75) - math.log(0.5), -math.log(1e-8) - math.log(0.5)])


def test_coefficients_match_the_official_rule():
    # Two modalities: ratio_a = exp(s_v - s_a), target_a = exp(S_v - S_a), c = exp(alpha min(target - ratio, 10)).
    scores, running = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.2])
    c = modulation_coefficients(scores, running, alpha=0.5, clamp=10.0)
    assert c.tolist() == pytest.approx([math.exp(0.5 * (math.exp(-0.3) - math.exp(1.0))),
                                        math.exp(0.5 * (math.exp(0.3) - math.exp(-1.0)))], rel=1e-6)
    # The cap: a modality far behind its usual standing gets at most exp(alpha * clamp).
    c = modulation_coefficients(torch.tensor([0.0, 9.0]), torch.tensor([3.0, 0.0]), alpha=1.0, clamp=7.0)
    assert c[1].item() == pytest.approx(math.exp(7.0), rel=1e-6)
    # Three (URFunny_main.py): exp((mean - s_i) * 3 / 2) = exp(mean of the others - s_i); no cap.
    scores, running = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([2.0, 2.0, 2.0])
    others = [3.0 - 1.0, 2.5 - 2.0, 1.5 - 4.0]
    c = modulation_coefficients(scores, running, alpha=1.0, clamp=None)
    assert c.tolist() == pytest.approx([math.exp(1 - math.exp(d)) for d in others], rel=1e-6)


def _method(overrides):
    datamodule, method = build(compose_train([*IMAGES, "method=agm", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


def _batch(datamodule):
    return next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize("three", [False, True])
def test_each_encoder_gets_its_coefficient_times_the_joint_gradient(three):
    # Through a concat head dL/df_m = c_m W_m^T g exactly (the other responses' terms in f_m cancel); with zero
    # features for absent modalities nothing else reaches the encoders.
    datamodule, method = _method([*(THREE if three else []), "method.absent=features"])
    batch = _batch(datamodule)
    method.running_scores.copy_(torch.linspace(2.0, 0.5, len(method.modalities)))
    step = method.forward_step(batch, 0)
    step.loss.backward()
    got = {n: p.grad.clone() for n, p in method.named_parameters()}
    method.zero_grad()
    features = method.model.encode(batch["inputs"])
    logits = method.model.fuse(features)
    assert torch.allclose(step.losses["fused"], F.cross_entropy(logits, batch["label"]), atol=1e-6)
    F.cross_entropy(logits, batch["label"]).backward()
    responses = method.responses(step)
    scores = response_losses(responses, step.labels) / len(step.labels)
    c = modulation_coefficients(scores, torch.linspace(2.0, 0.5, len(method.modalities)), method.alpha, method.clamp)
    assert not torch.allclose(c, torch.ones_like(c))
    for name, p in method.named_parameters():
        for i, m in enumerate(method.modalities):
            if name.startswith(f"model.encoders.{m}."):
                assert torch.allclose(got[name], c[i] * p.grad, atol=1e-6), name
    assert torch.allclose(got["model.fusion.linear.bias"], c.mean() * method.model.fusion.linear.bias.grad, atol=1e-6)


def test_zero_input_encoding_is_eval_mode_and_leaves_modes_and_statistics_alone():
    datamodule, method = _method([])
    batch = _batch(datamodule)
    step = method.forward_step(batch, 0)
    bn = method.model.encoders["m0"].blocks[1]
    stats = bn.running_mean.clone()
    absent = method.absent_features(step)
    assert torch.equal(bn.running_mean, stats) and all(mod.training for mod in method.modules())
    method.model.eval()
    with torch.no_grad():
        zeros = method.model.encode({m: torch.zeros_like(x) for m, x in batch["inputs"].items()})
    for m in method.modalities:
        assert absent[m].requires_grad and absent[m].shape == step.features[m].shape
        assert torch.allclose(absent[m].detach(), zeros[m], atol=1e-6), m


def test_running_scores_are_the_cumulative_mean_and_outside_the_window_the_loss_is_joint():
    datamodule, method = _method(["method.modulation_starts=1", "method.modulation_ends=2"])
    loader = iter(datamodule.train_dataloader())
    seen = []
    for i in range(3):
        step = method.forward_step(next(loader), i)  # epoch 0: outside the window
        with torch.no_grad():
            seen.append(response_losses(method.responses(step), step.labels) / len(step.labels))
        assert torch.equal(step.losses["fused"], F.cross_entropy(step.logits, step.labels))
    assert method.score_steps.item() == 3
    assert torch.allclose(method.running_scores, torch.stack(seen).mean(0), atol=1e-6)
    assert method.train_method_metrics["coeff_m0"].update_count == 0
    assert method.train_method_metrics["score_m0"].update_count == 3


def test_gradients_are_clipped_when_a_head_weight_gradient_exceeds_the_threshold():
    for threshold, clipped in ((1e-4, True), (1e6, False)):
        datamodule, method = _method([f"method.clip_threshold={threshold}"])
        step = method.forward_step(_batch(datamodule), 0)
        step.loss.backward()
        before = {n: p.grad.clone() for n, p in method.named_parameters()}
        method.modify_gradients(step)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in method.parameters()]))
        if clipped:
            assert norm.item() == pytest.approx(threshold, rel=1e-3)
        else:
            assert all(torch.equal(p.grad, before[n]) for n, p in method.named_parameters())
        assert method.train_method_metrics["clipped"].compute().item() == float(clipped)


def test_three_modalities_responses_sum_to_the_fused_logits():
    datamodule, method = _method(THREE)
    step = method.forward_step(_batch(datamodule), 0)
    responses = method.responses(step)
    assert responses.shape[0] == 3 and method.shapley.shape == (3, 7)
    assert torch.allclose(responses.sum(0), step.logits, atol=1e-5)
    step.loss.backward()
    assert all(p.grad is not None for p in method.parameters())


@pytest.mark.parametrize("fusion", ["sum", "late_fusion", "film", "gated", "shared"])
def test_every_fusion_head_works(fusion):
    datamodule, method = _method([f"model/fusion={fusion}"])
    step = method.forward_step(_batch(datamodule), 0)
    assert torch.allclose(method.responses(step).sum(0), step.logits, atol=1e-5)
    step.loss.backward()
    method.modify_gradients(step)
    assert all(p.grad is not None for p in method.parameters())


@pytest.mark.parametrize(("override", "match"), [
    ("method.alpha=0", "method.alpha must be a number > 0"),
    ("method.clamp=0", "method.clamp must be a number > 0 or null"),
    ("method.clip_threshold=-1", "method.clip_threshold must be a number > 0 or null"),
    ("method.absent=noise", "method.absent must be one of"),
    ("method.modulation_ends=-1", "ends at an epoch >= its start"),
    ("method.alpha=abc", "method.alpha must be a number"),
    ("data.modalities=[m0]", "needs at least two"),
])
def test_bad_options_are_refused(override, match):
    extra = ["data.informativeness=[2.0]"] if override.startswith("data.") else []
    with pytest.raises(Exception, match=match):
        build(compose_train([*IMAGES, "method=agm", override, *extra]))


def test_dominant_modality_is_slowed_and_the_weak_one_learns_more_than_under_joint_training(tmp_path):
    # The same seed, data, batches and SGD: m0 carries most of the signal, so it is the one AGM slows.
    moved, logged = {}, {}
    for name in ("joint", "agm"):
        moved[name], trainer, _, _ = fit_and_measure_encoders(
            [*IMAGES, f"method={name}", "optimizer=sgd", "method.optimizer.lr=5.0e-2"], epochs=3,
            run_dir=tmp_path / name)
        logged[name] = trainer.logged_metrics
    assert float(logged["agm"]["train/coeff_m0"]) < 1.0 < float(logged["agm"]["train/coeff_m1"])
    assert moved["agm"]["m0"] < 0.9 * moved["joint"]["m0"], moved
    assert moved["agm"]["m1"] > 1.1 * moved["joint"]["m1"], moved

"""OGM-GE: the coefficients against hand computation, the gradient hook, the refusal, and the intended direction."""

import math

import pytest
import pytorch_lightning as pl
import torch

from balance.methods.ogm_ge import confidence_scores, modulation_coefficients
from balance.run import build, train
from compose import compose_train, fit_and_measure_encoders

IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=400",
          "data.batch_size=32", "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "callbacks.contributions=null"]


def test_coefficients_match_the_official_rule():
    # Two modalities: the stronger one gets 1 - tanh(alpha * s_strong / s_weak), the weaker 1.
    k = modulation_coefficients(torch.tensor([30.0, 10.0]), alpha=0.8)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.8 * 3.0), 1.0], rel=1e-5)
    k = modulation_coefficients(torch.tensor([10.0, 40.0]), alpha=0.1)
    assert k.tolist() == pytest.approx([1.0, 1 - math.tanh(0.1 * 4.0)], rel=1e-5)
    # Three: every modality against the weakest of the others.
    k = modulation_coefficients(torch.tensor([30.0, 10.0, 20.0]), alpha=0.8)
    assert k.tolist() == pytest.approx([1 - math.tanh(2.4), 1.0, 1 - math.tanh(1.6)], rel=1e-5)


def test_confidence_scores_sum_the_true_class_probability():
    logits = {"a": torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]), "v": torch.tensor([[1.0, 1.0], [5.0, 5.0]])}
    labels = torch.tensor([1, 0])
    assert confidence_scores(logits, labels).tolist() == pytest.approx([0.75 + 0.5, 0.5 + 0.5])


def _method(overrides):
    datamodule, method = build(compose_train([*IMAGES, "method=ogm_ge", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


def _step_with_gradients(datamodule, method):
    batch = next(iter(datamodule.train_dataloader()))
    step = method.forward_step(batch, 0)
    step.loss.backward()
    return step, {n: p.grad.clone() for n, p in method.named_parameters()}


@pytest.mark.parametrize("ge", [False, True])
def test_hook_scales_the_conv_kernels_of_each_modality(ge):
    datamodule, method = _method([f"method.ge={str(ge).lower()}"])
    step, before = _step_with_gradients(datamodule, method)
    k = modulation_coefficients(confidence_scores(step.unimodal_logits, step.labels), method.alpha)
    state = method.generator.get_state()
    method.modify_gradients(step)
    noise = torch.Generator().set_state(state)
    for name, p in method.named_parameters():
        modality = next((m for m in method.modalities if name.startswith(f"model.encoders.{m}.")), None)
        if modality is None or p.dim() != 4:
            assert torch.equal(p.grad, before[name]), name  # heads, BN, projections: untouched
            continue
        expected = before[name] * k[method.modalities.index(modality)]
        if ge:
            expected = expected + torch.randn(p.shape, generator=noise) * (before[name].std() + 1e-8)
        assert torch.allclose(p.grad, expected, atol=1e-7), name


def test_hook_does_nothing_outside_the_modulation_epochs():
    datamodule, method = _method(["method.modulation_starts=1", "method.modulation_ends=3"])
    step, before = _step_with_gradients(datamodule, method)
    method.modify_gradients(step)  # epoch 0
    assert all(torch.equal(p.grad, before[n]) for n, p in method.named_parameters())


def test_encoders_without_convolutions_are_refused_with_the_fix():
    cfg = compose_train(["data=synthetic", "model=mlp", "method=ogm_ge"])
    with pytest.raises(Exception, match="method.params=weights"):
        build(cfg)
    _, method = build(compose_train(["data=synthetic", "model=mlp", "method=ogm_ge", "method.params=weights"]))
    assert all(len(method.modulated[m]) > 0 for m in method.modalities)


def test_dominant_encoder_learns_less_than_under_joint_training(tmp_path):
    # The same seed, data and batches: OGM (no noise) damps only the dominant modality m0's convolutions.
    moved = {}
    for method in ("joint", "ogm_ge"):
        moved[method], trainer, _, _ = fit_and_measure_encoders(
            [*IMAGES, f"method={method}", "optimizer=sgd", "method.optimizer.lr=5.0e-2",
             *(["method.ge=false", "method.alpha=0.5"] if method == "ogm_ge" else [])],
            epochs=2, run_dir=tmp_path / method, kernels_only=True)
        if method == "ogm_ge":
            logged = trainer.logged_metrics
            assert float(logged["train/coeff_m0"]) < float(logged["train/coeff_m1"]) <= 1.0  # m0 damped more
    assert moved["ogm_ge"]["m0"] < 0.9 * moved["joint"]["m0"], moved


def test_logged_coefficients_reach_the_results(tmp_path):
    results = train(compose_train([*IMAGES, "method=ogm_ge", "trainer.max_epochs=2", "method.optimizer.lr=5.0e-2"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.25
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/coeff_m0", "train/coeff_m1"} <= set(metrics)

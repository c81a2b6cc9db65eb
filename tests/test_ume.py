"""UME: each modality's model trained on its own loss, the prediction their mean."""

import pytest
import torch
from torch.nn import functional as F

from balance.run import build
from compose import SYNTHETIC, compose_train, fit_briefly

DATA = [*SYNTHETIC, "data.num_samples=600", "data.informativeness=[2.0,0.4]"]


def test_the_loss_is_each_classifier_on_its_own_and_the_prediction_their_mean():
    _, method = build(compose_train([*DATA, "method=ume"]))
    batch = {"inputs": {m: torch.randn(6, 16) for m in ("m0", "m1")}, "label": torch.arange(6) % 3,
             "index": torch.arange(6)}
    step = method.forward_step(batch, 0)
    for m in ("m0", "m1"):
        assert float(step.losses[f"unimodal_{m}"]) == pytest.approx(
            float(F.cross_entropy(step.unimodal_logits[m], batch["label"])))
    assert set(step.losses) == {"unimodal_m0", "unimodal_m1"}
    assert torch.allclose(step.logits, (step.unimodal_logits["m0"] + step.unimodal_logits["m1"]) / 2)


def test_members_learn_independently(tmp_path):
    """Training the ensemble gives each member exactly what training it alone on the same batches gives: its
    encoder and classifier receive only its own loss's gradient."""
    _, method = build(compose_train([*DATA, "method=ume"]))
    batch = {"inputs": {m: torch.randn(8, 16) for m in ("m0", "m1")}, "label": torch.arange(8) % 3,
             "index": torch.arange(8)}
    step = method.forward_step(batch, 0)
    step.loss.backward()
    together = {n: p.grad.clone() for n, p in method.named_parameters()}
    method.zero_grad()
    step = method.forward_step(batch, 0)
    step.losses["unimodal_m1"].backward()
    alone = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    assert alone and all(n.startswith(("model.encoders.m1.", "model.fusion.heads.m1.")) for n in alone)
    assert all(torch.allclose(together[n], alone[n]) for n in alone)


def test_it_learns_above_the_weak_member(tmp_path):
    trainer, _, _ = fit_briefly([*DATA, "method=ume"], epochs=4, run_dir=tmp_path)
    metrics = trainer.callback_metrics
    assert float(metrics["train/acc"]) > 0.7
    assert float(metrics["train/acc"]) > float(metrics["train/acc_m1"])


def test_a_head_without_a_classifier_per_modality_is_refused():
    with pytest.raises(Exception, match="UME trains a classifier per modality"):
        build(compose_train([*DATA, "method=ume", "model/fusion=concat"]))

"""AMCo: the mask ratio, the class mask, the softmax shares and the fused logits by hand; a training step's masks,
losses and flags by hand; learning with two and three modalities; both schedules; the dominant modality masked and
its encoder held back against joint training; option refusals."""

import math

import pytest
import torch
from torch.nn import functional as F

from balance.methods.amco import class_mask, mask_ratio, softmax_shares
from balance.run import build
from compose import SYNTHETIC, compose_train, fit_and_measure_encoders, fit_briefly

DOMINANT = ["data.num_samples=600", "data.informativeness=[2.0,0.4]"]
AMCO = [*SYNTHETIC, "method=amco", *DOMINANT]
EPOCHS = 4


@pytest.mark.parametrize("level, expected", [(0.0, 0.0), (0.1, 0.5), (0.15, math.sin(math.pi / 4)), (0.3, 1.0),
                                             (0.9, 1.0), (-1.0, 0.0)])
def test_mask_ratio_by_hand(level, expected):
    assert mask_ratio(level, 0.3) == pytest.approx(expected)


@pytest.mark.parametrize("ratio, zeros", [(0.0, 0), (0.1, 0), (0.5, 3), (math.sin(math.pi / 3), 5), (1.0, 6)])
def test_the_class_mask_zeroes_floor_ratio_times_c_classes(ratio, zeros):
    mask = class_mask(6, ratio, torch.Generator().manual_seed(0))
    assert mask.shape == (6,) and set(mask.tolist()) <= {0.0, 1.0}
    assert int((mask == 0).sum()) == zeros


def test_the_class_mask_is_drawn_from_the_generator():
    generator = torch.Generator().manual_seed(3)
    draws = [class_mask(10, 0.5, generator) for _ in range(8)]
    again = torch.Generator().manual_seed(3)
    assert all(torch.equal(d, class_mask(10, 0.5, again)) for d in draws)  # reproducible
    assert len({tuple(d.tolist()) for d in draws}) > 1  # and not the same classes every step


def test_softmax_shares_by_hand():
    z0 = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    z1 = torch.tensor([[0.0, 0.0], [1.0, 3.0], [5.0, 5.0]])
    total, count = softmax_shares({"a": z0, "b": z1})
    first = (math.e ** 2 + 1) / (math.e ** 2 + 3)
    second = 2 / (2 + math.e + math.e ** 3)
    third = 2 * math.e / (2 * math.e + 2 * math.e ** 5)
    assert float(count) == 3
    assert total.tolist() == pytest.approx([first + second + third, 3 - first - second - third])
    # A sample with one modality present is not counted; a missing block leaves its sample's softmax.
    present = torch.tensor([[True, True], [True, False], [True, True]])
    total, count = softmax_shares({"a": z0, "b": z1}, present)
    assert float(count) == 2
    assert total.tolist() == pytest.approx([first + third, 2 - first - third])


def _features(method, batch_size=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch_size, method.model.fusion.feature_dims[m], generator=generator)
            for m in method.modalities}


def test_the_fused_logits_are_the_class_layer_on_the_summed_modality_logits():
    _, method = build(compose_train([*AMCO, "method.init=default"]))
    features = _features(method)
    unimodal = method.model.unimodal_logits(features)
    layer = method.class_layer
    by_hand = (unimodal["m0"] + unimodal["m1"]) @ layer.weight.T + layer.bias
    assert torch.allclose(method.fused_logits(features), by_hand, atol=1e-6)
    # The concat head's modality logits sum to its own output; a dropped modality gives its zeroed features'.
    keep = torch.tensor([[True, False]] * 5)
    assert torch.allclose(method.fused_logits(features, keep), layer(method.model.fuse(features, keep)), atol=1e-6)
    # The identity start: the fused prediction begins as the head's own.
    _, method = build(compose_train(AMCO))
    features = _features(method)
    assert torch.allclose(method.fused_logits(features), method.model.fuse(features), atol=1e-6)


def _batch(method, batch_size=6, present=None):
    generator = torch.Generator().manual_seed(1)
    batch = {"inputs": {m: torch.randn(batch_size, 16, generator=generator) for m in method.modalities},
             "label": torch.randint(0, 4, (batch_size,), generator=generator),
             "index": torch.arange(batch_size)}
    if present is not None:
        batch["present"] = present
    return batch


def test_a_training_step_masks_the_flagged_modality_by_hand():
    _, method = build(compose_train(AMCO))
    method.dependent.copy_(torch.tensor([True, False]))
    method.level = lambda batch_idx: 0.1  # p_t = sin(pi/6) = 0.5: floor(0.5 * 4) = 2 classes
    batch = _batch(method)
    step = method.forward_step(batch, 0)
    plain = step.unimodal_logits
    zeroed = (step.masked_logits["m0"] == 0).all(0)
    assert int(zeroed.sum()) == 2  # the same two classes for every sample
    mask = (~zeroed).float()
    assert torch.equal(step.masked_logits["m0"], plain["m0"] * mask)
    assert torch.equal(step.masked_logits["m1"], plain["m1"]) and step.masked == ("m0",)
    assert torch.allclose(step.logits, method.class_layer(plain["m0"] * mask + plain["m1"]), atol=1e-6)
    labels = batch["label"]
    assert float(step.losses["fused"]) == pytest.approx(float(F.cross_entropy(step.logits, labels)))
    unimodal = F.cross_entropy(plain["m0"] * mask, labels) + F.cross_entropy(plain["m1"], labels)
    assert float(step.losses["unimodal"]) == pytest.approx(float(unimodal))
    # The shares of what the fusion saw flag the next step's masks.
    method.observe_step(step)
    total, count = softmax_shares(step.masked_logits)
    assert method.dependent.tolist() == (total / count > 0.5).tolist()


def test_a_full_mask_and_missing_modalities_by_hand():
    _, method = build(compose_train([*AMCO, "method.unimodal_logits=plain"]))
    method.dependent.copy_(torch.tensor([True, False]))
    method.level = lambda batch_idx: 1.0  # p_t = 1: every class of m0
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True], [True, True], [True, True]])
    batch = _batch(method, present=present)
    step = method.forward_step(batch, 0)
    assert bool((step.masked_logits["m0"] == 0).all())
    dropped = method.model.unimodal_logits({m: f * present[:, i:i + 1] for i, (m, f) in
                                            enumerate(method.model.encode(batch["inputs"]).items())})
    assert torch.allclose(step.logits, method.class_layer(dropped["m1"]), atol=1e-6)
    # unimodal_logits=plain: each modality's CE on its unmasked logits, over the samples that have it.
    labels, expected = batch["label"], 0.0
    for i, m in enumerate(method.modalities):
        losses = F.cross_entropy(step.unimodal_logits[m], labels, reduction="none")
        expected += float(losses[present[:, i]].mean())
    assert float(step.losses["unimodal"]) == pytest.approx(expected)


def test_outside_the_window_the_loss_is_the_fused_cross_entropy_alone():
    _, method = build(compose_train([*AMCO, "method.modulation_starts=1"]))
    method.dependent.copy_(torch.tensor([True, False]))
    step = method.forward_step(_batch(method), 3)  # epoch 0, before the window
    assert set(step.losses) == {"fused"} and step.masked == ()


@pytest.fixture(scope="module")
def amco_run():
    return fit_and_measure_encoders(AMCO, epochs=EPOCHS)


def test_it_learns_masks_the_dominant_modality_and_logs_it(amco_run):
    _, trainer, datamodule, method = amco_run
    metrics = trainer.callback_metrics
    assert float(metrics["train/acc_m0"]) > 0.8
    assert float(metrics["train/share_m0"]) > 0.5 > float(metrics["train/share_m1"])
    assert float(metrics["train/masked_m0"]) > 0.5 and float(metrics["train/masked_m1"]) == 0.0
    # port schedule in the last epoch: l_t = k * 3 / 10, so p_t = 0 at batch 0 and 1 from batch 1 on.
    batches = len(datamodule.train_dataloader())
    assert float(metrics["train/mask_ratio"]) == pytest.approx((batches - 1) / batches)
    accuracy = sum(int((method.fused_logits(method.model.encode(b["inputs"])).argmax(1) == b["label"]).sum())
                   for b in datamodule.val_dataloader()) / len(datamodule.datasets["val"])
    assert accuracy > 0.8


def test_the_dominant_encoder_is_held_back_and_the_weak_one_moves_more_than_under_joint(amco_run):
    """Measured over data seeds 0-4 (4 epochs): the m0 encoder moves 0.69-0.74x as far as under joint, the m1
    encoder 1.03-1.16x as far, and m1's training accuracy is higher in all five (AMCo's unimodal CEs and the masked
    m0 both push m1). Against joint training with unimodal CEs the m1 encoder moves further by 1-8 %, too little
    to assert."""
    moved, trainer, _, _ = amco_run
    joint_moved, joint, _, _ = fit_and_measure_encoders([*SYNTHETIC, "method=joint", *DOMINANT], epochs=EPOCHS)
    assert moved["m0"] < 0.8 * joint_moved["m0"]
    assert moved["m1"] > joint_moved["m1"]
    assert float(trainer.callback_metrics["train/acc_m1"]) > float(joint.callback_metrics["train/acc_m1"])


def test_three_modalities_and_the_progress_schedule(tmp_path):
    trainer, _, method = fit_briefly([*SYNTHETIC, "method=amco", "method.schedule=progress",
                                      "data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.4,0.4]",
                                      "data.num_samples=600"], epochs=EPOCHS, run_dir=tmp_path)
    metrics = trainer.callback_metrics
    assert float(metrics["train/acc"]) > 0.7
    # progress: the last epoch is past eps = 0.3 of the run, so every step has the full ratio.
    assert float(metrics["train/mask_ratio"]) == pytest.approx(1.0)
    assert {f"train/share_{m}" for m in method.modalities} <= set(metrics)


def test_the_class_layer_is_trained():
    _, method = build(compose_train(AMCO))
    grouped = {id(p) for group in method.parameter_groups() for p in group["params"]}
    assert {id(p) for p in method.class_layer.parameters()} <= grouped


@pytest.mark.parametrize("override, match", [
    ("method.sigma=0", r"method.sigma must be a number in \(0, 1\)"),
    ("method.sigma=1.0", r"method.sigma must be a number in \(0, 1\)"),
    ("method.eps=0", "method.eps must be a number > 0"),
    ("method.schedule=epoch", "method.schedule must be one of"),
    ("method.unimodal_logits=both", "method.unimodal_logits must be one of"),
    ("method.init=xavier", "method.init must be one of"),
    ("model/fusion=film", "AMCo sums each modality's own logits"),
    ("method.modulation_ends=-1", "an epoch window ends at an epoch >= its start"),
])
def test_bad_options_are_refused(override, match):
    with pytest.raises(Exception, match=match):
        build(compose_train([*AMCO, override]))


def test_one_modality_is_refused():
    with pytest.raises(Exception, match="AMCo .* needs at least two modalities"):
        build(compose_train([*SYNTHETIC, "method=amco", "data.modalities=[m0]", "data.informativeness=[2.0]"]))

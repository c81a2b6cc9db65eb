"""CGGM: the coefficients and the direction loss against hand computation (M = 2 and 3), the step against the
official order (accuracies before the classifiers' update, the previous step's accuracies, the one-step-late
weight term), the gradient hook and the clipping, where each loss reaches, the fusion heads' output weights, the
refusals, and the intended direction on data with a dominant modality."""

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from balance.methods.cggm import CGGM, balance_coefficients, direction_loss
from balance.models import MultimodalModel
from balance.models.fusion import FusionHead, GatedFusion
from balance.run import build, train
from compose import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = ["data=synthetic", "model=mlp", "data.num_samples=400", "data.batch_size=32",
            "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "callbacks.contributions=null", "method=cggm"]
THREE = ["data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.6,0.3]"]
EPS = 1e-8


def _method(overrides=()):
    datamodule, method = build(compose_train([*FEATURES, *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # world size 1, no accumulation
    return datamodule, method


def _batches(datamodule, count):
    loader = iter(datamodule.train_dataloader())
    return [next(loader) for _ in range(count)]


def _official_coefficients(gains):
    """The official loop's arithmetic in Python floats: diff_sum = sum(diff) + 1e-8; (diff_sum - d) / diff_sum."""
    total = sum(gains) + EPS
    return [(total - d) / total for d in gains]


def _accuracies(method, step):
    with torch.no_grad():
        return [float((method.classifiers[m](step.features[m]).argmax(1) == step.labels).double().mean())
                for m in method.modalities]


def test_coefficients_by_hand():
    # Two modalities: B_1 = d_2 / (d_1 + d_2).
    assert balance_coefficients(torch.tensor([0.1, 0.3], dtype=torch.float64)).tolist() == \
        pytest.approx([0.75, 0.25], rel=1e-6)
    # Three: B_m = (S - d_m) / S, S = 0.2; the one that fell gets more than 1.
    assert balance_coefficients(torch.tensor([0.1, 0.2, -0.1], dtype=torch.float64)).tolist() == \
        pytest.approx([0.5, 0.0, 1.5], abs=1e-6)
    # No change at all: every coefficient is 1 (eps / eps).
    assert balance_coefficients(torch.zeros(3, dtype=torch.float64)).tolist() == [1.0, 1.0, 1.0]
    # Changes that cancel: the official division by eps, B ~ -+ d / eps; max_coefficient bounds it.
    cancel = torch.tensor([0.05, -0.05], dtype=torch.float64)
    assert balance_coefficients(cancel).tolist() == pytest.approx([1 - 0.05 / EPS, 1 + 0.05 / EPS], rel=1e-9)
    assert balance_coefficients(cancel, max_coefficient=10.0).tolist() == [-10.0, 10.0]
    # A saturated classifier (no change) gets 1 and the others about 0.
    assert balance_coefficients(torch.tensor([0.0, 0.03], dtype=torch.float64)).tolist() == \
        pytest.approx([1.0, 0.0], abs=1e-6)


def test_direction_loss_by_hand():
    # L_gm = (sum |B| - sum B cos) / M.
    value = direction_loss(torch.tensor([0.5, -1.0, 1.5]), torch.tensor([0.2, -0.3, 0.4]))
    assert float(value) == pytest.approx((3.0 - (0.1 + 0.3 + 0.6)) / 3)
    value = direction_loss(torch.tensor([0.75, 0.25]), torch.tensor([1.0, -1.0]))
    assert float(value) == pytest.approx((1.0 - 0.5) / 2)


@pytest.mark.parametrize("overrides", [[], THREE], ids=["two", "three"])
def test_coefficients_follow_the_previous_steps_accuracies(overrides):
    # Three steps by hand: each step's classifier accuracies (before any update) against the previous step's
    # (0 before the first, as the official acc1 = [0] * M); the state is in buffers (so in checkpoints).
    datamodule, method = _method(overrides)
    previous = [0.0] * len(method.modalities)
    for batch in _batches(datamodule, 3):
        step = method.forward_step(batch, 0)
        accuracy = _accuracies(method, step)
        expected = _official_coefficients([a - p for a, p in zip(accuracy, previous)])
        assert method._coefficients.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert method.previous_coefficients.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert (method.previous_correct.double() / method.previous_total).tolist() == pytest.approx(accuracy)
        previous = accuracy
        with torch.no_grad():  # the classifiers change between steps, as after their update
            for m in method.modalities:
                method.classifier_weight(m).add_(0.3 * torch.randn_like(method.classifier_weight(m)))
    state = method.state_dict()
    assert {"previous_correct", "previous_total", "previous_coefficients", "has_previous"} <= set(state)


def test_gradient_direction_term_by_hand():
    # Concat head: the fused CE's gradient on the block of m is (softmax(z) - onehot)^T f_m / B; the term's value
    # is L_gm from these and the classifiers' gradients, and its gradient (lamda L_gm's) reaches the fusion head.
    datamodule, method = _method(["method.lamda=0.5"])
    step = method.forward_step(_batches(datamodule, 1)[0], 0)
    features = {m: f.detach() for m, f in step.features.items()}
    weight = method.model.fusion.linear.weight.detach().clone().requires_grad_()
    bias = method.model.fusion.linear.bias.detach()
    logits = torch.cat([features[m] for m in method.modalities], 1) @ weight.T + bias
    error = (F.softmax(logits, 1) - F.one_hot(step.labels, logits.shape[1])) / len(step.labels)
    blocks = torch.split(error.T @ torch.cat([features[m] for m in method.modalities], 1),
                         [features[m].shape[1] for m in method.modalities], dim=1)
    cosines = []
    for m, fusion_grad in zip(method.modalities, blocks):
        hidden = method.classifiers[m][:-1](features[m])
        out = method.classifiers[m][-1]
        error_m = (F.softmax(hidden @ out.weight.T + out.bias, 1) - F.one_hot(step.labels, logits.shape[1])) / len(
            step.labels)
        cosines.append(F.cosine_similarity((error_m.T @ hidden).detach().flatten(), fusion_grad.flatten(), dim=0))
    expected = 0.5 * direction_loss(method._coefficients, torch.stack(cosines))
    assert float(method.train_method_metrics["direction_loss"].compute()) == pytest.approx(float(expected) / 0.5,
                                                                                              rel=1e-4)
    (want,) = torch.autograd.grad(expected, weight)
    got = torch.autograd.grad(step.losses["direction"], method.model.fusion.linear.weight, retain_graph=True)[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-8)
    assert float(step.losses["direction"]) == 0.0  # its value is logged apart (train/direction_loss)


@pytest.mark.parametrize("direction", ["gradients", "weights"])
def test_direction_term_reaches_the_fusion_head_only(direction):
    datamodule, method = _method([f"method.direction={direction}"])
    for batch in _batches(datamodule, 2):  # the weights term exists from the second step on
        step = method.forward_step(batch, 0)
    named = dict(method.named_parameters())
    grads = torch.autograd.grad(step.losses["direction"], list(named.values()), allow_unused=True)
    reached = {n for n, g in zip(named, grads) if g is not None and bool(g.any())}
    head = {"model.fusion.linear.weight"} | ({"model.fusion.linear.bias"} if direction == "gradients" else set())
    assert reached == head


def test_weight_direction_term_is_the_previous_steps_as_official():
    # The official term is built after the backward of step t from clones of the fusion and classifier weights
    # (both before their updates) and the coefficients of step t, and backpropagated at step t + 1: its gradient
    # on the fusion weight is that of -(lamda / M) sum_m B_m(t) cos(w_m(t), W_m) at W = W(t), the stale weight.
    datamodule, method = _method(["method.direction=weights", "method.lamda=0.5"])
    first, second = _batches(datamodule, 2)
    step = method.forward_step(first, 0)
    assert "direction" not in step.losses  # no term at the first step (official l_gm is None)
    fusion = method.model.fusion.linear.weight
    stale = fusion.detach().clone()
    classifiers = [method.classifier_weight(m).detach().clone() for m in method.modalities]
    coefficients = method._coefficients.clone()
    with torch.no_grad():  # the optimizer steps of step t
        fusion.add_(0.1 * torch.randn_like(fusion))
        for m in method.modalities:
            method.classifier_weight(m).add_(0.1 * torch.randn_like(method.classifier_weight(m)))
    step = method.forward_step(second, 0)
    leaf = stale.clone().requires_grad_()
    blocks = torch.split(leaf, [method.model.fusion.feature_dims[m] for m in method.modalities], dim=1)
    cosines = torch.stack([F.cosine_similarity(c.flatten(), b.flatten(), dim=0) for c, b in zip(classifiers, blocks)])
    expected = 0.5 * direction_loss(coefficients, cosines)
    (want,) = torch.autograd.grad(expected, leaf)
    (got,) = torch.autograd.grad(step.losses["direction"], fusion)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9)
    assert float(method.train_method_metrics["direction_loss"].compute()) == pytest.approx(float(expected) / 0.5,
                                                                                              rel=1e-5)


def test_classifiers_never_reach_the_encoders_and_have_their_own_group():
    datamodule, method = _method(["model.feature_dim=24"])  # with projections
    step = method.forward_step(_batches(datamodule, 1)[0], 0)
    named = dict(method.named_parameters())
    grads = torch.autograd.grad(step.losses["classifiers"], list(named.values()), allow_unused=True)
    reached = {n for n, g in zip(named, grads) if g is not None and bool(g.any())}
    assert reached and all(n.startswith("classifiers.") for n in reached)
    optimizer = method.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    model_group, classifier_group = optimizer.param_groups
    assert {id(p) for p in classifier_group["params"]} == {id(p) for p in method.classifiers.parameters()}
    assert classifier_group["lr"] == 5e-4 and classifier_group["weight_decay"] == 3e-3
    assert model_group["lr"] == 1e-3 and len(model_group["params"]) == len(list(method.model.parameters()))
    # The classifiers' output layers have the shape of the concat head's block of their modality.
    for m in method.modalities:
        assert method.classifier_weight(m).shape == method.fusion_weight(m).shape == (4, 24)


def test_hook_scales_exactly_the_encoders_then_clips_the_model():
    datamodule, method = _method(["model.feature_dim=24", "method.clip=null"])
    step = method.forward_step(_batches(datamodule, 1)[0], 0)
    step.loss.backward()
    before = {n: p.grad.clone() for n, p in method.named_parameters()}
    coefficients = method._coefficients.clone()
    method.modify_gradients(step)
    for n, p in method.named_parameters():
        modality = next((m for m in method.modalities if n.startswith(f"model.encoders.{m}.")), None)
        if modality is None:  # projections, fusion head, classifiers: untouched
            assert torch.equal(p.grad, before[n]), n
        else:
            k = float(coefficients[method.modalities.index(modality)]) * 1.3
            assert torch.allclose(p.grad, before[n] * k, rtol=1e-6, atol=0), n
    assert method._coefficients is None  # consumed: a step's coefficients never outlive it

    # With clip: the model's gradients are clipped to norm 0.8 after the scaling, the classifiers' are not.
    datamodule, method = _method(["model.feature_dim=24", "method.clip=0.8", "method.rho=1000"])
    step = method.forward_step(_batches(datamodule, 1)[0], 0)
    step.loss.backward()
    classifier_grads = [p.grad.clone() for p in method.classifiers.parameters()]
    method.modify_gradients(step)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in method.model.parameters()]))
    assert float(norm) == pytest.approx(0.8, rel=1e-4)
    assert all(torch.equal(p.grad, g) for p, g in zip(method.classifiers.parameters(), classifier_grads))


class _NoOutputLayer(FusionHead):
    def __init__(self, feature_dims, num_classes):
        super().__init__(feature_dims, num_classes)
        self.bilinear = nn.Bilinear(*feature_dims.values(), num_classes)

    def forward(self, features):
        return self.bilinear(*features.values())


@pytest.mark.parametrize("fusion", ["sum", "late_fusion", "shared", "gated", "film"])
def test_every_fusion_head_gives_an_output_block(fusion):
    overrides = [f"model/fusion={fusion}"] + (["model.feature_dim=32"] if fusion == "shared" else [])
    datamodule, method = _method(overrides)
    fusion_head = method.model.fusion
    expected = {"sum": lambda m: fusion_head.heads[m].weight, "late_fusion": lambda m: fusion_head.heads[m].weight,
                "shared": lambda m: fusion_head.linear.weight, "gated": lambda m: fusion_head.out.weight,
                "film": lambda m: fusion_head.out.weight}[fusion]
    for m in method.modalities:
        assert torch.equal(method.fusion_weight(m), expected(m))
        assert method.classifier_weight(m).shape == expected(m).shape
    step = method.forward_step(_batches(datamodule, 1)[0], 0)
    step.loss.backward()
    assert all(p.grad is not None for p in method.classifiers.parameters())


def test_refusals():
    _, method = _method()
    model = method.model
    with pytest.raises(ValueError, match="rho must be"):
        CGGM(model=model, optimizer=torch.optim.AdamW, rho=0.0)
    with pytest.raises(ValueError, match="direction must be one of"):
        CGGM(model=model, optimizer=torch.optim.AdamW, direction="both")
    gated = MultimodalModel(dict(model.encoders), lambda **kwargs: GatedFusion(hidden_dim=8, **kwargs), 4)
    with pytest.raises(ValueError, match="classifier_layers >= 1"):  # an 8-wide block, 32-wide features
        CGGM(model=gated, optimizer=torch.optim.AdamW, classifier_layers=0)
    CGGM(model=model, optimizer=torch.optim.AdamW, classifier_layers=0)  # concat: the block is the feature size
    odd = MultimodalModel(dict(model.encoders), _NoOutputLayer, 4)
    with pytest.raises(ValueError, match="method.lamda=0"):
        CGGM(model=odd, optimizer=torch.optim.AdamW)
    CGGM(model=odd, optimizer=torch.optim.AdamW, lamda=0.0)  # without the direction loss it needs no output layer
    shared = MultimodalModel({"m0": model.encoders["m0"], "m1": model.encoders["m0"]}, model.fusion.__class__, 4)
    with pytest.raises(ValueError, match="share a parameter"):
        CGGM(model=shared, optimizer=torch.optim.AdamW)


def test_classifiers_learn_and_metrics_are_logged(tmp_path):
    results = train(compose_train([*FEATURES, "trainer.max_epochs=4"], run_dir=tmp_path))
    assert results["test"]["acc"] > 0.5
    lines = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    names = {f"{stage}/cls_acc_{m}" for stage in ("train", "val") for m in ("m0", "m1")}
    names |= {f"train/{k}_{m}" for k in ("coeff", "cos") for m in ("m0", "m1")} | {"train/direction_loss"}
    assert names <= set(header)
    column = header.index("val/cls_acc_m0")
    values = [float(row.split(",")[column]) for row in lines[1:] if row.split(",")[column]]
    assert values[0] < 0.4 and values[-1] > 0.6, values  # the dominant modality's classifier learns (chance 0.25)


class _Coefficients(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # before the method's hook consumes them
        self.seen.append(pl_module._coefficients.clone())


def test_dominant_modality_gets_the_smaller_coefficient_while_it_learns_faster():
    # m0 dominates. While its classifier's accuracy climbs faster than m1's, B_m0 = d_m1 / (d_m0 + d_m1) is the
    # smaller one. Batch-accuracy changes are noisy, and where they cancel B reaches ~1e7, so the statistic is
    # the share of steps and the median over three seeds (large batches, the learning phase: two epochs).
    seen = []
    for seed in range(3):
        pl.seed_everything(seed)
        datamodule, method = build(compose_train([*FEATURES, "data.num_samples=8000", "data.batch_size=1000",
                                                  "data.informativeness=[1.0,0.2]", "method.classifier_lr=5.0e-3",
                                                  f"seed={seed}"]))
        recorder = _Coefficients()
        trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[recorder])
        trainer.fit(method, datamodule=datamodule)
        seen += recorder.seen
    coefficients = torch.stack(seen)
    assert float((coefficients[:, 0] < coefficients[:, 1]).float().mean()) > 0.65
    median = coefficients.median(0).values
    assert float(median[0]) < 0.4 < 0.6 < float(median[1]), median

"""MLA: the projector update, entropy fusion, alternating steps, HGM on/off, M = 3, resume."""

import pytest
import pytorch_lightning as pl
import torch

from balance.methods.mla import batch_entropy_weights, entropy_weights, update_projector
from balance.methods.step import Step
from balance.run import build, train
from compose import SYNTHETIC, compose_train, train_interrupted_and_resumed


def test_projector_two_steps_by_hand():
    # Step 1: r = [1, 0], alpha = 0.1: k = [1, 0], r k = 1, P = I - diag(1, 0) / 1.1 = diag(1/11, 1),
    # then / ||P||_F = sqrt(1/121 + 1): diag(0.090536, 0.995893).
    P = update_projector(torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64), 0.1)
    assert torch.allclose(P, torch.tensor([[0.090536, 0.0], [0.0, 0.995893]], dtype=torch.float64), atol=1e-6)
    # Step 2: r = [1, 1], alpha = 0.01: k = [a, b], r k = a + b = 1.086429,
    # P - k k^T / 1.096429 = [[0.083060, -0.082234], [-0.082234, 0.091327]], Frobenius norm 0.169602.
    P = update_projector(P, torch.tensor([[1.0, 1.0]], dtype=torch.float64), 0.01)
    expected = torch.tensor([[0.48973, -0.48486], [-0.48486, 0.53848]], dtype=torch.float64)
    assert torch.allclose(P, expected, atol=1e-4)


def test_projector_uses_the_batch_mean_and_protects_its_direction():
    torch.manual_seed(0)
    features = torch.randn(32, 6) + 2.0
    r = features.mean(0, keepdim=True)
    P0 = torch.eye(6)
    P1 = update_projector(P0, features, alpha=0.01, normalize=False)
    assert torch.allclose(P1, update_projector(P0, r, alpha=0.01, normalize=False))
    assert (P1 @ r.T).norm() < 0.01 * (P0 @ r.T).norm()
    # Directions orthogonal to r are left as they were.
    orthogonal = torch.linalg.svd(r).Vh[1:]
    assert torch.allclose(P1 @ orthogonal.T, orthogonal.T, atol=1e-5)


def test_entropy_weights():
    confident = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    unsure = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    weights = entropy_weights([confident, unsure])
    assert torch.allclose(weights.sum(1), torch.ones(2))
    assert weights[0, 0] > weights[0, 1]  # lower entropy, larger weight
    assert torch.allclose(weights[1], torch.tensor([0.5, 0.5]))  # equal entropies
    # By hand for row 0: lambda = softmax(max e - e).
    e = torch.stack([-(z.softmax(0) * z.log_softmax(0)).sum() for z in (confident[0], unsure[0])])
    assert torch.allclose(weights[0], torch.softmax(e.max() - e, 0))


def test_batch_entropy_weights_are_one_per_batch():
    torch.manual_seed(0)
    a, b = torch.randn(5, 4) * 3, torch.randn(5, 4)
    weights = batch_entropy_weights([a, b])
    e = torch.stack([-(z.softmax(0) * z.log_softmax(0)).sum() for z in (a, b)])
    assert weights.shape == (2,) and torch.allclose(weights, torch.softmax(e.max() - e, 0))


def _method(overrides=(), modalities=("m0", "m1")):
    names = ",".join(modalities)
    scales = ",".join(["1.0"] * len(modalities))
    cfg = compose_train([*SYNTHETIC, "method=mla", f"data.modalities=[{names}]", f"data.informativeness=[{scales}]",
                         *overrides])
    return cfg, *build(cfg)


def test_requires_shared_head():
    cfg = compose_train([*SYNTHETIC, "method=mla", "model/fusion=concat"])
    with pytest.raises(Exception, match="shared head"):
        build(cfg)


class _StepRecorder(pl.Callback):
    """Which parameters each optimizer step of the first batch changed."""

    def __init__(self):
        self.snapshots, self.changed = [], []

    def _snapshot(self, module):
        return {n: p.detach().clone() for n, p in module.model.named_parameters()}

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.snapshots.append(self._snapshot(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        states = [*self.snapshots, self._snapshot(module)]
        for before, after in zip(states[:-1], states[1:]):
            self.changed.append({n.split(".")[1] for n in before if not torch.equal(before[n], after[n])})


@pytest.mark.parametrize("modalities", [("m0", "m1"), ("m0", "m1", "m2")])
def test_one_step_per_modality_changes_its_encoder_and_the_head(modalities):
    cfg, datamodule, method = _method(["method.optimizer._target_=torch.optim.SGD", "method.optimizer.lr=0.1",
                                       "method.optimizer.weight_decay=0.0"], modalities)
    recorder = _StepRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_steps=len(modalities), limit_val_batches=0, logger=False,
                         callbacks=[recorder], enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(method, datamodule=datamodule)
    assert trainer.global_step == len(modalities)  # one optimizer step per modality, one batch
    # Parameter names look like encoders.<modality>... and fusion.linear...
    assert recorder.changed == [{m, "linear"} for m in modalities]


def _unimodal_step(features, batch_idx):
    """The step object of modality m0's unimodal step on ``features`` (all the gradient hook reads)."""
    return Step({}, batch_idx, {"m0": features}, None, {}, modality="m0")


def test_hgm_modifies_head_gradient_with_projector():
    cfg, datamodule, method = _method()
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # world_size; batch_idx 0 gives alpha = 0.1
    weight = method.model.fusion.linear.weight
    torch.manual_seed(0)
    features = torch.randn(8, weight.shape[1])
    weight.grad = torch.randn_like(weight)
    method.hgm_steps.fill_(1)  # the very first step is skipped, as in the official code
    before, grad = method.projector.clone(), weight.grad.clone()
    method.modify_gradients(_unimodal_step(features, batch_idx=0))
    expected_P = update_projector(before, features, alpha=0.1)
    assert torch.allclose(method.projector, expected_P)
    assert torch.allclose(weight.grad, grad @ expected_P.T)


def test_first_step_leaves_gradient_alone():
    cfg, datamodule, method = _method()
    weight = method.model.fusion.linear.weight
    weight.grad = torch.randn_like(weight)
    grad = weight.grad.clone()
    method.modify_gradients(_unimodal_step(torch.randn(4, weight.shape[1]), batch_idx=0))
    assert torch.equal(weight.grad, grad) and torch.equal(method.projector, torch.eye(weight.shape[1]))


@pytest.mark.parametrize("modalities", [("m0", "m1"), ("m0", "m1", "m2")])
def test_mla_learns(tmp_path, modalities):
    names = ",".join(modalities)
    scales = ",".join(["0.6"] * len(modalities))
    cfg = compose_train([*SYNTHETIC, "method=mla", f"data.modalities=[{names}]", f"data.informativeness=[{scales}]",
                         "trainer.max_epochs=5", "logger=[]"], run_dir=tmp_path)
    results = train(cfg)
    test = results["test"]
    assert test["acc"] > 0.6, test  # chance 0.25
    assert all(test[f"acc_{m}"] > 0.35 for m in modalities), test
    # Fused beats each modality alone, and the fusion weights are reported and sum to one.
    assert test["acc"] > max(test[f"acc_{m}"] for m in modalities)
    assert sum(test[f"weight_{m}"] for m in modalities) == pytest.approx(1.0, abs=1e-5)
    projector = torch.load(results["best_checkpoint"], weights_only=True)["state_dict"]["projector"]
    assert not torch.allclose(projector, torch.eye(projector.shape[0]))


def test_hgm_false_leaves_projector_untouched(tmp_path):
    cfg = compose_train([*SYNTHETIC, "method=mla", "method.hgm=false", "trainer.max_epochs=1", "logger=[]"],
                        run_dir=tmp_path)
    results = train(cfg)
    projector = torch.load(results["best_checkpoint"], weights_only=True)["state_dict"]["projector"]
    assert torch.equal(projector, torch.eye(projector.shape[0]))


@pytest.mark.parametrize("fusion", ["fixed", "mean", "dynamic_batch"])
def test_other_fusions_run(tmp_path, fusion):
    extra = ["method.fixed_weights={m0: 0.7, m1: 0.3}"] if fusion == "fixed" else []
    cfg = compose_train([*SYNTHETIC, "method=mla", f"method.fusion={fusion}", *extra, "trainer.max_epochs=1",
                         "logger=[]"], run_dir=tmp_path)
    test = train(cfg)["test"]
    if fusion == "fixed":
        assert test["weight_m0"] == pytest.approx(0.7) and test["weight_m1"] == pytest.approx(0.3)
    if fusion == "mean":
        assert test["weight_m0"] == pytest.approx(0.5)


def test_fixed_fusion_needs_weights():
    cfg = compose_train([*SYNTHETIC, "method=mla", "method.fusion=fixed"])
    with pytest.raises(Exception, match="fixed_weights"):
        build(cfg)


def test_resume_reproduces_projector_and_metrics(tmp_path):
    common = [*SYNTHETIC, "method=mla", "seed=5", "logger=[]"]
    a, b = (c["state_dict"] for c in train_interrupted_and_resumed(common, tmp_path, stop_after=2, epochs=4))
    assert torch.equal(a["projector"], b["projector"]) and torch.equal(a["hgm_steps"], b["hgm_steps"])

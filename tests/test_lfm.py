"""LFM: the alignment terms by hand and against the official formula, the implicit hypergradient against explicit
Hessians and against a finite difference of the bilevel objective, the official quantity, the weight update and
its schedule, the loss on a built method (M = 2 and 3), learning while the weights are learnt on the validation
split only, the intended direction (the weak modality learns more, the modality gap narrows), refusals and logs."""

import copy
import csv
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, default_collate

from balance.methods.lfm import (LFM, alpha_learning_rate, implicit_hypergradient, jensen_shannon,
                                 mixture_divergence, official_hypergradient, pairwise_alignment, training_loss,
                                 updated_weight)
from balance.models import MLPEncoder, MultimodalModel
from balance.models.fusion import LateFusion
from balance.run import build, train
from compose import SYNTHETIC, compose_train, fit_briefly

QUIET = ["callbacks.contributions=null"]
LFM_RUN = [*SYNTHETIC, *QUIET, "method=lfm", "data.num_samples=400", "data.batch_size=32"]


# -- the alignment terms -------------------------------------------------------------------------------------------

def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_the_divergences_by_hand():
    p_logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    q_logits = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    p, q = [0.25, 0.75], [0.5, 0.5]
    m = [(a + b) / 2 for a, b in zip(p, q)]
    assert float(mixture_divergence(p_logits, q_logits)) == pytest.approx(0.5 * (_kl(m, p) + _kl(m, q)), rel=1e-5)
    assert float(jensen_shannon(p_logits, q_logits)) == pytest.approx(0.5 * (_kl(p, m) + _kl(q, m)), rel=1e-5)
    # Both are symmetric and vanish when the predictions agree; they are different numbers.
    for divergence in (mixture_divergence, jensen_shannon):
        assert float(divergence(q_logits, p_logits)) == pytest.approx(float(divergence(p_logits, q_logits)))
        assert float(divergence(p_logits, p_logits + 5.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(mixture_divergence(p_logits, q_logits)) != pytest.approx(float(jensen_shannon(p_logits, q_logits)))


def _official_alignment(p, q):
    """The official ``Alignment`` as its code writes it (softmax, then ``F.kl_div(p.log(), m, 'batchmean')``)."""
    p, q = F.softmax(p, dim=-1), F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def test_the_official_term_is_the_official_codes_alignment():
    generator = torch.Generator().manual_seed(0)
    p, q = torch.randn(16, 6, generator=generator) * 3, torch.randn(16, 6, generator=generator) * 3
    assert float(mixture_divergence(p, q).mean()) == pytest.approx(float(_official_alignment(p, q)), rel=1e-5)
    assert float(pairwise_alignment([p, q], mixture_divergence)) == pytest.approx(float(_official_alignment(p, q)),
                                                                                  rel=1e-5)


def test_the_alignment_of_three_modalities_averages_the_pairs_over_the_samples_that_have_both():
    generator = torch.Generator().manual_seed(1)
    logits = [torch.randn(5, 4, generator=generator) for _ in range(3)]
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    pair_means = []
    for i, j in ((0, 1), (0, 2), (1, 2)):
        values = [float(jensen_shannon(logits[i][b:b + 1], logits[j][b:b + 1])) for b in range(5)
                  if present[b, i] and present[b, j]]
        pair_means.append(sum(values) / len(values))
    assert float(pairwise_alignment(logits, jensen_shannon, present)) == pytest.approx(sum(pair_means) / 3, rel=1e-5)


# -- the hypergradient on a tiny model -------------------------------------------------------------------------------

N, D, C = 60, 2, 3


def _tiny_problem(seed=0):
    """Two linear heads (no bias) on fixed two-dimensional features, late fusion, random labels (float64)."""
    generator = torch.Generator().manual_seed(seed)
    x = [torch.randn(N, D, generator=generator, dtype=torch.float64) for _ in range(2)]
    y = torch.randint(0, C, (N,), generator=generator)

    def losses(w0, w1):
        z0, z1 = x[0] @ w0.T, x[1] @ w1.T
        return F.cross_entropy((z0 + z1) / 2, y), mixture_divergence(z0, z1).mean()

    return losses


def _flat(losses, which):
    """A function of the flat parameter vector: ``which`` picks a combination of ``(CE, A)``."""
    return lambda v: which(*losses(v[:C * D].view(C, D), v[C * D:].view(C, D)))


def _gradient(f, v):
    v = v.detach().requires_grad_()
    return torch.autograd.grad(f(v), v)[0]


def _heads(v):
    return [v[:C * D].view(C, D).clone().requires_grad_(), v[C * D:].view(C, D).clone().requires_grad_()]


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_the_implicit_hypergradient_is_the_neumann_series_written_out(steps):
    losses = _tiny_problem()
    theta = torch.randn(2 * C * D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    alpha, eta = 0.7, 0.5
    inner = _flat(losses, lambda ce, a: training_loss(ce, a, alpha))
    hessian = torch.autograd.functional.hessian(inner, theta)
    grad_cls = _gradient(_flat(losses, lambda ce, a: ce), theta)
    # d/d alpha of the inner gradient, by a difference quotient (the gradient is linear in alpha).
    mixed = (_gradient(_flat(losses, lambda ce, a: training_loss(ce, a, 1.0)), theta)
             - _gradient(_flat(losses, lambda ce, a: training_loss(ce, a, 0.0)), theta))
    step = torch.eye(len(theta), dtype=torch.float64) - eta * hessian
    series = eta * sum(torch.linalg.matrix_power(step, k) for k in range(steps + 1))
    expected = -mixed @ series @ grad_cls
    params = _heads(theta)
    got = implicit_hypergradient(*losses(*params), params, alpha, steps, eta)
    assert float(got) == pytest.approx(float(expected), rel=1e-9)


def _inner_minimum(losses, alpha, start):
    """The minimiser of the inner loss by Newton steps (pseudo-inverse: softmax logits have a null direction)."""
    f = _flat(losses, lambda ce, a: training_loss(ce, a, alpha))
    v = start.clone()
    for _ in range(30):
        v = v - torch.linalg.pinv(torch.autograd.functional.hessian(f, v)) @ _gradient(f, v)
    assert float(_gradient(f, v).norm()) < 1e-10
    return v


def test_the_implicit_hypergradient_is_the_derivative_of_the_held_out_loss_at_the_inner_minimum():
    losses = _tiny_problem()
    alpha, eps = 0.6, 1e-4
    theta = _inner_minimum(losses, alpha, torch.zeros(2 * C * D, dtype=torch.float64))
    held_out = _flat(losses, lambda ce, a: ce)
    # The bilevel objective's derivative, by a central difference of CE(theta*(alpha)).
    finite_difference = (held_out(_inner_minimum(losses, alpha + eps, theta))
                         - held_out(_inner_minimum(losses, alpha - eps, theta))) / (2 * eps)
    eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(
        _flat(losses, lambda ce, a: training_loss(ce, a, alpha)), theta))
    eta = 1 / float(eigenvalues.max())
    steps = math.ceil(40 / (eta * float(eigenvalues[eigenvalues > 1e-8].min())))  # the series has converged
    params = _heads(theta)
    got = implicit_hypergradient(*losses(*params), params, alpha, steps, eta)
    assert float(got) == pytest.approx(float(finite_difference), rel=1e-5)
    assert abs(float(finite_difference)) > 1e-3  # a real slope, not two zeros that agree


def test_the_official_quantity_is_the_mean_of_one_hessian_vector_product_over_the_first_tensor():
    losses = _tiny_problem(seed=3)
    theta = torch.randn(2 * C * D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    alpha = 0.95
    hessian = torch.autograd.functional.hessian(_flat(losses, lambda ce, a: (1 - alpha) * ce + alpha * a), theta)
    product = hessian @ _gradient(_flat(losses, lambda ce, a: ce), theta)
    params = _heads(theta)
    got = official_hypergradient(*losses(*params), params, alpha)
    assert float(got) == pytest.approx(float(product[:C * D].mean()), rel=1e-9)


def test_the_weight_step_is_clamped_and_its_size_halves_every_twenty_epochs():
    assert [alpha_learning_rate(1.0, e, 20) for e in (0, 19, 20, 39, 40, 65)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]
    weight = torch.tensor(0.95)
    assert float(updated_weight(weight, torch.tensor(0.2), 0.5)) == pytest.approx(0.85)
    assert float(updated_weight(weight, torch.tensor(-1.0), 0.5)) == pytest.approx(0.95)  # the official upper clamp
    assert float(updated_weight(weight, torch.tensor(10.0), 0.5)) == pytest.approx(0.05)  # and lower one


# -- the method ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.6]"), ("[m0,m1,m2]", "[2.0,0.6,0.6]")])
def test_the_loss_mixes_the_fused_cross_entropy_and_the_pairwise_alignment(modalities, informativeness):
    datamodule, method = build(compose_train([*LFM_RUN, f"data.modalities={modalities}",
                                              f"data.informativeness={informativeness}", "method.alignment=js"]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)
    batch = next(iter(datamodule.val_dataloader()))
    step = method.forward_step(batch, 0)
    heads = [step.unimodal_logits[m] for m in method.modalities]
    fused = torch.stack(heads).mean(0)  # the late-fusion head the method config selects
    pairs = [float(jensen_shannon(heads[i], heads[j]).mean()) for i in range(len(heads))
             for j in range(i + 1, len(heads))]
    assert step.losses["cls"].item() == pytest.approx(2 * 0.05 * float(F.cross_entropy(fused, batch["label"])),
                                                      rel=1e-5)
    assert step.losses["align"].item() == pytest.approx(2 * 0.95 * sum(pairs) / len(pairs), rel=1e-5)


class _Untouchable(Dataset):
    """A split that must never be read."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        raise AssertionError("the test split was read during training")


def _fit_without_test_split(overrides, epochs):
    pl.seed_everything(0)
    datamodule, method = build(compose_train(overrides))
    datamodule.setup()
    datamodule.datasets["test"] = _Untouchable(len(datamodule.datasets["test"]))
    initial = copy.deepcopy(method)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=datamodule)
    return trainer, datamodule, method, initial


def _held_out_batch(datamodule, index):
    """The held-out batch, built from the validation split by hand."""
    return default_collate([datamodule.evaluation_view("val")[int(i)] for i in index])


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.6]"), ("[m0,m1,m2]", "[2.0,0.6,0.6]")])
def test_it_learns_while_the_weights_are_learnt_on_the_validation_split_only(modalities, informativeness):
    trainer, datamodule, method, initial = _fit_without_test_split(
        [*LFM_RUN, f"data.modalities={modalities}", f"data.informativeness={informativeness}",
         "method.lr_alpha=1.0"], epochs=3)
    assert float(trainer.callback_metrics["val/acc"]) > 0.5  # 4 classes: chance 0.25
    index = method.held_out_index
    assert len(set(index.tolist())) == 8
    assert 0 <= int(index.min()) and int(index.max()) < len(datamodule.datasets["val"])
    # The first update, redone by hand: one clamped step on the initial model's hypergradient on that batch.
    batch = _held_out_batch(datamodule, index)
    first = float(initial.held_out_hypergradient(batch))
    assert float(initial.held_out_hypergradient(batch)) == first  # deterministic: eval mode, a fixed batch
    assert first != 0.0
    # Three updates happened (before each epoch); the weight left its start and stays in the official bounds.
    assert 0.05 <= float(method.weight_align) < 0.95 - 1e-3
    assert float(trainer.callback_metrics["train/weight_cls"]) == pytest.approx(1 - float(method.weight_align))


def test_the_first_update_is_one_step_on_the_initial_hypergradient():
    trainer, datamodule, method, initial = _fit_without_test_split([*LFM_RUN, "method.lr_alpha=0.5"], epochs=1)
    hypergradient = float(initial.held_out_hypergradient(_held_out_batch(datamodule, method.held_out_index)))
    assert float(method.weight_align) == pytest.approx(min(0.95, max(0.05, 0.95 - 0.5 * hypergradient)), abs=1e-6)
    assert float(trainer.callback_metrics["train/hypergradient"]) == pytest.approx(hypergradient, rel=1e-5)


def _weak_accuracy_and_gap(datamodule, method):
    """The weak modality's own accuracy and the JS gap between the modalities' predictions, held out."""
    method.eval()
    correct = total = 0
    gap = []
    with torch.no_grad():
        for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
            for batch in loader:
                logits = method.unimodal_logits(method.model.encode(batch["inputs"]))
                correct += int((logits["m1"].argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
                gap.append(jensen_shannon(logits["m0"], logits["m1"]))
    return correct / total, float(torch.cat(gap).mean())


def test_the_weak_modality_learns_more_and_the_gap_narrows_compared_with_late_fusion(tmp_path):
    # The same seed, data, batches, late-fusion head and SGD (the official optimizer): m0 dominates.
    measured = {}
    for method in ("late_fusion", "lfm"):
        _, datamodule, module = fit_briefly([*SYNTHETIC, f"method={method}", "data.num_samples=600",
                                             "data.informativeness=[2.0,0.4]", "optimizer=sgd",
                                             "method.optimizer.lr=5.0e-2"], epochs=4, run_dir=tmp_path / method)
        measured[method] = _weak_accuracy_and_gap(datamodule, module)
    assert measured["lfm"][0] > measured["late_fusion"][0] + 0.05, measured
    assert measured["lfm"][1] < measured["late_fusion"][1], measured


@pytest.mark.parametrize("option,value,message", [
    ("initial_weight_align", 1.0, r"method.initial_weight_align must be a number in \[0.05, 0.95\]"),
    ("lr_alpha", -1.0, "method.lr_alpha must be a number >= 0"),
    ("lr_alpha_halve_every", 0, "method.lr_alpha_halve_every must be an integer >= 1"),
    ("hypergradient", "exact", "method.hypergradient must be one of"),
    ("neumann_steps", -1, "method.neumann_steps must be an integer >= 0"),
    ("neumann_lr", 0.0, "method.neumann_lr must be a number > 0"),
    ("held_out_size", 0, "method.held_out_size must be an integer >= 1"),
    ("alignment", "kl", "method.alignment must be one of"),
])
def test_bad_options_are_refused(option, value, message):
    with pytest.raises(Exception, match=message):
        build(compose_train([*LFM_RUN, f"method.{option}={value}"]))


def test_a_held_out_batch_larger_than_the_validation_split_is_refused():
    with pytest.raises(ValueError, match=r"method.held_out_size must be at most the validation split's size \(60\)"):
        _fit_without_test_split([*LFM_RUN, "method.held_out_size=1000"], epochs=1)


def test_one_modality_is_refused():
    model = MultimodalModel({"m0": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=8)}, partial(LateFusion), 3)
    with pytest.raises(ValueError, match="needs at least two"):
        LFM(model=model, optimizer=torch.optim.SGD)


def test_the_weights_and_the_gap_reach_the_logs(tmp_path):
    results = train(compose_train([*LFM_RUN, "trainer.max_epochs=2", "method.hypergradient=official"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.25
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = [r for r in rows if r.get("train/weight_align")]
    assert len(logged) == 2
    for row in logged:
        assert float(row["train/weight_cls"]) + float(row["train/weight_align"]) == pytest.approx(1.0)
        assert row["train/hypergradient"] and row["train/alignment"]
    assert sum(1 for r in rows if r.get("val/alignment")) >= 2

"""MBSD: the per-sample weight, logit regression and KL against hand computation (teacher chosen per sample, the
KL's teacher side detached, the regression symmetric, the temperature), the method's loss terms for M = 2 and 3
with missing modalities, option and model refusals, learning with M = 2 and 3 and the logged teaching weights, and
the intended direction (the weak modality learns more than under joint training, the dominant encoder is held
back)."""

import csv
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.mbsd import MBSD, distillation_weight, pair_terms
from balance.models import ConcatFusion, MLPEncoder, MultimodalModel
from balance.run import build, train
from compose import SYNTHETIC, compose_train, fit_and_measure_encoders, held_out_accuracy

QUIET = [*SYNTHETIC, "callbacks.contributions=null"]
VECTORS = [*QUIET, "data.num_samples=400", "data.batch_size=32"]


def _softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _pair_by_hand(za, zb, label, temperature=1.0):
    """One sample of one pair, written out: (weight, regression, KL, a teaches)."""
    pa, pb = _softmax(za), _softmax(zb)
    right = max(range(len(za)), key=za.__getitem__) == label or max(range(len(zb)), key=zb.__getitem__) == label
    weight = abs(pa[label] - pb[label]) if right else 0.0
    a_teaches = pa[label] >= pb[label]
    teacher, student = (za, zb) if a_teaches else (zb, za)
    regression = sum((a - b) ** 2 for a, b in zip(za, zb)) / len(za)
    pt, ps = _softmax(teacher, temperature), _softmax(student, temperature)
    kl = temperature ** 2 * sum(t * (math.log(t) - math.log(s)) for t, s in zip(pt, ps))
    return weight, regression, kl, a_teaches


# Sample 0: a right and surer (a teaches); 1: b right (b teaches); 2: neither right (weight 0).
LOGITS_A = [[2.0, 0.0, -1.0], [0.5, 0.2, 0.0], [0.0, 0.0, 3.0]]
LOGITS_B = [[0.5, 0.4, 0.0], [-1.0, 2.5, 0.5], [1.0, 0.0, 0.2]]
LABELS = [0, 1, 1]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_pair_terms_match_the_hand_computation(temperature):
    za, zb, y = torch.tensor(LOGITS_A), torch.tensor(LOGITS_B), torch.tensor(LABELS)
    terms = pair_terms(za, zb, y, temperature)
    for i in range(3):
        weight, regression, kl, a_teaches = _pair_by_hand(LOGITS_A[i], LOGITS_B[i], LABELS[i], temperature)
        assert float(terms.weight[i]) == pytest.approx(weight, abs=1e-6)
        assert float(terms.regression[i]) == pytest.approx(regression, rel=1e-5)
        assert float(terms.divergence[i]) == pytest.approx(kl, rel=1e-5)
        assert bool(terms.a_teaches[i]) == a_teaches
    assert terms.a_teaches.tolist()[:2] == [True, False] and float(terms.weight[2]) == 0.0
    assert torch.equal(distillation_weight(za, zb, y), terms.weight)
    # A proper KL: zero where the student already predicts what the teacher does, whatever the class.
    assert float(pair_terms(za, za.clone(), y, temperature).divergence.abs().max()) < 1e-6


@pytest.mark.parametrize("detach_teacher", [True, False])
def test_the_kl_distils_only_the_student_unless_the_teacher_is_left_attached(detach_teacher):
    za = torch.tensor(LOGITS_A, requires_grad=True)
    zb = torch.tensor(LOGITS_B, requires_grad=True)
    terms = pair_terms(za, zb, torch.tensor(LABELS), detach_teacher=detach_teacher)
    (terms.weight * terms.divergence).sum().backward()
    moved_a, moved_b = za.grad.abs().sum(1), zb.grad.abs().sum(1)
    assert moved_b[0] > 0 and moved_a[1] > 0  # the students: b on sample 0, a on sample 1
    assert (moved_a[0] > 0) == (not detach_teacher) and (moved_b[1] > 0) == (not detach_teacher)
    assert moved_a[2] == 0 and moved_b[2] == 0  # weight 0: not distilled
    # The weight is a coefficient: no gradient flows through it.
    assert not terms.weight.requires_grad


def test_the_regression_pulls_both_modalities_towards_each_other():
    za = torch.tensor(LOGITS_A, requires_grad=True)
    zb = torch.tensor(LOGITS_B, requires_grad=True)
    terms = pair_terms(za, zb, torch.tensor(LABELS))
    terms.regression.sum().backward()
    # d/dz_a ||z_a - z_b||^2 / C = 2 (z_a - z_b) / C, and the opposite for z_b, on every sample.
    expected = 2 * (za - zb).detach() / 3
    assert torch.allclose(za.grad, expected) and torch.allclose(zb.grad, -expected)


def _by_hand(unimodal, labels, present):
    """The regression and KL terms: per pair, sum_i w_i term_i over the samples with both modalities, divided by
    their number; the mean over the pairs."""
    names = list(unimodal)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    regression = kl = 0.0
    for i, j in pairs:
        both = [k for k in range(len(labels)) if present[k][i] and present[k][j]]
        for k in both:
            w, rs, d, _ = _pair_by_hand(unimodal[names[i]][k].tolist(), unimodal[names[j]][k].tolist(),
                                        int(labels[k]))
            regression += w * rs / len(both) / len(pairs)
            kl += w * d / len(both) / len(pairs)
    return regression, kl


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.6]"), ("[m0,m1,m2]", "[2.0,0.6,0.6]")])
def test_loss_terms_are_the_cross_entropies_and_the_mean_pairwise_weighted_distillation(modalities, informativeness):
    torch.manual_seed(0)  # the batch drawn (whatever ran before): one where some pair has a right modality
    datamodule, method = build(compose_train([*VECTORS, "method=mbsd", f"data.modalities={modalities}",
                                              f"data.informativeness={informativeness}", "data.missing_rate=0.3",
                                              "method.rs_weight=0.5", "method.kl_weight=2.0"]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)
    batch = next(iter(datamodule.train_dataloader()))
    present = batch["present"]
    assert not bool(present.all())  # some modalities are missing
    step = method.forward_step(batch, 0)
    y = step.labels
    assert set(step.losses) == {"fused", "unimodal", "rs", "kl"}
    assert float(step.losses["fused"]) == pytest.approx(float(F.cross_entropy(step.logits, y)), rel=1e-5)
    unimodal = sum(float((F.cross_entropy(z, y, reduction="none") * present[:, i]).sum() / present[:, i].sum())
                   for i, z in enumerate(step.unimodal_logits.values()))
    assert float(step.losses["unimodal"]) == pytest.approx(unimodal, rel=1e-5)
    regression, kl = _by_hand({m: z.detach() for m, z in step.unimodal_logits.items()}, y, present.tolist())
    assert regression > 0 and kl > 0
    assert float(step.losses["rs"]) == pytest.approx(0.5 * regression, rel=1e-4)
    assert float(step.losses["kl"]) == pytest.approx(2.0 * kl, rel=1e-4)


@pytest.mark.parametrize("override, match", [
    ("method.rs_weight=-1", "method.rs_weight must be a number >= 0"),
    ("method.kl_weight=-0.5", "method.kl_weight must be a number >= 0"),
    ("method.temperature=0", "method.temperature must be a number > 0"),
    ("method.detach_teacher=1", "method.detach_teacher must be true or false"),
])
def test_bad_options_are_refused(override, match):
    with pytest.raises(Exception, match=match):  # Hydra wraps the ValueError
        build(compose_train([*VECTORS, "method=mbsd", override]))


def test_a_single_modality_model_is_refused():
    model = MultimodalModel({"m0": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=8)}, partial(ConcatFusion), 3)
    with pytest.raises(ValueError, match="needs at least two"):
        MBSD(model=model, optimizer=torch.optim.SGD)


def _epoch_rows(run_dir):
    return [r for r in csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()) if r.get("train/loss")]


@pytest.mark.parametrize("modalities,informativeness,extra", [
    ("[m0,m1]", "[2.0,0.6]", []),
    ("[m0,m1,m2]", "[2.0,0.6,0.6]", ["data.missing_rate=0.3"]),
])
def test_training_learns_and_logs_who_teaches(modalities, informativeness, extra, tmp_path):
    results = train(compose_train([*VECTORS, "method=mbsd", f"data.modalities={modalities}",
                                   f"data.informativeness={informativeness}", "method.optimizer.lr=1.0e-2",
                                   "trainer.max_epochs=4", *extra], run_dir=tmp_path))
    rows = _epoch_rows(tmp_path)
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
    assert results["test"]["acc"] > 0.6, results["test"]  # 4 classes: chance 0.25
    names = modalities.strip("[]").split(",")
    last = rows[-1]
    teach = {m: float(last[f"train/teach_{m}"]) for m in names}
    assert sum(teach.values()) == pytest.approx(float(last["train/distill_weight"]), rel=1e-4)
    # The dominant modality teaches most of the distilled samples (measured: 3.8 times the other's weight with M = 2,
    # 2.1 times either other's with M = 3, where the two weaker ones also teach each other).
    assert teach["m0"] > 0.05 and teach["m0"] > 1.5 * max(teach[m] for m in names[1:]), teach


def test_the_weak_modality_learns_more_and_the_dominant_one_is_held_back(tmp_path):
    # The same seed, data, batches and optimizer (Adam 1e-3); m0 dominates. Measured over data seeds 0-4 with M = 2
    # (5 and 10 epochs): m1's held-out accuracy was higher than under joint concat training in every run, by
    # 0.04-0.21 (seed 0, 5 epochs: 0.20); against joint training with the same unimodal cross-entropies and no
    # distillation (method.unimodal_loss_weight=1) it was within -0.01..+0.04, so not asserted. What held in every
    # run (M = 3 too) is the mechanism: the regression between the modalities holds the dominant encoder back
    # (m0 moved 0.4-1.7 less than under that baseline; m1 0.05-0.16 further at 5 epochs, 0.4-0.5 less at 10), so
    # the weak encoder's share of the movement grows.
    runs = {}
    for name, overrides in [("joint", ["method=concat"]),
                            ("joint_unimodal", ["method=concat", "method.unimodal_loss_weight=1.0"]),
                            ("mbsd", ["method=mbsd"])]:
        moved, _, datamodule, module = fit_and_measure_encoders(
            [*QUIET, *overrides, "data.informativeness=[2.0,0.4]", "data.num_samples=1000"], epochs=5,
            run_dir=tmp_path / name)
        runs[name] = {"moved": moved, "acc": {m: held_out_accuracy(datamodule, module, m) for m in ("m0", "m1")}}
    mbsd, baseline = runs["mbsd"]["moved"], runs["joint_unimodal"]["moved"]
    assert runs["mbsd"]["acc"]["m1"] > runs["joint"]["acc"]["m1"] + 0.05, runs
    assert mbsd["m0"] < baseline["m0"] - 0.2, runs
    assert mbsd["m1"] / mbsd["m0"] > baseline["m1"] / baseline["m0"], runs
    assert runs["mbsd"]["acc"]["m0"] > 0.9, runs  # the dominant modality is not given up for it

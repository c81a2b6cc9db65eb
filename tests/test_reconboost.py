"""ReconBoost: the schedule, the ensemble, the boosting loss and GA-MSE by hand, which parameters each phase
trains, fresh optimizers per phase, learning with M = 2 and 3, the intended direction (the weak modality's own
learner gets better than under joint training), exact resume at a phase boundary, logged quantities, refusals."""

import csv
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from balance.methods.reconboost import (
    ReconBoost,
    Turn,
    boosted_ensemble,
    boosting_loss,
    ensemble_members,
    ensemble_true_probability,
    ga_mse,
    previous_learner,
    schedule,
)
from balance.models import MLPEncoder, MultimodalModel
from balance.models.fusion import SharedHead
from balance.run import build, train
from compose import SYNTHETIC, compose_train, fit_briefly, held_out_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["callbacks.contributions=null"]
# One learner epoch and one correction epoch a stage, so a few epochs cover several stages.
RECON = [*SYNTHETIC, *QUIET, "method=reconboost", "data.num_samples=600", "method.learner_epochs=1",
         "method.correction_epochs=1", "method.optimizer.lr=0.05"]
THREE = ["data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.6,0.6]"]


# -- the schedule -------------------------------------------------------------------------------------------------------


def test_the_schedule_follows_the_epoch():
    order = ["a", "v"]
    turns = [schedule(e, order, learner_epochs=2, correction_epochs=1) for e in range(7)]
    assert turns == [Turn("learner", 0, "a", True), Turn("learner", 0, "a", False), Turn("correction", 0, "a", True),
                     Turn("learner", 1, "v", True), Turn("learner", 1, "v", False), Turn("correction", 1, "v", True),
                     Turn("learner", 2, "a", True)]
    # A warm-up comes first; three modalities take turns in the given order; no correction phase at 0 epochs.
    assert schedule(0, order, 1, 1, warmup_epochs=2) == Turn("warmup", -1, None, True)
    assert schedule(1, order, 1, 1, warmup_epochs=2) == Turn("warmup", -1, None, False)
    assert schedule(2, order, 1, 1, warmup_epochs=2) == Turn("learner", 0, "a", True)
    assert [schedule(e, ["t", "v", "a"], 1, 0).learner for e in range(5)] == ["t", "v", "a", "t", "v"]


def test_the_ensemble_grows_and_ga_follows_the_previous_stage():
    order = ["t", "v", "a"]
    stage = [Turn("learner", s, order[s % 3], True) for s in range(5)]
    # Without a warm-up a learner joins at its first stage (the official code without pretrained learners).
    assert [ensemble_members(t, order, 0) for t in stage[:4]] == [["t"], ["t", "v"], ["t", "v", "a"], order]
    assert ensemble_members(stage[0], order, warmup_epochs=1) == order
    assert ensemble_members(Turn("warmup", -1, None, True), order, warmup_epochs=1) == order
    # GA-MSE: none in the first stage; then the previous stage's learner (official train_MSA.py for three).
    assert [previous_learner(t, order) for t in stage] == [None, "t", "v", "a", "t"]
    assert previous_learner(Turn("learner", 1, "v", True), ["a", "v"]) == "a"  # two modalities: the other one


# -- the formulas ---------------------------------------------------------------------------------------------------------


def test_boosting_loss_by_hand_and_as_the_official_expression():
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # p(class 1) = 0.75 in row 0
    labels = torch.tensor([1, 0])
    ensemble = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])  # p_ens,y = 0.5 and 0.8
    probability = ensemble_true_probability(ensemble, labels)
    assert probability.tolist() == pytest.approx([0.5, 0.8])
    loss = boosting_loss(logits, probability, labels, weight1=5.0, weight2=1.0)
    row1 = -(5.0 - 0.8) * math.log(math.exp(2.0) / (math.exp(2.0) + 1.0)) / 2
    assert loss.tolist() == pytest.approx([-(5.0 - 0.5) * math.log(0.75) / 2, row1])
    # The official expression, literally: target one-hot, means over the classes.
    target = F.one_hot(labels, 2).float()
    official = (-5.0 * (target * logits.log_softmax(1)).mean(-1)
                + 1.0 * (target * ensemble.softmax(1) * logits.log_softmax(1)).mean(-1))
    assert torch.allclose(loss, official)
    # No other learner yet: the official constant ensemble (one logit) has softmax 1, so the weight is w1 - w2.
    assert ensemble_true_probability(None, labels).tolist() == [1.0, 1.0]
    # The ensemble is a constant of the loss: no gradient reaches it.
    ensemble.requires_grad_()
    assert not ensemble_true_probability(ensemble, labels).requires_grad


def test_ga_mse_by_hand_and_only_the_working_form_has_a_gradient():
    logits = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)  # p = [0.75, 0.25]
    previous = torch.tensor([[0.0, 0.0]], requires_grad=True)  # q = [0.5, 0.5]
    working = ga_mse(logits, previous, working=True)
    assert working.tolist() == pytest.approx([0.0625])  # mean(0.25^2, 0.25^2)
    official = ga_mse(logits, previous, working=False)
    assert official.tolist() == pytest.approx([0.0625]) and not official.requires_grad
    assert float(official.mean()) == pytest.approx(float(nn.MSELoss()(logits.softmax(1), previous.softmax(1))))
    working.sum().backward()
    # d/dz of mean_c (p - q)^2 with p = softmax(z): J^T (p - q), J = diag(p) - p p^T.
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    expected = (torch.diag(p) - torch.outer(p, p)) @ (p - q)
    assert torch.allclose(logits.grad[0], expected) and previous.grad is None


def test_the_ensemble_sums_its_members_times_the_boost_rate():
    logits = {"a": torch.tensor([[1.0, 2.0]]), "v": torch.tensor([[3.0, -1.0]]), "t": torch.tensor([[5.0, 5.0]])}
    rate = torch.tensor(0.5)
    assert boosted_ensemble(logits, ["a", "v"], rate).tolist() == [[2.0, 0.5]]
    assert boosted_ensemble(logits, [], rate) is None
    absent = {"a": torch.tensor([True]), "v": torch.tensor([False]), "t": torch.tensor([True])}
    assert boosted_ensemble(logits, ["a", "v"], rate, absent).tolist() == [[0.5, 1.0]]


def test_the_prediction_uses_the_checkpointed_members_and_boost_rate():
    _, method = build(compose_train(RECON))
    features = {m: torch.randn(4, 32) for m in method.modalities}
    assert torch.equal(method.fuse(features), torch.zeros(4, 4))  # no learner has trained yet
    unimodal = method.model.unimodal_logits(features)
    with torch.no_grad():
        method.boost_rate.fill_(2.0)
    method.members.copy_(torch.tensor([True, False]))
    assert torch.allclose(method.fused_logits(features), 2.0 * unimodal["m0"])
    method.members.fill_(True)
    assert torch.allclose(method.fuse(features), 2.0 * (unimodal["m0"] + unimodal["m1"]))
    keep = torch.tensor([[True, False], [False, True], [True, True], [True, True]])
    expected = 2.0 * (unimodal["m0"] * keep[:, :1] + unimodal["m1"] * keep[:, 1:])
    assert torch.allclose(method.fuse(features, keep), expected)
    state = method.state_dict()
    assert state["members"].tolist() == [True, True] and float(state["boost_rate"]) == 2.0


# -- training -----------------------------------------------------------------------------------------------------------


class _OptimizerStates(pl.Callback):
    """Per epoch, the number of parameters with optimizer state in each optimizer at its first and second batch."""

    def __init__(self) -> None:
        self.sizes: dict[tuple[int, int], list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx < 2:
            self.sizes[(trainer.current_epoch, batch_idx)] = [len(o.state) for o in trainer.optimizers]


def _fit(overrides, epochs, callbacks=()):
    pl.seed_everything(0)
    datamodule, method = build(compose_train(overrides))
    start = {n: p.detach().clone() for n, p in method.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=list(callbacks))
    trainer.fit(method, datamodule=datamodule)
    moved = {prefix: any(not torch.equal(p.detach(), start[n]) for n, p in method.named_parameters()
                         if n.startswith(prefix)) for prefix in ("model.encoders.m0", "model.encoders.m1",
                                                                 "model.fusion", "boost_rate")}
    return trainer, method, moved


def test_each_phase_trains_what_it_should_with_a_fresh_optimizer():
    # Epoch 0: m0's learner phase (m0's encoder and the head, nothing else); epoch 1: the correction of the
    # ensemble {m0} and the boost rate; m1 joins at its stage (epoch 2).
    _, method, moved = _fit(RECON, epochs=1)
    assert moved == {"model.encoders.m0": True, "model.encoders.m1": False, "model.fusion": True,
                     "boost_rate": False}
    assert method.members.tolist() == [True, False]
    states = _OptimizerStates()
    _, method, moved = _fit(RECON, epochs=3, callbacks=[states])
    assert moved["model.encoders.m1"] and moved["boost_rate"]
    # A phase's first batch finds its optimizer without state (built afresh, as the official code): at epoch 2
    # the learner optimizer's momentum from epoch 0 is gone.
    learner, correction = 0, 1
    assert states.sizes[(0, 0)] == [0, 0] and states.sizes[(1, 0)][correction] == 0
    assert states.sizes[(2, 0)][learner] == 0 and states.sizes[(2, 1)][learner] > 0
    assert states.sizes[(1, 1)][correction] > 0


def _ensemble_accuracy(datamodule, method) -> float:
    method.eval()
    with torch.no_grad():
        hits = [(method.fused_logits(method.model.encode(b["inputs"])).argmax(1) == b["label"]).float()
                for b in datamodule.test_dataloader()]
    return float(torch.cat(hits).mean())


def test_it_learns_with_three_modalities():
    _, datamodule, method = fit_briefly([*RECON, *THREE], epochs=6)  # one stage per modality
    assert method.members.tolist() == [True, True, True]
    assert _ensemble_accuracy(datamodule, method) > 0.8  # 4 classes: chance 0.25


def test_the_weak_modality_learns_more_than_under_joint_training():
    # The same seed, data, batches and optimizer; m0 dominates. ReconBoost trains m1's learner on its own in its
    # stage (epochs 3-4), against the ensemble of m0: its own held-out accuracy ends higher than under joint
    # training (with the concat head, and with the same shared head).
    base = [*SYNTHETIC, *QUIET, "data.num_samples=600", "data.informativeness=[2.0,0.4]", "optimizer=sgd",
            "method.optimizer.lr=0.05"]
    accuracy = {}
    for name, extra in {"joint": ["method=joint"], "joint_shared": ["method=joint", "model/fusion=shared"],
                        "reconboost": ["method=reconboost", "method.learner_epochs=2",
                                       "method.correction_epochs=1"]}.items():
        _, datamodule, method = fit_briefly([*base, *extra], epochs=6)
        accuracy[name] = held_out_accuracy(datamodule, method, "m1")
    assert accuracy["reconboost"] > accuracy["joint"] + 0.1, accuracy
    assert accuracy["reconboost"] > accuracy["joint_shared"] + 0.1, accuracy


def test_it_learns_logs_its_schedule_and_resumes_exactly_at_a_phase_boundary(tmp_path):
    full = train(compose_train([*RECON, "trainer.max_epochs=4"], run_dir=tmp_path / "full"))
    assert full["test"]["acc"] > 0.8
    rows = [r for r in csv.DictReader((tmp_path / "full" / "csv" / "version_0" / "metrics.csv").open())
            if r.get("train/learner")]
    assert [float(r["train/learner"]) for r in rows] == [0, 0, 1, 1]  # whose stage: m0, m0, m1, m1
    assert [float(r["train/phase"]) for r in rows] == [1, 2, 1, 2]  # learner, correction, learner, correction
    assert [bool(r["train/ga_mse"]) for r in rows] == [False, False, True, False]  # from stage 1, learner phase
    assert all(r["train/boost_rate"] for r in rows) and float(rows[0]["train/boost_rate"]) == 1.0
    assert float(rows[3]["train/boost_rate"]) != 1.0  # learnt in the correction phases
    assert all(0 <= float(r["train/ensemble_prob"]) <= 1 for r in rows if r["train/ensemble_prob"])
    assert rows[0]["train/boosting"] and not rows[1]["train/boosting"]
    # The checkpoint after epoch 1 ends stage 0: the resumed run starts a learner phase (m1 joins, the learner
    # optimizer is cleared) exactly as the uninterrupted one.
    train(compose_train([*RECON, "trainer.max_epochs=2"], run_dir=tmp_path / "part"))
    resumed = train(compose_train([*RECON, "trainer.max_epochs=4",
                                   f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
                                  run_dir=tmp_path / "part"))
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    a, b = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for run in ("full", "part"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- options -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value, message", [
    ("learner_epochs", 0, "method.learner_epochs must be an integer >= 1"),
    ("correction_epochs", -1, "method.correction_epochs must be an integer >= 0"),
    ("warmup_epochs", -1, "method.warmup_epochs must be an integer >= 0"),
    ("weight1", 0, "method.weight1 must be a number > 0"),
    ("weight2", 6.0, r"method.weight2 must be a number in \[0, 5.0\]"),
    ("alpha", -0.5, "method.alpha must be a number >= 0"),
    ("ga_mse", "detached", "method.ga_mse must be one of"),
    ("boost_rate", 0, "method.boost_rate must be a number > 0"),
    ("correction_lr", 0, "method.correction_lr must be a number > 0 or null"),
    ("order", "[m0,m0]", "method.order must list each of"),
])
def test_bad_options_are_refused(option, value, message):
    with pytest.raises(Exception, match=message):
        build(compose_train([*RECON, f"method.{option}={value}"]))


def test_one_modality_is_refused():
    model = MultimodalModel({"m0": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=8)}, partial(SharedHead), 3)
    with pytest.raises(ValueError, match="needs at least two"):
        ReconBoost(model=model, optimizer=torch.optim.SGD)


def test_two_optimizers_with_their_own_rates_and_schedulers():
    _, method = build(compose_train([*RECON, "method.correction_lr=0.2", "scheduler=step"]))
    (learner, correction), schedulers = method.configure_optimizers()
    assert [g["lr"] for g in learner.param_groups] == [0.05] and [g["lr"] for g in correction.param_groups] == [0.2]
    assert not any(p is method.boost_rate for p in learner.param_groups[0]["params"])
    assert any(p is method.boost_rate for p in correction.param_groups[0]["params"])
    assert [s.optimizer for s in schedulers] == [learner, correction]

"""DI-MML: the effective dimensions, the DUC loss and the certainty weights against hand computation and brute
force; the loss terms on a built method; the selection pass; stage 2 (frozen encoders, fresh fusion head); exact
resume across the stage switch; learning with M = 2 and 3; the intended directions (the weak modality's own
classifier learns more than under joint training, the DUC loss aligns a student with its teacher); refusals."""

import csv
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.dimml import (
    DIMML,
    certainty_weights,
    dimension_hits,
    duc_loss,
    effective_dimensions,
    transfer_dimensions,
    unidirectional_contrastive_loss,
    weighted_logits,
)
from balance.models import MLPEncoder, MultimodalModel
from balance.models.fusion import ConcatFusion
from balance.run import build, train
from compose import compose_train, fit_briefly, held_out_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.contributions=null"]
VECTORS = ["data=synthetic", "model=mlp", "data.num_samples=400", "data.batch_size=32", *QUIET]
IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=200",
          "data.batch_size=32", *QUIET]
# Three epochs: epoch 0 without the DUC loss, epoch 1 with it (dimensions selected at its start), epoch 2 stage 2.
STAGED = ["method=dimml", "method.warmup_epochs=1", "method.stage2_epoch=2", "method.optimizer.lr=1.0e-2"]


# -- the formulas ---------------------------------------------------------------------------------------------------

def _brute_force_effective(features, labels, num_classes):
    """The official selection by explicit loops: class means, then per dimension and sample the nearest class
    along that dimension alone; effective = share of own-class nearest above the mean share."""
    n, d = features.shape
    means = [features[labels == c].mean(0) for c in range(num_classes)]
    scores = []
    for k in range(d):
        hits = 0
        for i in range(n):
            distances = [abs(float(features[i, k] - means[c][k])) for c in range(num_classes)]
            hits += distances.index(min(distances)) == int(labels[i])
        scores.append(hits / n)
    mean = sum(scores) / d
    return [s > mean for s in scores]


def test_effective_dimensions_match_the_official_selection_by_brute_force():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 3
    features = torch.randn(40, 7, generator=generator)
    features[:, 2] += 3 * labels  # a dimension that separates the classes
    features[:, 5] -= 2 * labels
    onehot = F.one_hot(labels, 3).float()
    prototypes = (onehot.T @ features) / onehot.sum(0, keepdim=True).T
    mask = effective_dimensions(dimension_hits(features, labels, prototypes) / len(labels))
    assert mask.tolist() == _brute_force_effective(features, labels, 3)
    assert mask[2] and mask[5]


def test_dimension_hits_by_hand_and_an_unseen_class_is_never_nearest():
    features = torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.2, 5.0]])
    labels = torch.tensor([0, 1, 1])
    prototypes = torch.tensor([[0.0, 1.0], [2.0, 3.0], [1.0, 5.0]])
    # dim 0: nearest classes 0, 1, 2 -> samples 0 and 1 hit; dim 1: nearest 0, 0 (a tie of 0 and 1 goes to the
    # first), 2 -> sample 0 hits.
    assert dimension_hits(features, labels, prototypes).tolist() == [2.0, 1.0]
    seen = torch.tensor([True, True, False])  # class 2 absent: sample 2 is nearest to class 1 on both dimensions
    assert dimension_hits(features, labels, prototypes, seen).tolist() == [3.0, 2.0]


def test_transfer_dimensions_are_the_teachers_own():
    effective = {"a": torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool), "v": torch.tensor([0, 1, 1, 0, 0]).bool(),
                 "t": torch.tensor([0, 0, 0, 1, 1]).bool()}
    transfer = {pair: mask.int().tolist() for pair, mask in transfer_dimensions(effective).items()}
    assert transfer == {("a", "v"): [1, 0, 0, 0, 1], ("a", "t"): [1, 1, 0, 0, 0], ("v", "a"): [0, 0, 1, 0, 0],
                        ("v", "t"): [0, 1, 1, 0, 0], ("t", "a"): [0, 0, 0, 1, 0], ("t", "v"): [0, 0, 0, 1, 1]}


def test_the_contrastive_loss_is_the_official_infonce_on_the_transfer_dimensions():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(5, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(5, 6, generator=generator, requires_grad=True)
    dims = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    temperature = 2.0
    expected = 0.0
    for i in range(5):  # -log(exp(<s_i, t_i> / T) / sum_j exp(<s_i, t_j> / T)) on the selected columns
        s = student[i, dims].detach()
        expected += -math.log(math.exp(float(s @ teacher[i, dims]) / temperature)
                              / sum(math.exp(float(s @ teacher[j, dims]) / temperature) for j in range(5)))
    loss = unidirectional_contrastive_loss(student, teacher, dims, temperature)
    assert loss.item() == pytest.approx(expected / 5, rel=1e-5)
    loss.backward()
    assert teacher.grad is None  # knowledge flows from the teacher, never back
    assert student.grad[:, ~dims].abs().sum() == 0 and student.grad[:, dims].abs().sum() > 0
    none = torch.zeros(6, dtype=torch.bool)
    assert unidirectional_contrastive_loss(student, teacher, none, temperature).item() == pytest.approx(math.log(5))


def test_the_duc_loss_sums_both_directions_and_averages_over_teachers():
    generator = torch.Generator().manual_seed(2)
    features = {m: torch.randn(6, 4, generator=generator) for m in ("a", "v", "t")}
    effective = {"a": torch.tensor([1, 1, 0, 0]).bool(), "v": torch.tensor([0, 1, 1, 0]).bool(),
                 "t": torch.tensor([0, 0, 1, 1]).bool()}
    pair = lambda t, s, f=features: unidirectional_contrastive_loss(  # noqa: E731
        f[s], f[t], effective[t] & ~effective[s], 3.0)
    two = {m: features[m] for m in ("a", "v")}
    assert duc_loss(two, transfer_dimensions({m: effective[m] for m in two}), 3.0).item() == pytest.approx(
        (pair("a", "v") + pair("v", "a")).item())
    pairs = [(t, s) for t in features for s in features if t != s]
    assert duc_loss(features, transfer_dimensions(effective), 3.0).item() == pytest.approx(
        sum(pair(t, s).item() for t, s in pairs) / 2)
    # Missing modalities: a pair uses the samples that have both.
    present = torch.ones(6, 2, dtype=torch.bool)
    present[0, 1] = present[3, 0] = False
    rows = torch.tensor([False, True, True, False, True, True])
    kept = {m: f[rows] for m, f in two.items()}
    assert duc_loss(two, transfer_dimensions({m: effective[m] for m in two}), 3.0, present).item() == pytest.approx(
        (pair("a", "v", kept) + pair("v", "a", kept)).item())


def test_certainty_weights_by_hand():
    logits = [torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, math.log(9.0)]])]
    # max softmax: predictor 0 -> 0.75, 0.5; predictor 1 -> 0.5, 0.9; weights softmax(max / T) over predictors.
    weights = certainty_weights(logits, temperature=0.5)
    first = math.exp(0.75 / 0.5) / (math.exp(0.75 / 0.5) + math.exp(0.5 / 0.5))
    second = math.exp(0.5 / 0.5) / (math.exp(0.5 / 0.5) + math.exp(0.9 / 0.5))
    assert weights.flatten().tolist() == pytest.approx([first, 1 - first, second, 1 - second])
    fused = weighted_logits(logits, weights)
    assert fused[0].tolist() == pytest.approx([first * math.log(3.0), 0.0])
    masked = certainty_weights(logits, 0.5, available=torch.tensor([[True, False], [True, True]]))
    assert masked[0].tolist() == [1.0, 0.0] and masked[1].tolist() == pytest.approx([second, 1 - second])


# -- the built method -------------------------------------------------------------------------------------------------

def _method(overrides):
    datamodule, method = build(compose_train([*VECTORS, "method=dimml", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.6]"), ("[m0,m1,m2]", "[2.0,0.6,0.6]")])
def test_stage_one_loss_terms_by_hand(modalities, informativeness):
    datamodule, method = _method([f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                  "method.shared_weight=0.5",
                                  "method.warmup_epochs=0", "method.contrast_weight=2.0", "method.temperature=3.0"])
    generator = torch.Generator().manual_seed(0)
    for mask in method.effective().values():
        mask.copy_(torch.rand(mask.shape, generator=generator) > 0.5)
    batch = next(iter(datamodule.unshuffled_train_dataloader()))
    step = method.stage_one_step(batch, 0)
    y = batch["label"]
    with torch.no_grad():
        features = method.model.encode(batch["inputs"])
    own = sum(F.cross_entropy(method.unimodal_heads[m](f), y) for m, f in features.items())
    shared = sum(F.cross_entropy(method.shared_head(f), y) for f in features.values())
    contrast = duc_loss(features, transfer_dimensions(method.effective()), 3.0)
    assert set(step.losses) == {"unimodal", "shared", "contrast", "fusion"}
    assert step.losses["unimodal"].item() == pytest.approx(own.item(), rel=1e-5)
    assert step.losses["shared"].item() == pytest.approx(0.5 * shared.item(), rel=1e-5)
    assert step.losses["contrast"].item() == pytest.approx(2.0 * contrast.item(), rel=1e-5)
    assert step.losses["fusion"].item() == pytest.approx(F.cross_entropy(method.model.fuse(features), y).item(),
                                                         rel=1e-5)
    # The fusion head learns on detached features: its loss never reaches an encoder.
    step.losses["fusion"].backward()
    moved = {n for n, p in method.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("model.fusion.") for n in moved), moved


def test_no_contrastive_loss_before_the_warmup_or_in_stage_two():
    datamodule, method = _method(["method.warmup_epochs=1"])
    batch = next(iter(datamodule.unshuffled_train_dataloader()))
    assert set(method.stage_one_step(batch, 0).losses) == {"unimodal", "shared", "fusion"}
    assert method.contrast_active(1) and not method.contrast_active(0) and not method.contrast_active(150)
    assert set(method.stage_two_step(batch, 0).losses) == {"fusion"}


def test_the_selection_pass_selects_on_the_training_split_in_eval_mode():
    expected = {}

    def brute_force(method):
        datamodule = build(compose_train([*VECTORS, "method=dimml"]))[0]
        batches = list(datamodule.unshuffled_train_dataloader())
        with torch.no_grad():
            features = [method.model.encode(b["inputs"]) for b in batches]
        labels = torch.cat([b["label"] for b in batches])
        for m in method.modalities:
            expected[m] = _brute_force_effective(torch.cat([f[m] for f in features]), labels, 4)

    _, _, method = fit_briefly([*VECTORS, "method=dimml", "method.warmup_epochs=0"], epochs=1,
                               before_fit=brute_force)
    assert bool(method.dimensions_selected)
    for m, mask in method.effective().items():
        assert mask.tolist() == expected[m]


class _StageTwoProbe(pl.Callback):
    """The method's state at the first batch of stage 2 (after the method's epoch-start hook)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.at_start: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            self.at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_stage_two_freezes_the_encoders_and_restarts_the_fusion_head():
    probe = _StageTwoProbe(epoch=1)
    pl.seed_everything(0)
    datamodule, method = build(compose_train([*IMAGES, "method=dimml", "method.stage2_epoch=1",
                                              "method.optimizer.lr=1.0e-2"]))
    initial = {k: v.clone() for k, v in method.model.fusion.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_val_batches=0, logger=False, callbacks=[probe],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=datamodule)
    start, end = probe.at_start, method.state_dict()
    fusion = {k for k in end if k.startswith("model.fusion.")}
    for k in fusion:  # stage 2 began from the head as built ...
        assert torch.equal(start[k], initial[k.removeprefix("model.fusion.")]), k
    assert any(not torch.equal(start[k], end[k]) for k in fusion)  # ... and trained it
    frozen = [k for k in end if k not in fusion]
    assert any("running_mean" in k for k in frozen)  # batch-norm statistics stay frozen too (eval mode)
    for k in frozen:
        assert torch.equal(start[k], end[k]), k
    stage_two_optimizer = trainer.optimizers[1]
    assert stage_two_optimizer.param_groups[0]["lr"] == pytest.approx(1.0e-2)


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dimml") / "full"
    results = train(compose_train([*VECTORS, *STAGED, "trainer.max_epochs=3"], run_dir=run_dir))
    return run_dir, results


def test_it_learns_and_logs_its_quantities(staged_run):
    run_dir, results = staged_run
    assert results["test"]["acc"] > 0.7, results["test"]  # 4 classes: chance 0.25
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    train_rows = [r for r in rows if r.get("train/loss")]
    assert [float(r["train/stage"]) for r in train_rows] == [1.0, 1.0, 2.0]
    assert not train_rows[0]["train/loss_contrast"] and float(train_rows[1]["train/loss_contrast"]) > 0
    assert float(train_rows[1]["train/effective_dims_m0"]) > 0 and train_rows[1]["train/dims_m0_to_m1"]
    assert not train_rows[2]["train/loss_unimodal"] and float(train_rows[2]["train/loss_fusion"]) > 0
    for stage in ("val", "test"):
        weights = sum(results[stage][f"weight_{name}"] for name in ("m0", "m1", "fusion"))
        assert weights == pytest.approx(1.0, abs=1e-5)


def test_three_modalities_learn(tmp_path):
    results = train(compose_train([*VECTORS, *STAGED, "data.modalities=[m0,m1,m2]",
                                   "data.informativeness=[1.0,0.6,0.6]", "trainer.max_epochs=3"], run_dir=tmp_path))
    assert results["test"]["acc"] > 0.7, results["test"]


def test_a_run_resumed_at_the_stage_switch_continues_exactly(staged_run, tmp_path):
    full_dir, full = staged_run
    part = [*VECTORS, *STAGED]
    train(compose_train([*part, "trainer.max_epochs=2"], run_dir=tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    resumed = train(compose_train([*part, "trainer.max_epochs=3", f"ckpt_path={last}"], run_dir=tmp_path))
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    a = torch.load(full_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the intended directions ----------------------------------------------------------------------------------------

def test_the_weak_modality_learns_more_than_under_joint_training():
    # m0 dominates; joint training's fused loss lets it crowd m1 out, DI-MML trains m1's encoder on its own.
    accuracy = {}
    for method in ("joint", "dimml"):
        _, datamodule, module = fit_briefly([*VECTORS, "data.informativeness=[2.0,0.4]", f"method={method}",
                                             "method.optimizer.lr=1.0e-2"], epochs=3)
        accuracy[method] = held_out_accuracy(datamodule, module, "m1")
    assert accuracy["dimml"] > accuracy["joint"] + 0.05, accuracy


def test_the_duc_loss_aligns_the_student_with_its_teacher():
    # Held-out DUC loss on the selected dimensions, with and without the term (the same run until it starts).
    losses, transfer = {}, None
    for weight in (1.0, 0.0):
        _, datamodule, module = fit_briefly([*VECTORS, "data.informativeness=[2.0,0.4]", "method=dimml",
                                             "method.warmup_epochs=1", "method.temperature=5.0",
                                             f"method.contrast_weight={weight}", "method.optimizer.lr=1.0e-2"],
                                            epochs=4)
        transfer = transfer if transfer is not None else transfer_dimensions(module.effective())
        module.eval()
        with torch.no_grad():
            batches = [module.model.encode(b["inputs"]) for b in datamodule.val_dataloader()]
        losses[weight] = {pair: sum(float(unidirectional_contrastive_loss(f[pair[1]], f[pair[0]], dims, 5.0))
                                    for f in batches) / len(batches) for pair, dims in transfer.items()}
    assert all(dims.any() for dims in transfer.values())
    for pair in transfer:
        assert losses[1.0][pair] < losses[0.0][pair] - 0.2, losses


# -- refusals ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("warmup_epochs", -1, "method.warmup_epochs must be an integer >= 0"),
    ("temperature", 0.0, "method.temperature must be a number > 0"),
    ("contrast_weight", -1.0, "method.contrast_weight must be a number >= 0"),
    ("shared_weight", -0.5, "method.shared_weight must be a number >= 0"),
    ("stage2_epoch", 0, "method.stage2_epoch must be an integer >= 1"),
    ("fusion_temperature", 0.0, "method.fusion_temperature must be a number > 0"),
    ("gradient_clip_val", 0.0, "method.gradient_clip_val must be a number > 0 or null"),
])
def test_bad_options_are_refused(option, value, message):
    with pytest.raises(Exception, match=message):
        build(compose_train([*VECTORS, "method=dimml", f"method.{option}={value}"]))


def test_unequal_feature_sizes_and_a_single_modality_are_refused():
    encoders = {"m0": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=8),
                "m1": MLPEncoder(in_dim=4, hidden_dims=[8], out_dim=6)}
    with pytest.raises(ValueError, match="set model.feature_dim"):
        DIMML(model=MultimodalModel(encoders, partial(ConcatFusion), 3), optimizer=torch.optim.SGD)
    DIMML(model=MultimodalModel(encoders, partial(ConcatFusion), 3, feature_dim=8), optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="needs at least two"):
        DIMML(model=MultimodalModel({"m0": encoders["m0"]}, partial(ConcatFusion), 3), optimizer=torch.optim.SGD)

"""CML: the confidence, the removal chain and the penalty by hand, the step's loss against a literal computation of
the port's formula on the concat head, the options (removal order, hinge, exemption, epoch window) and their
refusals, learning with M = 2 and 3 (missing modalities included) with the logged violation rates, and the intended
direction with a dominant modality (the weak modality's own accuracy beats joint training's, with fewer
violations)."""

import csv

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.cml import confidence, confidence_increase_penalty, removal_chain
from balance.run import build, train
from compose import SYNTHETIC, compose_train, fit_briefly

QUIET = [*SYNTHETIC, "callbacks.contributions=null"]
CML = [*QUIET, "method=cml", "data.num_samples=400", "data.batch_size=32"]


def test_confidence_is_the_largest_softmax_probability():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    expected = [0.5, torch.sigmoid(torch.tensor(2.0)).item(), torch.sigmoid(torch.tensor(3.0)).item()]
    assert confidence(logits).tolist() == pytest.approx(expected)


def test_the_chain_removes_present_modalities_one_at_a_time_in_key_order():
    keys = torch.tensor([[0.3, 0.1, 0.9], [0.5, 0.2, 0.1]])
    chain = removal_chain(keys)
    # Sample 0 loses m1, then m0; sample 1 loses m2, then m1.
    assert chain[:, 0].tolist() == [[True, True, True], [True, False, True], [False, False, True]]
    assert chain[:, 1].tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    # A missing modality is never kept, and the sample's chain is one input shorter.
    present = torch.tensor([[True, True, True], [True, False, True]])
    chain = removal_chain(keys, present)
    assert chain[:, 0].tolist() == [[True, True, True], [True, False, True], [False, False, True]]
    assert chain[:, 1].tolist() == [[True, False, True], [True, False, False], [False, False, False]]


def test_the_penalty_hinges_each_rise_of_confidence_by_hand():
    # Two pairs (K = 3) of three samples; sample 2 has no second pair.
    confidences = torch.tensor([[0.5, 0.8, 0.6], [0.7, 0.6, 0.9], [0.6, 0.9, 0.9]], requires_grad=True)
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # sample: pair 0 rises 0.2, -0.2, 0.3; pair 1 rises -0.1, 0.3 (sample 2's does not count).
    penalty = confidence_increase_penalty(confidences, valid, "sample")
    assert float(penalty) == pytest.approx(0.2 + 0.3 + 0.3)
    # batch (the port): the hinge on each pair's summed rise, max(0, 0.3) + max(0, 0.2).
    assert float(confidence_increase_penalty(confidences, valid, "batch")) == pytest.approx(0.3 + 0.2)
    # Exempting pair 0 of sample 2 leaves its rise out.
    exempt = torch.tensor([[False, False, True], [False, False, False]])
    assert float(confidence_increase_penalty(confidences, valid, "sample", exempt)) == pytest.approx(0.2 + 0.3)
    # Descent lowers the confidence with less information and raises the one with more, where it rose.
    penalty.backward()
    grad = confidences.grad
    assert grad[1, 0] > 0 and grad[0, 0] < 0  # pair 0 of sample 0 (and its pair 1 does not rise)
    assert grad[2, 1] > 0 and grad[0, 1] == 0  # sample 1: only pair 1 rises
    assert grad[2, 2] == 0  # the pair that does not exist


def _method(overrides):
    datamodule, method = build(compose_train([*CML, *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)
    return datamodule, method


def _port_chain(method, features, order):
    """The port's chain, written out on the concat head for one removal order shared by the batch: from the fused
    logits, each removal subtracts the modality's own logits ``W_m f_m + b / M`` and adds back ``b / M``."""
    head = method.model.fusion.linear
    share = head.bias / len(method.modalities)
    own = method.model.unimodal_logits(features)
    logits = [head(torch.cat([features[m] for m in method.modalities], dim=1))]
    for m in order[:-1]:
        logits.append(logits[-1] - own[m] + share)
    return logits


@pytest.mark.parametrize("modalities,informativeness", [("[m0,m1]", "[2.0,0.4]"), ("[m0,m1,m2]", "[2.0,0.4,0.4]")])
@pytest.mark.parametrize("hinge", ["sample", "batch"])
def test_the_step_loss_is_the_chain_cross_entropy_plus_the_weighted_penalty(modalities, informativeness, hinge):
    datamodule, method = _method([f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                  "method.order=epoch", f"method.hinge={hinge}", "method.penalty_weight=0.5"])
    method.on_train_epoch_start()
    keys = method._epoch_keys
    order = [method.modalities[i] for i in keys.argsort().tolist()]
    with torch.no_grad():  # larger head weights than at initialisation: some removals then raise the confidence
        head = method.model.fusion.linear
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)))
    batch = next(iter(datamodule.train_dataloader()))
    step = method.forward_step(batch, 0)
    y = step.labels
    logits = _port_chain(method, step.features, order)
    ce = sum(F.cross_entropy(z, y) for z in logits) / len(logits)
    rises = [F.softmax(b, 1).max(1).values - F.softmax(a, 1).max(1).values for a, b in zip(logits, logits[1:])]
    penalty = sum(r.clamp_min(0).sum() if hinge == "sample" else r.sum().clamp_min(0) for r in rises)
    assert set(step.losses) == {"chain_ce", "cml"}
    assert step.losses["chain_ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert step.losses["cml"].item() == pytest.approx(0.5 * penalty.item(), rel=1e-4, abs=1e-6)
    if hinge == "sample":  # (under the port's hinge of the summed rises, this batch's falls outweigh its rises)
        assert step.losses["cml"].item() > 0


def test_the_sample_order_draws_a_new_order_per_sample_from_the_method_generator():
    datamodule, method = _method(["data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.4,0.4]"])
    state = method.generator.get_state()
    first = method._removal_keys(64, torch.device("cpu"))
    assert len({tuple(row.argsort().tolist()) for row in first}) > 1  # samples differ
    assert not torch.equal(method._removal_keys(64, torch.device("cpu")), first)  # and steps do
    method.generator.set_state(state)
    assert torch.equal(method._removal_keys(64, torch.device("cpu")), first)  # from the seeded generator
    _, method = _method(["method.order=epoch", "data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.4,0.4]"])
    method.on_train_epoch_start()
    keys = method._removal_keys(8, torch.device("cpu"))
    assert torch.equal(keys, keys[:1].expand(8, -1)) and torch.equal(method._removal_keys(8, torch.device("cpu")), keys)


def test_exempting_corrected_pairs_only_removes_penalty():
    datamodule, method = _method(["method.order=epoch"])
    method.on_train_epoch_start()
    batch = next(iter(datamodule.train_dataloader()))
    plain = method.forward_step(batch, 0).losses
    method.exempt_corrected = True
    exempted = method.forward_step(batch, 0).losses
    assert exempted["chain_ce"].item() == pytest.approx(plain["chain_ce"].item())
    assert exempted["cml"].item() <= plain["cml"].item() + 1e-7


def test_outside_the_epoch_window_the_loss_is_the_fused_cross_entropy():
    datamodule, method = _method(["method.modulation_starts=2"])
    batch = next(iter(datamodule.train_dataloader()))
    step = method.forward_step(batch, 0)  # epoch 0
    assert set(step.losses) == {"fused"}
    assert step.losses["fused"].item() == pytest.approx(F.cross_entropy(step.logits, step.labels).item())


def _epoch_rows(run_dir):
    return [r for r in csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()) if r.get("train/loss")]


@pytest.mark.parametrize("modalities,informativeness,extra", [
    ("[m0,m1]", "[2.0,0.4]", []),
    ("[m0,m1,m2]", "[2.0,0.4,0.4]", ["data.missing_rate=0.3"]),
])
def test_training_learns_and_logs_the_violations(modalities, informativeness, extra, tmp_path):
    results = train(compose_train([*CML, f"data.modalities={modalities}", f"data.informativeness={informativeness}",
                                   "method.optimizer.lr=1.0e-2", "trainer.max_epochs=4", *extra], run_dir=tmp_path))
    rows = _epoch_rows(tmp_path)
    losses = [float(r["train/loss"]) for r in rows]
    assert len(losses) == 4 and losses[-1] < 0.7 * losses[0], losses
    assert results["test"]["acc"] > 0.6, results["test"]  # 4 classes: chance 0.25
    names = modalities.strip("[]").split(",")
    logged = {f"{stage}/{name}" for stage in ("train", "val", "test")
              for name in ("violation_rate", "confidence_increase")}
    logged |= {f"{stage}/violation_rate_{m}" for stage in ("val", "test") for m in names}
    assert logged <= set(rows[0])  # every column of the file
    for row in rows:
        assert 0.0 <= float(row["train/violation_rate"]) <= 1.0
        assert 0.0 <= float(row["train/confidence_increase"]) <= 1.0
    assert 0.0 <= results["test"]["violation_rate"] <= 1.0


def _held_out(datamodule, method):
    """The weak modality's own accuracy and the share of (sample, removed modality) pairs whose fused confidence
    rose without the modality, over the validation and test splits."""
    method.eval()
    correct = rose = total = 0
    with torch.no_grad():
        for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
            for batch in loader:
                features, y = method.model.encode(batch["inputs"]), batch["label"]
                correct += int((method.unimodal_logits(features)["m1"].argmax(1) == y).sum())
                full = confidence(method.model.fuse(features))
                for keep in ([False, True], [True, False]):
                    alone = method.model.fuse(features, torch.tensor(keep).expand(len(y), -1))
                    rose += int((confidence(alone) > full).sum())
                total += len(y)
    return correct / total, rose / (2 * total)


def test_the_weak_modality_learns_more_than_under_joint_training_with_fewer_violations(tmp_path):
    # The same seed, data, batches and optimizer; m0 dominates. Measured over data seeds 0-4 (5 epochs, M = 2):
    # m1's held-out accuracy was higher under CML in every run (by 0.04-0.18) and the violation rate lower (by
    # 0.01-0.08). The accuracy gain comes from the chain's cross-entropy on the inputs without m0: with
    # penalty_weight=0 it is about the same, while the penalty itself lowered the violation rate further by only
    # 0.002-0.02 (every seed), too little to assert here; its direction is tested by hand above.
    measured = {}
    for method in ("joint", "cml"):
        _, datamodule, module = fit_briefly([*QUIET, f"method={method}", "data.informativeness=[2.0,0.4]",
                                             "data.num_samples=1000"], epochs=5, run_dir=tmp_path / method)
        measured[method] = _held_out(datamodule, module)
    assert measured["cml"][0] > measured["joint"][0] + 0.05, measured
    assert measured["cml"][1] < measured["joint"][1], measured


@pytest.mark.parametrize("override,message", [
    ("method.penalty_weight=-0.1", "method.penalty_weight must be a number >= 0"),
    ("method.order=batch", "method.order must be one of"),
    ("method.hinge=pair", "method.hinge must be one of"),
    ("method.exempt_corrected=maybe", "method.exempt_corrected must be true or false"),
    ("method.modulation_starts=-1", "method.modulation_starts must be an integer >= 0"),
    ("method.modulation_ends=-1", "method.modulation_ends must be an integer >= 0"),
])
def test_invalid_options_are_refused(override, message):
    with pytest.raises(Exception, match=message):  # Hydra wraps the ValueError
        build(compose_train([*CML, override]))


def test_a_single_modality_is_refused():
    with pytest.raises(Exception, match="needs at least two"):
        build(compose_train([*CML, "data.modalities=[m0]", "data.informativeness=[2.0]"]))

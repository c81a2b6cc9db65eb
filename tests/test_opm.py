"""OPM: the drop probabilities against the official rule, the modulated forward step, M = 3, the refusals, and
the intended direction (the dominant encoder learns less, the weak one more)."""

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.ogm_ge import confidence_scores
from balance.methods.opm import drop_probabilities, feature_scale
from balance.run import build, train
from compose import compose_train, fit_and_measure_encoders

SYNTHETIC = ["data=synthetic", "model=mlp", "data.num_samples=400", "data.batch_size=32",
             "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false", "callbacks.contributions=null"]


def _official_q(s1: float, s2: float, q_base: float, lam: float) -> list[float]:
    """The official ``calcu_q`` (two modalities), written out on floats."""
    r1, r2 = math.tanh(max(s1 / s2 - 1, 0)), math.tanh(max(s2 / s1 - 1, 0))
    q = [q_base * (1 + lam * r1) if r1 > 0 else 0.0, q_base * (1 + lam * r2) if r2 > 0 else 0.0]
    return [min(max(x, 0.0), 1.0) for x in q]


def test_drop_probabilities_match_the_official_rule():
    assert drop_probabilities(torch.tensor([30.0, 10.0]), 0.5, 0.5).tolist() == pytest.approx(
        [0.5 * (1 + 0.5 * math.tanh(2.0)), 0.0])
    assert drop_probabilities(torch.tensor([10.0, 40.0]), 0.4, 1.0).tolist() == pytest.approx(
        [0.0, 0.4 * (1 + math.tanh(3.0))])
    assert drop_probabilities(torch.tensor([7.0, 7.0]), 0.5, 0.5).tolist() == [0.0, 0.0]  # a tie drops nothing
    assert drop_probabilities(torch.tensor([30.0, 10.0]), 0.9, 1.0).tolist() == [1.0, 0.0]  # clipped
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = torch.rand(2, generator=generator) * 32 + 0.1
        q_base, lam = float(torch.rand((), generator=generator)), float(torch.rand((), generator=generator)) * 2
        assert drop_probabilities(s, q_base, lam).tolist() == pytest.approx(_official_q(*s.tolist(), q_base, lam))


def test_three_modalities_compare_with_the_weakest_other():
    q = drop_probabilities(torch.tensor([30.0, 10.0, 20.0]), 0.5, 0.5)
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(2.0)), 0.0, 0.5 * (1 + 0.5 * math.tanh(1.0))])


def test_feature_scale_is_the_inverse_kept_share_of_the_concatenation():
    # theta = (32 * 0.6 + 16 * 0) / 48 = 0.4
    assert float(feature_scale(torch.tensor([0.6, 0.0]), torch.tensor([32.0, 16.0]))) == pytest.approx(1 / 0.6)
    assert float(feature_scale(torch.zeros(3), torch.tensor([8.0, 8.0, 8.0]))) == 1.0


def _method(overrides):
    datamodule, method = build(compose_train([*SYNTHETIC, "method=opm", "method.modulation_starts=0", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


@pytest.mark.parametrize("modalities", [["m0", "m1"], ["m0", "m1", "m2"]])
def test_forward_step_drops_by_the_drawn_mask_and_rescales(modalities):
    overrides = [f"data.modalities=[{','.join(modalities)}]",
                 f"data.informativeness=[{','.join(['2.0'] + ['0.3'] * (len(modalities) - 1))}]", "method.p_exe=1.0"]
    datamodule, method = _method(overrides)
    batch = next(iter(datamodule.train_dataloader()))
    state = method.generator.get_state()
    step = method.forward_step(batch, 0)

    features = method.model.encode(batch["inputs"])
    q = drop_probabilities(confidence_scores(method.model.unimodal_logits(features), batch["label"]), 0.5, 0.5)
    replay = torch.Generator().set_state(state)
    assert float(torch.rand((), generator=replay)) < 1.0  # the p_exe draw
    keep = torch.rand(1, len(batch["label"]), len(modalities), generator=replay)[0] >= q
    assert (~keep).any()  # the dominant modality is dropped somewhere
    assert keep[:, int(q.argmin())].all()  # the weakest modality is never dropped
    dims = torch.tensor([float(features[m].shape[1]) for m in modalities])
    theta = float((dims * q).sum() / dims.sum())
    dropped = torch.cat([features[m] * keep[:, i:i + 1] / (1 - theta) for i, m in enumerate(modalities)], dim=1)
    assert torch.allclose(step.logits, method.model.fusion.linear(dropped), atol=1e-6)
    assert torch.allclose(step.loss, F.cross_entropy(step.logits, batch["label"]), atol=1e-6)
    # Each modality's own logits (its training accuracy, the next scores) stay those of its undropped features.
    for m in modalities:
        assert torch.allclose(step.unimodal_logits[m], method.model.unimodal_logits(features)[m])
    assert float(method.train_method_metrics[f"drop_prob_{modalities[0]}"].compute()) == pytest.approx(float(q[0]))


def test_no_modulation_outside_the_window_or_when_the_batch_is_not_drawn():
    for overrides in (["method.modulation_starts=1"], ["method.p_exe=0.0"]):
        datamodule, method = _method(overrides)
        batch = next(iter(datamodule.train_dataloader()))
        step = method.forward_step(batch, 0)
        assert torch.allclose(step.logits, method.model(batch["inputs"]), atol=1e-6)


def test_masks_drop_at_the_rate_q_and_each_rank_takes_its_slice():
    _, method = _method(["method.p_exe=1.0"])
    q = torch.tensor([0.7, 0.0])
    keep = method.drop_mask(q, 20000)
    assert 1 - keep[:, 0].float().mean() == pytest.approx(0.7, abs=0.02) and keep[:, 1].all()
    state = method.generator.get_state()
    method._ranks = lambda: (2, 1)
    second = method.drop_mask(q, 8)
    replay = torch.Generator().set_state(state)
    torch.rand((), generator=replay)
    assert torch.equal(second, torch.rand(2, 8, 2, generator=replay)[1] >= q)


@pytest.mark.parametrize("override, match", [
    ("model/fusion=film", "model/fusion=concat"), ("model/fusion=gated", "model/fusion=concat"),
    ("method.q_base=1.5", "q_base"), ("method.p_exe=-0.1", "p_exe"), ("method.lam=-1", "lam"),
    ("method.modulation_starts=-1", "epoch >= 0")])
def test_refusals_name_the_fix(override, match):
    with pytest.raises(Exception, match=match):
        build(compose_train([*SYNTHETIC, "method=opm", override]))


def test_one_modality_is_refused():
    with pytest.raises(Exception, match="at least two modalities"):
        build(compose_train([*SYNTHETIC, "method=opm", "data.modalities=[m0]", "data.informativeness=[2.0]"]))


def test_dominant_encoder_learns_less_and_the_weak_one_more_than_under_joint_training():
    # The same seed, data, batches and optimizer (AdamW); m0 carries most of the signal.
    moved, weak_acc = {}, {}
    for method in ("joint", "opm"):
        moved[method], trainer, datamodule, module = fit_and_measure_encoders(
            [*SYNTHETIC, "data.num_samples=800", f"method={method}", "optimizer=adamw",
             *(["method.modulation_starts=0"] if method == "opm" else [])], epochs=4)
        if method == "opm":
            logged = trainer.logged_metrics
            assert float(logged["train/drop_prob_m0"]) > 0.5 and float(logged["train/drop_prob_m1"]) == 0.0
        evaluation = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        weak_acc[method] = evaluation.validate(module, datamodule=datamodule, verbose=False)[0]["val/acc_m1"]
    assert moved["opm"]["m0"] < 0.9 * moved["joint"]["m0"], moved
    assert moved["opm"]["m1"] > 1.1 * moved["joint"]["m1"], moved
    assert weak_acc["opm"] > weak_acc["joint"], weak_acc


def test_logged_drop_probabilities_reach_the_metrics(tmp_path):
    results = train(compose_train([*SYNTHETIC, "method=opm", "method.modulation_starts=1", "trainer.max_epochs=2"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.25
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/drop_prob_m0", "train/drop_prob_m1", "train/dropped_m0", "train/dropped_m1"} <= set(header)

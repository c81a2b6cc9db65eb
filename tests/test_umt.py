"""UMT: teachers from this project's unimodal runs, the distillation term by hand, what it teaches, refusals."""

import pytest
import torch
from torch.nn import functional as F

from balance.checkpoints import selected_checkpoint
from balance.run import build, train
from compose import SYNTHETIC, compose_train, fit_briefly

# m0 carries the label strongly, m1 weakly: joint training leaves m1's encoder behind.
DATA = [*SYNTHETIC, "data.num_samples=600", "data.informativeness=[2.0,0.4]", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A finished unimodal run per modality (run directories)."""
    root = tmp_path_factory.mktemp("teachers")
    for m in ("m0", "m1"):
        train(compose_train([*DATA, "method=unimodal", f"method.modality={m}", "trainer.max_epochs=4"],
                            run_dir=root / m))
    return {m: root / m for m in ("m0", "m1")}


def _umt(teachers, *extra):
    return [*DATA, "method=umt", f"method.teachers={{m0: {teachers['m0']}, m1: {teachers['m1']}}}", *extra]


def test_teachers_are_the_unimodal_runs_encoders_frozen_and_outside_the_model(teachers):
    _, method = build(compose_train(_umt(teachers)))
    parameters_before = sum(p.numel() for p in method.parameters())
    teacher = method.load_teacher("m1")
    _, unimodal = build(compose_train([*DATA, "method=unimodal", "method.modality=m1"]))
    state = torch.load(selected_checkpoint(teachers["m1"]), map_location="cpu", weights_only=True)["state_dict"]
    unimodal.load_state_dict(state)
    inputs = torch.randn(5, 16)
    method._teachers = {"m1": teacher}
    with torch.no_grad():
        expected = unimodal.model.eval().encode({"m0": inputs, "m1": inputs})["m1"]
    assert torch.allclose(method.teacher_features("m1", inputs), expected, atol=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in method.parameters()) == parameters_before
    assert not any("teacher" in key for key in method.state_dict())


def test_the_distillation_term_by_hand(teachers):
    _, method = build(compose_train(_umt(teachers, "method.distill_weight=3.0")))
    method._teachers = {m: method.load_teacher(m) for m in method.modalities}
    batch = {"inputs": {"m0": torch.randn(6, 16), "m1": torch.randn(6, 16)}, "label": torch.arange(6) % 3,
             "index": torch.arange(6)}
    step = method.forward_step(batch, 0)
    by_hand = sum(F.mse_loss(step.features[m], method.teacher_features(m, batch["inputs"][m]))
                  for m in method.modalities)
    assert float(step.losses["distill"]) == pytest.approx(3.0 * float(by_hand), rel=1e-5)
    assert float(step.losses["fused"]) == pytest.approx(float(F.cross_entropy(step.logits, batch["label"])))
    # A missing modality's samples leave its term.
    batch["present"] = torch.tensor([[True, True]] * 3 + [[True, False]] * 3)
    step = method.forward_step(batch, 0)
    m1 = F.mse_loss(step.features["m1"][:3], method.teacher_features("m1", batch["inputs"]["m1"][:3]))
    m0 = F.mse_loss(step.features["m0"], method.teacher_features("m0", batch["inputs"]["m0"]))
    assert float(step.losses["distill"]) == pytest.approx(3.0 * float(m0 + m1), rel=1e-5)


def test_the_weak_encoder_learns_what_its_teacher_learned(teachers, tmp_path):
    trainer, datamodule, umt = fit_briefly(_umt(teachers), epochs=4, run_dir=tmp_path / "umt")
    _, _, joint = fit_briefly([*DATA, "method=joint"], epochs=4, run_dir=tmp_path / "joint")
    loader = datamodule.val_dataloader()

    def distance_to_teacher(method):
        umt_teacher = umt._teachers["m1"]
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                inputs = batch["inputs"]["m1"]
                target = umt_teacher["encoder"](inputs)
                total += float(F.mse_loss(method.model.eval().encode(batch["inputs"])["m1"], target,
                                          reduction="sum"))
                count += target.numel()
        return total / count

    assert distance_to_teacher(umt) < 0.5 * distance_to_teacher(joint)
    assert float(trainer.callback_metrics["train/distill_m1"]) >= 0


@pytest.mark.parametrize("make, match", [
    (lambda t: [*DATA, "method=umt", f"method.teachers={{m0: {t['m0']}}}"],
     r"method.teachers must name a unimodal run for each of \['m0', 'm1'\] \(missing \['m1'\]"),
])
def test_incomplete_teachers_are_refused_at_build_time(teachers, make, match):
    with pytest.raises(Exception, match=match):
        build(compose_train(make(teachers)))


def test_a_teacher_of_the_wrong_kind_is_refused_when_fitting_starts(teachers, tmp_path):
    _, method = build(compose_train(_umt({"m0": teachers["m1"], "m1": teachers["m1"]})))
    with pytest.raises(ValueError, match="the m0 teacher .* was not trained with method=unimodal method.modality=m0"):
        method.load_teacher("m0")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    _, method = build(compose_train(_umt({"m0": unfinished, "m1": teachers["m1"]})))
    with pytest.raises(FileNotFoundError, match="run directory without results.json: that run has not finished"):
        method.load_teacher("m0")
    _, method = build(compose_train(_umt(teachers, "model.encoders.encoder.hidden_dims=[8]")))
    with pytest.raises(ValueError, match="the m0 teacher .* does not fit this model's m0 encoder"):
        method.load_teacher("m0")

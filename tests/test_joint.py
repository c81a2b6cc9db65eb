"""The joint baseline learns, and its per-modality accuracies follow which modality carries the signal."""

import pytest

from balance.run import train
from compose import SYNTHETIC, compose_train


@pytest.mark.parametrize("informative", [0, 1])
def test_joint_learns_and_tracks_informative_modality(tmp_path, informative):
    scales = ["1.0", "0.0"] if informative == 0 else ["0.0", "1.0"]
    cfg = compose_train(
        [*SYNTHETIC, f"data.informativeness=[{','.join(scales)}]", "trainer.max_epochs=6", "logger=[]"],
        run_dir=tmp_path,
    )
    test = train(cfg)["test"]
    chance = 1 / cfg.data.num_classes
    strong, weak = (test["acc_m0"], test["acc_m1"]) if informative == 0 else (test["acc_m1"], test["acc_m0"])
    assert test["acc"] > chance + 0.5, test
    assert strong > weak + 0.4, test
    assert weak < chance + 0.15, test  # the pure-noise modality predicts at about chance


def test_unimodal_auxiliary_loss_lifts_weak_modality(tmp_path):
    """With CE on every modality's own logits the weaker (but informative) modality learns more on its own."""
    base = [*SYNTHETIC, "data.informativeness=[1.5,0.5]", "trainer.max_epochs=6", "logger=[]"]
    plain = train(compose_train(base, run_dir=tmp_path / "plain"))["test"]
    aux = train(compose_train([*base, "method.unimodal_loss_weight=1.0"], run_dir=tmp_path / "aux"))["test"]
    assert aux["acc_m1"] > plain["acc_m1"] + 0.05, (plain, aux)

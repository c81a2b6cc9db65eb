"""The unimodal baseline: one modality's encoder and a head, trained and evaluated alone."""

import pytest
import torch

from balance.models.encoders import AbsentEncoder
from balance.run import build, train
from compose import SYNTHETIC, compose_train

# m0 carries the label strongly, m1 weakly.
DOMINANT = [*SYNTHETIC, "data.num_samples=600", "data.informativeness=[2.0,0.4]"]


def _unimodal(modality: str, *extra: str):
    return build(compose_train([*DOMINANT, "method=unimodal", f"method.modality={modality}", *extra]))[1]


def test_only_the_kept_encoder_is_in_the_model_and_its_prediction_is_a_linear_head_on_it():
    method = _unimodal("m0")
    model = method.model
    assert isinstance(model.encoders["m1"], AbsentEncoder)
    assert not any(n.startswith("encoders.m1.") for n, _ in model.named_parameters())
    inputs = {"m0": torch.randn(5, 16), "m1": torch.full((5, 16), float("nan"))}  # m1's input is never read
    features = model.encode(inputs)
    assert torch.equal(features["m1"], torch.zeros(5, features["m1"].shape[1]))
    head = model.fusion.linear  # the concatenation head
    width = features["m0"].shape[1]
    by_hand = features["m0"] @ head.weight[:, :width].T + head.bias  # W_m0 h_m0 + b
    assert torch.allclose(method(inputs), by_hand, atol=1e-6)
    assert torch.equal(method.unimodal_logits(features)["m0"], method(inputs))


def test_each_modality_alone_learns_as_far_as_its_information_goes(tmp_path):
    accuracy = {}
    for modality in ("m0", "m1"):
        cfg = compose_train([*DOMINANT, "method=unimodal", f"method.modality={modality}", "trainer.max_epochs=4",
                             "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"],
                            run_dir=tmp_path / modality)
        results = train(cfg)["test"]
        assert results["acc"] == pytest.approx(results[f"acc_{modality}"])  # the same prediction
        assert not any(key.startswith("acc_") and key != f"acc_{modality}" for key in results)
        accuracy[modality] = results["acc"]
    chance = 1 / compose_train(DOMINANT).data.num_classes
    assert accuracy["m0"] > accuracy["m1"] > chance + 0.05, accuracy


def test_three_modalities_keep_one():
    method = _unimodal("m2", "data.modalities=[m0,m1,m2]", "data.informativeness=[1.0,1.0,1.0]")
    assert [m for m, e in method.model.encoders.items() if not isinstance(e, AbsentEncoder)] == ["m2"]
    assert set(method.train_metrics.keys()) == {"acc", "f1", "loss", "acc_m2"}


def test_a_projected_modality_loses_its_projection_too():
    method = _unimodal("m0", "model.feature_dim=8")
    assert list(method.model.projections) == ["m0"]
    assert method.model.encode({"m0": torch.randn(3, 16), "m1": torch.randn(3, 16)})["m1"].shape == (3, 8)


@pytest.mark.parametrize("override, match", [
    ([], r"method.modality must be set for this method, e.g. method.modality=<value>"),
    (["method.modality=m7"], r"method.modality must be one of \('m0', 'm1'\), got 'm7'"),
])
def test_the_kept_modality_must_be_one_of_the_data(override, match):
    with pytest.raises(Exception, match=match):
        build(compose_train([*DOMINANT, "method=unimodal", *override]))

"""Missing-modality sweep: r = 0 is the plain evaluation, the realised rate is r, accuracy falls with r, masks
follow the sample index, batch `present` combines, the inputs path zeroes inputs without telling the model."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from balance.diagnostics.missing_modality import MissingModalitySweep, split_size
from diagnostic_fixtures import joint_method, make_batches
from balance.methods.joint import JointTraining
from balance.models import MLPEncoder
from balance.missing import missing_mask

CONF = Path(__file__).resolve().parents[1] / "conf" / "diagnostics"


def method_of(encoders: dict[str, nn.Module], num_classes: int, seed: int = 0) -> JointTraining:
    torch.manual_seed(seed)
    return joint_method(encoders, num_classes)


def mlp_method(num_modalities: int = 2, in_dim: int = 4, num_classes: int = 3) -> JointTraining:
    torch.manual_seed(0)
    return method_of({f"m{i}": MLPEncoder(in_dim, hidden_dims=(8,), out_dim=4) for i in range(num_modalities)},
                     num_classes)


def random_batches(num_samples: int, num_modalities: int = 2, in_dim: int = 4, num_classes: int = 3,
                   batch_size: int = 16, present: torch.Tensor | None = None) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    inputs = {f"m{i}": torch.randn(num_samples, in_dim, generator=generator) for i in range(num_modalities)}
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    return make_batches(inputs, labels, batch_size, present)


def plain_scores(method, data, keep_of=lambda batch: batch.get("present"), inputs_of=lambda batch: batch["inputs"]):
    """Accuracy, macro-F1 and mean cross-entropy of an ordinary evaluation pass."""
    method.eval()
    preds, labels, loss = [], [], 0.0
    with torch.no_grad():
        for batch in data:
            logits = method.fused_logits(method.model.encode(inputs_of(batch)), keep=keep_of(batch))
            preds.append(logits.argmax(1))
            labels.append(batch["label"])
            loss += float(F.cross_entropy(logits, batch["label"], reduction="sum"))
    preds, labels = torch.cat(preds), torch.cat(labels)
    num_classes = method.model.num_classes
    return (float(multiclass_accuracy(preds, labels, num_classes, average="micro")),
            float(multiclass_f1_score(preds, labels, num_classes, average="macro")), loss / len(labels))


@pytest.mark.parametrize("drop", ["features", "inputs"])
def test_rate_zero_is_the_plain_evaluation(drop):
    method = mlp_method()
    data = random_batches(50)
    result = MissingModalitySweep(rates=[0.0, 0.3], drop=drop).compute(method, data)
    acc, f1, loss = plain_scores(method, data)
    assert (result["acc"][0], result["f1"][0], result["loss"][0]) == (acc, f1, loss)
    assert result["realised_rate"][0] == 0.0 and result["num_samples"] == 50


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_realised_rate_is_the_requested_rate(num_modalities):
    encoders = {f"m{i}": nn.Identity() for i in range(num_modalities)}
    for encoder in encoders.values():
        encoder.out_dim = 2
    method = method_of(encoders, num_classes=2)
    data = random_batches(10_000, num_modalities=num_modalities, in_dim=2, num_classes=2, batch_size=2_500)
    result = MissingModalitySweep().compute(method, data)
    cap = (num_modalities - 1) / num_modalities
    assert result["rates"] == [r for r in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7) if r <= cap]
    for rate, realised in zip(result["rates"], result["realised_rate"]):
        assert abs(realised - rate) <= 0.01


def test_accuracy_falls_when_both_modalities_matter():
    # Label = 2 a + b with bit a carried by modality t and bit b by modality v, each as a +-1 feature; the head
    # scores class (a, b) by the signs: with one modality dropped half the samples are wrong (a tie at best).
    encoders = {"t": nn.Identity(), "v": nn.Identity()}
    for encoder in encoders.values():
        encoder.out_dim = 1
    method = method_of(encoders, num_classes=4)
    signs = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])  # class c = 2 a + b
    with torch.no_grad():
        method.model.fusion.linear.weight.copy_(signs)
        method.model.fusion.linear.bias.zero_()
    labels = torch.randint(4, (2_000,), generator=torch.Generator().manual_seed(0))
    data = make_batches({"t": signs[labels, :1], "v": signs[labels, 1:]}, labels, batch_size=500)
    result = MissingModalitySweep().compute(method, data)
    assert result["acc"][0] == 1.0
    assert all(later < earlier for earlier, later in zip(result["acc"], result["acc"][1:]))
    assert result["acc"][-1] == pytest.approx(0.5, abs=0.05)  # at r = 0.5 every sample misses one modality


def test_masks_follow_the_sample_index():
    method = mlp_method()
    data = random_batches(40, batch_size=8)
    shuffled = [{**b, **{k: b[k][perm] for k in ("label", "index")},
                 "inputs": {m: x[perm] for m, x in b["inputs"].items()}}
                for b in reversed(data) for perm in [torch.randperm(len(b["label"]))]]
    sweep = MissingModalitySweep(rates=[0.2, 0.5])
    first, second = sweep.compute(method, data), sweep.compute(method, shuffled)
    for key in ("realised_rate", "acc", "f1"):
        assert first[key] == second[key]
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)


def test_batch_present_is_combined_with_the_mask():
    method = mlp_method()
    present = torch.ones(40, 2, dtype=torch.bool)
    present[:10, 0] = False
    data = random_batches(40, present=present)
    result = MissingModalitySweep(rates=[0.0, 0.25]).compute(method, data)
    acc, f1, loss = plain_scores(method, data)
    assert (result["acc"][0], result["f1"][0], result["loss"][0]) == (acc, f1, loss)
    assert result["realised_rate"][0] == 10 / 80
    mask = torch.from_numpy(missing_mask(40, 2, 0.25, seed=0))
    assert result["realised_rate"][1] == float((~(mask & present)).sum()) / 80
    acc, _, _ = plain_scores(method, data, keep_of=lambda b: mask[b["index"]] & b["present"])
    assert result["acc"][1] == acc


def test_inputs_path_zeroes_inputs_and_does_not_tell_the_model():
    method = mlp_method()
    data = random_batches(60)
    mask = torch.from_numpy(missing_mask(60, 2, 0.4, seed=7))

    def zeroed(batch):
        keep = mask[batch["index"]]
        return {m: x * keep[:, i, None] for i, (m, x) in enumerate(batch["inputs"].items())}

    result = MissingModalitySweep(rates=[0.4], drop="inputs", seed=7).compute(method, data)
    acc, f1, loss = plain_scores(method, data, keep_of=lambda b: None, inputs_of=zeroed)
    assert (result["acc"][0], result["f1"][0]) == (acc, f1)
    assert result["loss"][0] == pytest.approx(loss, rel=1e-6)
    # An MLP maps a zero input to its biases, not to zero features: the two drops differ.
    features = MissingModalitySweep(rates=[0.4], drop="features", seed=7).compute(method, data)
    assert features["loss"][0] != pytest.approx(result["loss"][0], rel=1e-3)


def test_rates_above_the_cap_are_refused():
    with pytest.raises(ValueError, match="missing rate"):
        MissingModalitySweep(rates=[0.6]).compute(mlp_method(), random_batches(10))
    with pytest.raises(ValueError, match="drop"):
        MissingModalitySweep(drop="tokens")


class _Items(Dataset):
    def __len__(self):
        return 30

    def __getitem__(self, index):
        return {"inputs": {"m0": torch.randn(4), "m1": torch.randn(4)}, "label": index % 3, "index": index}


def test_split_size_reads_a_dataloader_or_the_batches():
    assert split_size(DataLoader(_Items(), batch_size=8)) == 30
    assert split_size(random_batches(27, batch_size=10)) == 27
    result = MissingModalitySweep(rates=[0.3]).compute(mlp_method(), DataLoader(_Items(), batch_size=8))
    assert result["num_samples"] == 30 and result["realised_rate"][0] == pytest.approx(0.3)


def test_result_is_json_and_renders():
    method = mlp_method()
    method.train()
    sweep = MissingModalitySweep()
    result = sweep.compute(method, random_batches(20))
    assert method.training
    json.dumps(result)
    assert set(sweep.scalars(result)) == {f"{k}_r{r:.2f}" for k in ("acc", "f1") for r in result["rates"]}
    assert sweep.summary(result).count("\n| 0.") == len(result["rates"])
    figures = sweep.figures(result)
    assert set(figures) == {"accuracy_vs_rate"}
    plt.close(figures["accuracy_vs_rate"])


def test_config_instantiates():
    cfg = OmegaConf.load(CONF / "missing_modality.yaml")
    sweep = instantiate(cfg.missing_modality)
    assert isinstance(sweep, MissingModalitySweep) and sweep.name == "missing_modality"
    assert sweep.resolved_rates(2) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]

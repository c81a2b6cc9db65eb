"""Cross-modal ablation: level none is the plain evaluation, an ignored modality changes nothing, all + zero is a
dropped input, part ablates the requested fraction, shuffling never pairs a sample with itself."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from balance.diagnostics.ablation import CrossModalAblation, choose_units, derangement
from balance.diagnostics.mm_shap import group_features
from diagnostic_fixtures import joint_method
from balance.methods import JointTraining
from balance.models import MLPEncoder, SmallCNNEncoder, TextEncoder, zero_input


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """Wraps an encoder and keeps every input it sees."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.out_dim = encoder.out_dim
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.encoder(x)


def make_method(encoders: dict) -> JointTraining:
    return joint_method(encoders).eval()


def audio_text_method() -> JointTraining:
    torch.manual_seed(0)
    return make_method({"audio": SmallCNNEncoder(1, (8, 16), out_dim=16),
                        "text": TextEncoder(30, embed_dim=16, out_dim=16, num_layers=1, num_heads=2, max_length=10,
                                            dropout=0.0)})


def audio_text_loader(sizes=(6, 6, 5)) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    loader, start = [], 0
    for size in sizes:
        tokens = torch.randint(1, 30, (size, 10), generator=generator)
        lengths = torch.randint(1, 11, (size,), generator=generator)
        tokens[torch.arange(10) >= lengths.unsqueeze(1)] = 0
        present = torch.ones(size, 2, dtype=torch.bool)
        present[0, 1] = False  # a missing text: the plain evaluation drops it through keep
        loader.append({"inputs": {"audio": torch.randn(size, 1, 16, 16, generator=generator), "text": tokens},
                       "label": torch.randint(3, (size,), generator=generator),
                       "index": torch.arange(start, start + size), "present": present})
        start += size
    return loader


def plain_metrics(method, loader, replace=None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of the fused and unimodal predictions, by hand (``replace`` edits inputs)."""
    sums, count = {}, 0
    with torch.no_grad():
        for batch in loader:
            inputs = dict(batch["inputs"]) | (replace(batch["inputs"]) if replace else {})
            features = method.model.encode(inputs)
            outputs = {"": method.fused_logits(features, keep=batch["present"])}
            outputs |= {f"_{m}": z for m, z in method.model.unimodal_logits(features).items()}
            for suffix, z in outputs.items():
                for name, value in (("loss", F.cross_entropy(z, batch["label"], reduction="sum")),
                                    ("acc", (z.argmax(-1) == batch["label"]).sum())):
                    sums[name + suffix] = sums.get(name + suffix, 0.0) + float(value)
            count += len(batch["label"])
    return {key: value / count for key, value in sums.items()}


def test_level_none_is_the_plain_evaluation():
    method = audio_text_method()
    loader = audio_text_loader()
    result = CrossModalAblation().compute(method, loader)
    expected = plain_metrics(method, loader)
    for fill in ("zero", "mean", "shuffled"):
        for m in ("audio", "text"):
            assert result[fill][m]["none"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    # ...which is what Lightning's validation loop logs for the method.
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(method, dataloaders=DataLoader(loader, batch_size=None), verbose=False)[0]
    none = result["zero"]["audio"]["none"]
    assert none["acc"] == pytest.approx(logged["val/acc"], abs=1e-6)
    assert none["acc_text"] == pytest.approx(logged["val/acc_text"], abs=1e-6)
    assert none["loss"] == pytest.approx(logged["val/loss"], rel=1e-5)


def test_ablating_an_ignored_modality_changes_nothing():
    torch.manual_seed(0)
    method = make_method({"audio": SmallCNNEncoder(1, (8, 16), out_dim=16), "features": MLPEncoder(12, (16,), 16)})
    with torch.no_grad():
        method.model.fusion.linear.weight[:, 16:] = 0  # the head never looks at the second modality
    generator = torch.Generator().manual_seed(2)
    loader = [{"inputs": {"audio": torch.randn(size, 1, 16, 16, generator=generator),
                          "features": torch.randn(size, 12, generator=generator)},
               "label": torch.randint(3, (size,), generator=generator), "index": torch.arange(size)}
              for size in (5, 1)]
    result = CrossModalAblation().compute(method, loader)
    for fill in ("zero", "mean", "shuffled"):
        levels = result[fill]["features"]
        assert levels["part"] == levels["none"] and levels["all"] == levels["none"], fill
        assert result[fill]["audio"]["all"]["acc_features"] == levels["none"]["acc_features"]


def test_all_with_zero_fill_is_a_dropped_input():
    method = audio_text_method()
    loader = audio_text_loader()
    result = CrossModalAblation(fills=["zero"]).compute(method, loader)
    for m in ("audio", "text"):
        expected = plain_metrics(method, loader, replace=lambda inputs, m=m: {m: zero_input(inputs[m])})
        assert result["zero"][m]["all"] == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_part_ablates_the_requested_fraction(fraction):
    torch.manual_seed(0)
    recorder = Recorder(SmallCNNEncoder(1, (8,), out_dim=8))
    method = make_method({"audio": recorder, "features": MLPEncoder(8, (8,), 8)})
    loader = [{"inputs": {"audio": torch.rand(4, 1, 16, 16) + 1, "features": torch.randn(4, 8)},
               "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)}]
    CrossModalAblation(fills=["zero"], fraction=fraction, units_per_modality=16).compute(method, loader)
    # Encoder calls: none, part and all of audio, then part and all of the other modality.
    part = recorder.seen[1]
    assert (part == 0).flatten(1).sum(1).tolist() == [fraction * 256] * 4  # 16 blocks of 4 x 4, fraction of them
    assert (recorder.seen[2] == 0).all()
    tokens = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 0, 0, 0]])
    groups = group_features(tokens, 0)
    chosen = choose_units(groups, 0.5, torch.Generator().manual_seed(0))
    ablated = torch.where(groups.element_mask(chosen, rest=False), 0, tokens)
    assert (ablated == 0).sum(1).tolist() == [4, 3 + 3]  # 4 of 8 tokens; round(2.5) = 3 of 5, plus 3 padding


def test_shuffled_partners_are_other_samples():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 10):
        for _ in range(20):
            assert not (derangement(n, generator) == torch.arange(n)).any()
    recorder = Recorder(MLPEncoder(4, (8,), 8))
    torch.manual_seed(0)
    method = make_method({"a": recorder, "b": MLPEncoder(4, (8,), 8)})
    rows = torch.arange(12, dtype=torch.float).view(3, 4)
    loader = [{"inputs": {"a": rows, "b": rows}, "label": torch.zeros(3, dtype=torch.long), "index": torch.arange(3)},
              {"inputs": {"a": rows[:1] + 100, "b": rows[:1]}, "label": torch.zeros(1, dtype=torch.long),
               "index": torch.tensor([3])}]
    CrossModalAblation(fills=["shuffled"]).compute(method, loader)
    shuffled = recorder.seen[2]  # level all of the first batch
    assert sorted(shuffled[:, 0].tolist()) == [0, 4, 8] and (shuffled[:, 0] != rows[:, 0]).all()
    alone = recorder.seen[-3]  # level all of the one-sample batch: a sample of the previous batch
    assert alone[0, 0].item() in (0, 4, 8)


def test_result_outputs():
    method = audio_text_method()
    diagnostic = CrossModalAblation()
    result = diagnostic.compute(method, audio_text_loader())
    json.dumps(result)
    assert set(result) == {"zero", "mean", "shuffled"}
    assert set(result["mean"]["text"]) == {"none", "part", "all"}
    assert set(result["mean"]["text"]["part"]) == {"loss", "acc", "loss_audio", "acc_audio", "loss_text",
                                                   "acc_text"}
    # Token ids have no mean: the mean fill pads them, as the zero fill does.
    assert result["mean"]["text"] == result["zero"]["text"]
    assert result == CrossModalAblation().compute(method, audio_text_loader())  # seeded
    scalars = diagnostic.scalars(result)
    assert scalars["shuffled/audio/all/acc"] == result["shuffled"]["audio"]["all"]["acc"]
    assert "### fill: shuffled" in diagnostic.summary(result)
    figure = diagnostic.figures(result)["ablation"]
    assert len(figure.axes) == 3
    figure.canvas.draw()
    (legend,) = figure.legends  # one legend for all panels, covering none of them
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in figure.axes)
    plt.close(figure)

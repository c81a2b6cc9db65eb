"""MM-SHAP: feature grouping with about equal counts, the covering and the official layouts, exact zero share for
an ignored modality, one half for a symmetric model, efficiency of the sampled Shapley values, batched
perturbations, the diagnostic's result."""

from __future__ import annotations

import json
import math

import matplotlib.pyplot as plt
import pytest
import torch
from captum.attr import ShapleyValueSampling

from balance.diagnostics.mm_shap import (
    LAYOUTS,
    MMSHAP,
    feature_groups,
    grid_shape,
    group_features,
    mm_shap_values,
    permutation_generator,
    token_count,
)
from balance.methods import JointTraining
from diagnostic_fixtures import joint_method
from balance.models import (
    ConcatFusion,
    LateFusion,
    MLPEncoder,
    SmallCNNEncoder,
    TextEncoder,
    zero_input,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_method(encoders: dict, fusion=ConcatFusion, num_classes: int = 3) -> JointTraining:
    return joint_method(encoders, num_classes, fusion).eval()


def image_text_method() -> JointTraining:
    torch.manual_seed(0)
    return make_method({"visual": SmallCNNEncoder(3, (8, 16), out_dim=16),
                        "text": TextEncoder(30, embed_dim=16, out_dim=16, num_layers=1, num_heads=2, max_length=12,
                                            dropout=0.0)})


def image_text_batch(size: int = 5) -> dict:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 30, (size, 12), generator=generator)
    for row, length in enumerate([3, 7, 12, 1, 5][:size]):
        tokens[row, length:] = 0
    return {"visual": torch.randn(size, 3, 16, 16, generator=generator), "text": tokens}


# ---------------------------------------------------------------------------------------------------------------
# Feature grouping


def test_grid_shape_is_the_papers_rule_generalised():
    assert grid_shape((224, 224), 10) == (4, 4)  # p = ceil(sqrt(10)) = 4
    assert grid_shape((224, 224), 16) == (4, 4)
    assert grid_shape((3, 32, 32), 27) == (3, 3, 3)  # an exact cube root, no float round-up to 4
    assert grid_shape((1, 32, 32), 16) == (1, 4, 4)  # one frame: the frame axis takes 1 cell, space the rest
    assert grid_shape((64,), 16) == (16,)
    assert grid_shape((2, 3), 100) == (2, 3)  # an input smaller than the target: every element a feature


def test_image_text_grouping_gives_about_equal_counts():
    x = image_text_batch()
    groups = feature_groups(x)
    text_counts = groups["text"].count.tolist()
    assert text_counts == [3, 7, 12, 1, 5]  # padding is no feature
    assert groups["visual"].count.tolist() == [math.ceil(math.sqrt(n)) ** 2 for n in text_counts]
    for t, v in zip(text_counts, groups["visual"].count.tolist()):
        assert t <= v < 2 * t + 2 * math.sqrt(t) + 1  # p^2 with p = ceil(sqrt(t)): (sqrt(t) + 1)^2 at most
    # Every patch of a sample's grid covers a contiguous near-equal block of the image, all channels together.
    assert groups["visual"].mask_shape == (1, 16, 16)
    for row, count in enumerate(groups["visual"].count.tolist()):
        sizes = torch.bincount(groups["visual"].index[row], minlength=count)
        assert len(sizes) == count and sizes.max() <= 2 * sizes.min()
    # Special tokens are kept out of the features.
    special = group_features(x["text"], 0, keep_token_ids=[int(x["text"][2, 0])])
    assert special.count[2] == 12 - int((x["text"][2] == x["text"][2, 0]).sum())


def test_audio_video_grouping_gives_about_equal_counts():
    x = {"audio": torch.randn(2, 1, 64, 64), "visual": torch.randn(2, 3, 3, 32, 32)}
    groups = feature_groups(x, features_per_modality=16)
    audio, visual = int(groups["audio"].count[0]), int(groups["visual"].count[0])
    assert audio == 16 and visual == 27  # 4 x 4 time-frequency blocks; 3 frames x 3 x 3 patches
    assert 0.5 <= visual / audio <= 2
    assert groups["visual"].mask_shape == (3, 1, 32, 32)
    assert torch.bincount(groups["audio"].index[0]).tolist() == [256] * 16
    vectors = feature_groups({"a": torch.randn(2, 40), "b": torch.randn(2, 8)}, features_per_modality=16)
    assert vectors["a"].count.tolist() == [16, 16] and vectors["b"].count.tolist() == [8, 8]


def test_official_layout_leaves_the_official_strip_unmasked():
    """224 x 224 image, p x p patches of 224 // p pixels from the top left: the right and bottom strip is in no
    feature; the covering layout puts every pixel in a feature."""
    image = torch.zeros(1, 3, 224, 224)
    for p in range(3, 10):
        size = 224 // p
        official = group_features(image, p * p, layout="official")
        assert official.count.tolist() == [p * p] and official.mask_shape == (1, 224, 224)
        strip = official.index[0] == official.width
        assert int(strip.sum()) == 224**2 - (p * size) ** 2  # the official share 1 - (p * (224 // p))^2 / 224^2
        assert strip.double().mean().item() == pytest.approx(1 - (p * size) ** 2 / 224**2, rel=1e-12)
        assert torch.bincount(official.index[0][~strip]).tolist() == [size * size] * (p * p)
        grid = official.index[0].view(224, 224)
        for k in (0, p + 1, p * p - 1):  # feature k: patch row k // p, column k % p
            row, col = k // p * size, k % p * size
            assert (grid[row:row + size, col:col + size] == k).all()
        assert (grid[p * size:] == official.width).all() and (grid[:, p * size:] == official.width).all()
        covering = group_features(image, p * p)
        assert covering.count.tolist() == [p * p]
        assert (covering.index < covering.width).all()  # every pixel in a feature
        assert torch.bincount(covering.index[0]).min() > 0
    # Per axis: a 64 x 50 spectrogram in 3 x 3 blocks of 21 x 16, a strip of 1 and 2; frame stacks cut frames,
    # height and width by the same rule (3 frames of 32 x 32, target 16: 3 x 3 x 3 cells of 1 x 10 x 10).
    spectrogram = group_features(torch.zeros(2, 1, 64, 50), 9, layout="official")
    assert torch.bincount(spectrogram.index[0]).tolist() == [21 * 16] * 9 + [64 * 50 - 9 * 21 * 16]
    frames = group_features(torch.zeros(2, 3, 3, 32, 32), 16, layout="official")
    assert frames.count.tolist() == [27, 27] and frames.mask_shape == (3, 1, 32, 32)
    assert torch.bincount(frames.index[0]).tolist() == [100] * 27 + [3 * (32 * 32 - 30 * 30)]
    # Feature vectors keep the covering chunks under both layouts.
    vector = torch.zeros(2, 40)
    assert torch.equal(group_features(vector, 16, layout="official").index, group_features(vector, 16).index)
    with pytest.raises(ValueError, match="layout"):
        group_features(image, 9, layout="square")


def test_official_layout_counts_special_tokens():
    """4 tokens and a special [CLS] kept unmasked: p = ceil(sqrt(4)) = 2 without it, ceil(sqrt(5)) = 3 with it."""
    tokens = torch.tensor([[1, 7, 8, 9, 10, 0, 0], [1, 7, 8, 9, 10, 11, 0]])  # 1 = [CLS], 0 = padding
    x = {"visual": torch.zeros(2, 3, 224, 224), "text": tokens}
    covering, official = (feature_groups(x, keep_token_ids=[1], layout=layout) for layout in LAYOUTS)
    assert token_count(tokens, [1]).tolist() == [4, 5]
    assert token_count(tokens, [1], layout="official").tolist() == [5, 6]
    assert covering["visual"].count.tolist() == [4, 9] and official["visual"].count.tolist() == [9, 9]
    # The special token is never a feature under either layout.
    assert covering["text"].count.tolist() == official["text"].count.tolist() == [4, 5]
    assert (official["text"].index[:, 0] == official["text"].width).all()


# ---------------------------------------------------------------------------------------------------------------
# Shapley values


def test_ignored_modality_gets_exactly_zero_share():
    torch.manual_seed(0)
    method = make_method({"audio": SmallCNNEncoder(1, (8, 16), out_dim=16), "features": MLPEncoder(12, (16,), 16)})
    with torch.no_grad():
        method.model.fusion.linear.weight[:, 16:] = 0  # the head never looks at the second modality
    generator = torch.Generator().manual_seed(2)
    loader = [{"inputs": {"audio": torch.randn(6, 1, 16, 16, generator=generator),
                          "features": torch.randn(6, 12, generator=generator)},
               "label": torch.randint(3, (6,), generator=generator), "index": torch.arange(6) + 6 * b}
              for b in range(2)]
    result = MMSHAP(n_samples=3).compute(method, loader)
    assert result["share"]["features"] == [0.0] * 12
    assert result["share"]["audio"] == [1.0] * 12


def test_symmetric_model_on_symmetric_inputs_gives_one_half():
    torch.manual_seed(0)
    method = make_method({"left": MLPEncoder(16, (32,), 16), "right": MLPEncoder(16, (32,), 16)}, fusion=LateFusion)
    model = method.model
    model.encoders["right"].load_state_dict(model.encoders["left"].state_dict())
    model.fusion.heads["right"].load_state_dict(model.fusion.heads["left"].state_dict())
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    loader = [{"inputs": {"left": x, "right": x.clone()}, "label": torch.zeros(32, dtype=torch.long),
               "index": torch.arange(32)}]
    result = MMSHAP(n_samples=10).compute(method, loader)
    assert result["mean"]["left"] == pytest.approx(0.5, abs=0.03)
    assert result["mean"]["left"] + result["mean"]["right"] == pytest.approx(1.0)
    assert all(abs(s - 0.5) < 0.2 for s in result["share"]["left"])


def test_sampled_values_are_efficient():
    """Every pass runs from all features masked to none masked: sum phi = f(x) - f(all masked)."""
    method = image_text_method()
    x = image_text_batch()
    with torch.no_grad():
        out = mm_shap_values(method, x, n_samples=4, perturbations_per_eval=8)
        target = out["prediction"].unsqueeze(1)
        full = method.fused_logits(method.model.encode(x)).gather(1, target).squeeze(1)
        masked = method.fused_logits(method.model.encode({m: zero_input(v) for m, v in x.items()}))
        total = sum(phi.sum(dim=1) for phi in out["phi"].values())
    torch.testing.assert_close(total, full - masked.gather(1, target).squeeze(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["logits"], method.fused_logits(method.model.encode(x)))
    # Columns past a sample's feature count are unused players and get nothing.
    for m, phi in out["phi"].items():
        unused = torch.arange(phi.shape[1]) >= out["count"][m].unsqueeze(1)
        assert (phi[unused] == 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sampled_values_are_efficient_under_both_layouts(layout):
    """sum phi = f(x) - f(every feature masked); under ``official`` the strip stays in the all-masked input."""
    method = image_text_method()
    x = image_text_batch()  # 16 x 16 images; 3, 7, 12, 1, 5 tokens: p = 2, 3, 4, 1, 3 (official: a 1-pixel strip
    with torch.no_grad():  # for p = 3)
        out = mm_shap_values(method, x, n_samples=3, perturbations_per_eval=8, layout=layout)
        groups = feature_groups(x, layout=layout)
        masked = {m: torch.where(groups[m].element_mask(torch.zeros(len(v), groups[m].width, dtype=torch.bool),
                                                        rest=True), v, 0) for m, v in x.items()}
        target = out["prediction"].unsqueeze(1)
        full = method.fused_logits(method.model.encode(x)).gather(1, target).squeeze(1)
        empty = method.fused_logits(method.model.encode(masked)).gather(1, target).squeeze(1)
        total = sum(phi.sum(dim=1) for phi in out["phi"].values())
    torch.testing.assert_close(total, full - empty, atol=1e-4, rtol=1e-4)
    strip = masked["visual"].abs().sum(dim=(1, 2, 3)) > 0
    assert strip.tolist() == ([False] * 5 if layout == "covering" else [False, True, False, False, True])


def test_an_input_informative_only_in_the_strip_gets_zero_share_under_official():
    """Images zero except the last row and column, 9 tokens (p = 3, 5-pixel patches of a 16 x 16 image): under
    ``official`` no feature changes the image, under ``covering`` the strip belongs to the edge patches."""
    method = image_text_method()
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 30, (4, 12), generator=generator)
    tokens[:, 9:] = 0
    image = torch.zeros(4, 3, 16, 16)
    image[:, :, 15, :] = 3 * torch.randn(4, 3, 16, generator=generator)
    image[:, :, :, 15] = 3 * torch.randn(4, 3, 16, generator=generator)
    loader = [{"inputs": {"visual": image, "text": tokens}, "label": torch.zeros(4, dtype=torch.long),
               "index": torch.arange(4)}]
    official = MMSHAP(n_samples=2, perturbations_per_eval=1, layout="official")
    result = official.compute(method, loader)
    assert result["share"]["visual"] == [0.0] * 4 and result["share"]["text"] == [1.0] * 4
    assert result["num_features"] == {"visual": 9.0, "text": 9.0}
    assert "official feature layout" in official.summary(result)
    covering = MMSHAP(n_samples=2, perturbations_per_eval=1).compute(method, loader)
    assert all(share > 0.01 for share in covering["share"]["visual"])
    with pytest.raises(ValueError, match="layout"):
        MMSHAP(layout="square")


def test_batched_perturbations_give_the_same_values():
    method = image_text_method()
    x = image_text_batch()
    with torch.no_grad():
        one, many = (mm_shap_values(method, x, n_samples=2, perturbations_per_eval=batched,
                                    generator=torch.Generator().manual_seed(5)) for batched in (1, 64))
    for m in one["phi"]:
        torch.testing.assert_close(one["phi"][m], many["phi"][m], atol=1e-5, rtol=1e-4)


def test_gates_play_the_same_game_as_masking_the_inputs_in_captum():
    """captum on the raw inputs with full-size feature masks, same permutations: the same Shapley values."""
    torch.manual_seed(0)
    method = make_method({"image": SmallCNNEncoder(1, (8,), out_dim=8), "vector": MLPEncoder(12, (16,), 8)})
    x = {"image": torch.randn(4, 1, 8, 8), "vector": torch.randn(4, 12)}
    with torch.no_grad():
        out = mm_shap_values(method, x, n_samples=3, generator=torch.Generator().manual_seed(7))
        groups = feature_groups(x)
        masks = (groups["image"].index.view(1, 1, 8, 8), groups["vector"].index + groups["image"].width)

        def forward(image, vector):
            return method.fused_logits(method.model.encode({"image": image, "vector": vector}))

        explainer = ShapleyValueSampling(forward)
        explainer.permutation_generator = permutation_generator(torch.Generator().manual_seed(7), antithetic=True)
        image, vector = explainer.attribute((x["image"], x["vector"]), target=out["prediction"], feature_mask=masks,
                                            n_samples=3, perturbations_per_eval=16)
    # Every element carries its feature's value; the 4 x 4 grid has 2 x 2 pixel patches, the vector 12 one-element
    # chunks (fewer elements than the 16 wanted).
    torch.testing.assert_close(out["phi"]["image"], image[:, 0, ::2, ::2].flatten(1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["phi"]["vector"], vector, atol=1e-5, rtol=1e-4)


def test_missing_modality_gets_zero_share():
    method = image_text_method()
    x = image_text_batch(4)
    present = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    with torch.no_grad():
        out = mm_shap_values(method, x, present=present, n_samples=2)
    assert (out["phi"]["text"][1] == 0).all() and (out["phi"]["visual"][2] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The diagnostic


def test_result_subsample_and_outputs():
    method = image_text_method()
    batch = image_text_batch()
    loader = [{"inputs": batch, "label": torch.tensor([0, 1, 2, 0, 1]), "index": torch.arange(5) + 5 * b}
              for b in range(3)]
    diagnostic = MMSHAP(n_samples=2, max_samples=6, seed=1)
    result = diagnostic.compute(method, loader)
    assert result == diagnostic.compute(method, loader)  # seeded subset and permutations
    assert result["num_samples"] == 6 and len(set(result["index"])) == 6
    assert result != MMSHAP(n_samples=2, max_samples=6, seed=2).compute(method, loader)
    json.dumps(result)
    for v, t in zip(result["share"]["visual"], result["share"]["text"]):
        assert v + t == pytest.approx(1.0)
    correct = [s for s, c in zip(result["share"]["text"], result["correct"]) if c]
    if correct:
        assert result["mean_correct"]["text"] == pytest.approx(sum(correct) / len(correct))
    scalars = diagnostic.scalars(result)
    assert scalars["share_text"] == pytest.approx(result["mean"]["text"])
    assert "| text |" in diagnostic.summary(result)
    figures = diagnostic.figures(result)
    assert list(figures) == ["mm_shap"]
    plt.close(figures["mm_shap"])


@pytest.mark.parametrize(("option", "value", "message"), [
    ("n_samples", 0, "diagnostics.mm_shap.n_samples must be an integer >= 1"),
    ("features_per_modality", 0, "diagnostics.mm_shap.features_per_modality must be an integer >= 1"),
    ("max_samples", 0, "diagnostics.mm_shap.max_samples must be an integer >= 1 or null"),
])
def test_bad_options_are_refused_by_their_config_name(option, value, message):
    with pytest.raises(ValueError, match=message):
        MMSHAP(**{option: value})

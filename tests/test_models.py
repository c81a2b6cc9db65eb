"""Tests of the encoders, fusion heads and `MultimodalModel` in `balance.models`.

In the spirit of timm's tests: every encoder and every fusion head is listed once (``ENCODERS``, ``FUSIONS``) and
the generic tests are parametrised over those lists, so a new encoder or head is covered by adding one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytest
import torch
from torch import nn

from balance.models import (
    ConcatFusion,
    CosineFusion,
    FiLMFusion,
    GatedFusion,
    LateFusion,
    MLPEncoder,
    MultimodalModel,
    ResNet18Encoder,
    SharedHead,
    SmallCNNEncoder,
    SumFusion,
    TextEncoder,
    replicate,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_every_parameter_gets_gradient(module: nn.Module) -> None:
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    zero = [name for name, p in module.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without a gradient: {missing}"
    assert not zero, f"parameters with an all-zero gradient: {zero}"


# --------------------------------------------------------------------------------------------------------------
# Encoders
# --------------------------------------------------------------------------------------------------------------

# Padded token ids (0 = padding, trailing): a full row, a short row, an all-padding row (a dropped text).
TOKENS = torch.tensor(
    [
        [3, 5, 7, 2, 9, 1, 4, 8],
        [4, 6, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [11, 2, 13, 0, 0, 0, 0, 0],
    ]
)
TEXT_MAX_LENGTH = 12


@dataclass(frozen=True)
class EncoderCase:
    build: Callable[[], nn.Module]
    make_input: Callable[[], torch.Tensor]


# Tiny inputs keep ResNet18 fast on a CPU; 48 x 48 leaves a 2 x 2 map after layer4, so train-mode batch norm
# there normalises over more than two values per channel.
ENCODERS: dict[str, EncoderCase] = {
    "resnet18_spectrogram": EncoderCase(partial(ResNet18Encoder, in_channels=1), lambda: torch.randn(2, 1, 48, 48)),
    "resnet18_frames": EncoderCase(partial(ResNet18Encoder, in_channels=3), lambda: torch.randn(2, 2, 3, 32, 32)),
    "resnet18_image": EncoderCase(partial(ResNet18Encoder, in_channels=3), lambda: torch.randn(2, 3, 48, 48)),
    "smallcnn_image": EncoderCase(
        partial(SmallCNNEncoder, in_channels=3, channels=(8, 16), out_dim=12), lambda: torch.randn(3, 3, 16, 16)
    ),
    "smallcnn_frames": EncoderCase(
        partial(SmallCNNEncoder, in_channels=1, channels=(8, 16), out_dim=12), lambda: torch.randn(3, 4, 1, 16, 12)
    ),
    "mlp": EncoderCase(partial(MLPEncoder, in_dim=10, hidden_dims=(16, 8), out_dim=6), lambda: torch.randn(4, 10)),
    "mlp_flattens": EncoderCase(
        partial(MLPEncoder, in_dim=10, hidden_dims=(), out_dim=6), lambda: torch.randn(4, 2, 5)
    ),
    "text_bag": EncoderCase(
        partial(TextEncoder, vocab_size=16, embed_dim=16, out_dim=8, num_layers=0), lambda: TOKENS.clone()
    ),
    "text_transformer": EncoderCase(
        partial(
            TextEncoder, vocab_size=16, embed_dim=16, out_dim=8, num_layers=2, num_heads=2, max_length=TEXT_MAX_LENGTH
        ),
        lambda: TOKENS.clone(),
    ),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_output_shape_finite_and_every_parameter_learns(name: str) -> None:
    case = ENCODERS[name]
    encoder = case.build().train()
    x = case.make_input()
    out = encoder(x)
    assert out.shape == (x.shape[0], encoder.out_dim)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert_every_parameter_gets_gradient(encoder)


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_eval_is_deterministic_and_per_sample(name: str) -> None:
    """In eval mode a sample's features do not depend on the rest of the batch (no leak across rows)."""
    case = ENCODERS[name]
    encoder = case.build().eval()
    x = case.make_input()
    with torch.no_grad():
        full = encoder(x)
        alone = torch.cat([encoder(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(full, alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "build",
    [partial(ResNet18Encoder, in_channels=3), partial(SmallCNNEncoder, in_channels=3, channels=(8, 16), out_dim=12)],
    ids=["resnet18", "smallcnn"],
)
def test_frame_pooling_is_mean_of_per_frame_features(build: Callable[[], nn.Module]) -> None:
    """Pooling over time and space together equals averaging each frame's pooled feature (equal frame sizes)."""
    encoder = build().eval()
    frames = torch.randn(2, 3, 3, 32, 32)  # B != T so a mixed-up unflatten would show
    with torch.no_grad():
        pooled = encoder(frames)
        per_frame = torch.stack([encoder(frames[:, t]) for t in range(frames.shape[1])]).mean(0)
        single = encoder(frames[:, 0])
        single_as_frames = encoder(frames[:, :1])
    torch.testing.assert_close(pooled, per_frame, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(single_as_frames, single, atol=1e-6, rtol=1e-5)


def test_resnet18_rejects_wrong_rank_and_pretrained_single_channel() -> None:
    with pytest.raises(ValueError, match="4-D or 5-D"):
        ResNet18Encoder(in_channels=1)(torch.randn(2, 32, 32))
    with pytest.raises(ValueError, match="in_channels=3"):
        ResNet18Encoder(in_channels=1, weights="IMAGENET1K_V1")


@pytest.mark.parametrize(
    ("num_layers", "exact"), [(0, True), (2, False)], ids=["bag_of_embeddings", "transformer"]
)
def test_text_encoder_ignores_padding(num_layers: int, exact: bool) -> None:
    encoder = TextEncoder(
        vocab_size=16, embed_dim=16, out_dim=8, num_layers=num_layers, num_heads=2, max_length=TEXT_MAX_LENGTH
    ).eval()
    padded = torch.cat([TOKENS, torch.zeros(TOKENS.shape[0], 3, dtype=TOKENS.dtype)], dim=1)
    trimmed = TOKENS[:, :6]  # drops padding only: rows 1-3 end in padding; row 0 changes (a control)
    with torch.no_grad():
        out = encoder(TOKENS)
        out_padded = encoder(padded)
        out_trimmed = encoder(trimmed)
    if exact:
        assert torch.equal(out, out_padded)
        assert torch.equal(out[1:], out_trimmed[1:])
    else:
        torch.testing.assert_close(out, out_padded, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out[1:], out_trimmed[1:], atol=1e-5, rtol=1e-4)
    # The control: dropping real tokens does change the features.
    assert not torch.allclose(out[0], out_trimmed[0], atol=1e-4)
    # An all-padding row gives the projection of a zero vector (its bias), not NaN.
    torch.testing.assert_close(out[2], encoder.project.bias.detach())


def test_text_encoder_features_depend_on_tokens_not_only_length() -> None:
    encoder = TextEncoder(vocab_size=16, embed_dim=16, out_dim=8, num_layers=0).eval()
    with torch.no_grad():
        a = encoder(torch.tensor([[1, 2, 0]]))
        b = encoder(torch.tensor([[3, 4, 0]]))
    assert not torch.allclose(a, b)


def test_text_transformer_rejects_sequences_longer_than_max_length() -> None:
    encoder = TextEncoder(vocab_size=16, embed_dim=16, out_dim=8, num_layers=1, num_heads=2, max_length=4)
    encoder(torch.ones(2, 4, dtype=torch.long))  # exactly max_length is fine
    with pytest.raises(ValueError, match="max_length"):
        encoder(torch.ones(2, 5, dtype=torch.long))


def test_replicate_gives_independent_encoders() -> None:
    encoders = replicate(partial(MLPEncoder, in_dim=4, hidden_dims=(8,), out_dim=3), ["a", "b", "c"])
    assert list(encoders) == ["a", "b", "c"]
    assert len({id(e) for e in encoders.values()}) == 3
    storages = [{p.data_ptr() for p in e.parameters()} for e in encoders.values()]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not storages[i] & storages[j], "replicated encoders share parameter storage"
    # Fresh initialisations, and training one leaves the others alone.
    x = torch.randn(5, 4)
    before_b = encoders["b"](x).detach().clone()
    assert not torch.allclose(encoders["a"](x), before_b)
    with torch.no_grad():
        for p in encoders["a"].parameters():
            p.add_(1.0)
    torch.testing.assert_close(encoders["b"](x).detach(), before_b, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Fusion heads
# --------------------------------------------------------------------------------------------------------------

NUM_CLASSES = 4
BATCH = 5

# name -> (constructor taking feature_dims and num_classes, needs every modality to have one feature size)
FUSIONS: dict[str, tuple[Callable[..., nn.Module], bool]] = {
    "concat": (ConcatFusion, False),
    "sum": (SumFusion, False),
    "late": (LateFusion, False),
    "film": (partial(FiLMFusion, hidden_dim=8), False),
    "gated": (partial(GatedFusion, hidden_dim=8), False),
    "shared": (SharedHead, True),
    "cosine": (CosineFusion, False),
}

UNEQUAL_DIMS = {2: {"audio": 5, "visual": 7}, 3: {"audio": 5, "visual": 7, "text": 3}}
EQUAL_DIMS = {2: {"audio": 6, "visual": 6}, 3: {"audio": 6, "visual": 6, "text": 6}}


def fusion_dims(name: str, num_modalities: int) -> dict[str, int]:
    return (EQUAL_DIMS if FUSIONS[name][1] else UNEQUAL_DIMS)[num_modalities]


def make_features(dims: dict[str, int], batch: int = BATCH) -> dict[str, torch.Tensor]:
    return {m: torch.randn(batch, d) for m, d in dims.items()}


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_logits_shape_and_every_parameter_learns(name: str, num_modalities: int) -> None:
    dims = fusion_dims(name, num_modalities)
    head = FUSIONS[name][0](dims, NUM_CLASSES)
    features = {m: f.requires_grad_() for m, f in make_features(dims).items()}
    logits = head(features)
    assert logits.shape == (BATCH, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert_every_parameter_gets_gradient(head)
    for m, f in features.items():
        assert f.grad is not None and f.grad.abs().sum() > 0, f"no gradient reaches modality {m}"


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_unimodal_logits_one_per_modality(name: str, num_modalities: int) -> None:
    dims = fusion_dims(name, num_modalities)
    head = FUSIONS[name][0](dims, NUM_CLASSES)
    features = make_features(dims)
    unimodal = head.unimodal_logits(features)
    assert list(unimodal) == list(dims)
    for m, logits in unimodal.items():
        assert logits.shape == (BATCH, NUM_CLASSES), m
        assert torch.isfinite(logits).all(), m
    # A modality's own logits depend on its own features and on no other modality's.
    for m in dims:
        for other in dims:
            changed = dict(features)
            changed[other] = features[other] + torch.randn_like(features[other])
            moved = not torch.allclose(head.unimodal_logits(changed)[m], unimodal[m], atol=1e-6)
            assert moved == (other == m), f"unimodal logits of {m} vs a change in {other}"


@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_ignores_feature_dict_order(name: str) -> None:
    dims = fusion_dims(name, 3)
    head = FUSIONS[name][0](dims, NUM_CLASSES)
    features = make_features(dims)
    reordered = dict(reversed(list(features.items())))
    torch.testing.assert_close(head(reordered), head(features))


@pytest.mark.parametrize("name", [n for n, (_, equal) in FUSIONS.items() if equal])
def test_equal_size_heads_reject_unequal_feature_sizes(name: str) -> None:
    with pytest.raises(ValueError, match="feature_dim"):
        FUSIONS[name][0](UNEQUAL_DIMS[2], NUM_CLASSES)


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_concat_unimodal_logits_by_hand(num_modalities: int) -> None:
    dims = UNEQUAL_DIMS[num_modalities]
    head = ConcatFusion(dims, NUM_CLASSES)
    features = make_features(dims)
    weight, bias = head.linear.weight.detach(), head.linear.bias.detach()
    unimodal = head.unimodal_logits(features)
    start = 0
    for m, d in dims.items():
        expected = features[m] @ weight[:, start : start + d].T + bias / num_modalities
        torch.testing.assert_close(unimodal[m], expected)
        start += d
    assert start == weight.shape[1]
    torch.testing.assert_close(torch.stack(list(unimodal.values())).sum(0), head(features))


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize(("name", "reduce"), [("sum", "sum"), ("late", "mean"), ("shared", "mean")])
def test_per_modality_heads_fuse_their_unimodal_logits(name: str, reduce: str, num_modalities: int) -> None:
    dims = fusion_dims(name, num_modalities)
    head = FUSIONS[name][0](dims, NUM_CLASSES)
    features = make_features(dims)
    stacked = torch.stack(list(head.unimodal_logits(features).values()))
    torch.testing.assert_close(head(features), getattr(stacked, reduce)(0))


def test_shared_head_unimodal_is_one_linear_on_each_modality() -> None:
    head = SharedHead(EQUAL_DIMS[3], NUM_CLASSES)
    features = make_features(EQUAL_DIMS[3])
    for m, logits in head.unimodal_logits(features).items():
        torch.testing.assert_close(logits, features[m] @ head.linear.weight.T + head.linear.bias)


@pytest.mark.parametrize("name", ["film", "gated"])
def test_unimodal_fallback_zeroes_the_other_modalities(name: str) -> None:
    dims = UNEQUAL_DIMS[3]
    head = FUSIONS[name][0](dims, NUM_CLASSES)
    features = make_features(dims)
    for m, logits in head.unimodal_logits(features).items():
        zeroed = {k: f if k == m else torch.zeros_like(f) for k, f in features.items()}
        torch.testing.assert_close(logits, head(zeroed))


@pytest.mark.parametrize(("cls", "key"), [(FiLMFusion, "condition"), (GatedFusion, "gate")])
def test_conditioned_heads_validate_their_modality(cls: type, key: str) -> None:
    dims = UNEQUAL_DIMS[3]
    with pytest.raises(ValueError, match="nope"):
        cls(dims, NUM_CLASSES, hidden_dim=8, **{key: "nope"})
    with pytest.raises(ValueError, match="two modalities"):
        cls({"audio": 5}, NUM_CLASSES, hidden_dim=8)
    # Naming a different conditioning modality changes which one modulates (weights sized from its features).
    head = cls(dims, NUM_CLASSES, hidden_dim=8, **{key: "text"})
    assert getattr(head, key) == "text"
    assert head(make_features(dims)).shape == (BATCH, NUM_CLASSES)


# --------------------------------------------------------------------------------------------------------------
# MultimodalModel
# --------------------------------------------------------------------------------------------------------------

MODEL_IN_DIMS = {"audio": 4, "visual": 6, "text": 5}
MODEL_OUT_DIMS = {"audio": 3, "visual": 8, "text": 5}
FEATURE_DIM = 8


def make_model(fusion: Callable[..., nn.Module], feature_dim: int | None = FEATURE_DIM) -> MultimodalModel:
    encoders = {
        m: MLPEncoder(in_dim=MODEL_IN_DIMS[m], hidden_dims=(16,), out_dim=MODEL_OUT_DIMS[m]) for m in MODEL_IN_DIMS
    }
    return MultimodalModel(encoders, fusion, num_classes=NUM_CLASSES, feature_dim=feature_dim).eval()


def make_inputs(batch: int = BATCH) -> dict[str, torch.Tensor]:
    return {m: torch.randn(batch, d) for m, d in MODEL_IN_DIMS.items()}


# Rows: all kept, each modality dropped once, and two dropped at once.
KEEP = torch.tensor(
    [
        [True, True, True],
        [False, True, True],
        [True, False, True],
        [True, True, False],
        [False, False, True],
    ]
)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_model_encode_gives_features_per_modality(name: str) -> None:
    model = make_model(FUSIONS[name][0])
    inputs = make_inputs()
    features = model.encode(inputs)
    assert list(features) == list(MODEL_IN_DIMS)
    for m, f in features.items():
        assert f.shape == (BATCH, FEATURE_DIM), m
    torch.testing.assert_close(model(inputs), model.fuse(features))
    unimodal = model.unimodal_logits(features)
    assert list(unimodal) == list(MODEL_IN_DIMS)
    assert all(u.shape == (BATCH, NUM_CLASSES) for u in unimodal.values())


@pytest.mark.parametrize("name", list(FUSIONS))
def test_model_keep_removes_a_dropped_modality_influence(name: str) -> None:
    model = make_model(FUSIONS[name][0])
    inputs = make_inputs()
    with torch.no_grad():
        logits = model.fuse(model.encode(inputs), KEEP)
        assert logits.shape == (BATCH, NUM_CLASSES)
        for i, m in enumerate(model.modalities):
            changed = dict(inputs)
            changed[m] = inputs[m] + 3.0 * torch.randn_like(inputs[m])
            moved = model.fuse(model.encode(changed), KEEP)
            dropped, kept = ~KEEP[:, i], KEEP[:, i]
            torch.testing.assert_close(moved[dropped], logits[dropped], atol=1e-6, rtol=1e-6)
            change = (moved[kept] - logits[kept]).abs().amax(dim=1)
            assert (change > 1e-4).all(), f"changing kept modality {m} left rows {change.tolist()} unchanged"
            # forward(inputs, keep) is the same thing.
            torch.testing.assert_close(model(changed, KEEP), moved)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_model_keep_all_equals_no_keep(name: str) -> None:
    model = make_model(FUSIONS[name][0])
    with torch.no_grad():
        features = model.encode(make_inputs())
        full = model.fuse(features)
        torch.testing.assert_close(model.fuse(features, KEEP)[KEEP.all(1)], full[KEEP.all(1)])
        torch.testing.assert_close(model.fuse(features, torch.ones(BATCH, 3, dtype=torch.bool)), full)


@pytest.mark.parametrize("name", list(FUSIONS))
def test_model_dropping_equals_fusing_zeroed_features(name: str) -> None:
    model = make_model(FUSIONS[name][0])
    with torch.no_grad():
        features = model.encode(make_inputs())
        zeroed = {m: features[m] * KEEP[:, i, None] for i, m in enumerate(model.modalities)}
        torch.testing.assert_close(model.fuse(features, KEEP), model.fusion(zeroed))


def test_model_feature_dim_projects_encoders_for_a_shared_head() -> None:
    model = make_model(SharedHead, feature_dim=FEATURE_DIM)
    # Only encoders whose out_dim differs get a projection.
    assert set(model.projections) == {m for m, d in MODEL_OUT_DIMS.items() if d != FEATURE_DIM}
    assert model.fusion.feature_dims == dict.fromkeys(MODEL_IN_DIMS, FEATURE_DIM)
    inputs = make_inputs()
    assert model(inputs).shape == (BATCH, NUM_CLASSES)
    # The projection is applied: encode is the projection of the encoder's output.
    with torch.no_grad():
        expected = model.projections["audio"](model.encoders["audio"](inputs["audio"]))
        torch.testing.assert_close(model.encode(inputs)["audio"], expected)
    with pytest.raises(ValueError, match="feature_dim"):
        make_model(SharedHead, feature_dim=None)


def test_model_without_feature_dim_keeps_encoder_sizes() -> None:
    model = make_model(ConcatFusion, feature_dim=None)
    assert len(model.projections) == 0
    assert model.fusion.feature_dims == MODEL_OUT_DIMS
    features = model.encode(make_inputs())
    assert {m: f.shape[1] for m, f in features.items()} == MODEL_OUT_DIMS


def test_model_missing_modality_raises_key_error_naming_it() -> None:
    model = make_model(ConcatFusion)
    inputs = make_inputs()
    del inputs["visual"]
    with pytest.raises(KeyError, match=r"\['visual'\]"):
        model.encode(inputs)
    with pytest.raises(KeyError, match="visual"):
        model(inputs)


@pytest.mark.parametrize("columns", [2, 4])
def test_model_keep_with_wrong_number_of_columns_raises(columns: int) -> None:
    model = make_model(ConcatFusion)
    features = model.encode(make_inputs())
    with pytest.raises(ValueError, match="columns"):
        model.fuse(features, torch.ones(BATCH, columns, dtype=torch.bool))


def test_model_trains_end_to_end_through_keep() -> None:
    """Gradients reach every encoder through the fused logits; a modality dropped in every row gets none."""
    model = make_model(ConcatFusion).train()
    keep = KEEP.clone()
    keep[:, 2] = False
    nn.functional.cross_entropy(model(make_inputs(), keep), torch.randint(NUM_CLASSES, (BATCH,))).backward()
    for m in ("audio", "visual"):
        assert_every_parameter_gets_gradient(model.encoders[m])
    assert all(p.grad is None or not p.grad.any() for p in model.encoders["text"].parameters())


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("name", list(FUSIONS))
def test_modality_parameters_partition_the_model(name: str, num_modalities: int) -> None:
    # A modality's parameters: its encoder, its projection, its own block of the head; every other parameter is
    # shared; and a modality's own parameters influence only its own unimodal logits' inputs.
    dims = fusion_dims(name, num_modalities)
    encoders = {m: MLPEncoder(3, (), 6) for m in dims}
    model = MultimodalModel(encoders, partial(FUSIONS[name][0]), NUM_CLASSES, feature_dim=4 if name != "shared" else 6)
    owned = {m: {id(p) for p in model.modality_parameters(m)} for m in dims}
    shared = {id(p) for p in model.shared_parameters()}
    for m in dims:
        assert {id(p) for p in model.encoders[m].parameters()} <= owned[m]
        if m in model.projections:
            assert {id(p) for p in model.projections[m].parameters()} <= owned[m]
        for other in dims:
            assert other == m or not owned[m] & owned[other], (m, other)
    assert set().union(*owned.values()) | shared == {id(p) for p in model.parameters()}
    assert not set().union(*owned.values()) & shared
    # The head's per-modality blocks where the head has them; none for concat and the shared head.
    head_owned = {id(p) for m in dims for p in model.fusion.modality_parameters(m)}
    assert (len(head_owned) > 0) == (name in ("sum", "late", "film", "gated", "cosine"))


def test_modality_parameters_refuse_an_unknown_modality() -> None:
    model = MultimodalModel({"a": MLPEncoder(3, (), 4), "b": MLPEncoder(3, (), 4)}, partial(ConcatFusion), NUM_CLASSES)
    with pytest.raises(KeyError, match="no modality 'c'"):
        model.modality_parameters("c")


def test_xavier_init_is_the_official_weight_init() -> None:
    torch.manual_seed(0)
    model = MultimodalModel({"a": SmallCNNEncoder(1, (8,), 4), "b": MLPEncoder(3, (), 4)}, partial(ConcatFusion),
                            NUM_CLASSES, init="xavier")
    head = model.fusion.linear
    assert torch.equal(head.bias, torch.zeros_like(head.bias))
    # Xavier-normal: std sqrt(2 / (fan_in + fan_out)); a default (uniform) init has a smaller spread here.
    expected = (2.0 / (head.in_features + head.out_features)) ** 0.5
    assert abs(float(head.weight.std()) - expected) < 0.35 * expected
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))
    with pytest.raises(ValueError, match="init must be one of"):
        MultimodalModel({"a": MLPEncoder(3, (), 4), "b": MLPEncoder(3, (), 4)}, partial(ConcatFusion), NUM_CLASSES, init="x")

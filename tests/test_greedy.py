"""Greedy and its MMTM mid-fusion: the block against hand computation, isolation, the stage pairing, the speeds,
BDR and decision against hand-computed values, the curation window, the refusals, and the intended direction."""

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from balance.methods.greedy import bypass_dominance, caring_modality, learning_speed
from balance.models import LateFusion, MLPEncoder, MultimodalModel, ResNet18Encoder, SmallCNNEncoder
from balance.models.mmtm import MMTM, MMTMFusion
from balance.run import build
from compose import compose_train, fit_briefly

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=400",
          "data.batch_size=32", "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "callbacks.contributions=null"]


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _block() -> MMTM:
    """Channels a: 2, v: 3; ratio 5 gives a joint layer of width int(2 * 5 / 5) = 2, with set weights."""
    block = MMTM({"a": 2, "v": 3}, ratio=5)
    with torch.no_grad():
        block.squeeze.weight.copy_(torch.tensor([[1.0, 0.0, 0.5, 0.0, -1.0], [0.0, 2.0, 0.0, 1.0, 0.0]]))
        block.squeeze.bias.copy_(torch.tensor([0.0, -1.0]))
        block.excitations["a"].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        block.excitations["a"].bias.copy_(torch.tensor([0.0, 0.5]))
        block.excitations["v"].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]))
        block.excitations["v"].bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return block


def _maps() -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    # a: 2 samples, 2 channels, 1 x 2 maps, no frames. v: 2 samples x 2 frames, 3 channels, 1 x 1 maps.
    a = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]],
                      [[[0.0, 0.0]], [[4.0, 0.0]]]])
    v = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0],     # sample 0: frames 0, 1
                      [0.0, 1.0, 1.0], [2.0, 1.0, 1.0]]).view(4, 3, 1, 1)  # sample 1
    return {"a": a, "v": v}, {"a": 1, "v": 2}


def _hand_scales() -> dict[str, list[list[float]]]:
    """The block's scales for `_maps()`, computed by hand."""
    # squeeze (mean over frames and space): a0 = (2, 2), a1 = (0, 2); v0 = (2, 1, 1), v1 = (1, 1, 1)
    squeezed = [[2.0, 2.0, 2.0, 1.0, 1.0], [0.0, 2.0, 1.0, 1.0, 1.0]]
    scales = {"a": [], "v": []}
    for s in squeezed:
        z = [max(0.0, s[0] + 0.5 * s[2] - s[4]), max(0.0, 2 * s[1] + s[3] - 1)]
        scales["a"].append([_sigmoid(z[0]), _sigmoid(-z[1] + 0.5)])
        scales["v"].append([_sigmoid(z[0] + z[1]), _sigmoid(-z[0]), _sigmoid(1.0)])
    return scales


def test_mmtm_block_matches_a_hand_computation():
    block = _block().train()
    maps, frames = _maps()
    out = block(maps, frames)
    scales = _hand_scales()
    expected_a = maps["a"] * torch.tensor(scales["a"]).view(2, 2, 1, 1)
    expected_v = maps["v"] * torch.tensor(scales["v"]).repeat_interleave(2, dim=0).view(4, 3, 1, 1)
    assert torch.allclose(out["a"], expected_a, atol=1e-6)
    assert torch.allclose(out["v"], expected_v, atol=1e-6)
    # The running averages: the batch mean of each modality's own scales (one training forward so far).
    assert torch.allclose(block.average_a, torch.tensor(scales["a"]).mean(0), atol=1e-6)
    assert torch.allclose(block.average_v, torch.tensor(scales["v"]).mean(0), atol=1e-6)
    assert int(block.count) == 1


def test_isolated_modality_uses_its_running_average_exactly():
    block = _block()
    maps, frames = _maps()
    scales = _hand_scales()
    average = torch.tensor([0.25, 0.75])
    block.average_a.copy_(average)
    block.count.fill_(3)
    # Evaluation: the stored average as it is (no update), the other modality as usual.
    block.eval()
    block.isolated = "a"
    out = block(maps, frames)
    assert torch.equal(out["a"], maps["a"] * average.view(1, 2, 1, 1))
    assert torch.allclose(out["v"], maps["v"] * torch.tensor(scales["v"]).repeat_interleave(2, 0).view(4, 3, 1, 1))
    assert torch.equal(block.average_a, average) and int(block.count) == 3
    # Training: the cumulative mean is first updated with this batch's own scales, then used.
    block.train()
    v = maps["v"].clone().requires_grad_()
    out = block({"a": maps["a"], "v": v}, frames)
    updated = (torch.tensor(scales["a"]).mean(0) + 3 * average) / 4
    assert torch.allclose(block.average_a, updated) and int(block.count) == 4
    assert torch.allclose(out["a"], maps["a"] * updated.view(1, 2, 1, 1))
    # No cross-modal input reaches the isolated branch; its excitation gets a zero (not a missing) gradient.
    (from_v,) = torch.autograd.grad(out["a"].sum(), v, retain_graph=True, allow_unused=True, materialize_grads=True)
    assert not from_v.any()
    (out["a"].sum() + out["v"].sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in block.excitations["a"].parameters())
    assert block.squeeze.weight.grad.abs().sum() > 0  # through v's excitation


def test_official_running_average_follows_the_first_modality_in_every_pass():
    block = MMTM({"a": 2, "v": 2}, running_average="official").eval()
    maps = {"a": torch.randn(3, 2, 2, 2), "v": torch.randn(3, 2, 2, 2)}
    scales = block.scales({m: x.mean(dim=(2, 3)) for m, x in maps.items()})
    block(maps, {"a": 1, "v": 1})  # evaluation updates too
    assert torch.allclose(block.average_v, scales["a"].mean(0)) and torch.allclose(block.average_a, block.average_v)
    with pytest.raises(ValueError, match="equal channels"):
        MMTM({"a": 2, "v": 3}, running_average="official")


def test_staged_encoders_equal_their_forward():
    cases = [(SmallCNNEncoder(1, (4, 8), 6), torch.randn(2, 3, 1, 8, 8)),
             (ResNet18Encoder(3), torch.randn(2, 2, 3, 32, 32))]
    for encoder, x in cases:
        encoder.eval()
        maps, frames = encoder.fold(x)
        for stage in encoder.stages():
            maps = stage(maps)
        assert torch.allclose(encoder.finish(maps, frames), encoder(x), atol=1e-6)
        assert len(encoder.stages()) == len(encoder.stage_channels)


def test_mmtm_fusion_pairs_stages_from_the_end():
    # AV-Digits: audio 3 blocks, visual 2; three blocks asked for, two fit (after the last two stages of each).
    fusion = MMTMFusion({"audio": SmallCNNEncoder(1, (16, 32, 64)), "visual": SmallCNNEncoder(1, (32, 64))}, stages=3)
    assert fusion.positions == {"audio": [1, 2], "visual": [0, 1]}
    assert [b.channels for b in fusion.blocks] == [{"audio": 32, "visual": 32}, {"audio": 64, "visual": 64}]
    # Two ResNet18s (official): after layer2, layer3, layer4, joint layers 256 -> 128, 512 -> 256, 1024 -> 512.
    encoders = {"a": ResNet18Encoder(1), "v": ResNet18Encoder(3)}
    model = MultimodalModel(encoders, partial(LateFusion), 5, mmtm=partial(MMTMFusion, ratio=4, stages=3))
    assert [(b.squeeze.in_features, b.squeeze.out_features) for b in model.mid_fusion.blocks] == \
        [(256, 128), (512, 256), (1024, 512)]
    seen = []
    for block in model.mid_fusion.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append({m: tuple(x.shape) for m, x in out.items()}))
    features = model.encode({"a": torch.randn(2, 1, 32, 32), "v": torch.randn(2, 3, 3, 32, 32)})  # v: 3 frames
    assert [s["v"][:2] for s in seen] == [(6, 128), (6, 256), (6, 512)] and seen[-1]["a"][:2] == (2, 512)
    assert {m: f.shape for m, f in features.items()} == {"a": (2, 512), "v": (2, 512)}
    # The MMTM parameters belong to no modality; the mid-fusion names each modality's excitations.
    owned = {id(p) for m in model.modalities for p in model.modality_parameters(m)}
    shared = {id(p) for p in model.shared_parameters()}
    mid = {id(p) for p in model.mid_fusion.parameters()}
    assert mid <= shared and not mid & owned
    assert mid == {id(p) for p in model.mid_fusion.shared_parameters()} | {
        id(p) for m in model.modalities for p in model.mid_fusion.modality_parameters(m)}


def test_encoders_without_stages_are_refused_naming_the_ones_that_work():
    with pytest.raises(ValueError, match="ResNet18Encoder, SmallCNNEncoder"):
        MultimodalModel({"a": MLPEncoder(3), "b": SmallCNNEncoder()}, partial(LateFusion), 4, mmtm=partial(MMTMFusion))


def test_decision_rule():
    # Two modalities: d = BDR_0 - BDR_1; care for 0 if d > epsilon, for 1 if d < -epsilon, else none.
    assert caring_modality(torch.tensor([0.5, 0.48]), 0.01) == 0
    assert caring_modality(torch.tensor([0.48, 0.5]), 0.01) == 1
    assert caring_modality(torch.tensor([0.5, 0.495]), 0.01) is None
    # Three: the highest BDR, when the spread exceeds epsilon.
    assert caring_modality(torch.tensor([0.1, 0.3, 0.2]), 0.01) == 1
    assert caring_modality(torch.tensor([0.2, 0.205, 0.2]), 0.01) is None
    bdr = bypass_dominance(torch.tensor([0.01, 0.1]), torch.tensor([1.0, 0.1]))  # log10(bypass / main)
    assert torch.allclose(bdr, torch.tensor([2.0, 0.0]))


def _method(overrides):
    datamodule, method = build(compose_train([*IMAGES, "method=greedy", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


def _set(parameters, weight, grad):
    for p in parameters:
        p.data.fill_(weight)
        p.grad = torch.full_like(p, grad)


def test_speeds_bdr_and_decision_against_hand_values():
    _, method = _method(["method.starting_epoch=0", "method.window=3"])
    model, mid = method.model, method.model.mid_fusion
    # One block on two 8-channel maps: joint layer 16 -> 8 (136 parameters), each excitation 8 -> 8 (72).
    assert sum(p.numel() for p in mid.shared_parameters()) == 136
    assert all(sum(p.numel() for p in mid.modality_parameters(m)) == 72 for m in method.modalities)

    def set_gradients(g_main, g_excite, g_squeeze):
        # Branch weights 1, excitation weights 2, joint-layer weights 1; constant gradients per group.
        for i, m in enumerate(method.modalities):
            _set(model.modality_parameters(m), 1.0, g_main[i])
            _set(mid.modality_parameters(m), 2.0, g_excite[i])
        _set(mid.shared_parameters(), 1.0, g_squeeze)

    # Step 1 by hand: main_m = g^2 (weights 1); bypass_m = (72 g_e^2 + 136 g_s^2) / (72 * 4 + 136).
    set_gradients((0.1, 0.2), (0.3, 0.1), 0.1)
    main1, bypass1 = [0.01, 0.04], [(72 * 0.09 + 136 * 0.01) / 424, (72 * 0.01 + 136 * 0.01) / 424]
    main, bypass = method.step_speeds()
    assert main.tolist() == pytest.approx(main1) and bypass.tolist() == pytest.approx(bypass1)
    method.modify_gradients(None)
    assert method.speed_main.tolist() == pytest.approx(main1)
    # BDR_0 = log10(0.01849 / 0.01) = 0.267 > BDR_1 = log10(0.004906 / 0.04) = -0.911: care for m0, 3 steps.
    d = math.log10(bypass1[0] / main1[0]) - math.log10(bypass1[1] / main1[1])
    assert d == pytest.approx(1.1788, abs=1e-3)
    assert int(method.caring) == 0 and int(method.curation_left) == 3 and method.isolated_modality() == "m0"
    for left in (2, 1, 0):  # the curated steps: counted down, not measured
        method.modify_gradients(None)
        assert int(method.curation_left) == left
    assert method.speed_main.tolist() == pytest.approx(main1) and method.isolated_modality() is None
    # Step 2: the speeds accumulate (sums of the per-step ratios).
    set_gradients((0.2, 0.2), (0.1, 0.1), 0.2)
    method.modify_gradients(None)
    main2, bypass2 = [0.04, 0.04], [(72 * 0.01 + 136 * 0.04) / 424] * 2
    assert method.speed_main.tolist() == pytest.approx([a + b for a, b in zip(main1, main2)])
    assert method.speed_bypass.tolist() == pytest.approx([a + b for a, b in zip(bypass1, bypass2)])


def test_no_decision_before_starting_epoch():
    _, method = _method(["method.epsilon=0"])  # starting_epoch 1; the trainer is at epoch 0
    for p in method.parameters():
        p.grad = torch.rand_like(p)
    method.modify_gradients(None)
    assert float(method.speed_main.sum()) > 0 and int(method.curation_left) == 0


def test_learning_speed_counts_a_missing_gradient_as_zero():
    a, b = nn.Parameter(torch.full((2,), 2.0)), nn.Parameter(torch.full((3,), 1.0))
    a.grad = torch.full((2,), 0.5)
    assert float(learning_speed([a, b])) == pytest.approx((2 * 0.25) / (2 * 4 + 3))


class _Isolation(pl.Callback):
    """Which modality the first MMTM block isolated in every forward pass, with the epoch and mode."""

    def __init__(self) -> None:
        self.seen = []

    def on_fit_start(self, trainer, pl_module) -> None:
        block = pl_module.model.mid_fusion.blocks[0]
        block.register_forward_pre_hook(
            lambda mod, args: self.seen.append((trainer.current_epoch, mod.training, mod.isolated)))


def test_curation_lasts_window_steps_and_starts_at_starting_epoch():
    # epsilon 0: every measured step from starting_epoch on opens a window (the BDRs are never exactly equal).
    datamodule, module = build(compose_train([*IMAGES, "method=greedy", "method.epsilon=0", "method.window=3",
                                              "method.starting_epoch=1"]))
    recorder = _Isolation()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[recorder],
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    training = [(epoch, isolated) for epoch, train_mode, isolated in recorder.seen if train_mode]
    assert all(isolated is None for _, train_mode, isolated in recorder.seen if not train_mode)  # evaluation
    assert all(isolated is None for epoch, isolated in training if epoch == 0)
    later = [isolated for epoch, isolated in training if epoch >= 1]
    # The first step of epoch 1 decides (after its backward); the next 3 forward passes are curated; and so on,
    # across the epoch boundary.
    assert [i is not None for i in later] == [k % 4 != 0 for k in range(len(later))]
    assert len(later) == 2 * len(datamodule.train_dataloader())
    logged = trainer.logged_metrics
    assert float(logged["train/curation"]) == pytest.approx(
        sum(i is not None for i in later[-len(later) // 2:]) / (len(later) // 2))


def test_refusals_name_the_fix():
    with pytest.raises(Exception, match="model/mmtm=default"):
        build(compose_train([*IMAGES, "method=greedy", "model.mmtm=null"]))
    with pytest.raises(Exception, match="late_fusion"):
        build(compose_train([*IMAGES, "method=greedy", "model/fusion=concat"]))
    with pytest.raises(Exception, match="window"):
        build(compose_train([*IMAGES, "method=greedy", "method.window=0"]))


def test_mmtm_config_serves_other_methods():
    datamodule, method = build(compose_train([*IMAGES, "method=joint", "+model/mmtm=default"]))
    assert method.model.mid_fusion is not None and len(method.model.mid_fusion.blocks) == 1
    batch = next(iter(datamodule.val_dataloader()))
    assert method.model(batch["inputs"]).shape == (len(batch["label"]), 4)


def _isolated_accuracy(module, datamodule, modality):
    """Accuracy of ``modality``'s head with its branch isolated: its own input only, no cross-modal scales."""
    module.eval()
    hits = total = 0
    with torch.no_grad(), module.model.mid_fusion.isolating(modality):
        for batch in datamodule.val_dataloader():
            logits = module.model.unimodal_logits(module.model.encode(batch["inputs"]))[modality]
            hits += int((logits.argmax(1) == batch["label"]).sum())
            total += len(logits)
    return hits / total


def test_weak_branch_learns_more_from_its_own_input_than_under_plain_mmtm():
    # The same seed, data and model; starting_epoch=99 never curates (plain MMTM training with the same loss).
    # The weak modality m1's head reaches a good accuracy under plain MMTM mostly through m0's scales (the greedy
    # bypass); Greedy isolates m1 (its BDR is the higher) and its branch learns more from its own input.
    accuracy, logged = {}, {}
    for name, start in (("plain", 99), ("greedy", 1)):
        trainer, datamodule, module = fit_briefly([*IMAGES, "method=greedy", "data.num_samples=2000",
                                                   "method.optimizer.lr=3.0e-3", f"method.starting_epoch={start}"],
                                                  epochs=5)
        accuracy[name] = _isolated_accuracy(module, datamodule, "m1")
        logged[name] = {k: float(v) for k, v in trainer.logged_metrics.items()}
    assert logged["plain"]["train/curation"] == 0
    assert logged["greedy"]["train/curation"] > 0.5
    assert logged["greedy"]["train/caring_m1"] == logged["greedy"]["train/curation"]  # m1 is the one cared for
    assert logged["greedy"]["train/d_bdr"] < 0  # BDR_m1 > BDR_m0
    assert accuracy["greedy"] > accuracy["plain"] + 0.05, accuracy

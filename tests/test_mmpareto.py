"""MMPareto: MinNorm and the integration against hand computation, the hook against the official procedure (one
backward pass per loss), M = 3, other fusion heads, accumulation, the refusals, and the intended direction."""

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from balance.methods.mmpareto import MMPareto, integrate_gradients, min_norm_weights, pareto_weights
from balance.run import build, train
from compose import compose_train

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=400",
          "data.batch_size=32", "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "callbacks.contributions=null"]
THREE = ["data.modalities=[m0,m1,m2]", "data.informativeness=[2.0,0.6,0.3]"]


def _dots(g1, g2):
    return (g1 @ g1, g1 @ g2, g2 @ g2)


def test_min_norm_weights_closed_form_and_brute_force():
    # Orthogonal unit vectors: the midpoint.
    assert min_norm_weights(*_dots(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))).tolist() == [0.5, 0.5]
    # g1 = (1, 0), g2 = (-1, 1): c = ((g2 - g1) . g2) / ||g1 - g2||^2 = 3 / 5.
    assert min_norm_weights(*_dots(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]))).tolist() == \
        pytest.approx([0.6, 0.4])
    # Beyond the segment's end the weight clips to 1 (the official solver: 0.999); equal vectors: any c, 1/2.
    assert min_norm_weights(*_dots(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))).tolist() == [1.0, 0.0]
    assert min_norm_weights(*_dots(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))).tolist() == [0.5, 0.5]
    # Against a grid search of min_c ||c g1 + (1 - c) g2|| on random pairs.
    generator = torch.Generator().manual_seed(0)
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    for _ in range(20):
        g1, g2 = torch.randn(2, 5, generator=generator, dtype=torch.float64) * torch.rand(2, 1, generator=generator) * 3
        c = min_norm_weights(*_dots(g1, g2))[0]
        best = grid[(grid[:, None] * g1 + (1 - grid[:, None]) * g2).norm(dim=1).argmin()]
        assert float(c) == pytest.approx(float(best), abs=2e-5)


def test_equal_weights_where_the_gradients_agree():
    weights, cosine = pareto_weights(*_dots(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])))
    assert weights.tolist() == [0.5, 0.5] and float(cosine) == pytest.approx(1 / math.sqrt(2))
    weights, cosine = pareto_weights(*_dots(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])))
    assert weights.tolist() == pytest.approx([0.6, 0.4]) and float(cosine) == pytest.approx(-1 / math.sqrt(2))


def test_integration_by_hand():
    # Two tensors: g_mm = ([1, 0], [2]), g_m = ([-1, 1], [0]): aa = 5, ab = -1, bb = 2, so c = 3 / 9 = 1/3 and the
    # new gradient 2 (c g_mm + (1 - c) g_m) = ([-2/3, 4/3], [4/3]); the summed gradient is ([0, 1], [2]).
    multimodal = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])]
    total = [torch.tensor([0.0, 1.0]), torch.tensor([2.0])]
    new, cosine, weight = integrate_gradients(multimodal, total, gamma=1.5, rescale="tensor")
    assert float(weight) == pytest.approx(1 / 3) and float(cosine) == pytest.approx(-1 / math.sqrt(10))
    # Per tensor: the first is longer than its summed gradient (kept), the second is lifted from 4/3 to 2.
    assert new[0].tolist() == pytest.approx([-1.0, 2.0]) and new[1].tolist() == pytest.approx([3.0])
    # One factor for the encoder: ||new|| = 2 is lifted to ||total|| = sqrt(5).
    new, _, _ = integrate_gradients(multimodal, total, gamma=1.5, rescale="encoder")
    lift = 1.5 * math.sqrt(5) / 2
    assert torch.cat(new).tolist() == pytest.approx([-2 / 3 * lift, 4 / 3 * lift, 4 / 3 * lift])
    # Agreeing gradients: gamma times the summed gradient; zero gradients stay zero.
    new, _, weight = integrate_gradients([torch.tensor([1.0, 0.0])], [torch.tensor([2.0, 1.0])], gamma=1.5)
    assert float(weight) == 0.5 and new[0].tolist() == pytest.approx([3.0, 1.5])
    new, _, _ = integrate_gradients([torch.zeros(2)], [torch.zeros(2)])
    assert new[0].tolist() == [0.0, 0.0]


def _method(overrides):
    datamodule, method = build(compose_train([*IMAGES, "method=mmpareto", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # world size 1, no accumulation
    return datamodule, method


def _encoder_names(method, m):
    return [n for n, _ in method.named_parameters() if n.startswith(f"model.encoders.{m}.")]


def _official(method, batch, sign=1.0):
    """The official procedure: each loss backpropagated alone (gradients zeroed in between), then the summed loss,
    then per parameter tensor: new = 2 (k g_mm + (1 - k) g_m), lifted to the summed gradient's norm, times 1.5."""
    step = method.forward_step(batch, 0)
    losses = [sign * step.losses["fused"]] + [F.cross_entropy(step.unimodal_logits[m], step.labels)
                                              for m in method.modalities]
    named = dict(method.named_parameters())
    grads = []
    for loss in losses:
        method.zero_grad()
        loss.backward(retain_graph=True)
        grads.append({n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in named.items()})
    method.zero_grad()
    sum(losses).backward()
    expected = {n: p.grad.clone() for n, p in named.items()}
    conflicts = []
    for i, m in enumerate(method.modalities):
        names = _encoder_names(method, m)
        g_mm, g_m = (torch.cat([g[n].flatten() for n in names]) for g in (grads[0], grads[1 + i]))
        if F.cosine_similarity(g_mm, g_m, dim=0) > 0:
            k = 0.5
        else:
            k = float(((g_m - g_mm) @ g_m / (g_mm - g_m).norm() ** 2).clamp(0, 1))
            conflicts.append(m)
        for n in names:
            new = 2 * k * grads[0][n] + 2 * (1 - k) * grads[1 + i][n]
            diff = expected[n].norm() / new.norm()
            expected[n] = 1.5 * (diff * new if diff > 1 else new)
    method.zero_grad()
    return expected, conflicts


def _hook(method, batch, sign=1.0):
    step = method.forward_step(batch, 0)
    step.losses["fused"] = sign * step.losses["fused"]
    method.observe_step(step)
    step.loss.backward()
    method.modify_gradients(step)
    return {n: p.grad.clone() for n, p in method.named_parameters()}


@pytest.mark.parametrize("overrides", [[], THREE, ["model/fusion=sum"], ["model/fusion=film"]],
                         ids=["concat", "three", "sum", "film"])
def test_hook_matches_the_official_procedure(overrides):
    # The fused loss with both signs: for every encoder one of them conflicts with its unimodal loss (MinNorm).
    datamodule, method = _method(overrides)
    method.eval()  # batch-norm statistics fixed, so the reference and the hook see the same forward pass
    batch = next(iter(datamodule.train_dataloader()))
    conflicted = set()
    for sign in (1.0, -1.0):
        expected, conflicts = _official(method, batch, sign)
        conflicted |= set(conflicts)
        got = _hook(method, batch, sign)
        for n, grad in got.items():
            assert torch.allclose(grad, expected[n], rtol=1e-4, atol=1e-7), (sign, n)
        method.zero_grad()
    assert conflicted == set(method.modalities)


def test_other_unimodal_losses_do_not_reach_an_encoder():
    # Why two backward passes suffice for M = 3: encoder m's gradient of CE(head_j) is zero for j != m.
    datamodule, method = _method(THREE)
    step = method.forward_step(next(iter(datamodule.train_dataloader())), 0)
    for j in method.modalities:
        loss = F.cross_entropy(step.unimodal_logits[j], step.labels)
        for m in method.modalities:
            grads = torch.autograd.grad(loss, method.encoder_parameters[m], retain_graph=True, allow_unused=True)
            reached = any(g is not None and bool(g.any()) for g in grads)
            assert reached == (m == j), (j, m)


def test_accumulated_batches_are_integrated_on_their_mean_gradient():
    datamodule, method = _method([])
    method.trainer = pl.Trainer(accelerator="cpu", logger=False, accumulate_grad_batches=2)
    method.eval()
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader), next(loader)]
    merged = {key: torch.cat([b[key] for b in batches]) for key in ("label", "index")}
    merged["inputs"] = {m: torch.cat([b["inputs"][m] for b in batches]) for m in method.modalities}
    expected, _ = _official(method, merged)  # batches of equal size: the mean over both is the merged batch
    for batch in batches:
        step = method.forward_step(batch, 0)
        method.observe_step(step)
        (step.loss / 2).backward()
    method.modify_gradients(step)
    for n, p in method.named_parameters():
        assert torch.allclose(p.grad, expected[n], rtol=1e-4, atol=1e-6), n


def test_refusals():
    _, method = _method([])
    with pytest.raises(ValueError, match="gamma must be"):
        MMPareto(model=method.model, optimizer=torch.optim.SGD, gamma=0.0)
    with pytest.raises(ValueError, match="rescale must be one of"):
        MMPareto(model=method.model, optimizer=torch.optim.SGD, rescale="layer")
    for p in method.model.encoders["m1"].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="'m1' has no trainable encoder parameter"):
        MMPareto(model=method.model, optimizer=torch.optim.SGD)
    method.model.encoders["m1"] = method.model.encoders["m0"]
    with pytest.raises(ValueError, match="share a parameter"):
        MMPareto(model=method.model, optimizer=torch.optim.SGD)


def test_weak_encoder_learns_more_than_under_joint_training(tmp_path):
    # Same seed, data, batches and optimizer (SGD): m0 dominates joint training and the weak encoder m1 barely
    # moves; MMPareto's unimodal assistance moves it, relative to the dominant one, several times as far (a ratio,
    # so gamma's common factor cancels), and its own head predicts better than joint training's m1 block.
    moved, own = {}, {}
    for name in ("joint", "mmpareto"):
        cfg = compose_train(["data=synthetic", "model=mlp", "data.num_samples=1000", "data.batch_size=32",
                             "data.informativeness=[2.0,0.3]", "callbacks.contributions=null", f"method={name}",
                             "optimizer=sgd", "method.optimizer.lr=1.0e-2"], run_dir=tmp_path / name)
        pl.seed_everything(0)
        datamodule, module = build(cfg)
        start = {n: p.detach().clone() for n, p in module.named_parameters()}
        trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=datamodule)
        distance = {m: sum(float((p.detach() - start[n]).norm()) for n, p in module.named_parameters()
                           if n.startswith(f"model.encoders.{m}.")) for m in module.modalities}
        moved[name] = distance["m1"] / distance["m0"]
        own[name] = float(trainer.logged_metrics["val/acc_m1"])
        if name == "mmpareto":
            assert {"train/cos_m1", "train/conflict_m1", "train/weight_m1"} <= set(trainer.logged_metrics)
    assert moved["mmpareto"] > 2 * moved["joint"], moved
    assert own["mmpareto"] > own["joint"] + 0.1, own


def test_logged_quantities_reach_the_results(tmp_path):
    results = train(compose_train([*IMAGES, "method=mmpareto", "trainer.max_epochs=2", "method.optimizer.lr=5.0e-2"],
                                  run_dir=tmp_path))
    assert results["test"]["acc"] > 0.25
    columns = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {f"train/{q}_{m}" for q in ("cos", "conflict", "weight") for m in ("m0", "m1")} <= set(columns)

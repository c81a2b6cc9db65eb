"""InfoReg: the window indicator against the official history, the regulation strengths by hand, the gradient hook,
the epoch bookkeeping, and the intended direction."""

import math

import pytest
import pytorch_lightning as pl
import torch

from balance.methods.inforeg import HISTORY, regulation_strengths, window_indicator
from balance.methods.ogm_ge import confidence_scores
from balance.run import build
from compose import compose_train, fit_and_measure_encoders

IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", "data.num_samples=400",
          "data.batch_size=32", "data.informativeness=[2.0,0.3]", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "callbacks.contributions=null"]


def _official_k(history: list[float]) -> float:
    # The official loop: a list that starts with ten zeros, one trace appended per epoch; k = 1 in epoch 0, then
    # (mean of the last 10 - mean of the 10 before the last) / mean of the last 10.
    if not history:
        return 1.0
    traces = [0.0] * 10 + history
    tr1, tr2 = sum(traces[-10:]) / 10, sum(traces[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def test_window_indicator_is_the_official_relative_growth_over_every_epoch():
    torch.manual_seed(0)
    history = torch.rand(2, 25) + 0.1
    buffer = torch.zeros(2, HISTORY + 1)
    for epoch in range(26):
        k = window_indicator(buffer, epoch)
        for m in range(2):
            assert float(k[m]) == pytest.approx(_official_k(history[m, :epoch].tolist()), rel=1e-5), (epoch, m)
        if epoch < 25:
            buffer = torch.cat([buffer[:, 1:], history[:, epoch, None]], dim=1)
    # A trace that stopped growing closes the window; all-zero traces (no gradient) give 0, not a division by 0.
    flat = torch.cat([torch.zeros(1, 1), torch.ones(1, HISTORY)], dim=1)
    assert float(window_indicator(flat, 20)[0]) == pytest.approx(0.1)
    assert float(window_indicator(torch.zeros(1, HISTORY + 1), 3)[0]) == 0.0


def test_regulation_strengths_match_the_official_rule():
    c = torch.tensor([0.95, 0.1])
    # Audio ahead: beta_a = 0.95 exp(tanh(s_a - s_v)), visual unregulated; and the reverse with 0.1.
    beta = regulation_strengths(torch.tensor([30.0, 29.5]), c, torch.tensor([True, True]))
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(0.5)), 0.0], rel=1e-5)
    beta = regulation_strengths(torch.tensor([10.0, 12.0]), c, torch.tensor([True, True]))
    assert beta.tolist() == pytest.approx([0.0, 0.1 * math.exp(math.tanh(2.0))], rel=1e-5)
    # A closed window regulates nothing; three modalities each compare with the weakest of the others.
    assert regulation_strengths(torch.tensor([30.0, 10.0]), c, torch.tensor([False, True])).tolist() == [0.0, 0.0]
    beta = regulation_strengths(torch.tensor([3.0, 1.0, 2.0]), torch.ones(3), torch.ones(3, dtype=torch.bool))
    assert beta.tolist() == pytest.approx([math.exp(math.tanh(2.0)), 0.0, math.exp(math.tanh(1.0))], rel=1e-5)


def _method(overrides=()):
    datamodule, method = build(compose_train([*IMAGES, "method=inforeg", *overrides]))
    method.trainer = pl.Trainer(accelerator="cpu", logger=False)  # current_epoch 0, world size 1
    return datamodule, method


def test_loss_is_the_fused_and_every_unimodal_cross_entropy():
    datamodule, method = _method()
    step = method.forward_step(next(iter(datamodule.train_dataloader())), 0)
    assert set(step.losses) == {"fused", "unimodal_m0", "unimodal_m1"}
    expected = sum(torch.nn.functional.cross_entropy(z, step.labels) for z in
                   [step.logits, *step.unimodal_logits.values()])
    torch.testing.assert_close(step.loss, expected)


def test_hook_pulls_the_leading_encoder_towards_its_epoch_start_and_accumulates_the_fisher_trace():
    datamodule, method = _method(["+method.beta_by_modality.m1=0.4"])
    method.on_train_epoch_start()  # the anchors: the parameters now
    with torch.no_grad():  # as if the epoch's first steps had moved every encoder
        for p in method.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    step = method.forward_step(next(iter(datamodule.train_dataloader())), 0)
    step.loss.backward()
    before = {n: p.grad.clone() for n, p in method.named_parameters()}
    beta = regulation_strengths(confidence_scores(step.unimodal_logits, step.labels), torch.tensor([0.95, 0.4]),
                                torch.ones(2, dtype=torch.bool))
    assert (beta > 0).sum() == 1  # one modality leads
    method.modify_gradients(step)
    for name, p in method.named_parameters():
        modality = next((m for m in method.modalities if name.startswith(f"model.encoders.{m}.")), None)
        if modality is None:
            assert torch.equal(p.grad, before[name]), name  # heads and projections are never regulated
            continue
        index = next(i for i, q in enumerate(method.regulated[modality]) if q is p)
        anchor = getattr(method, f"anchor_{modality}_{index}")
        expected = before[name] + beta[method.modalities.index(modality)] * (p.detach() - anchor)
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-8)
    # The Fisher accumulators hold the squared final gradients of the conv and linear weights.
    for m in method.modalities:
        for i, w in enumerate(method.fisher_weights[m]):
            torch.testing.assert_close(getattr(method, f"fisher_{m}_{i}"), w.grad ** 2)
    trace = method._epoch_traces()
    assert float(trace[0]) == pytest.approx(sum(float((w.grad ** 2).mean()) for w in method.fisher_weights["m0"]))


def test_the_next_epoch_appends_the_trace_resets_the_accumulators_and_moves_the_anchor():
    datamodule, method = _method()
    method.on_train_epoch_start()
    fisher = method.fisher_m0_0
    fisher.fill_(2.0)
    trace = method._epoch_traces()
    method.on_train_epoch_start()  # the same epoch again (a resumed run): nothing moves on
    assert float(fisher.sum()) > 0 and int(method.epochs_seen) == 0
    with torch.no_grad():
        method.model.encoders["m0"].blocks[0].weight.add_(1.0)
    method.trainer.fit_loop.epoch_progress.current.completed = 1  # current_epoch 1
    method.on_train_epoch_start()
    assert int(method.epochs_seen) == 1 and torch.equal(method.traces[:, -1], trace)
    assert float(fisher.abs().sum()) == 0
    assert torch.equal(method.anchor_m0_0, method.model.encoders["m0"].blocks[0].weight)


def test_window_from_one_modality_applies_its_indicator_to_every_modality():
    _, method = _method(["method.window=m0", "method.threshold=0.5"])
    method.traces.copy_(torch.tensor([[0.0] * 10 + [1.0], [1.0] * 11]))  # m0 still growing, m1 flat
    method.epochs_seen.fill_(1)
    method.anchor_epoch.fill_(0)
    method.on_train_epoch_start()
    assert method._window_open.tolist() == [True, True]
    _, method = _method(["method.threshold=0.5"])
    method.traces.copy_(torch.tensor([[0.0] * 10 + [1.0], [1.0] * 11]))
    method.epochs_seen.fill_(1)
    method.anchor_epoch.fill_(0)
    method.on_train_epoch_start()
    assert method._window_open.tolist() == [True, False]


@pytest.mark.parametrize("override, match", [("method.window=m7", "window must be"),
                                             ("method.beta=-1.0", "must be >= 0")])
def test_bad_options_are_refused(override, match):
    with pytest.raises(Exception, match=match):
        build(compose_train([*IMAGES, "method=inforeg", override]))


def test_regulation_slows_the_dominant_encoder(tmp_path):
    # The same seed, data, batches and loss: only the proximal regulation differs (beta 0 turns it off).
    moved = {}
    for name, extra in (("off", ["method.beta=0.0"]), ("on", [])):
        moved[name], trainer, _, _ = fit_and_measure_encoders(
            [*IMAGES, "method=inforeg", "method.optimizer.lr=5.0e-2", *extra], epochs=2, run_dir=tmp_path / name)
        if name == "on":
            logged = trainer.logged_metrics
            assert float(logged["train/beta_m0"]) > float(logged["train/beta_m1"])  # the dominant m0 is regulated
            assert float(logged["train/fisher_trace_m0"]) > 0
    assert moved["on"]["m0"] < 0.9 * moved["off"]["m0"], moved

"""Sample-level and modality-level resampling end to end: plans applied, copies train one modality, online
valuation adds no encoder pass, exact resume, DDP values the same table as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from balance.run import build, train
from compose import SYNTHETIC, compose_train, train_interrupted_and_resumed

REPO = Path(__file__).resolve().parents[1]
FAST = [*SYNTHETIC, "data.informativeness=[1.0,0.3]", "method.warmup_epochs=1", "logger=[]"]


@pytest.mark.parametrize("method", ["sample_level", "modality_level"])
@pytest.mark.parametrize("valuation", ["pass", "online"])
def test_resampling_trains_on_plans(tmp_path, method, valuation):
    cfg = compose_train([*FAST, f"method={method}", f"method.valuation={valuation}", "trainer.max_epochs=3"],
                        run_dir=tmp_path)
    results = train(cfg)
    assert results["test"]["acc"] > 0.8
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    indices, keep = state["resampling_plan"]["indices"], state["resampling_plan"]["keep"]
    num_train = len(state["valuation_table"]["index"])
    assert len(indices) > num_train and keep[:num_train].all()
    extra = keep[num_train:]
    assert (extra.sum(1) == 1).all()  # every copy keeps exactly one modality
    if method == "modality_level":
        assert extra[:, 1].all()  # the weaker modality (m1) is the one retrained
    else:
        phi = state["valuation_table"]["phi"]
        copies_m1 = int(extra[:, 1].sum())
        assert copies_m1 > int(extra[:, 0].sum())
        assert copies_m1 == int(((phi[:, 1] < 1.0).long() + (phi[:, 1] <= 0.4).long()
                                 + (phi[:, 1] <= -0.1).long()).sum())


def test_copy_trains_only_its_modality():
    cfg = compose_train([*FAST, "method=sample_level"])
    datamodule, method = build(cfg)
    datamodule.train_plan.set(torch.tensor([0, 1, 2, 3]), torch.tensor([[False, True]] * 4))
    batch = next(iter(datamodule.train_dataloader()))
    method.training_step(batch, 0).backward()
    dropped = [p.grad for n, p in method.model.named_parameters() if n.startswith("encoders.m0")]
    kept = [p.grad for n, p in method.model.named_parameters() if n.startswith("encoders.m1")]
    assert all(g is None or not g.any() for g in dropped)
    assert all(g is not None and g.any() for g in kept)


class _EncoderCalls:
    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.count += 1


@pytest.mark.parametrize("valuation", ["pass", "online"])
def test_online_valuation_needs_no_extra_encoder_pass(tmp_path, valuation):
    import pytorch_lightning as pl

    cfg = compose_train([*FAST, "method=sample_level", f"method.valuation={valuation}"], run_dir=tmp_path)
    datamodule, method = build(cfg)
    calls = _EncoderCalls(method.model.encoders["m0"])
    train_batches = len(datamodule.train_dataloader())  # epoch 0 trains on the split itself, no plan yet
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, reload_dataloaders_every_n_epochs=1)
    trainer.fit(method, datamodule=datamodule)
    valuation_batches = len(datamodule.unshuffled_train_dataloader())
    assert calls.count == train_batches + (valuation_batches if valuation == "pass" else 0)
    assert method.plan.active


def test_resume_reproduces_plan_and_metrics(tmp_path):
    common = [*FAST, "method=sample_level", "seed=2"]
    a, b = train_interrupted_and_resumed(common, tmp_path, stop_after=2, epochs=4)
    assert torch.equal(a["resampling_plan"]["indices"], b["resampling_plan"]["indices"])
    assert torch.equal(a["valuation_table"]["phi"], b["valuation_table"]["phi"])


def test_ddp_values_the_same_table_as_one_process(tmp_path):
    # An odd-sized training split: shards of unequal length must still cover every sample exactly once.
    overrides = [*FAST, "method=modality_level", "data.num_samples=1991", "trainer.max_epochs=1"]
    out = subprocess.run(
        [sys.executable, "train.py", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.sync_batchnorm=false", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    table = state["valuation_table"]

    cfg = compose_train(overrides, run_dir=tmp_path / "single")
    datamodule, method = build(cfg)
    assert len(datamodule.datasets["train"]) % 2 == 1
    method.load_state_dict(state["state_dict"])
    from balance.valuation import value_dataloader

    single = value_dataloader(method.model, datamodule.unshuffled_train_dataloader())
    assert torch.equal(table["index"], single.index)
    assert torch.allclose(table["phi"], single.phi)

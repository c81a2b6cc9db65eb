"""DDP on the CPU (2 processes, gloo): training runs and distributed evaluation counts every sample once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from balance.run import build
from compose import SYNTHETIC, compose_train

REPO = Path(__file__).resolve().parents[1]


def test_ddp_evaluation_matches_single_process(tmp_path):
    # 1,991 samples: odd-sized evaluation splits, which DistributedSampler would pad with duplicates.
    overrides = [*SYNTHETIC, "data.num_samples=1991", "trainer.max_epochs=2"]
    out = subprocess.run(
        [sys.executable, "train.py", *overrides, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
         "trainer.sync_batchnorm=false", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())

    cfg = compose_train(overrides, run_dir=tmp_path / "single")
    datamodule, method = build(cfg)
    assert len(datamodule.datasets["test"]) % 2 == 1
    state = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    method.load_state_dict(state)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    single = trainer.test(method, datamodule=datamodule, verbose=False)[0]
    for name in ("acc", "acc_m0", "acc_m1", "f1"):
        assert abs(single[f"test/{name}"] - results["test"][name]) < 1e-6, name

"""End-to-end runs of the real entry point: results.json, resume, loggers, bad input."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from balance.run import train
from compose import SYNTHETIC, compose_train, train_interrupted_and_resumed

REPO = Path(__file__).resolve().parents[1]


def test_results_json_has_every_metric(tmp_path):
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=2"], run_dir=tmp_path)
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    for split in ("val", "test"):
        assert {"acc", "acc_m0", "acc_m1", "f1"} <= set(results[split])
        assert all(0.0 <= results[split][k] <= 1.0 for k in ("acc", "acc_m0", "acc_m1", "f1"))
    assert Path(results["best_checkpoint"]).exists()
    assert results["best_epoch"] in (0, 1)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/acc", "val/acc", "val/acc_m1", "val/f1", "train/loss"} <= set(header)


def test_best_epoch_is_selected_on_validation(tmp_path):
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=3"], run_dir=tmp_path)
    results = train(cfg)
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    monitor = next(v for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" in k)
    assert results["val"]["acc"] == pytest.approx(float(monitor["best_model_score"]), abs=1e-6)


def test_last_checkpoint_is_the_newest_epoch_when_validation_stops_improving(tmp_path):
    # lr 0: validation accuracy never changes, so the best checkpoint stays at epoch 0 while training goes on.
    results = train(compose_train([*SYNTHETIC, "trainer.max_epochs=3", "method.optimizer.lr=0.0"], run_dir=tmp_path))
    assert results["best_epoch"] == 0
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        Path(results["best_checkpoint"]).name, "last.ckpt"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    # Dropout and an unequal split make the run depend on the RNG; shuffling depends on it anyway.
    common = [*SYNTHETIC, "model.encoders.encoder.dropout=0.3", "seed=3"]
    a, b = (c["state_dict"] for c in train_interrupted_and_resumed(common, tmp_path, stop_after=2, epochs=4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=1", "logger=wandb"], run_dir=tmp_path)
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_tensorboard_logger_writes_events(tmp_path):
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=1", "logger=tensorboard"], run_dir=tmp_path)
    train(cfg)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))


def test_unknown_config_name_lists_choices():
    with pytest.raises(ConfigCompositionException, match="Available options"):
        compose_train(["method=no_such_method"])


def test_model_data_mismatch_is_explained(tmp_path):
    cfg = compose_train(["data=synthetic", "model=avdigits"], run_dir=tmp_path)
    with pytest.raises(ValueError, match="pick a model config"):
        train(cfg)


def test_train_py_cli_writes_results(tmp_path):
    """The real command line (Hydra run directory and all), with tiny limits."""
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, "train.py", *SYNTHETIC, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test"]) >= {"acc", "acc_m0", "acc_m1", "f1"}
    assert "acc_m0" in out.stdout and "results.json" in out.stdout
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_paper_protocol_selects_the_best_test_epoch(tmp_path):
    cfg = compose_train([*SYNTHETIC, "trainer.max_epochs=4", "protocol=paper"], run_dir=tmp_path)
    results = train(cfg)
    assert results["selection"] == "best test/acc over epochs (protocol=paper)"
    rows = list(csv.DictReader(open(tmp_path / "csv" / "version_0" / "metrics.csv")))
    per_epoch = {int(r["epoch"]): float(r["paper/test_acc"]) for r in rows if r.get("paper/test_acc")}
    assert sorted(per_epoch) == [0, 1, 2, 3]
    best_epoch = max(per_epoch, key=lambda e: (per_epoch[e], -e))  # the checkpoint keeps the first best
    assert results["best_epoch"] == best_epoch
    assert results["test"]["acc"] == pytest.approx(per_epoch[best_epoch], abs=1e-6)


def test_unknown_protocol_is_refused(tmp_path):
    with pytest.raises(ValueError, match="protocol='best'"):
        train(compose_train([*SYNTHETIC, "protocol=best"], run_dir=tmp_path))


# Lightning steps joint's schedule after last.ckpt is written (two drops in it after three epochs); MLA, under
# manual optimization, steps its own in its epoch-end hook, before the checkpoint (three).
@pytest.mark.parametrize(("method", "final_lr"), [("joint", 1.0e-5), ("mla", 1.0e-6)])
def test_plateau_schedule_steps_on_the_validation_loss(tmp_path, method, final_lr):
    # A threshold no epoch can meet: every epoch is a plateau, so the rate drops by the factor after each one.
    train(compose_train([*SYNTHETIC, f"method={method}", "trainer.max_epochs=3", "scheduler=plateau",
                         "method.scheduler.patience=0",
                         "method.scheduler.threshold=10.0", "method.optimizer.lr=1.0e-3"], run_dir=tmp_path))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["lr_schedulers"][0]["num_bad_epochs"] == 0
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(final_lr)

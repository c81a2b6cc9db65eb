"""What a run shows on the console and keeps in train.log: the parameter summary, the progress bars, no noise."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate

from balance.console import parameter_table
from balance.diagnostics.callback import ProgressLoader, run_diagnostics
from balance.diagnostics.modality_gap import ModalityGap
from balance.run import build_model_config
from compose import compose_train

REPO = Path(__file__).resolve().parents[1]


class _Data:
    modalities, num_classes, encoder_kwargs = ["m0", "m1"], 3, {}


def _method(name: str):
    cfg = compose_train(["data=synthetic", "model=mlp", f"method={name}"])
    return instantiate(cfg.method, model=instantiate(build_model_config(cfg, _Data())))


def test_the_parameter_table_splits_every_parameter_once():
    for name in ("joint", "cggm"):  # CGGM keeps auxiliary classifiers outside the model
        method = _method(name)
        rows = dict(parameter_table(method))
        parts = sum(count for part, count in rows.items() if part != "total")
        assert parts == rows["total"] == sum(p.numel() for p in method.parameters())
        model = method.model
        assert rows["m0 (encoder and own head parts)"] == sum(p.numel() for p in model.modality_parameters("m0"))
    assert rows["method's own (outside the model)"] > 0
    assert dict(parameter_table(_method("joint")))["method's own (outside the model)"] == 0


def test_a_progress_loader_serves_the_same_batches_and_shows_a_bar(capsys):
    loader = torch.utils.data.DataLoader(torch.arange(10), batch_size=4)
    shown = ProgressLoader(loader, "mm_shap")
    assert [b.tolist() for b in shown] == [b.tolist() for b in loader]
    assert len(shown) == 3 and shown.dataset is loader.dataset and shown.batch_size == 4
    assert "mm_shap" in capsys.readouterr().err


def test_each_diagnostic_reports_its_time(caplog):
    method = _method("joint")
    batches = [{"inputs": {m: torch.randn(6, 16) for m in ("m0", "m1")}, "label": torch.tensor([0, 1, 2] * 2),
                "index": torch.arange(6)}]
    with caplog.at_level(logging.INFO):
        results = run_diagnostics({"modality_gap": ModalityGap()}, method, batches, progress=False)
    assert "error" not in results["modality_gap"]
    assert "diagnostic modality_gap took" in caplog.text


def test_a_run_logs_to_train_log_without_noise(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    shown = subprocess.run([sys.executable, "train.py", "data=synthetic", "model=mlp", "trainer.max_epochs=1",
                            "data.num_samples=120", f"hydra.run.dir={tmp_path}"],
                           cwd=REPO, env=env, capture_output=True, text=True, check=True)
    console = shown.stdout + shown.stderr
    kept = (tmp_path / "train.log").read_text()
    for text in (console, kept):
        assert "Seed set to 0" in text and "JointTraining parameters" in text and "m0 (encoder" in text
    for noise in ("v_num", "FLOPs", "litlogger", "LeafSpec", "Skipping setting a default"):
        assert noise not in console, noise

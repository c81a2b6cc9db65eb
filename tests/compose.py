"""Composing the real Hydra config in tests (CPU, tiny limits, output in a temporary directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from balance.run import build, train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Runs in tests: synthetic features, a small MLP per modality, no progress bar.
SYNTHETIC = ["data=synthetic", "model=mlp", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false"]


def compose_train(overrides: list[str], run_dir: Path | str | None = None) -> DictConfig:
    """The `train` config with ``overrides`` (and ``run_dir`` set, since there is no Hydra run here)."""
    extra = [f"run_dir={run_dir}"] if run_dir is not None else ["run_dir=/tmp/balance-unused"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *extra])


def small_encoder(modality: str, in_channels: int) -> str:
    """An override giving ``modality`` a small CNN encoder (after ``~model.encoders``), to keep runs fast."""
    return (f"+model.encoders.{modality}={{_target_:balance.models.SmallCNNEncoder,in_channels:{in_channels},"
            "channels:[8,16],out_dim:16}")


def model_logits_on_a_batch(overrides: list[str]):
    """Builds the config's datamodule and method and runs the model on one validation batch.

    Returns:
        ``(datamodule, method, logits)``.
    """
    datamodule, method = build(compose_train(overrides))
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        logits = method.model(batch["inputs"])
    return datamodule, method, logits


def train_briefly(overrides: list[str], run_dir: Path) -> dict:
    """Trains one epoch of two batches, selects, tests; checks that ``results.json`` holds what ``train`` returned.

    Returns:
        The results (``{"test": {...}, "val": {...}}``).
    """
    cfg = compose_train([*overrides, "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"], run_dir=run_dir)
    results = train(cfg)
    saved = json.loads((Path(run_dir) / "results.json").read_text())
    assert saved["test"]["acc"] == pytest.approx(results["test"]["acc"])
    return results


def fit_briefly(overrides: list[str], epochs: int, run_dir: Path | str | None = None, before_fit=None):
    """Builds the config's method and fits it for ``epochs`` (seed 0, no validation, no logger, no checkpoints):
    the direction tests compare a method with a baseline on the same seed, data and batches.

    Args:
        overrides: the config's overrides.
        epochs: training epochs.
        run_dir: the run directory (a temporary one if ``None``).
        before_fit: called with the built method before it trains (e.g. to record its initial parameters).

    Returns:
        ``(trainer, datamodule, method)``.
    """
    import pytorch_lightning as pl

    pl.seed_everything(0)
    datamodule, method = build(compose_train(overrides, run_dir=run_dir))
    if before_fit is not None:
        before_fit(method)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=datamodule)
    return trainer, datamodule, method


def fit_and_measure_encoders(overrides: list[str], epochs: int, run_dir: Path | str | None = None,
                             kernels_only: bool = False):
    """:func:`fit_briefly`, measuring how far each encoder moved.

    Args:
        kernels_only: measure only the encoders' 4-D parameters (convolution kernels); the other arguments are
            :func:`fit_briefly`'s.

    Returns:
        ``(moved, trainer, datamodule, method)``: ``moved`` maps each modality to the summed L2 distance of its
        encoder's parameters from their initial values.
    """
    start: dict[str, torch.Tensor] = {}
    trainer, datamodule, method = fit_briefly(
        overrides, epochs, run_dir, before_fit=lambda m: start.update({n: p.detach().clone()
                                                                       for n, p in m.named_parameters()}))
    moved = {m: sum(float((p.detach() - start[n]).norm()) for n, p in method.named_parameters()
                    if n.startswith(f"model.encoders.{m}.") and (p.dim() == 4 or not kernels_only))
             for m in method.modalities}
    return moved, trainer, datamodule, method


def held_out_accuracy(datamodule, method, modality: str) -> float:
    """The modality's own accuracy (its ``acc_<m>`` logits) over the validation and test splits together."""
    method.eval()
    correct = total = 0
    with torch.no_grad():
        for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
            for batch in loader:
                logits = method.unimodal_logits(method.model.encode(batch["inputs"]))[modality]
                correct += int((logits.argmax(1) == batch["label"]).sum())
                total += len(batch["label"])
    return correct / total


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Asserts that two nested structures (dicts, sequences, tensors, plain values: a checkpoint) are equal,
    naming the first entry that differs."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def train_interrupted_and_resumed(overrides: list[str], run_dir: Path, stop_after: int, epochs: int
                                  ) -> tuple[dict, dict]:
    """Trains ``epochs`` epochs at once (``run_dir/full``) and again stopped after ``stop_after`` epochs and resumed
    from its ``last.ckpt`` (``run_dir/part``); asserts that both runs validate and test alike.

    Returns:
        The final checkpoints of the uninterrupted and of the resumed run.
    """
    full = train(compose_train([*overrides, f"trainer.max_epochs={epochs}"], run_dir=run_dir / "full"))
    train(compose_train([*overrides, f"trainer.max_epochs={stop_after}"], run_dir=run_dir / "part"))
    last = run_dir / "part" / "checkpoints" / "last.ckpt"
    resumed = train(compose_train([*overrides, f"trainer.max_epochs={epochs}", f"ckpt_path={last}"],
                                  run_dir=run_dir / "part"))
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    return tuple(torch.load(run_dir / run / "checkpoints" / "last.ckpt", weights_only=True) for run in ("full", "part"))

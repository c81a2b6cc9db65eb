"""Composing the real Hydra config in tests (CPU, tiny limits, output in a temporary directory)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Runs in tests: synthetic features, a small MLP per modality, no progress bar.
SYNTHETIC = ["data=synthetic", "model=mlp", "trainer.enable_progress_bar=false",
             "trainer.enable_model_summary=false"]


def compose_train(overrides: list[str], run_dir: Path | str | None = None) -> DictConfig:
    """The `train` config with ``overrides`` (and ``run_dir`` set, since there is no Hydra run here)."""
    extra = [f"run_dir={run_dir}"] if run_dir is not None else ["run_dir=/tmp/balance-unused"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, *extra])

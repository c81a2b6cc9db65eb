"""Saving figures as PNG and sending them to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger  # noqa: E402


def log_figure(trainer: pl.Trainer | None, name: str, figure: plt.Figure, path: Path) -> Path:
    """Writes ``figure`` to ``path`` (PNG), logs it as ``name`` to W&B and TensorBoard loggers, closes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=name, images=[str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(name, figure, global_step=trainer.global_step)
    plt.close(figure)
    return path

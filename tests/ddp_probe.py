"""A callback for DDP tests, importable by the training subprocess (tests/ is put on its PYTHONPATH)."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class RankStateDump(pl.Callback):
    """Saves every rank's weights after training as ``<directory>/rank<r>.pt``."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        torch.save(pl_module.state_dict(), self.directory / f"rank{trainer.global_rank}.pt")

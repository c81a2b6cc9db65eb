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


class PoisonOneRank(pl.Callback):
    """Makes rank ``rank``'s inputs NaN from training step ``step`` on, so that only that rank's loss is NaN."""

    def __init__(self, rank: int = 1, step: int = 2) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            for value in batch["inputs"].values():
                value.fill_(float("nan"))

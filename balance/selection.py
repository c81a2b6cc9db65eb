"""Model-selection protocols: which epoch's weights a run reports.

``protocol=val`` (default): the epoch with the best validation accuracy, tested once at the end.
``protocol=paper``: the epoch with the best *test* accuracy, as the papers of this field selected their models;
it needs the test accuracy of every epoch, which :class:`TestAccuracyEachEpoch` provides. Results say which.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from torchmetrics.classification import MulticlassAccuracy

from balance.diagnostics.base import batches
from balance.scopes import isolated_rng

PROTOCOLS = {"val": "best val/acc", "paper": "best test/acc over epochs (protocol=paper)"}
PAPER_MONITOR = "paper/test_acc"


class TestAccuracyEachEpoch(pl.Callback):
    """Logs ``paper/test_acc``, the fused test accuracy, after every validation epoch of training.

    Each rank evaluates its shard of the test split and the accuracy is synced across ranks, so every rank's
    checkpoint callback sees the same value. The global RNG is left as it was.
    """

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        accuracy = MulticlassAccuracy(pl_module.model.num_classes, average="micro").to(pl_module.device)
        with isolated_rng():
            for batch in batches(pl_module, trainer.datamodule.test_dataloader()):
                features = pl_module.model.encode(batch["inputs"])
                accuracy.update(pl_module.fused_logits(features, batch.get("present")), batch["label"])
        pl_module.log(PAPER_MONITOR, accuracy.compute(), on_epoch=True, on_step=False)


def apply_protocol(protocol: str, callbacks: Sequence[pl.Callback]) -> list[pl.Callback]:
    """The trainer's callbacks for a selection protocol: under ``paper`` every checkpoint callback that monitors
    validation accuracy monitors the per-epoch test accuracy instead."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}")
    callbacks = list(callbacks)
    if protocol == "paper":
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor == "val/acc":
                callback.monitor = PAPER_MONITOR
        callbacks.append(TestAccuracyEachEpoch())
    return callbacks

"""`MultimodalMethod`: the small base every training method shares (metrics, optimizers, logging, RNG state)."""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from balance.models import MultimodalModel

STAGES = ("train", "val", "test")


class MultimodalMethod(pl.LightningModule):
    """Base of every method: holds the model and logs, per epoch and stage, fused accuracy, each modality's
    accuracy (through ``model.unimodal_logits``), macro-F1 and the loss, as ``<stage>/acc``,
    ``<stage>/acc_<modality>``, ``<stage>/f1`` and ``<stage>/loss``.

    Subclasses implement ``training_step``; validation and test evaluate the fused prediction. A subclass that
    overrides an ``on_<stage>_epoch_end`` hook calls ``super()`` so the stage's metrics are logged.

    Args:
        model: the multimodal model.
        optimizer: a ``_partial_`` optimizer taking the parameters.
        scheduler: an optional ``_partial_`` LR scheduler taking the optimizer, stepped once per epoch.
    """

    def __init__(
        self,
        model: MultimodalModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.modalities = list(model.modalities)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # nn.Module already has a `train` attribute, so the collections are named `<stage>_metrics`.
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", self._stage_metrics(model.num_classes))

    def _stage_metrics(self, num_classes: int) -> MetricCollection:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        metrics |= {f"acc_{m}": MulticlassAccuracy(num_classes, average="micro") for m in self.modalities}
        metrics["loss"] = MeanMetric()
        return MetricCollection(metrics)

    def forward(self, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(inputs, keep)

    def log_metrics(
        self,
        stage: str,
        logits: torch.Tensor,
        unimodal_logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        loss: torch.Tensor,
    ) -> None:
        """Accumulates the fused, per-modality and F1 metrics and the batch-weighted loss of one batch; they are
        computed (synced across ranks), logged and reset at the stage's epoch end.

        Logging once per epoch instead of calling ``self.log`` per metric per step matters on small models: each
        ``self.log`` call costs Lightning about 0.3 ms of bookkeeping (benchmarks/README.md).
        """
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        metrics["acc"].update(logits, labels)
        metrics["f1"].update(logits, labels)
        for m, unimodal in unimodal_logits.items():
            metrics[f"acc_{m}"].update(unimodal, labels)
        metrics["loss"].update(loss.detach(), weight=labels.shape[0])

    def log_epoch_metrics(self, stage: str) -> None:
        """Logs ``<stage>/<metric>`` for the epoch's accumulated metrics and resets them (no-op if none)."""
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        if metrics["acc"].update_count == 0:
            return
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        shown = {f"{stage}/acc", "train/loss"}
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown})

    def on_train_epoch_end(self) -> None:
        self.log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def fused_logits(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The method's prediction (fused logits) from encoded features; ``keep`` (``BoolTensor[B, M]``) drops
        modalities by zeroing their features. Diagnostics evaluate every method through this."""
        return self.model.fuse(features, keep)

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        """Logs the batch's metrics; returns ``{"loss", "features"}``: the encoded features go to the callbacks'
        ``on_validation_batch_end`` / ``on_test_batch_end`` (the contribution callback values them without running
        the encoders again)."""
        features = self.model.encode(batch["inputs"])
        logits = self.fused_logits(features, keep=batch.get("present"))
        loss = nn.functional.cross_entropy(logits, batch["label"])
        self.log_metrics(stage, logits, self.model.unimodal_logits(features), batch["label"], loss)
        return {"loss": loss, "features": features}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer),
                                                         "interval": "epoch"}}

    # The global RNG drives shuffling and augmentation; keeping it in the checkpoint lets a resumed run draw
    # exactly what the uninterrupted run would have drawn. Stored as tensors and ints so that checkpoints still
    # load with torch.load(weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
            random.setstate(states["python"])

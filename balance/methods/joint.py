"""Joint training: cross-entropy on the fused logits, optionally plus unimodal auxiliary losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from balance.methods.base import MultimodalMethod


class JointTraining(MultimodalMethod):
    """The joint baseline: ``CE(fused) + unimodal_loss_weight * sum_m CE(unimodal_m)``.

    The fusion (concat, sum, late fusion, FiLM, gated, ...) comes from the model config.

    Args:
        unimodal_loss_weight: weight of each modality's auxiliary cross-entropy on its own logits (0 = off).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, unimodal_loss_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if unimodal_loss_weight < 0:
            raise ValueError(f"unimodal_loss_weight must be >= 0, got {unimodal_loss_weight}")
        self.unimodal_loss_weight = unimodal_loss_weight

    def observe_step(self, features: Mapping[str, torch.Tensor], logits: torch.Tensor,
                     batch: Mapping[str, Any]) -> None:
        """Called every training step with the step's features and (detached) fused logits; a subclass can use
        them (e.g. to value the samples) without another forward pass. Does nothing here."""

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        labels = batch["label"]
        features = self.model.encode(batch["inputs"])
        logits = self.model.fuse(features, keep=batch.get("present"))
        unimodal = self.model.unimodal_logits(features)
        loss = F.cross_entropy(logits, labels)
        if self.unimodal_loss_weight:
            loss = loss + self.unimodal_loss_weight * sum(F.cross_entropy(u, labels) for u in unimodal.values())
        self.observe_step(features, logits.detach(), batch)
        self.log_metrics("train", logits.detach(), {m: u.detach() for m, u in unimodal.items()}, labels,
                         loss.detach())
        return loss

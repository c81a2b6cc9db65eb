"""Joint training: cross-entropy on the fused logits, optionally plus unimodal auxiliary losses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step


class JointTraining(MultimodalMethod):
    """The joint baseline: ``CE(fused) + unimodal_loss_weight * sum_m CE(unimodal_m)``.

    The fusion (concat, sum, late fusion, FiLM, gated, ...) comes from the model config.

    Args:
        unimodal_loss_weight: weight of each modality's auxiliary cross-entropy on its own logits (0 = off).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, unimodal_loss_weight: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.non_negative("unimodal_loss_weight", unimodal_loss_weight)
        self.unimodal_loss_weight = unimodal_loss_weight

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = dict(super().loss_terms(step))
        if self.unimodal_loss_weight:
            terms["unimodal"] = self.unimodal_loss_weight * sum(
                F.cross_entropy(u, step.labels) for u in step.unimodal_logits.values())
        return terms

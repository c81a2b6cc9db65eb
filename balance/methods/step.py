"""`Step`: one batch's forward pass, shared by a method's loss, its observers and its gradient hook."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Step:
    """What one training step computed, so that every part of a method reads it instead of recomputing it.

    The base method builds it (:meth:`~balance.methods.MultimodalMethod.forward_step`), a method adds its loss
    terms (:meth:`~balance.methods.MultimodalMethod.loss_terms`), and the same object reaches
    ``observe_step`` and the gradient hook ``modify_gradients`` (after backward, before the optimizer step).

    Attributes:
        batch: the batch (``inputs``, ``label``, ``index``, optionally ``present``).
        batch_idx: the batch's position in the epoch.
        features: modality -> ``[B, d_m]`` encoder features (with the autograd graph).
        logits: ``[B, C]`` fused logits (with the graph); ``None`` for a unimodal sub-step.
        unimodal_logits: modality -> ``[B, C]`` each modality's own logits (see the fusion head's convention).
        losses: name -> scalar loss term; the step's loss is their sum.
        modality: the one modality a unimodal sub-step trains (MLA's alternating steps); ``None`` otherwise.
    """

    batch: Mapping[str, Any]
    batch_idx: int
    features: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    unimodal_logits: dict[str, torch.Tensor]
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    modality: str | None = None

    @property
    def labels(self) -> torch.Tensor:
        """``[B]`` class labels."""
        return self.batch["label"]

    @property
    def loss(self) -> torch.Tensor:
        """The sum of the loss terms."""
        if not self.losses:
            raise ValueError("the step has no loss term")
        return sum(self.losses.values())  # type: ignore[return-value]

"""UME, the uni-modal ensemble (Du et al., "On Uni-Modal Feature Learning in Supervised Multi-Modal Learning",
ICML 2023): every modality's model is trained on its own, and their predictions are averaged.

Trained here as one model: each modality's encoder with its own classifier (a late-fusion head), the loss the sum
of the classifiers' cross-entropies and nothing else. No parameter is shared and each loss reaches only its own
modality's encoder and classifier, so this is training M unimodal models side by side, on the same batches; the
prediction is the mean of their logits (the late-fusion head). What one model changes against M separate runs:
one epoch, the one with the best validation accuracy of the ensemble, is selected for all members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from balance.methods.base import MultimodalMethod
from balance.methods.step import Step
from balance.models.fusion import LateFusion, SumFusion


class UnimodalEnsemble(MultimodalMethod):
    """The sum over modalities of each classifier's cross-entropy on its own logits; the fused prediction is the
    head's combination of them (see the module docstring).

    Args:
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    runs_encoders_alone = "UME trains each modality's model on its own"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.model.fusion, (LateFusion, SumFusion)):
            raise ValueError(f"UME trains a classifier per modality, but the fusion head is "
                             f"{type(self.model.fusion).__name__}: use model/fusion=late_fusion (method=ume "
                             "selects it) or sum")

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        return {f"unimodal_{m}": loss for m, loss in self.unimodal_losses(step).items()}

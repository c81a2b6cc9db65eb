"""The unimodal baseline: one modality's encoder and a head, trained and evaluated alone (the "audio only" and
"visual only" rows that every table of this field starts with)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from balance import options
from balance.methods.base import MultimodalMethod
from balance.models.encoders import AbsentEncoder


class UnimodalTraining(MultimodalMethod):
    """Cross-entropy on the prediction of ``modality`` alone.

    Every other modality's encoder (and projection) is replaced by an :class:`AbsentEncoder`, whose features are
    zeros, so the model's fusion head sees those modalities as dropped in training, evaluation and diagnostics
    alike: with the concatenation head the prediction is ``W_m h_m + b``, a linear head on the one encoder. The
    other modalities' parameters are gone from the model and its checkpoints; their inputs are still loaded by
    the datamodule but never read. ``acc`` and ``acc_<modality>`` are the same prediction; no ``acc_<other>`` is
    reported.

    Args:
        modality: the modality kept (one of the data's).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    runs_encoders_alone = "method=unimodal trains one encoder alone"

    def __init__(self, modality: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.one_of("modality", modality, self.modalities)
        self.modality = modality
        for other in self.modalities:
            if other == modality:
                continue
            projection = self.model.projections[other] if other in self.model.projections else None
            width = projection.out_features if projection is not None else self.model.encoders[other].out_dim
            self.model.encoders[other] = AbsentEncoder(width)
            if projection is not None:
                del self.model.projections[other]
        self.report_modalities([modality])

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The model's only prediction is the kept modality's own.
        return {self.modality: self.model.fuse(features)}

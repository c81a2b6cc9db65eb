"""`MultimodalModel`: per-modality encoders and a fusion head, with modality dropping by feature zeroing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import torch
from torch import nn

from balance.dropping import drop_features, zero_input
from balance.models.fusion import FusionHead


class MultimodalModel(nn.Module):
    """Encoders (one per modality, in the data's modality order) and a fusion head.

    Args:
        encoders: modality name -> encoder; each encoder exposes ``out_dim``.
        fusion: a callable (a ``_partial_`` fusion config) taking ``feature_dims`` and ``num_classes``.
        num_classes: number of classes; run.py fills it in from the datamodule.
        feature_dim: if set, every encoder whose ``out_dim`` differs is followed by a linear projection to this
            size (needed by a shared head).
    """

    def __init__(
        self,
        encoders: Mapping[str, nn.Module],
        fusion: Callable[..., FusionHead],
        num_classes: int,
        feature_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(encoders) < 1:
            raise ValueError("a MultimodalModel needs at least one encoder")
        self.modalities = list(encoders)
        self.num_classes = num_classes
        self.encoders = nn.ModuleDict(dict(encoders))
        self.projections = nn.ModuleDict(
            {
                m: nn.Linear(enc.out_dim, feature_dim)
                for m, enc in encoders.items()
                if feature_dim is not None and enc.out_dim != feature_dim
            }
        )
        dims = {m: feature_dim if feature_dim is not None else enc.out_dim for m, enc in encoders.items()}
        self.fusion = fusion(feature_dims=dims, num_classes=num_classes)

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs each modality's encoder (and projection) once: modality -> ``[B, d_m]`` features."""
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"batch has no input for modalities {missing}; it has {list(inputs)}")
        features = {}
        for m in self.modalities:
            f = self.encoders[m](inputs[m])
            features[m] = self.projections[m](f) if m in self.projections else f
        return features

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """Fused logits; ``keep`` (``BoolTensor[B, M]``, modality order) drops modalities by zeroing their features."""
        return self.fusion(drop_features(features, self.modalities, keep))

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's own logits (see the fusion head for the convention)."""
        return self.fusion.unimodal_logits(features)

    def forward(self, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse(self.encode(inputs), keep)

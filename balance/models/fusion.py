"""Fusion heads: a dict of per-modality features (ordered as the model's modalities) to class logits.

Every head takes ``feature_dims`` (modality -> feature size, in order) and ``num_classes`` as its first two
arguments; model configs give the rest and mark the head ``_partial_`` so the model fills those two in.
``unimodal_logits`` is each modality's own prediction; heads without a natural one fall back to fusing with
every other modality's features zeroed, the way the valuation code drops modalities.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from balance.dropping import drop_features


class FusionHead(nn.Module):
    """Base class: remembers the modality order and provides the zero-the-others unimodal fallback."""

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__()
        if len(feature_dims) < 1:
            raise ValueError("a fusion head needs at least one modality")
        self.modalities = list(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch_size = len(features[self.modalities[0]])
        alone = torch.eye(len(self.modalities), dtype=torch.bool, device=features[self.modalities[0]].device)
        return {m: self(drop_features(features, self.modalities, alone[i].expand(batch_size, -1)))
                for i, m in enumerate(self.modalities)}

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The head's parameters that belong to ``modality`` alone (its own block, where the head has one); the
        rest of the head is shared. None here."""
        return []

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        """The weight of the head's output layer that ``modality``'s features reach, and the columns of it that act
        on them: ``weight[:, columns]`` is a ``[num_classes, k]`` matrix (e.g. the modality's block of a concat
        head). ``None`` for a head without a linear output layer (here)."""
        return None


class ConcatFusion(FusionHead):
    """One linear layer on the concatenated features (the standard joint-training baseline).

    Each modality's own logits are its block of the weight plus the bias shared equally,
    ``W[:, slice_m] f_m + b / M``, the convention OGM-GE uses to read unimodal accuracy off a concat head.
    """

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__(feature_dims, num_classes)
        self.linear = nn.Linear(sum(feature_dims.values()), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(torch.cat([features[m] for m in self.modalities], dim=1))

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blocks = torch.split(self.linear.weight, [self.feature_dims[m] for m in self.modalities], dim=1)
        share = self.linear.bias / len(self.modalities)
        return {m: features[m] @ block.T + share for m, block in zip(self.modalities, blocks)}

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        start = sum(self.feature_dims[m] for m in self.modalities[:self.modalities.index(modality)])
        return self.linear.weight, slice(start, start + self.feature_dims[modality])


class _PerModalityHeads(FusionHead):
    def __init__(self, feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__(feature_dims, num_classes)
        self.heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](features[m]) for m in self.modalities}

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.heads[modality].parameters())

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        return self.heads[modality].weight, slice(None)


class SumFusion(_PerModalityHeads):
    """A linear head per modality; the fused logits are their sum (OGM-GE's sum fusion)."""

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).sum(0)


class LateFusion(_PerModalityHeads):
    """A linear head per modality; the fused logits are their mean (late fusion of unimodal predictions)."""

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).mean(0)


class FiLMFusion(FusionHead):
    """Feature-wise linear modulation (OGM-GE's FiLM), generalised to M modalities.

    One modality (``condition``, default the first) predicts a scale and shift applied to the concatenation of
    the others: ``out(gamma * x + beta)`` with ``gamma, beta = film(f_condition)``. For two modalities this is
    OGM-GE's ``FiLM`` with the conditioning modality chosen by name instead of a flag.

    Args:
        hidden_dim: width of the modulated features (the other modalities are projected to it).
        condition: name of the conditioning modality.
    """

    def __init__(
        self, feature_dims: Mapping[str, int], num_classes: int, hidden_dim: int = 512, condition: str | None = None
    ) -> None:
        super().__init__(feature_dims, num_classes)
        if len(feature_dims) < 2:
            raise ValueError("FiLM fusion needs at least two modalities")
        self.condition = condition or self.modalities[0]
        if self.condition not in feature_dims:
            raise ValueError(f"FiLM condition {self.condition!r} is not one of {self.modalities}")
        self.others = [m for m in self.modalities if m != self.condition]
        self.project = nn.Linear(sum(feature_dims[m] for m in self.others), hidden_dim)
        self.film = nn.Linear(feature_dims[self.condition], 2 * hidden_dim)
        self.out = nn.Linear(hidden_dim, num_classes)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        # The conditioning modality's own layer; the projection of the others mixes them, so it is shared.
        return list(self.film.parameters()) if modality == self.condition else []

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        # Every modality reaches the one output layer (the condition through the scale and shift).
        return self.out.weight, slice(None)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(features[self.condition]).chunk(2, dim=1)
        x = self.project(torch.cat([features[m] for m in self.others], dim=1))
        return self.out(gamma * x + beta)


class GatedFusion(FusionHead):
    """Gated fusion (OGM-GE's ``GatedFusion``), generalised to M modalities.

    Every modality is projected to ``hidden_dim``; the ``gate`` modality's projection, through a sigmoid,
    multiplies the sum of the others' projections before the output layer.

    Args:
        hidden_dim: width of the projections.
        gate: name of the gating modality (default the first).
    """

    def __init__(
        self, feature_dims: Mapping[str, int], num_classes: int, hidden_dim: int = 512, gate: str | None = None
    ) -> None:
        super().__init__(feature_dims, num_classes)
        if len(feature_dims) < 2:
            raise ValueError("gated fusion needs at least two modalities")
        self.gate = gate or self.modalities[0]
        if self.gate not in feature_dims:
            raise ValueError(f"gate modality {self.gate!r} is not one of {self.modalities}")
        self.project = nn.ModuleDict({m: nn.Linear(d, hidden_dim) for m, d in feature_dims.items()})
        self.out = nn.Linear(hidden_dim, num_classes)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return list(self.project[modality].parameters())

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        return self.out.weight, slice(None)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        gate = torch.sigmoid(self.project[self.gate](features[self.gate]))
        others = sum(self.project[m](features[m]) for m in self.modalities if m != self.gate)
        return self.out(gate * others)


class SharedHead(FusionHead):
    """One linear classifier applied to every modality's features (MLA); fused logits are their mean.

    All modalities must have the same feature size: set the model's ``feature_dim`` to project them.
    """

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int) -> None:
        super().__init__(feature_dims, num_classes)
        sizes = set(feature_dims.values())
        if len(sizes) != 1:
            raise ValueError(
                f"a shared head needs one feature size for all modalities, got {self.feature_dims}; "
                "set model.feature_dim to project every encoder to a common size"
            )
        self.linear = nn.Linear(sizes.pop(), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).mean(0)

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.linear(features[m]) for m in self.modalities}

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        return self.linear.weight, slice(None)


class CosineFusion(FusionHead):
    """MMCosine's head (Xu et al., ICASSP 2023): per modality, class weights ``W_m`` (``[C, d_m]``, no bias) and
    logits ``z_m = scale * cos(h_m, W_m[k])`` for every class ``k``, the features and each class's weight row
    L2-normalised; the fused logits are their sum ``sum_m z_m``.

    Each modality's logits are bounded by ``scale`` whatever its feature norm, so a modality cannot outweigh the
    others in the sum by growing its features. A dropped modality's zeroed features give 0 logits (its cosine is
    taken as 0). ``scale`` is a plain attribute: ``method=mmcosine`` sets it from ``method.scale``.

    Args:
        scale: the factor ``s`` on every cosine (official 10).
    """

    def __init__(self, feature_dims: Mapping[str, int], num_classes: int, scale: float = 10.0) -> None:
        super().__init__(feature_dims, num_classes)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"model.fusion.scale must be a number > 0, got {scale!r}")
        self.scale = float(scale)
        # The official code reads each modality's weights off one nn.Linear over the concatenated features, so they
        # start as that layer does: U(-1/sqrt(D), 1/sqrt(D)) with D the summed feature size. Only their direction
        # enters the logits, but their norm sets the effective step size of plain SGD.
        bound = sum(feature_dims.values()) ** -0.5
        self.weights = nn.ParameterDict({m: nn.Parameter(torch.empty(num_classes, d).uniform_(-bound, bound))
                                         for m, d in feature_dims.items()})

    @staticmethod
    def unit_rows(x: torch.Tensor) -> torch.Tensor:
        """``x`` with every row (last dimension) scaled to unit L2 norm; an all-zero row stays zero."""
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        # Dividing an all-zero row by 1 gives 0 logits and a bounded gradient; F.normalize's eps would give a
        # 1 / eps gradient there, which overflows in half precision (and 0 * inf is NaN).
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))

    def cosines(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's ``[B, C]`` cosines between its features and its class weights (unscaled)."""
        return {m: self.unit_rows(features[m]) @ self.unit_rows(self.weights[m]).T for m in self.modalities}

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(features).values())).sum(0)

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.scale * c for m, c in self.cosines(features).items()}

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        return [self.weights[modality]]

    def output_weight(self, modality: str) -> tuple[nn.Parameter, slice] | None:
        return self.weights[modality], slice(None)

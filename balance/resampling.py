"""Training plans built from modality Shapley values (Wei et al., CVPR 2024): which samples to train on again,
keeping only one modality.

A plan is ``(indices, keep)``: every sample of the split once with all modalities, followed by extra copies, each
a sample index and a ``BoolTensor[M]`` that keeps one modality. The plan builders are pure functions; the plan in
use lives in one :class:`TrainingPlan` object that the method fills and checkpoints and the datamodule serves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# Official thresholds on a modality's contribution (official benefit): at least 1 -> no copy; (0.4, 1) -> 1;
# (-0.1, 0.4] -> 2; at most -0.1 -> 3. With the official benefit a modality that does all it can is worth 1.
OFFICIAL_THRESHOLDS = (-0.1, 0.4, 1.0)
VARIANTS = ("linear", "tanh", "power")


class TrainingPlan:
    """The training plan in use: item ``i`` of the next training epochs is sample ``indices[i]`` keeping only the
    modalities ``keep[i]`` (inputs of the others zeroed too when ``zero_inputs``); inactive until first set.

    One object shared by the method that builds it (and saves it in its checkpoints) and the datamodule that
    serves it, so there is nothing to re-synchronise after a plan is built or a checkpoint restored.
    """

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.keep: torch.Tensor | None = None
        self.zero_inputs = False

    @property
    def active(self) -> bool:
        """Whether a plan is set (otherwise the training split is served as it is)."""
        return self.indices is not None

    def __len__(self) -> int:
        return 0 if self.indices is None else len(self.indices)

    def set(self, indices: torch.Tensor, keep: torch.Tensor, zero_inputs: bool = False) -> None:
        """Makes ``(indices [N'], keep [N', M])`` the plan from the next training loader on."""
        if len(indices) != len(keep):
            raise ValueError(f"a plan needs one keep row per index, got {len(indices)} and {len(keep)}")
        self.indices, self.keep, self.zero_inputs = indices.long(), keep.bool(), bool(zero_inputs)

    def clear(self) -> None:
        """Back to the training split itself."""
        self.indices = self.keep = None
        self.zero_inputs = False

    def state_dict(self) -> dict[str, Any]:
        """Tensors and a bool only, so checkpoints load with ``torch.load(weights_only=True)``."""
        return {"indices": self.indices, "keep": self.keep, "zero_inputs": self.zero_inputs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("indices") is None:
            self.clear()
        else:
            self.set(state["indices"], state["keep"], state.get("zero_inputs", False))


def sample_level_copies(phi: torch.Tensor, thresholds: Sequence[float] = OFFICIAL_THRESHOLDS,
                        scale: float = 1.0) -> torch.Tensor:
    """Copies per sample and modality ``[N, M]`` (0-3): the lower a modality's contribution, the more copies.

    Args:
        phi: Shapley values ``[N, M]``.
        thresholds: ascending ``(t1, t2, t3)``: ``phi <= t1`` -> 3, ``t1 < phi <= t2`` -> 2, ``t2 < phi < t3``
            -> 1, ``phi >= t3`` -> 0 (the official values are -0.1, 0.4, 1).
        scale: the contribution of a modality that does all it can; thresholds are multiplied by it (1 for the
            official benefit ``|S| * correct``; ``1 / M`` for the ``correct`` and ``true_prob`` benefits, whose
            values sum to at most 1).
    """
    t1, t2, t3 = (scale * t for t in thresholds)
    if not t1 < t2 < t3:
        raise ValueError(f"thresholds must be ascending, got {tuple(thresholds)}")
    copies = torch.zeros_like(phi, dtype=torch.long)
    copies[phi < t3] = 1
    copies[phi <= t2] = 2
    copies[phi <= t1] = 3
    return copies


def plan_from_copies(copies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample once with all modalities, then ``copies[i, m]`` copies of sample i keeping only m.

    Returns:
        ``(indices [N + copies.sum()], keep [N + copies.sum(), M])``.
    """
    num_samples, num_modalities = copies.shape
    counts = copies.flatten().long()
    extra_index = torch.arange(num_samples).repeat_interleave(num_modalities).repeat_interleave(counts)
    extra_modality = torch.arange(num_modalities).repeat(num_samples).repeat_interleave(counts)
    indices = torch.cat([torch.arange(num_samples), extra_index])
    keep = torch.cat([torch.ones(num_samples, num_modalities, dtype=torch.bool),
                      torch.eye(num_modalities, dtype=torch.bool)[extra_modality]])
    return indices, keep


def estimate_mean_contribution(phi: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Mean contribution of each modality ``[M]`` on ``int(N * ratio)`` samples drawn with replacement (the
    official estimate on a random part of the training split)."""
    num = max(int(len(phi) * ratio), 1)
    choice = torch.randint(len(phi), (num,), generator=generator)
    return phi[choice].mean(dim=0)


def modality_level_extra(mean_phi: torch.Tensor, num_samples: int, alpha: float = 1.0, variant: str = "linear",
                         scale: float = 1.0) -> torch.Tensor:
    """Extra samples per modality ``[M]`` for the modality-level plan.

    ``gap_m = scale - mean_phi_m`` (how far modality m is from doing all it can); with ``d = |gap_m - gap_s| * 2/3``
    against the strongest modality s (smallest gap), modality m gets ``int(f(d) * N)`` copies keeping only it,
    ``f`` = ``alpha * d`` (linear), ``tanh(alpha * d)`` or ``alpha * d ** 1.5`` (power), as the official code's
    ``linear``/``tanh``/``square`` functions. For M = 2 this is the official rule: the weaker modality gets
    ``int(|gap_a - gap_v| * 2/3 * alpha * N)`` copies and the stronger none. For M > 2 every modality is compared
    with the strongest one (our generalisation).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    # float64 and the official order of operations, so int() truncates exactly as the official code does.
    gap = scale - mean_phi.double()
    difference = (gap - gap.min()).abs() / scale / 3 * 2
    if variant == "linear":
        fraction = alpha * difference
    elif variant == "tanh":
        fraction = torch.tanh(alpha * difference)
    else:
        fraction = alpha * difference**1.5
    return (fraction * num_samples).long()


def plan_from_extra(extra: torch.Tensor, num_samples: int, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample once, then ``extra[m]`` samples drawn uniformly with replacement keeping only modality m."""
    num_modalities = len(extra)
    copies_index = [torch.randint(num_samples, (int(n),), generator=generator) for n in extra]
    copies_modality = [torch.full((int(n),), m) for m, n in enumerate(extra)]
    indices = torch.cat([torch.arange(num_samples), *copies_index])
    keep = torch.cat([torch.ones(num_samples, num_modalities, dtype=torch.bool),
                      torch.eye(num_modalities, dtype=torch.bool)[torch.cat(copies_modality).long()]])
    return indices, keep


def plan_summary(keep: torch.Tensor, modalities: Sequence[str], num_samples: int) -> dict[str, float]:
    """Counts for logging: extra copies keeping each modality, and the plan's size relative to the split."""
    extra = keep[num_samples:]
    summary = {f"copies_{m}": float(extra[:, i].sum()) for i, m in enumerate(modalities)}
    summary["plan_ratio"] = float(len(keep)) / max(num_samples, 1)
    return summary


__all__ = [
    "OFFICIAL_THRESHOLDS",
    "TrainingPlan",
    "estimate_mean_contribution",
    "modality_level_extra",
    "plan_from_copies",
    "plan_from_extra",
    "plan_summary",
    "sample_level_copies",
]

"""MM-SHAP's modality shares: modality ``m``'s share of a sample is

    share_m = sum_{features f of m} |phi_f| / sum_{all features f} |phi_f|,

so shares are in [0, 1] and sum to 1 over modalities (the paper's T-SHAP and V-SHAP for text and image).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def modality_shares(phi: Mapping[str, torch.Tensor], count: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Each modality's share of the absolute Shapley values, ``Tensor[B, M]`` (modality order of ``phi``); NaN for
    a sample whose values are all zero (a prediction no feature changes).

    Args:
        phi: modality -> ``Tensor[B, width_m]`` of Shapley values (``mm_shap_values``).
        count: modality -> ``LongTensor[B]``, each sample's feature count (columns past it are left out).
    """
    sums = []
    for m, values in phi.items():
        valid = torch.arange(values.shape[1], device=values.device) < count[m].unsqueeze(1)
        sums.append((values.abs() * valid).sum(dim=1))
    absolute = torch.stack(sums, dim=1).double()
    total = absolute.sum(dim=1, keepdim=True)
    return torch.where(total > 0, absolute / total, torch.full_like(absolute, float("nan")))

"""Dropping modalities: how a missing or dropped modality looks, on encoder features or on inputs.

Every place that drops a modality (the fusion head's ``keep``, training plans, missing-modality masks,
valuation's coalitions, the diagnostics) goes through these, so "dropped" means one thing everywhere: features
multiplied by zero, inputs replaced by zeros (token ids by the padding id 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def zero_input(x: Any) -> Any:
    """An all-zero input of the same shape (recursively for dict inputs): how a dropped modality's input looks;
    for token ids it is all padding (id 0)."""
    if isinstance(x, Mapping):
        return {k: zero_input(v) for k, v in x.items()}
    return torch.zeros_like(torch.as_tensor(x))


def _column(keep: torch.Tensor, i: int, like: torch.Tensor) -> torch.Tensor:
    """``keep[:, i]`` shaped to broadcast over a ``[B, ...]`` tensor like ``like``."""
    return keep[..., i].to(like.device).view(-1, *([1] * (like.dim() - 1)))


def drop_features(
    features: Mapping[str, torch.Tensor], modalities: Sequence[str], keep: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Zeroes the features of modality ``modalities[i]`` in the rows where ``keep[:, i]`` is False.

    Args:
        features: modality -> ``[B, ...]`` features.
        modalities: the order of ``keep``'s columns.
        keep: ``BoolTensor[B, M]`` (``None`` keeps everything).
    """
    if keep is None:
        return dict(features)
    if keep.shape[-1] != len(modalities):
        raise ValueError(f"keep has {keep.shape[-1]} columns for {len(modalities)} modalities")
    return {m: features[m] * _column(keep, i, features[m]).to(features[m].dtype) for i, m in enumerate(modalities)}


def _zero_rows(x: Any, column: torch.Tensor) -> Any:
    if isinstance(x, Mapping):
        return {k: _zero_rows(v, column) for k, v in x.items()}
    return torch.where(column.to(x.device).view(-1, *([1] * (x.dim() - 1))), x, zero_input(x))


def drop_inputs(inputs: Mapping[str, Any], modalities: Sequence[str], keep: torch.Tensor | None) -> dict[str, Any]:
    """Replaces the inputs of dropped modalities by zeros (see :func:`zero_input`).

    Args:
        inputs: modality -> input (tensor or dict of tensors) of one sample or of a batch.
        modalities: the order of ``keep``'s columns.
        keep: ``BoolTensor[M]`` for one sample (a dropped modality's whole input is zeroed) or ``[B, M]`` for a
            batch (the rows where the modality is dropped are zeroed); ``None`` keeps everything.
    """
    if keep is None:
        return dict(inputs)
    if keep.shape[-1] != len(modalities):
        raise ValueError(f"keep has {keep.shape[-1]} columns for {len(modalities)} modalities")
    if keep.dim() == 1:
        return {m: inputs[m] if keep[i] else zero_input(inputs[m]) for i, m in enumerate(modalities)}
    return {m: _zero_rows(inputs[m], keep[:, i]) for i, m in enumerate(modalities)}

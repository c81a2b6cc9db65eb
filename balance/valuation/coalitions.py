"""The coalition values of a model: its prediction on every non-empty subset of a batch's modalities.

Dropping a modality (``drop=``) zeroes its encoder features (``"features"``, the official code and the fast
path: encode once, evaluate only the fusion head on the 2^M - 1 non-empty subsets) or its inputs (``"inputs"``,
the papers' wording: the whole model runs per subset, or, with a :class:`ZeroInputCache`, every encoder runs
once on the real inputs and once on an all-zero input). Either way the result is the ``[B, 2^M]`` value table
of :mod:`balance.valuation.shapley`, column 0 (the empty set) being 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from balance.dropping import drop_inputs
from balance.valuation.shapley import _subset_masks, _value_table

DROPS = ("features", "inputs")


def _repeat_rows(x: torch.Tensor, times: int) -> torch.Tensor:
    """``[B, ...]`` -> ``[times * B, ...]``, block k being a copy of x (subset-major, like the keep masks)."""
    return x.repeat(times, *([1] * (x.dim() - 1)))


def _nonempty_keep(num_modalities: int, batch_size: int, present: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """``[(2^M - 1) * B, M]`` keep masks of the non-empty subsets, subset-major, combined with ``present``."""
    keep = _subset_masks(num_modalities)[1:].to(device).repeat_interleave(batch_size, dim=0)
    if present is not None:
        # A missing modality has no features to keep, in any coalition.
        keep = keep & _repeat_rows(present.to(device=device, dtype=torch.bool), 2**num_modalities - 1)
    return keep


def _logits_dropping_features(model: nn.Module, features: Mapping[str, torch.Tensor],
                              present: torch.Tensor | None) -> torch.Tensor:
    """``[2^M - 1, B, C]`` logits of the non-empty subsets, one fusion-head call on the repeated features."""
    num_modalities = len(model.modalities)
    num_nonempty = 2**num_modalities - 1
    first = features[model.modalities[0]]
    batch_size = first.shape[0]
    repeated = {m: _repeat_rows(features[m], num_nonempty) for m in model.modalities}
    keep = _nonempty_keep(num_modalities, batch_size, present, first.device)
    return model.fuse(repeated, keep=keep).view(num_nonempty, batch_size, -1)


def subset_values(model: nn.Module, features: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  benefit: str = "official", present: torch.Tensor | None = None) -> torch.Tensor:
    """Coalition values with modalities dropped by zeroing their features (the fast path).

    The features are repeated once per non-empty subset along the batch axis and the fusion head runs once on
    all of them with the stacked keep masks, so no encoder runs here.

    Args:
        model: a :class:`~balance.models.MultimodalModel` (anything with ``modalities`` and ``fuse(features,
            keep)``); its fusion head must treat rows independently (true in eval mode).
        features: modality -> ``[B, d_m]`` encoder features (``model.encode``).
        labels: ``[B]`` class labels.
        benefit: see :func:`~balance.valuation.shapley.coalition_benefit`.
        present: optional ``BoolTensor[B, M]`` of available modalities; a missing one is dropped in every
            coalition and a coalition counts only its present modalities, so the missing one gets phi = 0.

    Returns:
        ``FloatTensor[B, 2^M]`` indexed by bitmask, column 0 (the empty set) being 0.
    """
    with torch.no_grad():
        logits = _logits_dropping_features(model, features, present)
    return _value_table(logits, labels, benefit, present)


def _first_row_zeros(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _first_row_zeros(v) for k, v in x.items()}
    return torch.zeros_like(x[:1])


def _leaves(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, Mapping):
        for key in sorted(x):
            yield from _leaves(x[key])
    else:
        yield x


def _input_signature(inputs: Mapping[str, Any], modalities: list[str]) -> tuple:
    return tuple(
        (m, tuple((tuple(leaf.shape[1:]), leaf.dtype, leaf.device) for leaf in _leaves(inputs[m])))
        for m in modalities
    )


@dataclass
class ZeroInputCache:
    """The encoder features of an all-zero input, per modality, computed on first use.

    In eval mode an encoder's output for an all-zero input is the same for every sample, so the inputs path
    (:func:`subset_values_from_inputs`) encodes one zero sample per modality instead of a zeroed batch per
    subset. Features are kept per input signature (per-sample shape, dtype and device of every input tensor),
    because a zero input of another size (e.g. a longer spectrogram) can give other features.

    Valid only while the model's weights do not change and its encoders are in eval mode without
    batch-dependent behaviour (no train-mode BatchNorm, no dropout, nothing that mixes samples); make a new one
    for every valuation pass.

    Attributes:
        features: input signature -> modality -> ``[1, d_m]`` zero-input features.
    """

    features: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict)

    def get(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Modality -> ``[1, d_m]`` features of an all-zero input shaped like ``inputs`` (encoded on first use)."""
        key = _input_signature(inputs, list(model.modalities))
        if key not in self.features:
            with torch.no_grad():
                self.features[key] = model.encode({m: _first_row_zeros(inputs[m]) for m in model.modalities})
        return self.features[key]


def _logits_dropping_inputs(model: nn.Module, inputs: Mapping[str, Any], cache: ZeroInputCache | None,
                            present: torch.Tensor | None) -> torch.Tensor:
    """``[2^M - 1, B, C]`` logits of the non-empty subsets with the dropped modalities' inputs zeroed."""
    modalities = list(model.modalities)
    num_modalities = len(modalities)
    num_nonempty = 2**num_modalities - 1
    masks = _subset_masks(num_modalities)
    if cache is None:
        logits = [model.fuse(model.encode(drop_inputs(inputs, modalities, masks[s])), keep=present)
                  for s in range(1, 2**num_modalities)]
        return torch.stack(logits)
    real = model.encode(inputs)
    zero = cache.get(model, inputs)
    first = real[modalities[0]]
    batch_size = first.shape[0]
    keep = masks[1:].to(first.device).repeat_interleave(batch_size, dim=0)
    stacked = {}
    for i, m in enumerate(modalities):
        # Real features where the subset keeps m, the cached zero-input features (broadcast) where it drops it.
        column = keep[:, i].view(-1, *([1] * (real[m].dim() - 1)))
        stacked[m] = torch.where(column, _repeat_rows(real[m], num_nonempty), zero[m].to(real[m]))
    rows_present = None if present is None else _repeat_rows(present.to(first.device), num_nonempty)
    return model.fuse(stacked, keep=rows_present).view(num_nonempty, batch_size, -1)


def subset_values_from_inputs(model: nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                              benefit: str = "official", cache: ZeroInputCache | None = None,
                              present: torch.Tensor | None = None) -> torch.Tensor:
    """Coalition values with modalities dropped by zeroing their inputs (``drop: inputs``).

    Without a cache the whole model runs once per non-empty subset, the dropped modalities' inputs (tensors or
    dicts of tensors) replaced by zeros (:func:`balance.dropping.drop_inputs`). With a :class:`ZeroInputCache`
    every encoder runs once on the real inputs, the zero-input features come from the cache, and the fusion
    head runs once on all subsets. Both give the same values for an eval-mode model without batch-dependent
    behaviour.

    Args:
        model: a :class:`~balance.models.MultimodalModel` (``modalities``, ``encode``, ``fuse``).
        inputs: modality -> input tensor or dict of tensors, first axis the batch.
        labels: ``[B]`` class labels.
        benefit: see :func:`~balance.valuation.shapley.coalition_benefit`.
        cache: zero-input features to reuse (filled on first use); ``None`` runs the full model per subset.
        present: optional ``BoolTensor[B, M]`` of available modalities; missing ones have their features zeroed
            in every coalition, as in evaluation, and get phi = 0 (see :func:`subset_values`).

    Returns:
        ``FloatTensor[B, 2^M]`` indexed by bitmask, column 0 (the empty set) being 0.
    """
    with torch.no_grad():
        logits = _logits_dropping_inputs(model, inputs, cache, present)
    return _value_table(logits, labels, benefit, present)

"""Exact per-sample modality Shapley values (Wei et al., CVPR 2024), for any number of modalities, batched.

A sample's modalities play a cooperative game: the value ``v(S)`` of a coalition ``S`` is the benefit of the
model's prediction when only the modalities in ``S`` are kept, and modality ``m``'s contribution is its exact
Shapley value

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)).

Coalitions are indexed by bitmask: bit ``i`` of ``s`` is set iff modality ``i`` (model order) is in subset ``s``,
so a value table ``[..., 2^M]`` has the empty set in column 0 and the full set in the last column.

Benefits (``benefit=``):
    - ``"official"``: ``|S| * 1[argmax f_S(x) == y]``, the official code's; a correct full model is worth ``M``.
    - ``"correct"``: ``1[argmax f_S(x) == y]`` (the BalanceBenchmark port).
    - ``"true_prob"``: ``softmax(f_S(x))[y]``, the probability of the label.

For every benefit ``v({}) = 0``, the official convention: the empty coalition is never evaluated (for
``true_prob`` the model's all-dropped prediction is therefore not used either), so by efficiency
``sum_m phi_m = v(all)``.

For two modalities ``a`` and ``v`` this is the closed form of the official code,
``phi_a = (v_a + v_all - v_v) / 2``; under the official benefit every value lies in {-0.5, 0, 0.5, 1, 1.5}.
The official benefit's ``|S|`` factor rewards joining a correct coalition: a pure-noise modality next to one
that is right alone still gets 0.5 when the pair is right (``(0 + 2 - 1) / 2``), where ``correct`` gives 0.

Where a batch marks modalities missing (``present``), a coalition counts only its present modalities,
``v(S) = v(S & present)``, so a missing modality gets phi = 0 under every benefit (no official counterpart).

Dropping a modality (``drop=``) zeroes its encoder features (``"features"``, the official code and the fast
path: encode once, evaluate only the fusion head on the 2^M - 1 non-empty subsets) or its inputs (``"inputs"``,
the papers' wording: the whole model runs per subset, or, with a :class:`ZeroInputCache`, every encoder runs
once on the real inputs and once on an all-zero input).

Everything here is a pure function of a model and tensors; nothing knows about Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from balance.models.multimodal import zero_input

BENEFITS = ("official", "correct", "true_prob")
DROPS = ("features", "inputs")


# ----------------------------------------------------------------------------------------------------------------
# Coalitions and Shapley values


@lru_cache(maxsize=None)
def _subset_masks(num_modalities: int) -> torch.Tensor:
    bits = torch.arange(num_modalities)
    return (torch.arange(2**num_modalities).unsqueeze(1) >> bits) & 1 == 1


def subset_masks(num_modalities: int) -> torch.Tensor:
    """Every subset of ``num_modalities`` modalities as a keep mask.

    Args:
        num_modalities: number of modalities M (at least 1).

    Returns:
        ``BoolTensor[2^M, M]`` whose row ``s`` has column ``i`` set iff bit ``i`` of ``s`` is set: row 0 is the
        empty set, the last row the full set.
    """
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    return _subset_masks(num_modalities).clone()


def _num_modalities(num_subsets: int) -> int:
    num_modalities = num_subsets.bit_length() - 1
    if num_modalities < 1 or 2**num_modalities != num_subsets:
        raise ValueError(f"a coalition value table needs 2^M columns (M >= 1), got {num_subsets}")
    return num_modalities


@lru_cache(maxsize=None)
def _shapley_weights_cpu(num_modalities: int) -> torch.Tensor:
    m_total = num_modalities
    weight = [math.factorial(k) * math.factorial(m_total - k - 1) / math.factorial(m_total) for k in range(m_total)]
    masks = _subset_masks(m_total)
    sizes = masks.sum(dim=1).tolist()
    table = torch.zeros(2**m_total, m_total, dtype=torch.float64)
    for s, size in enumerate(sizes):
        for m in range(m_total):
            # phi_m collects +w(|S|) v(S + m) and -w(|S|) v(S) over the S without m: seen from a subset T, it is
            # +w(|T| - 1) where T contains m and -w(|T|) where it does not.
            table[s, m] = weight[size - 1] if masks[s, m] else -weight[size]
    return table


@lru_cache(maxsize=None)
def shapley_weights(num_modalities: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The matrix ``W [2^M, M]`` with ``phi = v @ W`` for a coalition value table ``v [..., 2^M]`` (cached).

    Args:
        num_modalities: number of modalities M.
        dtype: dtype of the returned matrix.
        device: device of the returned matrix.

    Returns:
        ``W[s, m] = (|s|-1)! (M-|s|)! / M!`` where subset ``s`` contains ``m`` and ``-|s|! (M-|s|-1)! / M!``
        where it does not. Do not modify it in place: it is shared.
    """
    return _shapley_weights_cpu(num_modalities).to(dtype=dtype, device=device)


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values from a table of coalition values.

    Args:
        values: ``[..., 2^M]`` coalition values indexed by bitmask (see :func:`subset_masks`), any leading shape.

    Returns:
        ``[..., M]`` Shapley values, one matrix product with the cached weights. Efficiency holds:
        ``phi.sum(-1) == values[..., -1] - values[..., 0]``.
    """
    num_modalities = _num_modalities(values.shape[-1])
    if not values.is_floating_point():
        values = values.float()
    return values @ shapley_weights(num_modalities, values.dtype, values.device)


# ----------------------------------------------------------------------------------------------------------------
# Benefits


def coalition_benefit(logits: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
                      benefit: str = "official") -> torch.Tensor:
    """The benefit of each coalition's prediction.

    Args:
        logits: ``[K, B, C]`` logits of K coalitions on B samples.
        labels: ``[B]`` class labels.
        sizes: ``[K]`` (or per sample ``[K, B]``) number of modalities in each coalition.
        benefit: ``"official"`` (``|S| * correct``), ``"correct"`` (1/0) or ``"true_prob"`` (label probability).

    Returns:
        ``FloatTensor[K, B]``.
    """
    if benefit not in BENEFITS:
        raise ValueError(f"unknown benefit {benefit!r}; choose one of {BENEFITS}")
    if benefit == "true_prob":
        probs = logits.float().softmax(dim=-1)
        return probs.gather(-1, labels.expand(probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(dim=-1) == labels).float()
    if benefit == "correct":
        return correct
    sizes = sizes.to(correct)
    return correct * (sizes.unsqueeze(-1) if sizes.dim() == 1 else sizes)


def _value_table(logits: torch.Tensor, labels: torch.Tensor, benefit: str,
                 present: torch.Tensor | None = None) -> torch.Tensor:
    """``[2^M - 1, B, C]`` logits of the non-empty subsets -> ``[B, 2^M]`` values with ``v(empty) = 0``.

    With ``present`` a coalition counts only its available modalities, ``v(S) = v(S & present)``, so a missing
    modality is a null player (phi = 0) under every benefit: a coalition of missing modalities only is the
    empty set (value 0, although the model was run on it) and the official ``|S|`` counts present ones.
    """
    num_subsets = logits.shape[0] + 1
    masks = _subset_masks(_num_modalities(num_subsets))[1:].to(logits.device)
    if present is None:
        sizes = masks.sum(dim=1)
        benefits = coalition_benefit(logits, labels, sizes, benefit)
    else:
        sizes = (masks.unsqueeze(1) & present.to(device=logits.device, dtype=torch.bool)).sum(dim=-1)  # [K, B]
        benefits = coalition_benefit(logits, labels, sizes, benefit) * (sizes > 0)
    return torch.cat([benefits.new_zeros(1, benefits.shape[1]), benefits]).T


# ----------------------------------------------------------------------------------------------------------------
# Coalition values from a model


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
        benefit: see :func:`coalition_benefit`.
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
        logits = []
        for s in range(1, 2**num_modalities):
            dropped = {m: inputs[m] if masks[s, i] else zero_input(inputs[m]) for i, m in enumerate(modalities)}
            logits.append(model.fuse(model.encode(dropped), keep=present))
        return torch.stack(logits)
    real = model.encode(inputs)
    zero = cache.get(model, inputs)
    first = real[modalities[0]]
    batch_size = first.shape[0]
    keep = masks[1:].to(first.device).repeat_interleave(batch_size, dim=0)
    stacked = {}
    for i, m in enumerate(modalities):
        column = keep[:, i].view(-1, *([1] * (real[m].dim() - 1)))
        stacked[m] = torch.where(column, _repeat_rows(real[m], num_nonempty), zero[m].to(real[m]))
    rows_present = None if present is None else _repeat_rows(present.to(first.device), num_nonempty)
    return model.fuse(stacked, keep=rows_present).view(num_nonempty, batch_size, -1)


def subset_values_from_inputs(model: nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                              benefit: str = "official", cache: ZeroInputCache | None = None,
                              present: torch.Tensor | None = None) -> torch.Tensor:
    """Coalition values with modalities dropped by zeroing their inputs (``drop: inputs``).

    Without a cache the whole model runs once per non-empty subset, the dropped modalities' inputs (tensors or
    dicts of tensors) replaced by zeros. With a :class:`ZeroInputCache` every encoder runs once on the real
    inputs, the zero-input features come from the cache, and the fusion head runs once on all subsets. Both
    give the same values for an eval-mode model without batch-dependent behaviour.

    Args:
        model: a :class:`~balance.models.MultimodalModel` (``modalities``, ``encode``, ``fuse``).
        inputs: modality -> input tensor or dict of tensors, first axis the batch.
        labels: ``[B]`` class labels.
        benefit: see :func:`coalition_benefit`.
        cache: zero-input features to reuse (filled on first use); ``None`` runs the full model per subset.
        present: optional ``BoolTensor[B, M]`` of available modalities; missing ones have their features zeroed
            in every coalition, as in evaluation, and get phi = 0 (see :func:`subset_values`).

    Returns:
        ``FloatTensor[B, 2^M]`` indexed by bitmask, column 0 (the empty set) being 0.
    """
    with torch.no_grad():
        logits = _logits_dropping_inputs(model, inputs, cache, present)
    return _value_table(logits, labels, benefit, present)


# ----------------------------------------------------------------------------------------------------------------
# Batches and data loaders


def modality_shapley(model: nn.Module, batch: Mapping[str, Any], benefit: str = "official",
                     drop: str = "features", cache: ZeroInputCache | None = None,
                     features: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-sample modality Shapley values of one batch.

    Putting the model in eval mode is the caller's job (:func:`value_dataloader` does it): in train mode
    BatchNorm and dropout would make every coalition's prediction depend on the batch and on chance.

    Args:
        model: a :class:`~balance.models.MultimodalModel`.
        batch: ``{"inputs": {modality: tensor or dict}, "label": [B], "index": [B]}`` and optionally
            ``"present": [B, M]`` (a missing modality is dropped in every coalition and gets phi = 0).
        benefit: ``"official"``, ``"correct"`` or ``"true_prob"`` (see :func:`coalition_benefit`).
        drop: ``"features"`` (zero encoder features; encode once) or ``"inputs"`` (zero inputs).
        cache: for ``drop="inputs"``, a :class:`ZeroInputCache` so that zero inputs are encoded once (``None``
            runs the whole model once per subset).
        features: with ``drop="features"``, the batch's encoded features if the caller has them already (in eval
            mode, e.g. from a validation step): the encoders are then not run again.

    Returns:
        ``{"index": [B], "label": [B], "correct": BoolTensor[B]`` (the full model's prediction is right),
        ``"phi": FloatTensor[B, M]`` (model modality order), ``"values": FloatTensor[B, 2^M]}`` (the coalition
        values behind phi).
    """
    if drop not in DROPS:
        raise ValueError(f"unknown drop {drop!r}; choose one of {DROPS}")
    labels = batch["label"]
    present = batch.get("present")
    with torch.no_grad():
        if drop == "features":
            if features is None:
                features = model.encode(batch["inputs"])
            logits = _logits_dropping_features(model, features, present)
        else:
            logits = _logits_dropping_inputs(model, batch["inputs"], cache, present)
    values = _value_table(logits, labels, benefit, present)
    return {
        "index": batch.get("index"),
        "label": labels,
        "correct": logits[-1].argmax(dim=-1) == labels,
        "phi": shapley_values(values),
        "values": values,
    }


@dataclass
class ValuationTable:
    """Per-sample modality Shapley values of a split, sorted by sample index.

    Attributes:
        index: ``LongTensor[N]`` sample positions in their split, ascending.
        label: ``LongTensor[N]`` labels.
        correct: ``BoolTensor[N]`` whether the full model was right.
        phi: ``FloatTensor[N, M]`` Shapley values, columns in ``modalities`` order.
        modalities: modality names.
    """

    index: torch.Tensor
    label: torch.Tensor
    correct: torch.Tensor
    phi: torch.Tensor
    modalities: list[str]

    @classmethod
    def sorted_by_index(cls, index: torch.Tensor, label: torch.Tensor, correct: torch.Tensor, phi: torch.Tensor,
                        modalities: Sequence[str]) -> ValuationTable:
        """The table of rows given in any order (e.g. batch by batch), sorted by sample index."""
        order = torch.argsort(index, stable=True)
        return cls(index[order].long(), label[order], correct[order], phi[order], list(modalities))

    def __len__(self) -> int:
        return len(self.index)

    def mean(self) -> dict[str, float]:
        """Modality -> mean Shapley value over the samples (NaN for an empty table)."""
        means = self.phi.double().mean(dim=0) if len(self) else torch.full((len(self.modalities),), float("nan"))
        return {m: float(v) for m, v in zip(self.modalities, means)}

    def to_rows(self) -> list[dict[str, Any]]:
        """One dict per sample with keys ``index, label, correct, phi_<modality>`` (e.g. for ``csv.DictWriter``)."""
        phi = self.phi.tolist()
        return [
            {"index": i, "label": y, "correct": c, **{f"phi_{m}": p for m, p in zip(self.modalities, row)}}
            for i, y, c, row in zip(self.index.tolist(), self.label.tolist(), self.correct.tolist(), phi)
        ]


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    return x


class TableBuilder:
    """Collects :func:`modality_shapley` results batch by batch into a :class:`ValuationTable`."""

    def __init__(self, modalities: Sequence[str]) -> None:
        self.modalities = list(modalities)
        self.parts: dict[str, list[torch.Tensor]] = {"index": [], "label": [], "correct": [], "phi": []}

    def add(self, result: Mapping[str, torch.Tensor]) -> None:
        """Adds one batch's result (moved to the CPU)."""
        if result["index"] is None:
            raise KeyError("valuation needs each batch's 'index' (the sample's position in its split)")
        for key, part in self.parts.items():
            part.append(result[key].detach().cpu())

    def table(self) -> ValuationTable:
        """The samples added so far, sorted by index."""
        parts = self.parts
        if not parts["index"]:
            return ValuationTable(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                                  torch.empty(0, dtype=torch.bool), torch.empty(0, len(self.modalities)),
                                  self.modalities)
        return ValuationTable.sorted_by_index(*(torch.cat(parts[key]) for key in ("index", "label", "correct", "phi")),
                                              self.modalities)


def value_dataloader(model: nn.Module, dataloader: Iterable[Mapping[str, Any]], benefit: str = "official",
                     drop: str = "features", device: torch.device | str | None = None, progress: bool = False,
                     cache_zero_inputs: bool = True) -> ValuationTable:
    """Per-sample modality Shapley values over a data loader, without gradients.

    The model is put in eval mode for the pass and every submodule gets its previous mode back afterwards.

    Args:
        model: a :class:`~balance.models.MultimodalModel`.
        dataloader: batches with ``inputs``, ``label`` and ``index`` (and optionally ``present``).
        benefit: ``"official"``, ``"correct"`` or ``"true_prob"`` (see :func:`coalition_benefit`).
        drop: ``"features"`` or ``"inputs"`` (see :func:`modality_shapley`).
        device: where to run (default: the device of the model's first parameter).
        progress: show a tqdm progress bar.
        cache_zero_inputs: with ``drop="inputs"``, encode all-zero inputs once per pass (a fresh
            :class:`ZeroInputCache`) instead of running the model once per subset; same values in eval mode.

    Returns:
        A :class:`ValuationTable` sorted by ``index`` (tensors on the CPU).
    """
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    device = torch.device(device)
    cache = ZeroInputCache() if drop == "inputs" and cache_zero_inputs else None
    modes = {module: module.training for module in model.modules()}
    model.eval()
    builder = TableBuilder(model.modalities)
    try:
        for batch in tqdm(dataloader, desc="valuation", disable=not progress, leave=False):
            builder.add(modality_shapley(model, _to_device(batch, device), benefit=benefit, drop=drop, cache=cache))
    finally:
        for module, training in modes.items():
            module.train(training)
    return builder.table()

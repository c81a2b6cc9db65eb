"""The valuation of a batch and of a whole split: per-sample modality Shapley values collected into a table.

:func:`modality_shapley` values one batch (coalition values from :mod:`balance.valuation.coalitions`, Shapley
values from :mod:`balance.valuation.shapley`); :class:`TableBuilder` gathers batch results into a
:class:`ValuationTable` sorted by sample index; :func:`value_dataloader` is the whole pass over a data loader, in
eval mode without gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from balance.scopes import evaluation_mode, module_device, to_device
from balance.valuation.coalitions import DROPS, ZeroInputCache, _logits_dropping_features, _logits_dropping_inputs
from balance.valuation.shapley import _value_table, shapley_values


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
        benefit: ``"official"``, ``"correct"`` or ``"true_prob"`` (see
            :func:`~balance.valuation.shapley.coalition_benefit`).
        drop: ``"features"`` (zero encoder features; encode once) or ``"inputs"`` (zero inputs).
        cache: for ``drop="inputs"``, a :class:`~balance.valuation.coalitions.ZeroInputCache` so that zero inputs
            are encoded once (``None`` runs the whole model once per subset).
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

    The model is put in eval mode for the pass and every submodule gets its previous mode back afterwards
    (:func:`balance.scopes.evaluation_mode`), so a frozen encoder stays in eval mode.

    Args:
        model: a :class:`~balance.models.MultimodalModel`.
        dataloader: batches with ``inputs``, ``label`` and ``index`` (and optionally ``present``).
        benefit: ``"official"``, ``"correct"`` or ``"true_prob"`` (see
            :func:`~balance.valuation.shapley.coalition_benefit`).
        drop: ``"features"`` or ``"inputs"`` (see :func:`modality_shapley`).
        device: where to run (default: the device of the model's first parameter, the CPU without parameters).
        progress: show a tqdm progress bar.
        cache_zero_inputs: with ``drop="inputs"``, encode all-zero inputs once per pass (a fresh
            :class:`~balance.valuation.coalitions.ZeroInputCache`) instead of running the model once per subset;
            same values in eval mode.

    Returns:
        A :class:`ValuationTable` sorted by ``index`` (tensors on the CPU).
    """
    device = module_device(model) if device is None else torch.device(device)
    # One cache per pass: the zero-input features are only valid for the weights of this pass.
    cache = ZeroInputCache() if drop == "inputs" and cache_zero_inputs else None
    builder = TableBuilder(model.modalities)
    with evaluation_mode(model):
        for batch in tqdm(dataloader, desc="valuation", disable=not progress, leave=False):
            builder.add(modality_shapley(model, to_device(batch, device), benefit=benefit, drop=drop, cache=cache))
    return builder.table()

"""CML: Calibrating Multimodal Learning (Ma, Zhang, Zhang, Wu, Fu, Zhou, Hu, ICML 2023).

The principle: a prediction's confidence, the largest softmax probability ``conf(z) = max_k softmax(z)_k``, should
not rise when a modality is taken away, since the input then carries less information. Each training step removes
every sample's modalities one at a time in a random order, which gives a chain of nested inputs
``S_0 = all present modalities > S_1 > ... > S_{p-1}`` (one modality left; ``p`` the sample's present modalities).
Each input is classified by the model's fusion head with the removed modalities' features zeroed (on the concat
head that is ``W_S f_S + b``: a removed modality's ``W_m f_m + b/M`` replaced by its bias share ``b/M``). The loss
is the mean cross-entropy over the chain plus a hinge on every confidence increase between consecutive inputs:

``L = mean_i (1/p_i) sum_k CE(z_i^{S_k}, y_i) + lambda sum_i sum_k max(0, conf(z_i^{S_{k+1}}) - conf(z_i^{S_k}))``

with ``lambda = 0.1``; the penalty is summed over the batch, as in the authors' code and the BalanceBenchmark port.
Validation and test predict from every present modality, as joint training does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.step import Step

#: how the random removal order is drawn: per sample and step (the authors' code) or once per epoch (the port)
ORDERS = ("sample", "epoch")
#: where the hinge applies: to each sample's increase (the paper) or to the batch's summed increase (the port)
HINGES = ("sample", "batch")


def confidence(logits: torch.Tensor) -> torch.Tensor:
    """``[B]``: the largest softmax probability of each row of ``[B, C]`` logits (the predicted class's)."""
    return F.softmax(logits.float(), dim=1).amax(dim=1)


def removal_chain(keys: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """The nested inputs of each sample, as keep masks: modalities are removed in the ascending order of ``keys``.

    Args:
        keys: ``[B, M]`` random keys (distinct within a row); the present modality with the smallest key goes first.
        present: ``BoolTensor[B, M]``, the modalities each sample has (``None``: all). Absent ones are never kept.

    Returns:
        ``BoolTensor[M, B, M]``: ``chain[k]`` keeps what is left after ``k`` removals; a sample with ``p`` present
        modalities has its input ``S_k`` in ``chain[k]`` for ``k < p`` (all-False rows after that).
    """
    if present is None:
        present = torch.ones_like(keys, dtype=torch.bool)
    # Absent modalities sort first, so that a present modality's rank minus the absent count is its removal step.
    ranks = torch.where(present, keys, torch.full_like(keys, -1.0)).argsort(dim=1).argsort(dim=1)
    removed_before = ranks - (~present).sum(dim=1, keepdim=True)
    steps = torch.arange(keys.shape[1], device=keys.device).view(-1, 1, 1)
    return present.unsqueeze(0) & (removed_before.unsqueeze(0) >= steps)


def confidence_increase_penalty(confidences: torch.Tensor, valid: torch.Tensor, hinge: str = "sample",
                                exempt: torch.Tensor | None = None) -> torch.Tensor:
    """The calibration penalty of a chain: every confidence increase from an input to the next (smaller) one.

    Args:
        confidences: ``[K, B]`` confidence of each sample's ``K`` nested inputs (``K - 1`` consecutive pairs).
        valid: ``BoolTensor[K - 1, B]``: the pairs that exist (both inputs have a modality).
        hinge: ``sample``: ``sum_k sum_i max(0, c[k+1, i] - c[k, i])`` (the paper); ``batch``:
            ``sum_k max(0, sum_i (c[k+1, i] - c[k, i]))`` (the BalanceBenchmark port's ``conf_loss``).
        exempt: ``BoolTensor[K - 1, B]``: pairs left out of the penalty (``None``: none).

    Returns:
        The penalty (a scalar with the graph of ``confidences``).
    """
    increase = confidences[1:] - confidences[:-1]
    counted = valid if exempt is None else valid & ~exempt
    increase = increase * counted.to(increase)
    if hinge == "sample":
        return F.relu(increase).sum()
    return F.relu(increase.sum(dim=1)).sum()


class CML(MultimodalMethod):
    """Calibrating Multimodal Learning: cross-entropy over a chain of nested inputs (modalities removed one at a
    time in a random order) plus a hinge on confidence increases along the chain (see the module docstring).

    Works with any fusion head (a removed modality's features are zeroed) and any number of modalities M >= 2
    (the port hard-codes two or three); a missing modality (``present``) is left out of the sample's chain.

    Args:
        penalty_weight: ``lambda``, the weight of the confidence-increase penalty (paper and port 0.1).
        order: how the removal order is drawn: ``sample`` (a new random order for every sample at every step, the
            authors' code) or ``epoch`` (one random order for every sample of an epoch, the port).
        hinge: ``sample`` (the paper's per-sample ``max(0, CI)``) or ``batch`` (the port: the hinge on the batch's
            summed increase of each pair, under which increases and decreases of different samples cancel).
        exempt_corrected: leave out of the penalty the pairs in which the removal turns a wrong prediction right
            (the authors' code's "trick 1"; the port computes it and leaves it unused). Default false (the paper).
        modulation_starts: first epoch (0-based) with the chain and its penalty; before it, CE on the fused logits.
        modulation_ends: last such epoch (inclusive), ``None`` for no end (the paper; the port 80).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "method=cml removes modalities one at a time"

    def __init__(self, penalty_weight: float = 0.1, order: str = "sample", hinge: str = "sample",
                 exempt_corrected: bool = False, modulation_starts: int = 0, modulation_ends: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.non_negative("penalty_weight", penalty_weight)
        options.one_of("order", order, ORDERS)
        options.one_of("hinge", hinge, HINGES)
        if not isinstance(exempt_corrected, bool):
            raise ValueError(f"method.exempt_corrected must be true or false, got {exempt_corrected!r}")
        options.integer("modulation_starts", modulation_starts, 0)
        if modulation_ends is not None:
            options.integer("modulation_ends", modulation_ends, modulation_starts)
        self.penalty_weight = float(penalty_weight)
        self.order = order
        self.hinge = hinge
        self.exempt_corrected = exempt_corrected
        self.window = EpochWindow(modulation_starts, modulation_ends)
        self._epoch_keys: torch.Tensor | None = None
        for name in ("violation_rate", "confidence_increase"):
            self.declare_metric(name, stages=("train", "val", "test"))
        # Per removed modality only in evaluation, where every sample loses each of its modalities in turn: a
        # training chain need not remove a given modality all epoch (order=epoch), which would log 0 / 0.
        for m in self.modalities:
            self.declare_metric(f"violation_rate_{m}", stages=("val", "test"))

    def on_train_epoch_start(self) -> None:
        if self.order == "epoch":
            self._epoch_keys = torch.rand(len(self.modalities), generator=self.generator)

    def _removal_keys(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """``[B, M]`` random keys of the step's removal order (from the method's generator)."""
        if self.order == "sample":
            return torch.rand(batch_size, len(self.modalities), generator=self.generator_on(device), device=device)
        if self._epoch_keys is None:  # a step outside the fit loop's epochs (e.g. called directly)
            self.on_train_epoch_start()
        return self._epoch_keys.to(device).expand(batch_size, -1)

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        if self.current_epoch not in self.window:
            return {"fused": F.cross_entropy(step.logits, step.labels)}
        labels, present = step.labels, step.batch.get("present")
        chain = removal_chain(self._removal_keys(len(labels), labels.device), present)
        # Input 0 is every present modality: the step's own fused logits.
        logits = [step.logits, *(self.fuse(step.features, keep=chain[k]) for k in range(1, len(chain)))]
        exists = chain.any(dim=2)  # [M, B]: the sample still has a modality after k removals
        ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits])
        sizes = exists.sum(dim=0).clamp_min(1)
        terms = {"chain_ce": ((ce * exists.to(ce)).sum(dim=0) / sizes).mean()}
        confidences = torch.stack([confidence(z) for z in logits])
        exempt = None
        if self.exempt_corrected:
            right = torch.stack([z.argmax(dim=1) == labels for z in logits])
            exempt = right[1:] & ~right[:-1]
        pairs = exists[1:]
        if self.penalty_weight:
            terms["cml"] = self.penalty_weight * confidence_increase_penalty(confidences, pairs, self.hinge, exempt)
        self._record_increases("train", confidences.detach(), pairs)
        return terms

    def _record_increases(self, stage: str, confidences: torch.Tensor, pairs: torch.Tensor,
                          removed: torch.Tensor | None = None) -> None:
        """Records, over the pairs of consecutive inputs: the share whose confidence rose when the modality was
        removed (with ``removed``, also per removed modality) and the mean rise ``max(0, CI)``.

        Args:
            confidences: ``[K, B]`` detached confidences of the nested inputs.
            pairs: ``BoolTensor[K - 1, B]``: the pairs that exist.
            removed: ``BoolTensor[K - 1, B, M]``: the modality removed between input ``k`` and ``k + 1``.
        """
        increase = confidences[1:] - confidences[:-1]
        weight = pairs.to(increase)
        count = weight.sum()
        rose = (increase > 0).to(increase) * weight
        self.record("violation_rate", rose.sum() / count.clamp_min(1.0), stage, weight=count)
        self.record("confidence_increase", (F.relu(increase) * weight).sum() / count.clamp_min(1.0), stage,
                    weight=count)
        if removed is None:
            return
        for i, m in enumerate(self.modalities):
            by_m = removed[..., i].to(increase) * weight
            self.record(f"violation_rate_{m}", (rose * by_m).sum() / by_m.sum().clamp_min(1.0), stage,
                        weight=by_m.sum())

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        """The base evaluation, plus the violations of every single removal from the full input: for each sample and
        each of its modalities (when it has two or more), whether the confidence rose without that modality."""
        outputs = super().evaluation_step(batch, stage)
        features, present = outputs["features"], batch.get("present")
        with torch.no_grad():
            full = present if present is not None else torch.ones(
                len(batch["label"]), len(self.modalities), dtype=torch.bool, device=batch["label"].device)
            base = confidence(self.fused_logits(features, keep=full))
            alone = torch.eye(len(self.modalities), dtype=torch.bool, device=full.device)
            several = full.sum(dim=1) >= 2
            confidences, pairs, removed = [], [], []
            for i in range(len(self.modalities)):
                keep = full & ~alone[i]
                confidences.append(torch.stack([base, confidence(self.fused_logits(features, keep=keep))]))
                pairs.append(full[:, i] & several)
                removed.append(alone[i].expand_as(full))
            # One pair per (sample, removed modality), laid out as K = 2 chains side by side.
            self._record_increases(stage, torch.cat(confidences, dim=1), torch.cat(pairs).unsqueeze(0),
                                   torch.cat(removed).unsqueeze(0))
        return outputs

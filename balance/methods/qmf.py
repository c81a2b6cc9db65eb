"""QMF, quality-aware multimodal fusion (Zhang et al., ICML 2023), as the MLA official code runs it
(``--modulation QMF``).

Each modality has its own linear classifier; its confidence on a sample is the energy of its logits,
``conf_m = logsumexp(z_m) / T``. The fused logits weigh each modality's logits by its (detached) confidence,
``z = sum_m conf_m z_m``. Besides the cross-entropies of the fused and of every unimodal prediction, a ranking loss
keeps each modality's confidence in the order of the samples' histories: a sample whose accumulated loss (over all
its training passes so far) is higher should not be more confident than a sample with a lower one, by more than the
difference of their min-max normalised histories. Pairs are each sample of the batch with the next one (a roll by
one), as in the official code.

Official settings (the audio-visual branch of the MLA code): ``T = 10``, ``loss = CE(z) + sum_m CE(z_m) + 0.1 sum_m
rank_m``; its image-text (M3AE) branch drops ``CE(z)`` and weighs the ranking loss by 1 (``fused_loss_weight=0``,
``rank_weight=1``). Beyond the official code, which has two or three modalities and no missing ones: any number of
modalities; a missing modality adds nothing to the fused logits, to its history or to its ranking pairs. Under DDP
every rank updates the history with every rank's samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step
from balance.models.fusion import LateFusion, SumFusion


def energy_confidence(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[B]``: ``logsumexp(logits) / temperature``, the (negative free) energy of each sample's logits."""
    return torch.logsumexp(logits, dim=1) / temperature


MARGINS = ("official", "gap")


def history_ranking_loss(confidence: torch.Tensor, history: torch.Tensor, index: torch.Tensor,
                         mask: torch.Tensor | None = None, margin: str = "official") -> torch.Tensor:
    """The ranking loss between each sample of the batch and the next one (rolled by one).

    Args:
        confidence: ``[B]`` this modality's confidence (with its graph).
        history: ``[N]`` accumulated loss of every training sample (min-max normalised over all N here).
        index: ``[B]`` the batch's positions in the training split.
        mask: ``[B]`` samples that have the modality (None: all); a pair counts only where both have it.
        margin: ``official``: ``relu(t (c_i - c_j) - |h_i - h_j|)`` with ``t = sign(h_i - h_j)``, the official
            code's sign, under which the history difference is slack: the historically worse sample is penalised
            only when it is *more* confident than the other by more than the difference. ``gap``:
            ``relu(t (c_i - c_j) + |h_i - h_j|)`` (for ``t != 0``), the confidence-ranking form in which the worse
            sample must be *less* confident by at least the difference.

    Returns:
        The mean over the counted pairs (``t = 0`` gives 0).
    """
    low, high = history.min(), history.max()
    spread = high - low
    normalised = (history - low) / spread if spread > 0 else torch.zeros_like(history)
    first, second = normalised[index], normalised[index.roll(-1)]
    target = torch.sign(first - second).to(confidence)
    difference = (first - second).abs().to(confidence)
    # The official code adds the difference to the partner's confidence divided by t; `gap` subtracts it.
    sign = 1.0 if margin == "official" else -1.0
    shifted = confidence.roll(-1) + sign * difference / torch.where(target == 0, torch.ones_like(target), target)
    losses = F.relu(target * (confidence - shifted))
    if mask is None:
        return losses.mean()
    pairs = (mask & mask.roll(-1)).to(losses)
    return (losses * pairs).sum() / pairs.sum().clamp_min(1.0)


class QMF(MultimodalMethod):
    """Confidence-weighted late fusion with a history ranking loss (see the module docstring).

    Needs a fusion head with one classifier per modality (``model/fusion=sum``, which ``conf/method/qmf.yaml``
    selects, or ``late_fusion``): QMF's fused logits replace the head's own sum.

    Args:
        temperature: ``T`` of the energy confidence (official 10).
        rank_weight: weight of the summed ranking losses (official 0.1).
        fused_loss_weight: weight of the fused prediction's cross-entropy (official 1 in the audio-visual code).
        margin: how the history difference enters the ranking loss, ``official`` or ``gap`` (see
            :func:`history_ranking_loss`).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, temperature: float = 10.0, rank_weight: float = 0.1, fused_loss_weight: float = 1.0,
                 margin: str = "official", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.one_of("margin", margin, MARGINS)
        self.margin = margin
        options.positive("temperature", temperature)
        options.non_negative("rank_weight", rank_weight)
        options.non_negative("fused_loss_weight", fused_loss_weight)
        if not isinstance(self.model.fusion, (SumFusion, LateFusion)):
            raise ValueError(f"QMF weighs each modality's own classifier, but the fusion head is "
                             f"{type(self.model.fusion).__name__}: use model/fusion=sum (method=qmf selects it)")
        self.temperature = temperature
        self.rank_weight = rank_weight
        self.fused_loss_weight = fused_loss_weight
        # [N, M] accumulated per-sample loss of each modality; sized when the training split is known.
        self.register_buffer("loss_history", torch.zeros(0, len(self.modalities)))
        for m in self.modalities:
            self.declare_metric(f"confidence_{m}", stages=("train", "val"))

    def on_fit_start(self) -> None:
        size = len(self.trainer.datamodule.datasets["train"])
        if self.loss_history.shape[0] != size:
            self.loss_history = self.loss_history.new_zeros(size, len(self.modalities))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # The buffer is sized by the training split; take the checkpoint's size before its state is loaded.
        saved = checkpoint["state_dict"].get("loss_history")
        if saved is not None:
            self.loss_history = self.loss_history.new_zeros(saved.shape)

    def confidences(self, unimodal: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's energy confidence ``[B]`` (with the graph)."""
        return {m: energy_confidence(logits, self.temperature) for m, logits in unimodal.items()}

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        unimodal = self.model.unimodal_logits(features)
        confidence = self.confidences(unimodal)
        fused = 0
        for i, m in enumerate(self.modalities):
            weight = confidence[m].detach().unsqueeze(1)
            if keep is not None:
                weight = weight * keep[:, i].unsqueeze(1).to(weight)
            fused = fused + weight * unimodal[m]
        return fused

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        present = step.batch.get("present")
        confidence = self.confidences(step.unimodal_logits)
        self._add_to_history(step, present)
        ranking = sum(history_ranking_loss(confidence[m], self.loss_history[:, i], step.batch["index"],
                                           None if present is None else present[:, i], self.margin)
                      for i, m in enumerate(self.modalities))
        for i, m in enumerate(self.modalities):
            self.record_over_present(f"confidence_{m}", confidence[m].detach(),
                                     None if present is None else present[:, i])
        terms = {"unimodal": sum(self.unimodal_losses(step).values()), "rank": self.rank_weight * ranking}
        if self.fused_loss_weight:
            terms["fused"] = self.fused_loss_weight * F.cross_entropy(step.logits, step.labels)
        return terms

    def _add_to_history(self, step: Step, present: torch.Tensor | None) -> None:
        """Adds the batch's per-sample losses (where the modality is present) to every rank's history."""
        losses = torch.stack([F.cross_entropy(step.unimodal_logits[m].detach(), step.labels, reduction="none")
                              for m in self.modalities], dim=1)
        if present is not None:
            losses = losses * present.to(losses)
        index = step.batch["index"]
        if self.trainer.world_size > 1:  # ranks hold batches of equal size (the distributed sampler pads)
            index, losses = self.all_gather(index).flatten(0, 1), self.all_gather(losses).flatten(0, 1)
        self.loss_history.index_add_(0, index.to(self.loss_history.device), losses.to(self.loss_history))

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        outputs = super().evaluation_step(batch, stage)
        if stage == "val":
            present = batch.get("present")
            for i, (m, logits) in enumerate(self.model.unimodal_logits(outputs["features"]).items()):
                self.record_over_present(f"confidence_{m}", energy_confidence(logits, self.temperature),
                                         None if present is None else present[:, i], stage)
        return outputs

"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang, Hu, ICASSP 2023).

Each modality is classified by the cosine between its L2-normalised features ``h_m`` and its L2-normalised class
weights ``W_m`` (no bias), times a scale ``s``: ``z_m = s * cos(h_m, W_m)``; the prediction is ``sum_m z_m`` and
the loss its cross-entropy. The head is :class:`~balance.models.CosineFusion` (``model/fusion=cosine``, selected
by ``conf/method/mmcosine.yaml``); this method sets its scale, checks it is there, logs each modality's mean
true-class cosine and adds the official optional cross-modal supervised contrastive term:

``L = CE(sum_m z_m, y) + supcon_weight * mean_{m < n} NCE(h_m, h_n)``, where for one pair of modalities, with
``c_ij = cos(h_m,i, h_n,j) / T`` and ``p_ij = softmax_j(c_ij)`` over the batch,
``NCE = mean_i [ -sum_{j: y_j = y_i} log(p_ij + eps) / |{j: y_j = y_i}|
- sum_{j: y_j != y_i} log(1 - p_ij + eps) / |{j: y_j != y_i}| ]``.
For two modalities this is the official ``NCELoss(a, v)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from itertools import combinations
from typing import Any

import torch
from torch.nn import functional as F

from balance.dropping import drop_features
from balance import options
from balance.methods.joint import JointTraining
from balance.methods.step import Step
from balance.models.fusion import CosineFusion

log = logging.getLogger(__name__)

#: added inside the contrastive term's logarithms (official ``EPISILON``)
LOG_EPS = 1e-10
#: what the fused prediction is in validation and test
PREDICTIONS = ("cosine", "linear")


def cross_modal_nce(anchors: torch.Tensor, others: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """The official supervised cross-modal contrastive loss (``NCELoss``) of ``[B, d]`` features of two modalities.

    Each anchor ``i`` gets a softmax over the batch of ``cos(anchor_i, other_j) / temperature``; the samples of its
    class (itself included) are positives, pushed towards probability 1, the others negatives, pushed towards 0,
    each group averaged. An anchor with no negative in the batch has a 0 negative part (the official code divides
    by zero there). Mean over the anchors; 0 for an empty batch.
    """
    if len(labels) == 0:
        return anchors.sum() * 0.0
    cosine = CosineFusion.unit_rows(anchors) @ CosineFusion.unit_rows(others).T
    probabilities = F.softmax(cosine / temperature, dim=1)
    positive = (labels.unsqueeze(1) == labels.unsqueeze(0)).to(probabilities)
    negative = 1.0 - positive
    pulled = -(torch.log(probabilities + LOG_EPS) * positive).sum(1) / positive.sum(1)
    pushed = -(torch.log(1.0 - probabilities + LOG_EPS) * negative).sum(1) / negative.sum(1).clamp_min(1.0)
    return (pulled + pushed).mean()


class MMCosine(JointTraining):
    """MMCosine: cross-entropy on the sum of the modalities' scaled cosine logits (the cosine fusion head), plus
    an optional cross-modal supervised contrastive term.

    Args:
        scale: the factor ``s`` on every modality's cosines (official 10); it sets the head's
            ``model.fusion.scale``.
        supcon_weight: weight of the cross-modal contrastive term (official ``--lam``, default 0: off).
        supcon_temperature: its temperature (official 0.1, hard-coded).
        prediction: the fused prediction in validation and test: ``cosine`` (the paper and the official VoxCeleb
            script: ``sum_m z_m``, what training optimises) or ``linear`` (the official CREMA-D script's ``valid``:
            the un-normalised ``sum_m W_m h_m``). Training and each modality's own logits are the cosine ones
            either way.
        **kwargs: :class:`~balance.methods.joint.JointTraining`'s arguments (``unimodal_loss_weight``: official 0)
            and the base method's (model, optimizer, scheduler).
    """

    def __init__(self, scale: float = 10.0, supcon_weight: float = 0.0, supcon_temperature: float = 0.1,
                 prediction: str = "cosine", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.positive("scale", scale)
        options.non_negative("supcon_weight", supcon_weight)
        options.positive("supcon_temperature", supcon_temperature)
        options.one_of("prediction", prediction, PREDICTIONS)
        fusion = self.model.fusion
        if not isinstance(fusion, CosineFusion):
            raise ValueError(f"method=mmcosine classifies with the cosine fusion head (model/fusion=cosine); the "
                             f"model has {type(fusion).__name__}")
        if supcon_weight and len(self.modalities) < 2:
            raise ValueError(f"method.supcon_weight contrasts modalities with each other: it needs at least two, the "
                             f"model has {self.modalities}")
        if fusion.scale != scale:
            log.info("MMCosine sets model.fusion.scale=%s (method.scale)", scale)
        fusion.scale = float(scale)
        self.supcon_weight = float(supcon_weight)
        self.supcon_temperature = float(supcon_temperature)
        self.prediction = prediction
        for m in self.modalities:
            self.declare_metric(f"cos_{m}", stages=("train", "val", "test"))

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = dict(super().loss_terms(step))
        if self.supcon_weight:
            terms["supcon"] = self.supcon_weight * self.contrastive_loss(step.features, step.labels,
                                                                         step.batch.get("present"))
        return terms

    def contrastive_loss(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor,
                         present: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of :func:`cross_modal_nce` over the modality pairs ``m < n`` (modality order; for two
        modalities the official ``NCE(a, v)``), each over the samples that have both modalities."""
        losses = []
        for (i, m), (j, n) in combinations(enumerate(self.modalities), 2):
            both = slice(None) if present is None else present[:, i] & present[:, j]
            losses.append(cross_modal_nce(features[m][both], features[n][both], labels[both],
                                          self.supcon_temperature))
        return torch.stack(losses).mean()

    def observe_step(self, step: Step) -> None:
        self._record_cosines("train", step.unimodal_logits, step.labels, step.batch.get("present"))

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        out = super().evaluation_step(batch, stage)
        with torch.no_grad():
            self._record_cosines(stage, self.unimodal_logits(out["features"]), batch["label"], batch.get("present"))
        return out

    def _record_cosines(self, stage: str, unimodal_logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
                        present: torch.Tensor | None) -> None:
        """Records each modality's mean cosine with its true class's weight (its true-class logit over the scale),
        over the samples that have the modality."""
        scale = self.model.fusion.scale
        for i, (m, logits) in enumerate(unimodal_logits.items()):
            true = logits.detach().gather(1, labels.unsqueeze(1)).squeeze(1) / scale
            self.record_over_present(f"cos_{m}", true, None if present is None else present[:, i], stage)

    def fused_logits(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.prediction == "cosine":
            return super().fused_logits(features, keep)
        kept = drop_features(features, self.modalities, keep)
        weights = self.model.fusion.weights
        return torch.stack([kept[m] @ weights[m].T for m in self.modalities]).sum(0)

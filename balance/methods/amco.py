"""AMCo: adaptive mask co-optimization (Zhou, Liang, Zheng, Xuan, Kumada, ICASSP 2023), with the details of the
BalanceBenchmark port (``balancemm/trainer/AMCo_trainer.py``, ``BaseClassifierAMCoModel`` in
``balancemm/models/avclassify_model.py``); the paper's full text could not be consulted (see docs/methods/amco.md).

Each modality has its own logits ``z_m`` (the fusion head's per-modality part: the concat head's block plus
``b / M``, or the sum head's classifier). The fused prediction passes their sum through a ``C x C`` linear layer
of the method's own, ``out = A (sum_m z_m) + a``. A modality the model depends on, one holding more than ``sigma``
of the softmax mass over the concatenated logits of all modalities (``share_m``, averaged over the batch), has
its logits multiplied by a random 0/1 class mask in the next training step: ``floor(p_t C)`` classes are zeroed,
the same classes for every sample of the step, with ``p_t = sin(pi/2 * min(eps, l_t) / eps)``. The loss is
``CE(out) + sum_m CE(mask_m * z_m)`` (co-optimization: each modality keeps its own cross-entropy). Evaluation uses
the unmasked ``out``. The ``C x C`` layer starts at the identity here (``init=identity``, so that training starts
as joint training does); the port's random start is ``init=default``.

``l_t`` (``schedule``): ``port``, the port's counter, reset every epoch and raised by ``epoch / 10`` per batch, so
``l_t = batch_idx * epoch / 10``: no mask in epoch 0, the full mask after a few batches of every later epoch; or
``progress``, the fraction of the training's optimizer steps done, so that the mask ratio reaches 1 at ``eps`` of
the run. Which modalities are masked is decided from the previous step's (masked) logits and forgotten at every
epoch start, as in the port. Beyond the port (two modalities, no missing ones): any number of modalities with the
same rule; a missing modality contributes what its zeroed features give (as in the model's own fusion), takes no
part in the shares, and adds nothing to its cross-entropy. Under DDP the shares are averaged over the ranks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance.dropping import drop_features
from balance import options
from balance.methods.base import MultimodalMethod, mean_over_present
from balance.methods.epochs import EpochWindow
from balance.methods.step import Step
from balance.models.fusion import ConcatFusion, LateFusion, SumFusion

#: what ``l_t`` is: the port's per-epoch counter, or the fraction of the training done
SCHEDULES = ("port", "progress")
#: which logits each modality's own cross-entropy is taken on
UNIMODAL_LOGITS = ("masked", "plain")
#: how the C x C layer starts: the identity (the fused prediction starts as the head's own) or PyTorch's default
INITS = ("identity", "default")
#: heads whose fused logits are built from per-modality linear parts, so that ``sum_m z_m`` is the fusion
PER_MODALITY_HEADS = (ConcatFusion, SumFusion, LateFusion)
#: the port raises ``l_t`` by ``epoch * PORT_RATE`` per batch
PORT_RATE = 0.1


def mask_ratio(level: float, eps: float) -> float:
    """``p_t = sin(pi/2 * min(eps, l_t) / eps)``: 0 at ``l_t = 0``, rising to 1 at ``l_t >= eps``."""
    return math.sin(math.pi / 2 * min(eps, max(level, 0.0)) / eps)


def class_mask(num_classes: int, ratio: float, generator: torch.Generator,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """``[C]`` float mask with ``floor(ratio * C)`` zeros at classes drawn without replacement, ones elsewhere."""
    zeros = int(ratio * num_classes)
    mask = torch.ones(num_classes, device=device)
    mask[torch.randperm(num_classes, generator=generator, device=device)[:zeros]] = 0.0
    return mask


def softmax_shares(logits: Mapping[str, torch.Tensor],
                   present: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each modality's share of one softmax over the concatenated logits of all modalities, summed over the batch.

    Per sample ``i``, ``share_m,i = sum_k softmax([z_1,i; ...; z_M,i])[m, k]`` (the shares of a sample sum to 1).
    A missing modality's block is left out of its sample's softmax, and only samples with at least two modalities
    present are counted (a lone modality holds everything by construction).

    Args:
        logits: modality -> ``[B, C]`` logits (detached here).
        present: ``BoolTensor[B, M]`` (``None``: all present).

    Returns:
        ``([M] summed shares over the counted samples, number of counted samples)``.
    """
    stacked = torch.stack([z.detach().float() for z in logits.values()], dim=1)  # [B, M, C]
    if present is None:
        present = torch.ones(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
    present = present.to(stacked.device)
    stacked = stacked.masked_fill(~present.unsqueeze(2), float("-inf"))
    counted = present.sum(1) >= 2
    probabilities = F.softmax(stacked.flatten(1), dim=1).view_as(stacked)
    shares = probabilities.sum(2)[counted]
    return shares.sum(0), counted.sum().to(shares)


@dataclass
class MaskedStep(Step):
    """A training step of AMCo: the :class:`~balance.methods.step.Step`, plus each modality's logits after its
    class mask (``masked_logits``, the plain logits for an unmasked modality) and which modalities were masked.
    ``unimodal_logits`` stay the plain ones (each modality's training accuracy is measured unmasked)."""

    masked_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    masked: tuple[str, ...] = ()


class AMCo(MultimodalMethod):
    """Adaptive mask co-optimization (see the module docstring).

    Args:
        sigma: the share of the softmax mass above which a modality counts as depended on and is masked (port 0.5).
        eps: the level of ``l_t`` at which the mask ratio reaches 1 (port 0.3).
        schedule: what ``l_t`` is: ``port`` (``batch_idx * epoch / 10``, the port's per-epoch counter) or
            ``progress`` (optimizer steps done / steps of the whole run).
        unimodal_logits: what each modality's own cross-entropy is taken on: ``masked`` (the port: the masked
            logits, so a fully masked modality gets no gradient from it) or ``plain`` (its unmasked logits).
        modulation_starts: first epoch with masks and unimodal cross-entropies (0-based; port 0).
        modulation_ends: last such epoch, inclusive (``None``: to the end; the port's config says 80, beyond its own
            30-epoch runs). Outside the window the loss is ``CE(out)`` alone, as in the port.
        init: how the ``C x C`` layer starts: ``identity`` (weight I, bias 0: ``out`` starts as ``sum_m z_m``, the
            head's own prediction) or ``default`` (PyTorch's random initialisation, the port's), which starts the
            product of the layer and the head near a saddle that takes several epochs to leave.
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "AMCo masks the modality the model depends on among others"

    def __init__(self, sigma: float = 0.5, eps: float = 0.3, schedule: str = "port",
                 unimodal_logits: str = "masked", modulation_starts: int = 0, modulation_ends: int | None = None,
                 init: str = "identity", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        head = self.model.fusion
        if not isinstance(head, PER_MODALITY_HEADS):
            raise ValueError(f"AMCo sums each modality's own logits, which needs a head with per-modality linear "
                             f"parts; {type(head).__name__} has none: use model/fusion=concat (the port's), sum or "
                             "late_fusion")
        options.interval("sigma", sigma, 0, 1, open_low=True, open_high=True)
        options.positive("eps", eps)
        options.one_of("schedule", schedule, SCHEDULES)
        options.one_of("unimodal_logits", unimodal_logits, UNIMODAL_LOGITS)
        options.one_of("init", init, INITS)
        self.sigma = float(sigma)
        self.eps = float(eps)
        self.schedule = schedule
        self.unimodal_target = unimodal_logits
        self.window = EpochWindow(modulation_starts, modulation_ends)
        num_classes = self.model.num_classes
        # The port's `linear_star` (part of its model there): a C x C layer on the summed logits, trained with the
        # rest. From the identity, training starts where joint training does.
        self.class_layer = nn.Linear(num_classes, num_classes)
        if init == "identity":
            with torch.no_grad():
                self.class_layer.weight.copy_(torch.eye(num_classes))
                self.class_layer.bias.zero_()
        # Which modalities the next step masks: state, so that a run resumed mid-epoch masks what it would have.
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool))
        self.declare_metric("mask_ratio")
        for m in self.modalities:
            self.declare_metric(f"share_{m}")
            self.declare_metric(f"masked_{m}")

    # -- the schedule ---------------------------------------------------------------------------------------------

    def level(self, batch_idx: int) -> float:
        """``l_t`` of this training step (see ``schedule``)."""
        if self.schedule == "port":
            return batch_idx * self.current_epoch * PORT_RATE
        total = self.trainer.estimated_stepping_batches
        return self.global_step / total if math.isfinite(total) and total > 0 else 0.0

    def on_train_epoch_start(self) -> None:
        # The port starts every epoch with no modality flagged.
        self.dependent.zero_()

    # -- the forward pass ------------------------------------------------------------------------------------------

    def combine(self, logits: Mapping[str, torch.Tensor],
                masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``A (sum_m mask_m * z_m) + a``: the fused logits from each modality's (optionally masked) logits."""
        masks = masks or {}
        summed = sum(z * masks[m] if m in masks else z for m, z in logits.items())
        return self.class_layer(summed)

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        # A dropped modality gives the logits of its zeroed features, as in the model's own fusion.
        return self.combine(self.model.unimodal_logits(drop_features(features, self.modalities, keep)))

    def forward_step(self, batch: Mapping[str, Any], batch_idx: int) -> Step:
        features = self.encode_batch(batch)
        keep = batch.get("present")
        plain = self.unimodal_logits(features)
        masks: dict[str, torch.Tensor] = {}
        if self.current_epoch in self.window:
            ratio = mask_ratio(self.level(batch_idx), self.eps)
            self.record("mask_ratio", ratio)
            flagged = [m for m, d in zip(self.modalities, self.dependent.tolist()) if d]
            if flagged and int(ratio * self.model.num_classes) > 0:
                device = plain[self.modalities[0]].device
                # One draw per step, shared by the samples and by every flagged modality (the port's one mask).
                mask = class_mask(self.model.num_classes, ratio, self.generator_on(device), device)
                masks = {m: mask.to(plain[m].dtype) for m in flagged}
        dropped = self.model.unimodal_logits(drop_features(features, self.modalities, keep))
        step = MaskedStep(batch, batch_idx, features, self.combine(dropped, masks), plain,
                          masked_logits={m: z * masks[m] if m in masks else z for m, z in plain.items()},
                          masked=tuple(masks))
        step.losses = dict(self.loss_terms(step))
        return step

    # -- the loss and the decision ---------------------------------------------------------------------------------

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        terms = {"fused": F.cross_entropy(step.logits, step.labels)}
        if self.current_epoch in self.window:
            logits = step.masked_logits if self.unimodal_target == "masked" else step.unimodal_logits
            terms["unimodal"] = sum(self._present_cross_entropies(logits, step.labels, step.batch.get("present")))
        return terms

    @staticmethod
    def _present_cross_entropies(logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
                                 present: torch.Tensor | None) -> list[torch.Tensor]:
        """Each modality's cross-entropy over the samples that have it (0 where none has)."""
        return [mean_over_present(F.cross_entropy(z, labels, reduction="none"),
                                  None if present is None else present[:, i])[0]
                for i, z in enumerate(logits.values())]

    def observe_step(self, step: Step) -> None:
        if self.current_epoch not in self.window:
            return
        for m in self.modalities:
            self.record(f"masked_{m}", float(m in step.masked))
        # The shares of what the fusion saw this step (masked logits, as in the port) flag the next step's masks.
        total, count = softmax_shares(step.masked_logits, step.batch.get("present"))
        total, count = self.reduce_across_ranks(total), self.reduce_across_ranks(count)
        if count > 0:
            shares = total / count
            self.dependent.copy_(shares > self.sigma)
            for m, share in zip(self.modalities, shares):
                self.record(f"share_{m}", share, weight=count)

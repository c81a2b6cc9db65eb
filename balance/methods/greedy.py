"""Greedy: balancing the conditional learning speeds of the branches (Wu, Jastrzebski, Cho, Geras, ICML 2022).

The model (official ``MMTM_MVCNN``): one encoder per modality with its own linear head, MMTM blocks between the
encoders' stages (``model.mmtm``, :mod:`balance.models.mmtm`: the only cross-modal path, the *bypass*), and the
prediction is the mean of the heads' logits (late fusion). The loss is the sum of the heads' cross-entropies (the
official ``blend_loss``); ``loss: fused`` takes the cross-entropy of the mean instead.

After every backward pass (the gradient hook, before the optimizer step) the method measures, per modality
``m``, the learning speed of its branch ``main_m`` (its encoder, projection and head,
``model.modality_parameters(m)``) and of its bypass ``bypass_m`` (its MMTM excitations plus the blocks' shared
joint layers): ``sum ||g||^2 / sum ||w||^2`` over the group's parameters. Both are summed over every training
step since the start (the epochs before ``starting_epoch`` included, curated steps excluded), and the
*conditional learning speed* gives ``BDR_m = log10(sum bypass_m / sum main_m)``: how much faster branch ``m``
learns to use the other modalities than to use its own input. From epoch ``starting_epoch`` on, a step that is not
curated compares them: for two modalities ``d = BDR_0 - BDR_1``, and ``|d| > epsilon`` starts a curation of
``window`` steps that *cares for* modality ``0`` if ``d > 0`` else ``1``: the next ``window`` training forward
passes isolate the cared-for modality at every MMTM block (its scales are their running averages, so no
cross-modal input reaches its branch and it must learn from its own input), while the others use MMTM as usual.
For M modalities the cared-for modality is ``argmax_m BDR_m`` when ``max_m BDR_m - min_m BDR_m > epsilon`` (for
two modalities exactly the rule above).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.step import Step
from balance.models.fusion import LateFusion, SumFusion

LOSSES = ("branches", "fused")


def _trainable(parameters: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in parameters if p.requires_grad]


def learning_speed(parameters: list[nn.Parameter]) -> torch.Tensor:
    """``sum ||g||^2 / sum ||w||^2`` over ``parameters`` (float64; a parameter without a gradient counts 0 there)."""
    weights = torch.stack([p.detach().double().pow(2).sum() for p in parameters]).sum()
    grads = torch.stack([p.grad.detach().double().pow(2).sum() if p.grad is not None
                         else torch.zeros((), dtype=torch.float64, device=p.device) for p in parameters]).sum()
    return grads / weights.clamp_min(torch.finfo(torch.float64).tiny)


def bypass_dominance(main: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
    """``[M]`` ``BDR_m = log10(bypass_m / main_m)`` from the accumulated speeds (a zero speed reads as the tiniest)."""
    tiny = torch.finfo(main.dtype).tiny
    return torch.log10(bypass.clamp_min(tiny)) - torch.log10(main.clamp_min(tiny))


def caring_modality(bdr: torch.Tensor, epsilon: float) -> int | None:
    """The modality to care for: ``argmax BDR`` when ``max BDR - min BDR > epsilon``, else ``None``. For two
    modalities: ``0`` if ``d = BDR_0 - BDR_1 > epsilon``, ``1`` if ``d < -epsilon`` (the official rule)."""
    if float(bdr.max() - bdr.min()) > epsilon:
        return int(bdr.argmax())
    return None


class Greedy(MultimodalMethod):
    """Greedy's balanced training (module docstring): conditional learning speeds decide which branch learns for
    ``window`` steps without cross-modal input.

    Needs a model with MMTM mid-fusion (``model.mmtm``; the method config selects ``model/mmtm=default``) and a
    head with one linear classifier per modality: late fusion (the config's choice, official) or sum fusion (the
    same heads and branch losses; its prediction is twice the mean, with the same argmax).

    The state (accumulated speeds, the curation window, the cared-for modality) is held in buffers, so checkpoints
    keep it and a resumed run continues exactly. Under DDP the hook reads gradients already averaged over the
    ranks and weights that are equal on every rank, so every rank computes the same speeds and takes the same
    decision with no reduction; the MMTM averages are buffers that DDP broadcasts from rank 0 before each forward
    pass, so every rank isolates alike. With gradient accumulation the decision runs once per optimizer step and
    the window counts optimizer steps. Evaluation never isolates.

    Args:
        epsilon: threshold on the BDR gap (official 0.01).
        window: curated training steps per decision (official ``curation_windowsize`` 5).
        starting_epoch: first epoch with decisions (0-based; official 2 in its 1-based epochs, i.e. the second).
        loss: ``branches`` (official: the sum of the heads' cross-entropies) or ``fused`` (the cross-entropy of the
            mean logits).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(self, epsilon: float = 0.01, window: int = 5, starting_epoch: int = 1, loss: str = "branches",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.model.mid_fusion is None:
            raise ValueError("Greedy needs MMTM mid-fusion between the encoders, but model.mmtm is null: select it "
                             "with model/mmtm=default (method=greedy does by default)")
        if not isinstance(self.model.fusion, (LateFusion, SumFusion)):
            raise ValueError(f"Greedy's branches each end in their own classifier, but the fusion head is "
                             f"{type(self.model.fusion).__name__}: use model/fusion=late_fusion (the method's "
                             "default, official) or model/fusion=sum")
        options.non_negative("epsilon", epsilon)
        options.integer("window", window, 1)
        options.one_of("loss", loss, LOSSES)
        self.epsilon = float(epsilon)
        self.window = window
        self.active = EpochWindow(starting_epoch)
        self.loss = loss
        mid = self.model.mid_fusion
        self.main_parameters = {m: _trainable(self.model.modality_parameters(m)) for m in self.modalities}
        self.bypass_parameters = {m: _trainable(mid.modality_parameters(m) + mid.shared_parameters())
                                  for m in self.modalities}
        for group in ("main", "bypass"):
            empty = [m for m, ps in getattr(self, f"{group}_parameters").items() if not ps]
            if empty:
                raise ValueError(f"Greedy measures the learning speed of each branch, but the {group} parameters of "
                                 f"{empty} are all frozen")
        count = len(self.modalities)
        self.register_buffer("speed_main", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("speed_bypass", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("curation_left", torch.zeros((), dtype=torch.long))  # curated forwards to come
        self.register_buffer("caring", torch.full((), -1, dtype=torch.long))  # the cared-for modality's index
        self.declare_metric("curation")
        for m in self.modalities:
            self.declare_metric(f"bdr_{m}")
            self.declare_metric(f"caring_{m}")
        if count == 2:
            self.declare_metric("d_bdr")

    def isolated_modality(self) -> str | None:
        """The modality the current training forward passes isolate (``None`` outside a curation window)."""
        return self.modalities[int(self.caring)] if int(self.curation_left) > 0 else None

    def encode_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # The cared-for modality is isolated during a curation window (training only).
        with self.model.mid_fusion.isolating(self.isolated_modality()):
            return self.model.encode(batch["inputs"])

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        if self.loss == "fused":
            return {"fused": F.cross_entropy(step.logits, step.labels)}
        return {"branches": torch.stack(list(self.unimodal_losses(step).values())).sum()}

    def step_speeds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([M], [M])``: this step's learning speeds of every branch and of every bypass (float64)."""
        main = torch.stack([learning_speed(self.main_parameters[m]) for m in self.modalities])
        bypass = torch.stack([learning_speed(self.bypass_parameters[m]) for m in self.modalities])
        return main, bypass

    def modify_gradients(self, step: Step) -> None:
        # The step just backpropagated was curated iff a window was open (the state changes only here).
        caring = self.isolated_modality()
        self.record("curation", float(caring is not None))
        for m in self.modalities:
            self.record(f"caring_{m}", float(caring == m))
        if caring is not None:
            self.curation_left -= 1  # curated steps are not measured (official)
            return
        main, bypass = self.step_speeds()
        self.speed_main += main
        self.speed_bypass += bypass
        bdr = bypass_dominance(self.speed_main, self.speed_bypass)
        for m, value in zip(self.modalities, bdr):
            self.record(f"bdr_{m}", value)
        if len(self.modalities) == 2:
            self.record("d_bdr", bdr[0] - bdr[1])
        if self.current_epoch not in self.active:
            return
        chosen = caring_modality(bdr, self.epsilon)
        if chosen is not None:
            self.caring.fill_(chosen)
            self.curation_left.fill_(self.window)

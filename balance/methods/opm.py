"""OPM: on-the-fly prediction modulation (Wei, Hu, Du, Wen, T-PAMI 2024, "On-the-fly Modulation for Balanced
Multimodal Learning").

Joint training on the fused cross-entropy, in which the dominant modality's features are dropped in the forward
pass so that the fused prediction has to lean on the others. On every training batch each modality's confidence
``s_m = sum_i softmax(z_m,i)[y_i]`` (its own logits ``z_m``, on the undropped features) gives the discrepancy
ratio ``rho_m = s_m / min_{j != m} s_j`` and the drop probability

    ``q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)), 0, 1)`` if ``rho_m > 1``, else ``q_m = 0``.

With probability ``p_exe`` the batch is modulated: each sample's features of modality ``m`` are zeroed with
probability ``q_m`` (independently per sample and modality), and all features are rescaled by ``1 / (1 - theta)``,
``theta = sum_m d_m q_m / sum_m d_m`` (``d_m`` the feature sizes), before the fusion head. For two modalities this
is the official rule; for more, each modality is compared with the weakest of the others (as OGM-GE here). The
weakest modality always has ``q = 0``, so no sample loses every modality (the official code's discarding of such
samples can never fire). Evaluation never drops anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.epochs import EpochWindow
from balance.methods.ogm_ge import confidence_scores
from balance.methods.step import Step
from balance.models.fusion import ConcatFusion, LateFusion, SharedHead, SumFusion

#: heads whose logits are a sum of per-modality linear terms: rescaling the kept features by ``1 / (1 - theta)``
#: keeps the expected fused logits there, and the modality's own logits are its term (the official concat head).
LINEAR_HEADS = (ConcatFusion, SumFusion, LateFusion, SharedHead)


def drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """``[M]`` drop probabilities: ``clip(q_base (1 + lam tanh(rho_m - 1)), 0, 1)`` where
    ``rho_m = s_m / min_{j != m} s_j`` exceeds 1, else 0 (the official ``calcu_q`` for two modalities)."""
    others = torch.stack([torch.cat([scores[:m], scores[m + 1:]]).min() for m in range(len(scores))])
    ratio = scores / others
    q = q_base * (1 + lam * torch.tanh(ratio - 1))
    return torch.where(ratio > 1, q, torch.zeros_like(q)).clamp(0.0, 1.0)


def feature_scale(q: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """``1 / (1 - theta)`` with ``theta = sum_m d_m q_m / sum_m d_m``: the expected share of the concatenated
    feature vector that is dropped (official)."""
    theta = (dims * q).sum() / dims.sum()
    return 1 / (1 - theta)


class OPM(MultimodalMethod):
    """On-the-fly prediction modulation: the dominant modality's features are dropped with a probability that
    grows with its confidence lead.

    The modulation lives in the forward step (training only): the scores are computed from the undropped
    features, summed over the DDP ranks so that every rank uses the same ``q``; the decision to modulate the batch
    and the per-sample masks come from the method's generator (the same on every rank and restored on resume;
    each rank takes its own slice of one draw of masks for all ranks, so ranks drop different samples). The loss
    is the fused cross-entropy on the modulated features; ``step.features`` and ``step.unimodal_logits`` stay the
    undropped ones (each modality's training accuracy is measured on its own features).

    Args:
        q_base: base drop probability of a dominant modality (official 0.5: the default of ``main.py`` and its
            ``train_opm.sh``; its ``config.py`` says 0.4, which the command-line default overrides; BalanceBenchmark
            0.4).
        lam: how much the drop probability grows with the confidence lead, ``lambda`` (official 0.5).
        p_exe: probability that a batch is modulated at all (official 0.7).
        modulation_starts: first modulated epoch (0-based; official 6: its loop trains epochs 0-5 without OPM,
            ``warm_up = epoch <= 5``; BalanceBenchmark 0).
        modulation_ends: last modulated epoch, inclusive (``None``: to the end, official).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "OPM drops a dominant modality's features"

    def __init__(self, q_base: float = 0.5, lam: float = 0.5, p_exe: float = 0.7, modulation_starts: int = 6,
                 modulation_ends: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        head = self.model.fusion
        if not isinstance(head, LINEAR_HEADS):
            raise ValueError(
                f"OPM rescales the kept features by 1 / (1 - theta), which keeps the expected fused logits only for "
                f"a head linear in each modality's features; {type(head).__name__} is not: use model/fusion=concat "
                "(official), sum, late_fusion or shared")
        options.interval("q_base", q_base, 0, 1)
        options.interval("p_exe", p_exe, 0, 1)
        options.non_negative("lam", lam)
        self.q_base = float(q_base)
        self.lam = float(lam)
        self.p_exe = float(p_exe)
        self.window = EpochWindow(modulation_starts, modulation_ends)
        self.register_buffer("feature_dims", torch.tensor([float(head.feature_dims[m]) for m in self.modalities]),
                             persistent=False)
        for m in self.modalities:
            self.declare_metric(f"drop_prob_{m}")
            self.declare_metric(f"dropped_{m}")

    def _ranks(self) -> tuple[int, int]:
        """``(world size, this rank)``; ``(1, 0)`` outside a trainer."""
        if self._trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def drop_mask(self, q: torch.Tensor, batch_size: int) -> torch.Tensor | None:
        """``BoolTensor[B, M]`` (True: kept) with each entry dropped with probability ``q_m``, or ``None`` when the
        batch is not modulated (probability ``1 - p_exe``). Drawn on the method's CPU generator: the same draws on
        every rank, of which each rank keeps its own ``[B, M]`` slice."""
        if torch.rand((), generator=self.generator) >= self.p_exe:
            return None
        world, rank = self._ranks()
        draws = torch.rand(world, batch_size, len(self.modalities), generator=self.generator)[rank]
        return draws.to(q.device) >= q  # P(kept) = 1 - q_m

    def forward_step(self, batch: Mapping[str, Any], batch_idx: int) -> Step:
        if self.current_epoch not in self.window:
            return super().forward_step(batch, batch_idx)
        features = self.encode_batch(batch)
        unimodal = self.unimodal_logits(features)
        scores = self.reduce_across_ranks(confidence_scores(unimodal, batch["label"]))
        q = drop_probabilities(scores, self.q_base, self.lam)
        keep, fused_features = batch.get("present"), features
        mask = self.drop_mask(q, len(batch["label"]))
        if mask is not None:
            keep = mask if keep is None else keep & mask.to(keep.device)
            scale = feature_scale(q, self.feature_dims.to(q))
            fused_features = {m: f * scale.to(f.dtype) for m, f in features.items()}
        for i, m in enumerate(self.modalities):
            self.record(f"drop_prob_{m}", q[i])
            self.record(f"dropped_{m}", 0.0 if mask is None else 1 - mask[:, i].float().mean())
        step = Step(batch, batch_idx, features, self.model.fuse(fused_features, keep=keep), unimodal)
        step.losses = dict(self.loss_terms(step))
        return step

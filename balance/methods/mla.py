"""MLA: Multimodal Representation Learning by Alternating Unimodal Adaptation (Zhang et al., CVPR 2024).

Per batch every encoder runs once; then, modality by modality in a fixed order, the shared head classifies that
modality's features alone and the model takes an optimizer step on that loss. Head gradient modification (HGM)
projects the head's weight gradient away from directions earlier modalities already used, so learning one
modality does not overwrite another. At test time the modalities' logits are fused with entropy-based weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from balance.dropping import drop_features
from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step
from balance.models import SharedHead

FUSIONS = ("dynamic", "dynamic_batch", "fixed", "mean")


def update_projector(projector: torch.Tensor, features: torch.Tensor, alpha: float, normalize: bool = True
                     ) -> torch.Tensor:
    """One recursive least-squares step of the orthogonal projector (OWM), as MLA's HGM.

    ``r = mean_batch(features)`` (1 x d), ``k = P r^T``, ``P <- P - k k^T / (alpha + r k)``, then optionally
    ``P <- P / ||P||_F``. After the step ``P r^T`` is small: gradients projected with ``P`` barely move the
    head along ``r``, the direction this modality's features already taught it.

    The official repository's first commit divides by ``alpha + k r`` (a d x d outer product, element-wise);
    we use the scalar ``r k`` of the OWM update the paper describes.
    """
    r = features.detach().mean(dim=0, keepdim=True).to(projector.dtype)
    k = projector @ r.T
    projector = projector - (k @ k.T) / (alpha + (r @ k))
    if normalize:
        projector = projector / torch.linalg.matrix_norm(projector, ord="fro")
    return projector


def entropy_weights(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-sample fusion weights ``[B, M]``: ``lambda_m = softmax_m(max_k e_k - e_m)`` with ``e_m`` the entropy
    of modality m's class distribution; a more confident (lower-entropy) modality gets more weight."""
    entropies = torch.stack(
        [-(F.softmax(z, dim=1) * F.log_softmax(z, dim=1)).sum(dim=1) for z in logits], dim=1
    )
    return torch.softmax(entropies.max(dim=1, keepdim=True).values - entropies, dim=1)


def batch_entropy_weights(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official code's weights ``[M]``: softmax over the *batch* axis, entropy summed over the whole batch,
    so one weight per modality per batch (it depends on the batch composition)."""
    entropies = torch.stack(
        [-(F.softmax(z, dim=0) * F.log_softmax(z, dim=0)).sum() for z in logits]
    )
    return torch.softmax(entropies.max() - entropies, dim=0)


class MLA(MultimodalMethod):
    """Alternating unimodal training on a shared head with head gradient modification (HGM).

    Requires a model whose fusion head is :class:`~balance.models.SharedHead` (``model/fusion=shared``; the
    ``mla`` method config sets it). Uses manual optimization, so Lightning's ``global_step`` counts M optimizer
    steps per batch: schedules are per epoch.

    Args:
        order: modality order of the unimodal steps in each batch (default: the model's order).
        hgm: modify the head's weight gradient with the projector (``False`` is the paper's ablation).
        hgm_normalize: divide the projector by its Frobenius norm after each update (official code).
        gradient_clip_val: max gradient norm per unimodal step (``None`` = no clipping); here rather than on the
            Trainer, which refuses clipping under manual optimization.
        fusion: test-time fusion: ``dynamic`` (per-sample entropy weights, the paper), ``dynamic_batch`` (the
            official code's batch-axis softmax), ``fixed`` (``fixed_weights``), ``mean``.
        fixed_weights: modality -> weight for ``fusion: fixed`` (official: audio 0.55, visual 0.45; audio 0.35,
            visual 0.25, text 0.40).
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    def __init__(
        self,
        order: Sequence[str] | None = None,
        hgm: bool = True,
        hgm_normalize: bool = True,
        gradient_clip_val: float | None = None,
        fusion: str = "dynamic",
        fixed_weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        head = self.model.fusion
        if not isinstance(head, SharedHead):
            raise ValueError(
                f"MLA needs a shared head (model/fusion=shared), got {type(head).__name__}; use method=mla, which "
                "sets it, and a model whose encoders share one feature size (or set model.feature_dim)"
            )
        self.order = list(order) if order is not None else list(self.modalities)
        if sorted(self.order) != sorted(self.modalities):
            raise ValueError(f"order {self.order} must list each of {self.modalities} once")
        options.one_of("fusion", fusion, FUSIONS)
        if fusion == "fixed":
            if fixed_weights is None or sorted(fixed_weights) != sorted(self.modalities):
                raise ValueError(f"fusion: fixed needs fixed_weights for each of {self.modalities}")
            self.register_buffer(
                "fixed_weights", torch.tensor([float(fixed_weights[m]) for m in self.modalities]), persistent=False
            )
        self.hgm = hgm
        self.hgm_normalize = hgm_normalize
        self.gradient_clip_val = gradient_clip_val
        self.fusion = fusion
        dim = head.linear.in_features
        # The projector and the step count persist across batches and epochs and live in the checkpoint.
        self.register_buffer("projector", torch.eye(dim))
        self.register_buffer("hgm_steps", torch.zeros((), dtype=torch.long))
        for m in self.modalities:
            self.declare_metric(f"weight_{m}", stages=("val", "test"))

    def fuse_unimodal(self, logits: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time fusion of the modalities' logits: ``(fused [B, C], weights [B, M])``."""
        stacked = [logits[m] for m in self.modalities]
        if self.fusion == "dynamic":
            weights = entropy_weights(stacked)
        elif self.fusion == "dynamic_batch":
            weights = batch_entropy_weights(stacked).expand(len(stacked[0]), -1)
        elif self.fusion == "fixed":
            weights = self.fixed_weights.expand(len(stacked[0]), -1)
        else:
            weights = torch.full((len(stacked[0]), len(stacked)), 1.0 / len(stacked), device=stacked[0].device)
        fused = sum(weights[:, i : i + 1] * z for i, z in enumerate(stacked))
        return fused, weights

    def modify_gradients(self, step: Step) -> None:
        """HGM: projects the shared head's weight gradient with the projector updated on this modality's batch
        mean feature (skipped on the very first unimodal step, as the official code)."""
        if not self.hgm:
            return
        features = step.features[step.modality]
        if self.hgm_steps > 0:
            alpha = 0.1 ** (1 + step.batch_idx / max(self.trainer.num_training_batches, 1))
            if self.trainer.world_size > 1:
                # Every rank must hold the same projector: update it with the global batch mean.
                features = self.all_gather(features.detach().mean(0, keepdim=True)).reshape(-1, features.shape[1])
            self.projector = update_projector(self.projector, features, alpha, self.hgm_normalize)
            weight = self.model.fusion.linear.weight
            weight.grad = weight.grad @ self.projector.T
        self.hgm_steps += 1

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        labels = batch["label"]
        features = drop_features(self.model.encode(batch["inputs"]), self.modalities, batch.get("present"))
        logits: dict[str, torch.Tensor] = {}
        losses = []
        for m in self.order:
            logits[m] = self.model.fusion.linear(features[m])
            step = Step(batch, batch_idx, features, None, {m: logits[m]},
                        {m: F.cross_entropy(logits[m], labels)}, modality=m)
            loss = step.loss
            self.manual_optimizer_step(step, loss, optimizer, self.gradient_clip_val)
            losses.append(loss.detach())
            logits[m] = logits[m].detach()
        fused, _ = self.fuse_unimodal(logits)
        self.log_metrics("train", fused, logits, labels, torch.stack(losses).mean())

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        for scheduler in self.epoch_schedulers():
            self.step_scheduler(scheduler)

    def fused_logits(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.fuse_unimodal(self.model.unimodal_logits(drop_features(features, self.modalities, keep)))[0]

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        encoded = self.model.encode(batch["inputs"])
        features = drop_features(encoded, self.modalities, batch.get("present"))
        logits = self.model.unimodal_logits(features)
        fused, weights = self.fuse_unimodal(logits)
        loss = F.cross_entropy(fused, batch["label"])
        self.log_metrics(stage, fused, logits, batch["label"], loss)
        for i, m in enumerate(self.modalities):
            self.record(f"weight_{m}", weights[:, i].mean(), stage=stage, weight=len(fused))
        return {"loss": loss, "features": encoded}

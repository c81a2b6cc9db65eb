"""DI-MML: detached and interactive multimodal learning (Fan et al., ACM MM 2024).

Stage 1 trains every modality's encoder on objectives of its own, so no modality's gradient reaches another's
encoder (no modality competition): a classifier of its own (``CE(own_m(f_m))``) and one classifier shared by all
modalities (``CE(shared(f_m))``, which puts every modality's features in one space). From epoch
``warmup_epochs`` on, a dimension-decoupled unidirectional contrastive (DUC) loss lets modalities learn from each
other on the feature dimensions where only one of them is "effective": once, at the start of that epoch, every
modality's effective dimensions are selected on the training split (a dimension is effective when the
nearest class mean along it is the sample's own class for more samples than on the average dimension), and the
student ``s``'s features on the dimensions effective for the teacher ``t`` but not for ``s`` are pulled, by an
InfoNCE over the batch, to the teacher's (detached) features of the same sample. Stage 2 (from epoch
``stage2_epoch``) freezes the encoders and trains the fusion head on their features. The prediction weighs the
modalities' own classifiers and the fusion head per sample by their certainty,
``w = softmax_k(max_c p_k(c) / fusion_temperature)``.

Beyond the official code: any number of modalities (every ordered teacher-student pair, averaged over the
teachers of each student), missing modalities, one run for both stages, and the fusion head also trained during
stage 1 on detached features (docs/methods/dimml.md says why).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance.dropping import drop_features
from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step
from balance.scopes import evaluation_mode, isolated_rng, to_device

log = logging.getLogger(__name__)

#: samples per chunk of the per-dimension nearest-class search (a ``[chunk, C, d]`` distance tensor)
SELECTION_CHUNK = 1024
#: the loss terms, each logged per epoch as ``train/loss_<term>``
TERMS = ("unimodal", "shared", "contrast", "fusion")


# -- effective dimensions -------------------------------------------------------------------------------------------

def dimension_hits(features: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """``[d]``: per feature dimension, the number of samples whose nearest class prototype *along that dimension
    alone* (``argmin_c |x_k - c_k|``, the first class at a tie) is their own class.

    Args:
        features: ``[N, d]`` features.
        labels: ``[N]`` classes.
        prototypes: ``[C, d]`` class means.
        seen: ``[C]`` classes that have a prototype (``None``: all); the others are never nearest.
    """
    hits = torch.zeros(features.shape[1], device=features.device)
    for start in range(0, len(features), SELECTION_CHUNK):
        rows = features[start:start + SELECTION_CHUNK].float()
        distances = (rows.unsqueeze(1) - prototypes.float().unsqueeze(0)).abs()  # [n, C, d]
        if seen is not None:
            distances = distances.masked_fill(~seen.view(1, -1, 1), float("inf"))
        nearest = distances.argmin(dim=1)  # [n, d]
        hits += (nearest == labels[start:start + SELECTION_CHUNK].unsqueeze(1)).sum(0)
    return hits


def effective_dimensions(scores: torch.Tensor) -> torch.Tensor:
    """``[d]`` bool: the dimensions whose score (share of samples nearest to their own class along it) is above
    the mean score over all dimensions."""
    return scores > scores.mean()


def transfer_dimensions(effective: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
    """``(teacher, student) -> [d]`` bool: the dimensions effective for the teacher and not for the student, on
    which the student learns from the teacher. For two modalities the official audio-only and visual-only sets."""
    return {(t, s): effective[t] & ~effective[s] for t in effective for s in effective if t != s}


# -- the losses and the prediction ----------------------------------------------------------------------------------

def unidirectional_contrastive_loss(student: torch.Tensor, teacher: torch.Tensor, dimensions: torch.Tensor,
                                    temperature: float) -> torch.Tensor:
    """DUC loss of one teacher-student pair: ``mean_i -log softmax_j(<s_i, t_j> / T)[i]`` with both features
    restricted to ``dimensions`` and the teacher's detached (knowledge flows one way). With no dimension every
    similarity is 0 and the loss is the constant ``log B`` (no gradient), as in the official code.

    Args:
        student: ``[B, d]`` the student modality's features (with the graph).
        teacher: ``[B, d]`` the teacher modality's features of the same samples.
        dimensions: ``[d]`` bool, the pair's transfer dimensions.
        temperature: ``T``.
    """
    mask = dimensions.to(student.dtype)
    # Zeroing the other dimensions gives the restricted inner products without a host sync on the mask.
    similarities = (student * mask) @ (teacher.detach() * mask).T / temperature
    return F.cross_entropy(similarities, torch.arange(len(student), device=student.device))


def duc_loss(features: Mapping[str, torch.Tensor], transfer: Mapping[tuple[str, str], torch.Tensor],
             temperature: float, present: torch.Tensor | None = None) -> torch.Tensor:
    """The DUC loss of all modalities: for every student, the mean over its teachers of the pair's
    :func:`unidirectional_contrastive_loss`, summed over the students (for two modalities the official sum of the
    two directions). With a missing-modality mask ``present`` (``[B, M]``, columns in ``features``' order) a
    pair uses the samples that have both modalities.
    """
    modalities = list(features)
    total = features[modalities[0]].new_zeros(())
    for (t, s), dimensions in transfer.items():
        student, teacher = features[s], features[t]
        if present is not None:
            both = present[:, modalities.index(s)] & present[:, modalities.index(t)]
            student, teacher = student[both], teacher[both]
        if len(student) > 0:
            total = total + unidirectional_contrastive_loss(student, teacher, dimensions, temperature)
    return total / (len(modalities) - 1)


def certainty_weights(logits: Sequence[torch.Tensor], temperature: float,
                      available: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K]`` per-sample weights of K predictors: ``softmax_k(max_c softmax(z_k)_c / temperature)``; a
    predictor not ``available`` (``[B, K]`` bool) gets weight 0."""
    certainty = torch.stack([F.softmax(z.float(), dim=1).amax(dim=1) for z in logits], dim=1) / temperature
    if available is not None:
        certainty = certainty.masked_fill(~available, float("-inf"))
    return F.softmax(certainty, dim=1)


def weighted_logits(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[:, k] * logits_k``."""
    return sum(weights[:, k:k + 1].to(z.dtype) * z for k, z in enumerate(logits))  # type: ignore[return-value]


class DIMML(MultimodalMethod):
    """Detached training of each modality (own and shared classifiers, DUC loss), then the fusion head on the
    frozen encoders; certainty-weighted prediction (module docstring).

    Manual optimization with two optimizers built from ``method.optimizer`` (and two schedulers from
    ``method.scheduler``, each stepped once per epoch of its stage): stage 1's over everything, stage 2's over the
    fusion head only, so stage 2 starts at the initial learning rate with a fresh optimizer, as the official
    second script does. The stage follows from the epoch; the selected dimensions and the fusion head's initial
    weights are buffers, so a resumed run continues exactly. Under DDP the selection pass sums its counts over the
    ranks (every rank selects the same dimensions).

    Args:
        warmup_epochs: epochs before the DUC loss; its dimensions are selected at the start of this epoch
            (official 20).
        temperature: the DUC loss's temperature (official scripts: CREMA-D 50, AVE 10, UCF101 10, ModelNet40 50).
        contrast_weight: weight of the DUC loss (official 1; 0 is the "without DUC" ablation).
        shared_weight: weight of the shared classifier's cross-entropies (official ``--weight`` 1).
        stage2_epoch: first epoch of stage 2, which trains only the fusion head (official: 150 epochs of stage 1,
            then 20 of stage 2); ``None``: stage 1 only.
        reset_fusion: stage 2 starts from the fusion head's initial weights (official: a new head); ``False``
            continues the head trained alongside stage 1.
        fusion_temperature: temperature of the certainty weights (official scripts: CREMA-D 1, AVE 3, UCF101 1,
            ModelNet40 3).
        selection_augment: select the dimensions with the training transforms (official) instead of the
            evaluation ones.
        gradient_clip_val: max gradient norm per step (``None``: none); here because the Trainer refuses clipping
            under manual optimization.
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "DI-MML transfers knowledge between modalities"

    def __init__(
        self,
        warmup_epochs: int = 20,
        temperature: float = 50.0,
        contrast_weight: float = 1.0,
        shared_weight: float = 1.0,
        stage2_epoch: int | None = 150,
        reset_fusion: bool = True,
        fusion_temperature: float = 1.0,
        selection_augment: bool = False,
        gradient_clip_val: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        dims = self.model.fusion.feature_dims
        if len(set(dims.values())) != 1:
            raise ValueError(f"DI-MML's shared classifier and DUC loss need one feature size for all modalities, got "
                             f"{dims}; set model.feature_dim to project the encoders' features to one size")
        options.integer("warmup_epochs", warmup_epochs, 0)
        options.positive("temperature", temperature)
        options.non_negative("contrast_weight", contrast_weight)
        options.non_negative("shared_weight", shared_weight)
        if stage2_epoch is not None:
            options.integer("stage2_epoch", stage2_epoch, 1)
        options.positive("fusion_temperature", fusion_temperature)
        options.positive("gradient_clip_val", gradient_clip_val, optional=True)
        self.warmup_epochs = warmup_epochs
        self.temperature = float(temperature)
        self.contrast_weight = float(contrast_weight)
        self.shared_weight = float(shared_weight)
        self.stage2_epoch = stage2_epoch
        self.reset_fusion = reset_fusion
        self.fusion_temperature = float(fusion_temperature)
        self.selection_augment = selection_augment
        self.gradient_clip_val = gradient_clip_val
        dim = next(iter(dims.values()))
        num_classes = self.model.num_classes
        self.unimodal_heads = nn.ModuleDict({m: nn.Linear(dim, num_classes) for m in self.modalities})
        self.shared_head = nn.Linear(dim, num_classes)
        # Stage 2's fresh head is the head as built: its initial weights, kept in the checkpoint.
        self._fusion_keys = list(self.model.fusion.state_dict())
        for i, value in enumerate(self.model.fusion.state_dict().values()):
            self.register_buffer(f"initial_fusion_{i}", value.detach().clone())
        self.register_buffer("dimensions_selected", torch.zeros((), dtype=torch.bool))
        for m in self.modalities:
            self.register_buffer(f"effective_{m}", torch.zeros(dim, dtype=torch.bool))
            self.declare_metric(f"effective_dims_{m}")
        for t, s in transfer_dimensions(self.effective()):
            self.declare_metric(f"dims_{t}_to_{s}")
        for term in TERMS:
            self.declare_metric(f"loss_{term}")
        self.declare_metric("stage")
        for name in [*self.modalities, "fusion"]:
            self.declare_metric(f"weight_{name}", stages=("val", "test"))

    # -- stages -------------------------------------------------------------------------------------------------------

    def in_stage_two(self, epoch: int) -> bool:
        """Whether ``epoch`` trains the fusion head on the frozen encoders."""
        return self.stage2_epoch is not None and epoch >= self.stage2_epoch

    def contrast_active(self, epoch: int) -> bool:
        """Whether ``epoch`` has the DUC loss: stage 1 from ``warmup_epochs`` on, with a non-zero weight."""
        return self.contrast_weight > 0 and epoch >= self.warmup_epochs and not self.in_stage_two(epoch)

    def effective(self) -> dict[str, torch.Tensor]:
        """Modality -> ``[d]`` bool, its selected effective dimensions (all False before the selection)."""
        return {m: getattr(self, f"effective_{m}") for m in self.modalities}

    def initial_fusion(self) -> dict[str, torch.Tensor]:
        """The fusion head's state dict as built (stage 2's fresh head)."""
        return {key: getattr(self, f"initial_fusion_{i}") for i, key in enumerate(self._fusion_keys)}

    def stage_one_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the fusion head's: the encoders (and projections, MMTM blocks), the modalities'
        own classifiers and the shared classifier."""
        fusion = {id(p) for p in self.model.fusion.parameters()}
        return [p for p in self.parameters() if id(p) not in fusion]

    def configure_optimizers(self) -> Any:
        stage_one = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        stage_two = self.optimizer_factory(params=[p for p in self.model.fusion.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return [stage_one, stage_two]
        return [stage_one, stage_two], [self.scheduler_factory(optimizer=o) for o in (stage_one, stage_two)]

    def on_train_start(self) -> None:
        max_epochs = self.trainer.max_epochs
        if self.stage2_epoch is not None and max_epochs is not None and 0 <= max_epochs <= self.stage2_epoch:
            log.info("DI-MML: stage 2 starts at epoch %d, after this run's last epoch (trainer.max_epochs=%d): only "
                     "stage 1 runs", self.stage2_epoch, max_epochs)

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        if self.reset_fusion and epoch == self.stage2_epoch:
            self.model.fusion.load_state_dict(self.initial_fusion())
        if self.contrast_active(epoch):
            if not bool(self.dimensions_selected):  # a resumed run has them from its checkpoint
                self.select_dimensions()
            for m, mask in self.effective().items():
                self.record(f"effective_dims_{m}", mask.sum())
            for (t, s), mask in transfer_dimensions(self.effective()).items():
                self.record(f"dims_{t}_to_{s}", mask.sum())
        self.record("stage", 2.0 if self.in_stage_two(epoch) else 1.0)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        schedulers = self.epoch_schedulers()
        if schedulers:
            self.step_scheduler(schedulers[1 if self.in_stage_two(self.current_epoch) else 0])

    # -- the selection pass ----------------------------------------------------------------------------------------

    def select_dimensions(self) -> None:
        """Selects every modality's effective dimensions on the training split, in eval mode without gradients
        (the official pass), with its own random state so that the run draws what it would without the pass."""
        datamodule = self.fitted_datamodule("DI-MML selects its dimensions on the datamodule's training split")
        loader = datamodule.unshuffled_train_dataloader(augment=self.selection_augment)
        with isolated_rng(), evaluation_mode(self.model):
            batches = [to_device(batch, self.device) for batch in loader]
            features = [self.model.encode(batch["inputs"]) for batch in batches]
        labels = torch.cat([batch["label"] for batch in batches])
        present = torch.cat([batch["present"] for batch in batches]) if "present" in batches[0] else None
        for i, m in enumerate(self.modalities):
            rows, y = torch.cat([f[m] for f in features]).float(), labels
            if present is not None:
                rows, y = rows[present[:, i]], y[present[:, i]]
            getattr(self, f"effective_{m}").copy_(self._effective_dimensions(rows, y))
        self.dimensions_selected.fill_(True)

    def _effective_dimensions(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One modality's effective dimensions from this rank's features, with class means and hit counts
        summed over the ranks."""
        onehot = F.one_hot(labels, self.model.num_classes).float()
        sums = self.reduce_across_ranks(onehot.T @ features)
        counts = self.reduce_across_ranks(onehot.sum(0))
        prototypes = sums / counts.clamp_min(1).unsqueeze(1)
        hits = self.reduce_across_ranks(dimension_hits(features, labels, prototypes, seen=counts > 0))
        total = self.reduce_across_ranks(torch.tensor(float(len(features)), device=features.device))
        return effective_dimensions(hits / total.clamp_min(1))

    # -- prediction ------------------------------------------------------------------------------------------------

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's logits through its own classifier."""
        return {m: self.unimodal_heads[m](features[m]) for m in self.modalities}

    def predict(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], weights [B, M + 1])``: the certainty-weighted sum of the modalities' own logits and
        the fusion head's; a dropped modality (``keep`` False) has no vote and zeroed features in the fusion."""
        logits = [*self.unimodal_logits(features).values(), self.model.fuse(features, keep)]
        available = None
        if keep is not None:
            available = torch.cat([keep.bool(), torch.ones_like(keep[:, :1], dtype=torch.bool)], dim=1)
        weights = certainty_weights(logits, self.fusion_temperature, available)
        return weighted_logits(logits, weights), weights

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.predict(features, keep)[0]

    # -- training ----------------------------------------------------------------------------------------------------

    def stage_one_step(self, batch: Mapping[str, Any], batch_idx: int) -> Step:
        """Own and shared classifiers on every modality, the DUC loss when active, and the fusion head on
        detached features (it never reaches the encoders)."""
        present = batch.get("present")
        features = drop_features(self.model.encode(batch["inputs"]), self.modalities, present)
        own = self.unimodal_logits(features)
        step = Step(batch, batch_idx, features, None, own)
        shared = Step(batch, batch_idx, features, None, {m: self.shared_head(f) for m, f in features.items()})
        step.losses["unimodal"] = torch.stack(list(self.unimodal_losses(step).values())).sum()
        step.losses["shared"] = self.shared_weight * torch.stack(list(self.unimodal_losses(shared).values())).sum()
        if self.contrast_active(self.current_epoch):
            transfer = transfer_dimensions(self.effective())
            step.losses["contrast"] = self.contrast_weight * duc_loss(features, transfer, self.temperature, present)
        detached = {m: f.detach() for m, f in features.items()}
        step.losses["fusion"] = F.cross_entropy(self.model.fuse(detached, present), step.labels)
        return step

    def stage_two_step(self, batch: Mapping[str, Any], batch_idx: int) -> Step:
        """The fusion head on the frozen encoders' features (eval mode, no gradient, as the official stage 2)."""
        present = batch.get("present")
        with evaluation_mode(self.model):
            features = self.model.encode(batch["inputs"])
            own = self.unimodal_logits(features)
        step = Step(batch, batch_idx, features, None, own)
        step.losses["fusion"] = F.cross_entropy(self.model.fuse(features, present), step.labels)
        return step

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        stage_two = self.in_stage_two(self.current_epoch)
        step = (self.stage_two_step if stage_two else self.stage_one_step)(batch, batch_idx)
        loss = step.loss
        if stage_two and self.trainer.world_size > 1:
            # DDP without find_unused_parameters needs a gradient for every parameter at every step: zero ones
            # for the frozen parameters (stage 2's optimizer never steps them).
            loss = loss + 0.0 * sum(p.sum() for p in self.stage_one_parameters())
        with torch.no_grad():  # the prediction of the weights that computed the loss, as the base logs it
            logits, _ = self.predict({m: f.detach() for m, f in step.features.items()}, batch.get("present"))
        self.manual_optimizer_step(step, loss, self.optimizers()[1 if stage_two else 0], self.gradient_clip_val)
        batch_size = len(step.labels)
        for name, value in step.losses.items():
            self.record(f"loss_{name}", value.detach(), weight=batch_size)
        # train/loss is the cross-entropy of the method's prediction, as val/loss and test/loss are; the terms
        # it optimises are train/loss_<term>.
        self.log_metrics("train", logits, {m: z.detach() for m, z in step.unimodal_logits.items()}, step.labels,
                         F.cross_entropy(logits, step.labels))

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        features = self.model.encode(batch["inputs"])
        logits, weights = self.predict(features, keep=batch.get("present"))
        loss = F.cross_entropy(logits, batch["label"])
        self.log_metrics(stage, logits, self.unimodal_logits(features), batch["label"], loss)
        for k, name in enumerate([*self.modalities, "fusion"]):
            self.record(f"weight_{name}", weights[:, k].mean(), stage=stage, weight=len(logits))
        return {"loss": loss, "features": features}

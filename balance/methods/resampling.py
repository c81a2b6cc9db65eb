"""Shapley-valued resampling (Wei et al., CVPR 2024): joint training that, after a warm-up, retrains samples
(sample level) or a share of the data (modality level) keeping only the modality that contributes too little.

Every epoch from ``warmup_epochs - 1`` on, the training split is valued (exact modality Shapley values per sample,
:mod:`balance.valuation`) and the next epoch trains on a plan: every sample once, plus copies that keep one
modality (its features zeroed for the others, as the official code; inputs with ``drop: inputs``). The methods
set ``trainer.reload_dataloaders_every_n_epochs = 1`` themselves, so that every epoch's loader serves the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from balance.gather import gather_table, last_per_index
from balance import options
from balance.methods.epochs import EpochWindow
from balance.methods.joint import JointTraining
from balance.methods.step import Step
from balance.resampling import (
    OFFICIAL_THRESHOLDS,
    VARIANTS,
    TrainingPlan,
    estimate_mean_contribution,
    modality_level_extra,
    plan_from_copies,
    plan_from_extra,
    plan_summary,
    sample_level_copies,
)
from balance.valuation import ValuationTable, shapley_values, subset_values, value_dataloader
from balance.valuation.coalitions import DROPS
from balance.valuation.shapley import BENEFITS

VALUATIONS = ("pass", "online")


class ShapleyResampling(JointTraining):
    """Shared machinery of the two resampling methods: valuation, gathering across ranks, the plan's life cycle
    (built at epoch end, handed to the datamodule, saved in and restored from checkpoints).

    Args:
        warmup_epochs: epochs of plain joint training; the first plan is built after epoch ``warmup_epochs - 1``
            (0 and 1 both value from epoch 0 on).
        valuation: ``pass`` (the paper: eval mode, no grad, the whole training split after each epoch) or
            ``online`` (each training step's features are valued on the spot through the fusion head, so no extra
            encoder pass; values then come from the weights during the epoch, in train mode).
        benefit: ``official`` (``|S| * correct``), ``correct`` or ``true_prob``.
        drop: ``features`` (zero dropped modalities' encoder features: official code) or ``inputs`` (zero their
            inputs: the paper's wording).
        valuation_transforms: ``eval`` (default: value unaugmented items) or ``train`` (the official code values
            with the training transforms).
        **kwargs: :class:`~balance.methods.JointTraining` arguments.
    """

    trainer_settings: ClassVar[Mapping[str, Any]] = {"reload_dataloaders_every_n_epochs": 1}

    def __init__(
        self,
        warmup_epochs: int = 5,
        valuation: str = "pass",
        benefit: str = "official",
        drop: str = "features",
        valuation_transforms: str = "eval",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        options.one_of("valuation", valuation, VALUATIONS)
        options.one_of("valuation_transforms", valuation_transforms, ("eval", "train"))
        options.one_of("benefit", benefit, BENEFITS)
        options.one_of("drop", drop, DROPS)
        if valuation == "online" and drop != "features":
            raise ValueError("online valuation reuses encoder features, so it needs drop: features")
        options.integer("warmup_epochs", warmup_epochs, 0)
        self.warmup_epochs = warmup_epochs
        self.valuing = EpochWindow(start=max(warmup_epochs - 1, 0))
        self.valuation = valuation
        self.benefit = benefit
        self.drop = drop
        self.valuation_transforms = valuation_transforms
        # A modality doing all it can is worth 1 under the official benefit and 1/M under the others.
        self.contribution_scale = 1.0 if benefit == "official" else 1.0 / len(self.modalities)
        self.plan = TrainingPlan()
        self.table: ValuationTable | None = None
        self._online: dict[str, list[torch.Tensor]] = {}
        for m in self.modalities:
            self.declare_metric(f"phi_{m}")
            self.declare_metric(f"copies_{m}")
        self.declare_metric("plan_ratio")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer.datamodule is not None:
            self.trainer.datamodule.use_train_plan(self.plan)

    def valuation_settings(self) -> dict[str, str]:
        return {"benefit": self.benefit, "drop": self.drop}

    def training_valuation(self) -> ValuationTable | None:
        return self.table

    # -- valuation ---------------------------------------------------------------------------------------------

    def observe_step(self, step: Step) -> None:
        if self.valuation == "online" and self.current_epoch in self.valuing:
            self._value_online(step)

    def _value_online(self, step: Step) -> None:
        # Everything stays on the device and every row is valued, so a step never waits for the device; the rows
        # that are samples themselves (every modality present, not a planned copy) are picked at the epoch's end.
        batch = step.batch
        present = batch.get("present")
        labels = step.labels
        detached = {m: f.detach() for m, f in step.features.items()}
        values = subset_values(self.model, detached, labels, self.benefit)
        rows = {"index": batch["index"], "label": labels, "correct": step.logits.detach().argmax(dim=1) == labels,
                "phi": shapley_values(values),
                "sample": present.all(dim=1) if present is not None else torch.ones_like(labels, dtype=torch.bool)}
        for key, value in rows.items():
            self._online.setdefault(key, []).append(value)

    def on_train_epoch_start(self) -> None:
        self._online = {}

    def _value_training_split(self) -> ValuationTable:
        if self.valuation == "online":
            if not self._online:
                raise RuntimeError("online valuation saw no training sample this epoch")
            parts = {k: torch.cat(v) for k, v in self._online.items()}
            samples = parts.pop("sample")
            parts = {k: v[samples].cpu() for k, v in parts.items()}
            local = ValuationTable.sorted_by_index(parts["index"], parts["label"], parts["correct"], parts["phi"],
                                                   self.modalities)
        else:
            datamodule = self.trainer.datamodule
            loader = datamodule.unshuffled_train_dataloader(augment=self.valuation_transforms == "train")
            local = value_dataloader(self.model, loader, benefit=self.benefit, drop=self.drop, device=self.device)
        return last_per_index(gather_table(self, local))

    # -- the plan ------------------------------------------------------------------------------------------------

    def build_plan(self, table: ValuationTable, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, keep)`` for the next epoch from this epoch's valuation."""
        raise NotImplementedError

    def on_train_epoch_end(self) -> None:
        if self.current_epoch in self.valuing:
            self._replan()
        super().on_train_epoch_end()

    def _replan(self) -> None:
        self.table = self._value_training_split()
        num_samples = len(self.trainer.datamodule.datasets["train"])
        if len(self.table) != num_samples or not torch.equal(self.table.index, torch.arange(num_samples)):
            raise RuntimeError(f"valuation covered {len(self.table)} of {num_samples} training samples")
        # The method's generator is the same on every rank and restored on resume: every rank, and a resumed
        # run, draws the same plan.
        indices, keep = self.build_plan(self.table, self.generator)
        self.plan.set(indices, keep, zero_inputs=self.drop == "inputs")
        for m, value in self.table.mean().items():
            self.record(f"phi_{m}", value)
        for name, value in plan_summary(keep, self.modalities, num_samples).items():
            self.record(name, value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.plan.active:
            checkpoint["resampling_plan"] = self.plan.state_dict()
        if self.table is not None:
            t = self.table
            checkpoint["valuation_table"] = {"index": t.index, "label": t.label, "correct": t.correct, "phi": t.phi}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        plan = checkpoint.get("resampling_plan")
        if plan is not None:
            # Checkpoints written before the plan kept its own zero_inputs flag derive it from `drop`.
            self.plan.load_state_dict({"zero_inputs": self.drop == "inputs", **plan})
        table = checkpoint.get("valuation_table")
        if table is not None:
            self.table = ValuationTable(table["index"], table["label"], table["correct"], table["phi"],
                                        list(self.modalities))


class SampleLevelResampling(ShapleyResampling):
    """Sample-level modality valuation: per sample and modality, 0-3 extra copies keeping only that modality,
    the lower its contribution the more copies.

    Args:
        thresholds: ascending ``(t1, t2, t3)`` in units of a fully contributing modality: ``phi <= t1`` -> 3
            copies, ``<= t2`` -> 2, ``< t3`` -> 1, else 0 (official: -0.1, 0.4, 1). Multiplied by 1 for the
            official benefit and by 1/M for ``correct`` and ``true_prob``, whose values sum to at most 1.
        **kwargs: :class:`ShapleyResampling` arguments.
    """

    def __init__(self, thresholds: Sequence[float] = OFFICIAL_THRESHOLDS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(thresholds)

    def build_plan(self, table: ValuationTable, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return plan_from_copies(sample_level_copies(table.phi, self.thresholds, self.contribution_scale))


class ModalityLevelResampling(ShapleyResampling):
    """Modality-level valuation: mean contributions on a random part of the training split decide how many
    uniformly drawn samples are retrained keeping only the weaker modality.

    For M = 2 the official rule: ``n = int(f(|gap_a - gap_v| * 2/3) * N)`` with ``gap_m = 1 - mean phi_m``. For
    M > 2 each modality is compared with the strongest one (see :func:`balance.resampling.modality_level_extra`).

    Args:
        ratio: share of the training split drawn (with replacement) to estimate the means (official 0.2).
        alpha: strength (official 1).
        variant: ``linear`` (official default), ``tanh`` or ``power`` (the official ``square``: exponent 1.5).
        **kwargs: :class:`ShapleyResampling` arguments.
    """

    def __init__(self, ratio: float = 0.2, alpha: float = 1.0, variant: str = "linear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        options.interval("ratio", ratio, 0, 1, open_low=True)
        options.positive("alpha", alpha)
        options.one_of("variant", variant, VARIANTS)
        self.ratio = ratio
        self.alpha = alpha
        self.variant = variant

    def build_plan(self, table: ValuationTable, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mean = estimate_mean_contribution(table.phi.double(), self.ratio, generator)
        extra = modality_level_extra(mean, len(table), self.alpha, self.variant, self.contribution_scale)
        return plan_from_extra(extra, len(table), generator)

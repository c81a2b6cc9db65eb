"""`MultimodalMethod`: the base every training method stands on.

The contract a method writes against (each part is optional):

- ``loss_terms(step)``: the named loss terms of a :class:`~balance.methods.step.Step` (default: cross-entropy
  on the fused logits). The base's ``training_step`` runs the shared forward pass once (``forward_step``: features,
  fused and unimodal logits), adds the loss terms, calls ``observe_step`` and logs the metrics.
- ``observe_step(step)``: sees every training step's object (e.g. to value its samples), no extra forward pass.
- ``modify_gradients(step)``: the gradient hook, called after backward and before the optimizer step, under
  automatic optimization (from Lightning's ``on_before_optimizer_step``) and under manual optimization (through
  :meth:`MultimodalMethod.manual_optimizer_step`). Under DDP the gradients it sees are already averaged over the
  ranks, while the step's tensors are the rank's own: reduce what decides a modification with
  :meth:`MultimodalMethod.reduce_across_ranks` so that every rank modifies alike.
- ``model.modality_parameters(m)`` / ``model.shared_parameters()``: the parameters of modality m and the rest.
- ``declare_metric(name, stages)`` once in ``__init__`` and ``record(name, value)`` per step or epoch: the method's
  own controlling quantities, averaged and logged per epoch with the accuracies (never ``self.log`` per step).
- ``self.generator``: the method's seeded random generator, the same on every rank and restored on resume.
- :class:`~balance.methods.epochs.EpochWindow`: the epochs in which a mechanism is active.
- ``trainer_settings``: trainer attributes the method needs (e.g. reloading the training loader every epoch);
  the base sets them when the run starts and says so.
- ``max_modalities``: a method defined only for so many modalities (and with no generalisation) sets it, and is
  refused at build time for more; ``needs_several_modalities``: a method that works between modalities says why,
  and is refused at build time for a single one; ``runs_encoders_alone``: likewise for a method that runs an
  encoder without the others, refused with MMTM mid-fusion.
- ``parameter_groups()``: the optimizer's parameter groups (one by default), for parts that train with their own
  learning rate or weight decay.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from balance.methods.step import Step
from balance.models import MultimodalModel

STAGES = ("train", "val", "test")
#: the value a ReduceLROnPlateau schedule (``scheduler=plateau``) steps on
PLATEAU_MONITOR = "val/loss"
log = logging.getLogger(__name__)


def mean_over_present(values: torch.Tensor, present: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, count)`` of per-sample ``values`` ``[B]`` over the samples where ``present`` (``[B]`` bool; every
    sample when ``None``); the mean is 0 when no sample has the modality. No host sync: the count stays a tensor."""
    if present is None:
        return values.mean(), torch.tensor(float(len(values)), device=values.device)
    mask = present.to(values)
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1.0), count


class MultimodalMethod(pl.LightningModule):
    """Base of every method: holds the model and logs, per epoch and stage, fused accuracy, each modality's
    accuracy (through ``model.unimodal_logits``), macro-F1 and the loss, as ``<stage>/acc``,
    ``<stage>/acc_<modality>``, ``<stage>/f1`` and ``<stage>/loss``.

    A method overrides the parts of the contract it needs (module docstring); validation and test evaluate the
    method's prediction (``fused_logits``). A subclass that overrides an ``on_<stage>_epoch_end`` hook calls
    ``super()`` so the stage's metrics are logged.

    Args:
        model: the multimodal model.
        optimizer: a ``_partial_`` optimizer taking the parameters.
        scheduler: an optional ``_partial_`` LR scheduler taking the optimizer, stepped once per epoch (a
            ``ReduceLROnPlateau`` on the epoch's validation loss).
    """

    #: trainer attributes the method needs, set when the run starts (e.g. ``{"reload_dataloaders_every_n_epochs": 1}``)
    trainer_settings: ClassVar[Mapping[str, Any]] = {}
    #: the most modalities the method is defined for (``None``: any number)
    max_modalities: ClassVar[int | None] = None
    #: why the method needs at least two modalities (e.g. "AGM compares modalities"); ``None``: one is enough
    needs_several_modalities: ClassVar[str | None] = None
    #: why the method runs an encoder without the others (e.g. "UME trains each modality's model on its own");
    #: ``None``: the encoders may be linked by mid-fusion
    runs_encoders_alone: ClassVar[str | None] = None

    def __init__(
        self,
        model: MultimodalModel,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        if self.max_modalities is not None and len(model.modalities) > self.max_modalities:
            raise ValueError(f"{type(self).__name__} is defined for at most {self.max_modalities} modalities; the "
                             f"model has {len(model.modalities)} ({list(model.modalities)})")
        if self.needs_several_modalities is not None and len(model.modalities) < 2:
            raise ValueError(f"{self.needs_several_modalities}: it needs at least two modalities, the model has "
                             f"{list(model.modalities)}")
        if self.runs_encoders_alone is not None and model.mid_fusion is not None:
            raise ValueError(f"{self.runs_encoders_alone}, but model.mmtm links the encoders: set model.mmtm=null")
        self.model = model
        self.modalities = list(model.modalities)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # nn.Module already has a `train` attribute, so the collections are named `<stage>_metrics`.
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", self._stage_metrics(model.num_classes, self.modalities))
            setattr(self, f"{stage}_method_metrics", nn.ModuleDict())
        self._generators: dict[str, torch.Generator] = {}
        self._generator_states: dict[str, torch.Tensor] = {}
        self._pending_step: Step | None = None
        #: the run's resolved ``data``, ``model`` and ``method`` configs (set by ``balance.run.build``), saved in
        #: checkpoints so that one moved out of its run directory can still be rebuilt as it was trained
        self.run_config: dict[str, Any] | None = None
        #: the epoch of the checkpoint last loaded (None before any), for reports of which epoch was evaluated
        self.loaded_epoch: int | None = None

    def report_modalities(self, modalities: Sequence[str]) -> None:
        """Reports ``acc_<m>`` only for ``modalities`` (default: all), for a method whose model predicts from
        fewer modalities than the data has (``unimodal``): the others' own predictions would mean nothing."""
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", self._stage_metrics(self.model.num_classes, modalities))

    @staticmethod
    def _stage_metrics(num_classes: int, modalities: Sequence[str]) -> MetricCollection:
        metrics = {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        }
        metrics |= {f"acc_{m}": MulticlassAccuracy(num_classes, average="micro") for m in modalities}
        metrics["loss"] = MeanMetric()
        return MetricCollection(metrics)

    def forward(self, inputs: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(inputs, keep)

    # -- the step contract ---------------------------------------------------------------------------------------

    def forward_step(self, batch: Mapping[str, Any], batch_idx: int) -> Step:
        """The shared forward pass: every encoder once, the fused logits (missing modalities dropped by
        ``present``), each modality's own logits, and the method's loss terms."""
        features = self.encode_batch(batch)
        step = Step(batch, batch_idx, features, self.fuse(features, keep=batch.get("present")),
                    self.unimodal_logits(features))
        step.losses = dict(self.loss_terms(step))
        return step

    def encode_batch(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The training step's encoder features: every encoder once. A method that changes how the encoders run
        in training (e.g. Greedy's curated cross-modal flow) overrides it; evaluation always runs them plainly."""
        return self.model.encode(batch["inputs"])

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each modality's own logits, in training and evaluation (its ``acc_<m>``): the fusion head's convention
        here; a method with unimodal heads of its own (e.g. MMPareto) returns theirs."""
        return self.model.unimodal_logits(features)

    def loss_terms(self, step: Step) -> Mapping[str, torch.Tensor]:
        """The step's named loss terms (summed into its loss); cross-entropy on the fused logits here."""
        return {"fused": F.cross_entropy(step.logits, step.labels)}

    @staticmethod
    def unimodal_losses(step: Step) -> dict[str, torch.Tensor]:
        """Each modality's cross-entropy on its own logits, over the samples where it is present (a missing
        modality's zeroed input has nothing to teach its own branch); 0 for a modality absent from the batch."""
        present = step.batch.get("present")
        return {m: mean_over_present(F.cross_entropy(logits, step.labels, reduction="none"),
                                     None if present is None else present[:, i])[0]
                for i, (m, logits) in enumerate(step.unimodal_logits.items())}

    def observe_step(self, step: Step) -> None:
        """Called every training step with the step's object (after its loss terms, before backward); does
        nothing here. A method can value the step's samples here without another forward pass."""

    def modify_gradients(self, step: Step) -> None:
        """The gradient hook: called after backward and before the optimizer step with the step whose loss was
        backpropagated (the last one when gradients accumulate); does nothing here."""

    def check_finite(self, step: Step, loss: torch.Tensor) -> None:
        """Stops the run at the first non-finite training loss, naming the epoch, the step and the loss terms:
        training on would only end with chance accuracy and NaN in every result. Under DDP every rank stops
        together (one more all-reduce per step): a rank stopping alone would leave the others waiting for it in
        the next gradient all-reduce until the process group times out."""
        failing = self.reduce_across_ranks((~torch.isfinite(loss.detach())).float())
        if failing > 0:
            terms = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in step.losses.items())
            ranks = "" if self._trainer is None or self.trainer.world_size == 1 else (
                f" on {int(failing)} of {self.trainer.world_size} ranks (this rank, {self.global_rank}: "
                f"{'non-finite' if not torch.isfinite(loss) else 'finite'})")
            raise FloatingPointError(
                f"non-finite training loss{ranks} in epoch {self.current_epoch}, step {self.global_step} (batch "
                f"{step.batch_idx}{'' if step.modality is None else ', modality ' + step.modality}): {terms}. "
                "Lower the learning rate (method.optimizer.lr), clip gradients (+trainer.gradient_clip_val=1.0), "
                "or check the inputs for NaN or infinite values")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.forward_step(batch, batch_idx)
        self.observe_step(step)
        self._pending_step = step
        loss = step.loss
        self.check_finite(step, loss)
        self.log_metrics("train", step.logits.detach(), {m: u.detach() for m, u in step.unimodal_logits.items()},
                         step.labels, loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Under manual optimization `manual_optimizer_step` calls the hook itself, before clipping.
        if self.automatic_optimization and self._pending_step is not None:
            self.modify_gradients(self._pending_step)
            self._pending_step = None

    def manual_optimizer_step(self, step: Step, loss: torch.Tensor, optimizer: Any,
                              gradient_clip_val: float | None = None) -> None:
        """One optimizer step under manual optimization: backward, the gradient hook, optional norm clipping,
        the step, zeroed gradients."""
        self.check_finite(step, loss)
        self.manual_backward(loss)
        self.modify_gradients(step)
        if gradient_clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        optimizer.zero_grad()

    def epoch_schedulers(self) -> list[Any]:
        """The learning-rate schedulers :meth:`configure_optimizers` returned, as a list (empty without one), for
        a method under manual optimization to step with :meth:`step_scheduler`."""
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, list) else [schedulers]

    def step_scheduler(self, scheduler: Any) -> None:
        """Steps an epoch schedule by hand (Lightning steps them only under automatic optimization): a
        ``ReduceLROnPlateau`` on this epoch's :data:`PLATEAU_MONITOR`, which must have been logged."""
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if PLATEAU_MONITOR not in self.trainer.callback_metrics:
                raise RuntimeError(f"a ReduceLROnPlateau schedule steps on {PLATEAU_MONITOR}, which this epoch did "
                                   "not log: validate every epoch, or use another scheduler")
            scheduler.step(self.trainer.callback_metrics[PLATEAU_MONITOR])
        else:
            scheduler.step()

    def fitted_datamodule(self, purpose: str) -> Any:
        """The datamodule the trainer fits, for a method that reads its splits itself; refused with ``purpose``
        (e.g. "LFM learns its weights on the validation split") when the trainer was given loaders instead."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError(f"{purpose}: fit it with trainer.fit(method, datamodule=...)")
        return datamodule

    def mean_across_ranks(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each of ``tensors`` averaged over the DDP ranks, all in one reduction (e.g. gradients that the method
        holds outside ``.grad``); the tensors themselves on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return list(tensors)
        flat = self.reduce_across_ranks(torch.cat([t.flatten() for t in tensors]), "mean")
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def reduce_across_ranks(self, value: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``value`` summed (``op="sum"``) or averaged (``"mean"``) over the DDP ranks; itself on one process."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value, reduce_op=op)

    # -- per-epoch method metrics ----------------------------------------------------------------------------------

    def declare_metric(self, name: str, stages: Iterable[str] = ("train",)) -> None:
        """Declares a method quantity logged once per epoch as ``<stage>/<name>`` (its mean over what
        :meth:`record` received that epoch, synced across ranks like the accuracies)."""
        for stage in stages:
            if stage not in STAGES:
                raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
            getattr(self, f"{stage}_method_metrics")[name] = MeanMetric()

    def record(self, name: str, value: torch.Tensor | float, stage: str = "train",
               weight: torch.Tensor | float = 1.0) -> None:
        """Adds one observation of a declared method metric (weighted, e.g. by the batch size)."""
        try:
            metric = getattr(self, f"{stage}_method_metrics")[name]
        except (AttributeError, KeyError):
            raise KeyError(f"method metric {stage}/{name} was not declared (declare_metric in __init__)") from None
        value = torch.as_tensor(value, dtype=torch.float32, device=self.device).detach()
        metric.update(value, weight=torch.as_tensor(weight, dtype=torch.float32, device=self.device))

    def record_over_present(self, name: str, values: torch.Tensor, present: torch.Tensor | None,
                            stage: str = "train") -> torch.Tensor:
        """Records the mean of per-sample ``values`` over the samples that have the modality (``present``, its
        ``[B]`` column of the batch's mask; every sample when ``None``), weighted by their number, and returns that
        mean with its graph (a loss term can be the recorded quantity)."""
        mean, count = mean_over_present(values, present)
        self.record(name, mean, stage, weight=count)
        return mean

    # -- the method's random generator ----------------------------------------------------------------------------

    @property
    def generator(self) -> torch.Generator:
        """The method's own CPU random generator (masks, resampling draws): seeded from the run's seed, so the
        same on every rank, and saved in checkpoints, so a resumed run draws what the uninterrupted one did."""
        return self.generator_on(torch.device("cpu"))

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        """The method's random generator on ``device`` (e.g. gradient noise drawn where the gradients are, with
        no copy from the host); seeded and checkpointed like :attr:`generator`, one per device type."""
        key = torch.device(device).type
        if key not in self._generators:
            generator = torch.Generator(device=device)
            # Each device type its own stream: a method drawing on the GPU leaves the CPU draws as they were.
            generator.manual_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)) + (0 if key == "cpu" else 1))
            if key in self._generator_states:
                generator.set_state(self._generator_states.pop(key))
            self._generators[key] = generator
        return self._generators[key]

    # -- valuation -------------------------------------------------------------------------------------------------

    def valuation_settings(self) -> dict[str, str]:
        """The method's own valuation options (``benefit``, ``drop``), which the contribution callback follows
        unless it is given its own; none here."""
        return {}

    def training_valuation(self) -> Any:
        """The method's latest valuation of the training split (a :class:`~balance.valuation.ValuationTable`),
        for the contribution callback to record; ``None`` for a method that values nothing itself."""
        return None

    # -- trainer settings -------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        for key, value in self.trainer_settings.items():
            if getattr(self.trainer, key) != value:
                log.info("%s sets trainer.%s=%s (it needs it)", type(self).__name__, key, value)
                setattr(self.trainer, key, value)

    def log_metrics(
        self,
        stage: str,
        logits: torch.Tensor,
        unimodal_logits: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        loss: torch.Tensor,
    ) -> None:
        """Accumulates the fused, per-modality and F1 metrics and the batch-weighted loss of one batch; they are
        computed (synced across ranks), logged and reset at the stage's epoch end.

        Logging once per epoch instead of calling ``self.log`` per metric per step matters on small models: each
        ``self.log`` call costs Lightning about 0.3 ms of bookkeeping (benchmarks/README.md).
        """
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        metrics["acc"].update(logits, labels)
        metrics["f1"].update(logits, labels)
        for m, unimodal in unimodal_logits.items():
            metrics[f"acc_{m}"].update(unimodal, labels)
        metrics["loss"].update(loss.detach(), weight=labels.shape[0])

    def log_epoch_metrics(self, stage: str) -> None:
        """Logs ``<stage>/<metric>`` for the epoch's accumulated metrics and resets them (no-op if none)."""
        metrics: MetricCollection = getattr(self, f"{stage}_metrics")
        if metrics["acc"].update_count == 0:
            return
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        for name, metric in getattr(self, f"{stage}_method_metrics").items():
            if metric.update_count:
                values[f"{stage}/{name}"] = metric.compute()
            metric.reset()
        shown = {f"{stage}/acc", "train/loss"}
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown})

    def on_train_epoch_end(self) -> None:
        self._pending_step = None
        self.log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self.log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self.log_epoch_metrics("test")

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The fused logits of training (and of evaluation, unless :meth:`fused_logits` says otherwise): the
        model's fusion head here; a method whose fusion is its own (e.g. QMF's confidence-weighted sum of the
        modalities' logits) overrides it."""
        return self.model.fuse(features, keep)

    def fused_logits(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The method's prediction (fused logits) from encoded features; ``keep`` (``BoolTensor[B, M]``) drops
        modalities by zeroing their features. Diagnostics evaluate every method through this. It is
        :meth:`fuse` unless a method predicts otherwise at test time (MLA's entropy-weighted fusion)."""
        return self.fuse(features, keep)

    def evaluation_step(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        """Logs the batch's metrics; returns ``{"loss", "features"}``: the encoded features go to the callbacks'
        ``on_validation_batch_end`` / ``on_test_batch_end`` (the contribution callback values them without running
        the encoders again)."""
        features = self.model.encode(batch["inputs"])
        logits = self.fused_logits(features, keep=batch.get("present"))
        loss = nn.functional.cross_entropy(logits, batch["label"])
        self.log_metrics(stage, logits, self.unimodal_logits(features), batch["label"], loss)
        return {"loss": loss, "features": features}

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluation_step(batch, "test")

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group of every trainable parameter here. A method with parts of
        its own that train with other options (e.g. auxiliary classifiers at their own learning rate) returns more
        groups, each a dict with ``params`` and the options it overrides (``lr``, ``weight_decay``, ...)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        schedule = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # A plateau schedule steps on a monitored value: the validation loss, logged every epoch.
            schedule["monitor"] = PLATEAU_MONITOR
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    # The global RNG drives shuffling and augmentation; keeping it in the checkpoint lets a resumed run draw
    # exactly what the uninterrupted run would have drawn. Stored as tensors and ints so that checkpoints still
    # load with torch.load(weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
            "python": random.getstate(),
        }
        # States restored but not drawn from since are saved too, or a resume of the resume would reseed them.
        checkpoint["method_generators"] = {**self._generator_states,
                                           **{key: g.get_state() for key, g in self._generators.items()}}
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_epoch = checkpoint.get("epoch")
        states = checkpoint.get("rng_states")
        if states is not None:
            torch.set_rng_state(states["torch"])
            kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
            random.setstate(states["python"])
        # Applied as soon as a generator of that device type is made (now, if it exists already).
        self._generator_states.update(checkpoint.get("method_generators", {}))
        for key in list(self._generator_states):
            if key in self._generators:
                self._generators[key].set_state(self._generator_states.pop(key))

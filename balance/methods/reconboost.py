"""ReconBoost: Boosting Can Achieve Modality Reconcilement (Hua et al., ICML 2024).

Training alternates over the modalities in stages. A stage belongs to one modality (the turn cycles through
``order``) and has two phases, each a number of whole epochs:

- the learner phase trains that modality's learner alone (its encoder and the head) on a boosting loss: a
  cross-entropy whose weight per sample shrinks as the ensemble of the *other* learners gets the sample right,
  ``-w1 y log p_m + w2 y p_ens log p_m`` (averaged over classes, as the official code), plus ``alpha`` times the
  memory-consolidation term GA-MSE: the squared distance between the learner's class probabilities and those of
  the previous stage's learner;
- the correction phase (the paper's global rectification) trains every learner of the ensemble, and the learnable
  boost rate ``beta``, on the cross-entropy of the ensemble ``beta * sum_m z_m``.

The ensemble grows: a learner enters it when its first stage begins (the official code without pretrained
learners); ``warmup_epochs`` of correction over every learner first stand in for the official pretrained ones.
The prediction, in training and evaluation, is ``beta * sum_m z_m`` over the ensemble's learners. Which phase an
epoch is in, and whose turn it is, follow from the epoch alone, so a resumed run and every DDP rank agree.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from balance import options
from balance.methods.base import MultimodalMethod
from balance.methods.step import Step

PHASES = ("warmup", "learner", "correction")
#: ``working``: GA-MSE trains the learner (the paper's intent); ``official``: both arguments detached, as the
#: official code (and BalanceBenchmark) compute it, so the term adds a constant and no gradient.
GA_MSE = ("working", "official")


@dataclass(frozen=True)
class Turn:
    """Where an epoch falls in ReconBoost's schedule.

    Attributes:
        phase: ``warmup``, ``learner`` or ``correction`` (one of :data:`PHASES`).
        stage: the stage, 0-based; -1 in the warm-up.
        learner: the modality whose stage it is; ``None`` in the warm-up.
        starts_phase: whether the epoch is the first of its phase (its optimizer starts afresh there).
    """

    phase: str
    stage: int
    learner: str | None
    starts_phase: bool


def schedule(epoch: int, order: Sequence[str], learner_epochs: int, correction_epochs: int,
             warmup_epochs: int = 0) -> Turn:
    """The turn of ``epoch``: ``warmup_epochs`` of warm-up, then stages of ``learner_epochs`` learner epochs and
    ``correction_epochs`` correction epochs, stage ``s`` belonging to ``order[s % M]``."""
    if epoch < warmup_epochs:
        return Turn("warmup", -1, None, epoch == 0)
    stage, position = divmod(epoch - warmup_epochs, learner_epochs + correction_epochs)
    learner = order[stage % len(order)]
    if position < learner_epochs:
        return Turn("learner", stage, learner, position == 0)
    return Turn("correction", stage, learner, position == learner_epochs)


def ensemble_members(turn: Turn, order: Sequence[str], warmup_epochs: int) -> list[str]:
    """The learners in the ensemble during ``turn``: each from the start of its first stage on (the official code
    without pretrained learners), or every learner when a warm-up trained them all first."""
    if warmup_epochs > 0:
        return list(order)
    return list(order[:turn.stage + 1])


def previous_learner(turn: Turn, order: Sequence[str]) -> str | None:
    """The modality of the previous stage, which GA-MSE holds the learner to; ``None`` in the first stage (the
    official code skips the term there) and in the warm-up. For two modalities it is the other one."""
    if turn.stage < 1:
        return None
    return order[(turn.stage - 1) % len(order)]


def boosted_ensemble(logits: Mapping[str, torch.Tensor], members: Collection[str], boost_rate: torch.Tensor,
                     present: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """``boost_rate * sum_{k in members} z_k`` (``[B, C]``), a sample's missing modality adding nothing
    (``present``: modality -> ``[B]`` bool); ``None`` when ``members`` is empty."""
    terms = [logits[k] if present is None else logits[k] * present[k].unsqueeze(1).to(logits[k])
             for k in logits if k in members]
    if not terms:
        return None
    return boost_rate * torch.stack(terms).sum(0)


def ensemble_true_probability(ensemble: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """``p_ens,y``: the true-class probability of the ensemble's logits (``[B]``, no gradient); 1 for every sample
    when the ensemble is empty, as the official code's constant ensemble (``c0``, one logit) gives."""
    if ensemble is None:
        return torch.ones(len(labels), device=labels.device)
    return F.softmax(ensemble.detach(), dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)


def boosting_loss(logits: torch.Tensor, ensemble_probability: torch.Tensor, labels: torch.Tensor,
                  weight1: float, weight2: float) -> torch.Tensor:
    """Per sample ``[B]``: ``mean_c(-w1 y log p_m + w2 y p_ens log p_m) = -(w1 - w2 p_ens,y) log p_m,y / C``.

    The second term is the KL-based reconcilement against the other learners: a sample their ensemble already
    classifies well teaches this learner less. The mean over the ``C`` classes is the official code's.
    """
    log_p = F.log_softmax(logits, dim=1).gather(1, labels.unsqueeze(1)).squeeze(1)
    return -(weight1 - weight2 * ensemble_probability) * log_p / logits.shape[1]


def ga_mse(logits: torch.Tensor, previous_logits: torch.Tensor, working: bool = True) -> torch.Tensor:
    """Per sample ``[B]``: ``mean_c (softmax(z_m) - softmax(z_prev))^2``, the squared difference of the two
    learners' cross-entropy gradients with respect to their logits (``p - y``), whose batch mean is the official
    ``MSELoss``. The previous learner is a fixed target; ``working=False`` also detaches ``z_m`` (the official code),
    which leaves the term without a gradient."""
    p = F.softmax(logits if working else logits.detach(), dim=1)
    return (p - F.softmax(previous_logits.detach(), dim=1)).pow(2).mean(1)


class ReconBoost(MultimodalMethod):
    """Alternating boosting over modality learners with a global correction phase (module docstring).

    The learners are the fusion head's unimodal logits ``z_m`` (``method=reconboost`` selects the shared head, the
    official code's common space). Manual optimization with two optimizers built from ``method.optimizer``: one
    for the learner phase (the model; only the learner in training gets gradients) and one for the correction
    phase and warm-up (the model and ``boost_rate``). Each starts afresh (its state cleared) at the first epoch of
    each of its phases, as the official code builds new optimizers there; a scheduler is built for each and stepped
    once per epoch. The ensemble's membership is a buffer, so a checkpoint predicts with the learners it had.

    Args:
        learner_epochs: epochs of a stage's learner phase (official ``epochs_per_stage``, 4).
        correction_epochs: epochs of a stage's correction phase (official ``correct_epoch``, 4; 0: none).
        weight1: ``w1``, weight of the learner's cross-entropy (official 5 CREMA-D, 4 AVE and ModelNet40, 1 MSA).
        weight2: ``w2``, weight of the reconcilement term, at most ``weight1`` (official 1; 0.25 MSA).
        alpha: weight of GA-MSE (official 0.5; 0: off).
        ga_mse: ``working`` (the term trains the learner) or ``official`` (both arguments detached, no gradient).
        boost_rate: the initial boost rate ``beta`` (official 1.0; BalanceBenchmark 0.01); learnt in correction.
        warmup_epochs: epochs of correction over every learner before the first stage (0: the official code
            without pretrained learners, whose ensemble grows stage by stage).
        order: the modalities' order of turns (default: the model's; official CREMA-D/AVE audio first).
        correction_lr: the correction optimizer's learning rate (official ``e_lr``); ``None``: the optimizer's.
        **kwargs: the base method's arguments (model, optimizer, scheduler).
    """

    needs_several_modalities = "ReconBoost alternates between modalities"
    runs_encoders_alone = "ReconBoost trains one modality's learner at a time"

    def __init__(
        self,
        learner_epochs: int = 4,
        correction_epochs: int = 4,
        weight1: float = 5.0,
        weight2: float = 1.0,
        alpha: float = 0.5,
        ga_mse: str = "working",
        boost_rate: float = 1.0,
        warmup_epochs: int = 0,
        order: Sequence[str] | None = None,
        correction_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        options.integer("learner_epochs", learner_epochs, 1)
        options.integer("correction_epochs", correction_epochs, 0)
        options.integer("warmup_epochs", warmup_epochs, 0)
        options.positive("weight1", weight1)
        options.interval("weight2", weight2, 0, weight1)
        options.non_negative("alpha", alpha)
        options.one_of("ga_mse", ga_mse, GA_MSE)
        options.positive("boost_rate", boost_rate)
        options.positive("correction_lr", correction_lr, optional=True)
        self.order = list(order) if order is not None else list(self.modalities)
        if sorted(self.order) != sorted(self.modalities):
            raise ValueError(f"method.order must list each of {self.modalities} once, got {self.order}")
        self.learner_epochs = learner_epochs
        self.correction_epochs = correction_epochs
        self.warmup_epochs = warmup_epochs
        self.weight1 = float(weight1)
        self.weight2 = float(weight2)
        self.alpha = float(alpha)
        self.ga_mse = ga_mse
        self.correction_lr = correction_lr
        self.boost_rate = nn.Parameter(torch.tensor(float(boost_rate)))
        # The ensemble's learners (model order); set from the schedule each epoch and saved with the weights, so
        # a checkpoint from an early stage predicts without the learners that had not trained yet.
        self.register_buffer("members", torch.zeros(len(self.modalities), dtype=torch.bool))
        for name in ("learner", "phase", "boost_rate", "ensemble_prob", "boosting", "ga_mse"):
            self.declare_metric(name)

    # -- the schedule ------------------------------------------------------------------------------------------------

    def turn(self) -> Turn:
        """The schedule's turn at the current epoch."""
        return schedule(self.current_epoch, self.order, self.learner_epochs, self.correction_epochs,
                        self.warmup_epochs)

    def member_names(self) -> list[str]:
        """The modalities whose learners are in the ensemble now."""
        return [m for m, inside in zip(self.modalities, self.members.tolist()) if inside]

    def on_train_epoch_start(self) -> None:
        turn = self.turn()
        members = ensemble_members(turn, self.order, self.warmup_epochs)
        self.members.copy_(torch.tensor([m in members for m in self.modalities]))
        if turn.starts_phase:
            # The official code builds a new optimizer for every phase: no momentum carries over from the last.
            self._phase_optimizer(turn).optimizer.state.clear()

    def _phase_optimizer(self, turn: Turn) -> Any:
        learner, correction = self.optimizers()
        return learner if turn.phase == "learner" else correction

    # -- training ------------------------------------------------------------------------------------------------------

    def _present(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        present = batch.get("present")
        return None if present is None else {m: present[:, i] for i, m in enumerate(self.modalities)}

    def _encode(self, inputs: Mapping[str, Any], trained: Collection[str]) -> dict[str, torch.Tensor]:
        """Every modality's features, with a graph only for the ``trained`` ones: the others are constants of the
        step (the official code runs them under ``no_grad``), and their encoders still see the batch in train mode."""
        features = {}
        for m in self.modalities:
            with torch.set_grad_enabled(m in trained and torch.is_grad_enabled()):
                features[m] = self.model.encode_modality(m, inputs[m])
        return features

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        turn = self.turn()
        members = self.member_names()
        present = self._present(batch)
        trained = [turn.learner] if turn.phase == "learner" else members
        features = self._encode(batch["inputs"], trained)
        logits = self.model.unimodal_logits(features)
        if turn.phase == "learner":
            step = self._learner_step(batch, batch_idx, turn, features, logits, members, present)
        else:
            step = Step(batch, batch_idx, features, boosted_ensemble(logits, members, self.boost_rate, present),
                        logits)
            step.losses = {"ensemble": F.cross_entropy(step.logits, step.labels)}
        loss = step.loss
        self.manual_optimizer_step(step, loss, self._phase_optimizer(turn))
        self._record_turn(turn)
        # train/loss is the cross-entropy of the prediction, as val/loss: the phases' objectives differ in scale
        # (the boosting loss is averaged over classes), so their values would not make one curve.
        fused = boosted_ensemble(logits, members, self.boost_rate, present).detach()
        self.log_metrics("train", fused, {m: z.detach() for m, z in logits.items()}, step.labels,
                         F.cross_entropy(fused, step.labels))

    def _learner_step(self, batch: Mapping[str, Any], batch_idx: int, turn: Turn, features: dict[str, torch.Tensor],
                      logits: dict[str, torch.Tensor], members: list[str],
                      present: Mapping[str, torch.Tensor] | None) -> Step:
        """The learner phase's loss terms: the boosting loss against the other learners' ensemble, and GA-MSE
        against the previous stage's learner."""
        m, labels = turn.learner, batch["label"]
        others = [k for k in members if k != m]
        probability = ensemble_true_probability(boosted_ensemble(logits, others, self.boost_rate, present), labels)
        mask = None if present is None else present[m]
        self.record_over_present("ensemble_prob", probability, mask)
        losses = {"boosting": self.record_over_present(
            "boosting", boosting_loss(logits[m], probability, labels, self.weight1, self.weight2), mask)}
        previous = previous_learner(turn, self.order)
        if previous is not None and self.alpha > 0:
            both = None if present is None else present[m] & present[previous]
            distance = self.record_over_present(
                "ga_mse", ga_mse(logits[m], logits[previous], self.ga_mse == "working"), both)
            losses["ga_mse"] = self.alpha * distance
        return Step(batch, batch_idx, features, None, {m: logits[m]}, losses, modality=m)

    def _record_turn(self, turn: Turn) -> None:
        self.record("learner", -1 if turn.learner is None else self.modalities.index(turn.learner))
        self.record("phase", PHASES.index(turn.phase))
        self.record("boost_rate", self.boost_rate.detach())

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        for scheduler in self.epoch_schedulers():
            self.step_scheduler(scheduler)

    # -- prediction and optimizers -------------------------------------------------------------------------------------

    def fuse(self, features: Mapping[str, torch.Tensor], keep: torch.Tensor | None = None) -> torch.Tensor:
        """The ensemble's logits ``beta * sum_m z_m`` over its learners (zeros before any learner has trained);
        ``keep`` drops modalities, which then add nothing."""
        logits = self.model.unimodal_logits(features)
        present = None if keep is None else {m: keep[:, i] for i, m in enumerate(self.modalities)}
        fused = boosted_ensemble(logits, self.member_names(), self.boost_rate, present)
        return torch.zeros_like(next(iter(logits.values()))) if fused is None else fused

    def configure_optimizers(self) -> Any:
        model = [p for p in self.model.parameters() if p.requires_grad]
        correction_group = {"params": [*model, self.boost_rate]}
        if self.correction_lr is not None:
            correction_group["lr"] = self.correction_lr
        optimizers = [self.optimizer_factory(params=[{"params": model}]),
                      self.optimizer_factory(params=[correction_group])]
        if self.scheduler_factory is None:
            return optimizers
        return optimizers, [self.scheduler_factory(optimizer=o) for o in optimizers]

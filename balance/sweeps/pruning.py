"""Pruning of a study's bad trials from the per-epoch validation accuracy.

A run inside a study (``python train.py -m hparams_search=<name>``, the study sweeper of :mod:`balance.sweeps.study`)
reports its monitored metric to its trial after every validation epoch; when the study's pruner judges the trial
worse than the others at the same epoch, the run stops by raising :class:`optuna.TrialPruned`, which the sweeper
records as a pruned trial. Outside a study (a single run, another sweeper) the callback does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger(__name__)

#: the sweeper class whose runs report to their trials
STUDY_SWEEPER = "hydra_plugins.balance_study.study_sweeper.StudySweeper"


def current_trial() -> Any:
    """The Optuna trial this run is, or None outside a study with a pruner.

    The study sweeper numbers each run by its trial (``hydra.job.num``), and the run finds the study through the
    sweeper's storage and name in its own Hydra config.
    """
    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    sweeper = hydra.sweeper
    if hydra.mode != RunMode.MULTIRUN or sweeper.get("_target_") != STUDY_SWEEPER or sweeper.get("pruner") is None:
        return None
    import optuna

    study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage,
                              pruner=instantiate(sweeper.pruner))
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == hydra.job.num), None)
    if trial is None:
        raise RuntimeError(f"run {hydra.job.num} of the sweep finds no trial numbered so in study "
                           f"{sweeper.study_name!r} ({sweeper.storage})")
    return optuna.trial.Trial(study, trial._trial_id)


class StudyPruning(pl.Callback):
    """Reports ``monitor`` to the run's trial after every validation epoch and stops a trial the pruner prunes.

    Args:
        monitor: the logged validation metric the study's pruner compares (the objective: ``val/acc``).
    """

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self.trial: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.trial = current_trial()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return  # the final validation of the selected epoch is no epoch of training
        prune, value = False, None
        if self.trial is not None:
            value = trainer.callback_metrics.get(self.monitor)
            if value is None:
                raise KeyError(f"StudyPruning monitors {self.monitor!r}, which this run does not log; logged: "
                               f"{sorted(trainer.callback_metrics)}")
            self.trial.report(float(value), step=trainer.current_epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune):
            import optuna

            raise optuna.TrialPruned(f"after epoch {trainer.current_epoch}: {self.monitor} "
                                     f"{'' if value is None else f'{float(value):.4f}'}")

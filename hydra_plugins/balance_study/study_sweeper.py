"""The Optuna study sweeper (``hydra/sweeper=optuna_study``) as Hydra finds it; the work is in
:mod:`balance.sweeps.study`, imported only when the sweeper is used (so a missing extra breaks nothing else)."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from balance.sweeps.plugins import missing_plugin_message


class StudySweeper(Sweeper):
    """See :class:`balance.sweeps.study.StudySweeperImpl` for the arguments."""

    def __init__(self, **kwargs: Any) -> None:
        try:
            from balance.sweeps.study import StudySweeperImpl
        except ImportError as error:
            raise ImportError(missing_plugin_message("hydra/sweeper=optuna_study", error)) from error
        self.sweeper = StudySweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)

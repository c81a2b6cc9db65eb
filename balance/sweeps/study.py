"""An Optuna study as a Hydra sweeper, on the ``hydra-optuna-sweeper`` plugin's search space and samplers.

What it adds to the plugin's sweeper: the study is its sweep directory's (SQLite storage there), ``n_trials`` is
the study's total, so a second invocation continues an interrupted study instead of adding ``n_trials`` more (runs
that were interrupted are marked failed and their parameters tried again); each trial's run directory is numbered
by its trial (``<sweep dir>/<trial number>``), so a continued study never overwrites an earlier trial's run; trials
that :class:`~balance.sweeps.pruning.StudyPruning` stops are recorded as pruned; the study refuses to continue
with other fixed overrides (another objective); and the report (:func:`~balance.sweeps.study_report.write_report`)
is written at the end.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig
from optuna.trial import TrialState

from balance.sweeps.study_report import write_report

log = logging.getLogger(__name__)

#: the study's user attribute holding the overrides every trial shares (its objective)
FIXED_OVERRIDES = "fixed_overrides"
#: overrides that change how a run is shown, not what it measures: a study continues whatever they are
PRESENTATION = ("trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps", "logger")


class StudySweeperImpl(OptunaSweeperImpl):
    """The plugin's sweeper with a resumable study, trial-numbered runs, pruning and a report.

    Args:
        sampler: an Optuna sampler, or a partial one (``_partial_: true``) with a ``seed``: then the study is the
            same on every machine, and a continued study seeds it with ``seed`` plus its trials so far (the same
            seed again would draw the first trials' parameters again).
        direction: ``maximize`` or ``minimize`` (one objective: ``train.py`` returns validation accuracy).
        storage: the study's database URL (the presets: ``sqlite:///<sweep dir>/study.db``).
        study_name: the study's name in the storage.
        n_trials: trials the study has in all; a continued study runs only those still to run.
        n_jobs: trials launched at once (with a parallel launcher, e.g. ``hydra/launcher=joblib``).
        max_failure_rate: the share of failed trials in a batch above which the sweep stops.
        params: the search space, ``{key: "interval(...)" | "tag(log, interval(...))" | "choice(...)" | value}``.
        pruner: an Optuna pruner, or None: trials report ``val/acc`` per epoch and the pruner stops bad ones.
    """

    def __init__(self, sampler: Any, direction: Any, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float, params: DictConfig | None, pruner: Any = None) -> None:
        super().__init__(sampler, direction, storage, study_name, n_trials, n_jobs, max_failure_rate,
                         search_space=None, custom_search_space=None, params=params)
        if isinstance(sampler, functools.partial) and sampler.func is optuna.samplers.GridSampler:
            raise ValueError("the study sweeper takes a sampler, not a grid: sweep a grid with Hydra's own sweeper "
                             "(python train.py -m key=a,b,c)")
        if pruner is not None and storage is None:
            raise ValueError("pruning needs the study in a storage the runs can reach (hydra.sweeper.storage)")
        self.pruner = pruner

    def sweep(self, arguments: list[str]) -> None:
        directions = self._get_directions()
        if len(directions) != 1:
            raise ValueError(f"the study sweeper optimises one value (validation accuracy), got {directions}")
        distributions, fixed = create_params_from_overrides([*self._parse_sweeper_params_config(), *arguments])
        for name in fixed:
            distributions.pop(name, None)
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                    pruner=self.pruner or optuna.pruners.NopPruner(), direction=directions[0],
                                    load_if_exists=True)
        study.sampler = self._sampler(len(study.trials))
        _check_same_objective(study, fixed)
        _retry_interrupted(study)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
        to_go = max(0, self.n_trials - done)
        log.info("study %s in %s: %d of %d trials done, %d to run (search space: %s)", study.study_name,
                 self.storage, done, self.n_trials, to_go, ", ".join(distributions) or "none")
        while to_go > 0:
            trials = [study.ask() for _ in range(min(to_go, self.n_jobs))]
            overrides = self._configure_trials(trials, distributions, fixed)
            returns = self._launch(trials, overrides)
            failures = [ret for trial, ret in zip(trials, returns) if not self._tell(study, trial, ret)]
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error("%d of %d trials failed (max_failure_rate=%s)", len(failures), len(returns),
                          self.max_failure_rate)
                failures[0].return_value  # noqa: B018 - raises the trial's own error, with its traceback
            to_go -= len(trials)
        # Read again: the runs reported their epochs from their own processes, which this process's copy lacks.
        if self.storage is not None:
            study = optuna.load_study(study_name=study.study_name, storage=self.storage)
        write_report(study, Path(self.sweep_dir))

    def _sampler(self, trials_so_far: int) -> optuna.samplers.BaseSampler:
        if not isinstance(self.sampler, functools.partial):
            return self.sampler
        seed = self.sampler.keywords.get("seed")
        return self.sampler(seed=None if seed is None else seed + trials_so_far)

    def _launch(self, trials: list[optuna.trial.Trial], overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
        """Launches the trials, each as the job numbered by its trial (its run directory and ``hydra.job.num``,
        by which :class:`~balance.sweeps.pruning.StudyPruning` finds its trial)."""
        returns: list[JobReturn] = []
        start = 0
        for end in range(1, len(trials) + 1):
            if end == len(trials) or trials[end].number != trials[end - 1].number + 1:
                returns += self.launcher.launch(overrides[start:end], initial_job_idx=trials[start].number)
                start = end
        return returns

    def _tell(self, study: optuna.Study, trial: optuna.trial.Trial, ret: JobReturn) -> bool:
        """Records the run's outcome in the study; False if the run failed."""
        if ret.status == JobStatus.COMPLETED:
            try:
                value = float(ret.return_value)
            except (TypeError, ValueError):
                log.warning("trial %d returned %r, not a number: recorded as failed", trial.number, ret.return_value)
                study.tell(trial, state=TrialState.FAIL)
                return False
            study.tell(trial, value)
            return True
        if isinstance(ret._return_value, optuna.TrialPruned):
            # The run reported its epochs to the storage from its own process; this process's copy of the trial
            # takes them, so that the pruned trial keeps its last value.
            reported = optuna.storages.RDBStorage(self.storage).get_trial(trial._trial_id).intermediate_values
            for step, value in sorted(reported.items()):
                trial.report(value, step)
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, ret._return_value)
            return True
        log.warning("trial %d failed: %r", trial.number, ret._return_value)
        study.tell(trial, state=TrialState.FAIL)
        return False


def _check_same_objective(study: optuna.Study, fixed: dict[str, Any]) -> None:
    """Refuses to continue a study with other fixed overrides than it was started with: the trials would not
    measure the same thing. A new study needs another sweep directory (``hydra.sweep.dir=...``)."""
    overrides = sorted(f"{name}={value}" for name, value in fixed.items()
                       if not name.lstrip("+~").startswith(PRESENTATION))
    started = study.user_attrs.get(FIXED_OVERRIDES)
    if started is None:
        study.set_user_attr(FIXED_OVERRIDES, overrides)
    elif started != overrides:
        raise ValueError(f"study {study.study_name!r} was run with the overrides {started}, now {overrides}: continue "
                         "it with the same ones, or start another study with hydra.sweep.dir=<new directory>")


def _retry_interrupted(study: optuna.Study) -> None:
    """Marks the trials an interrupted invocation left running as failed and, once, queues their parameters again
    (a study runs from one sweeper at a time)."""
    failed = [t.params for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))]
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        if trial.params not in failed:
            study.enqueue_trial(trial.params)
            log.info("trial %d was interrupted: its parameters are tried again", trial.number)
        else:
            log.warning("trial %d was interrupted, as an earlier run of its parameters was: not tried again",
                        trial.number)

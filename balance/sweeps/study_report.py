"""A finished study's report in its sweep directory: the best parameters and value (``optimization_results.yaml``),
every trial (``trials.csv``), and the study's history, per-epoch curves and parameter importances as PNG files."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import matplotlib.pyplot as plt
import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from balance.plots import log_figure

log = logging.getLogger(__name__)

#: the states of trials that ran to an end (a pruned trial's value is its last reported one)
ENDED = (TrialState.COMPLETE, TrialState.PRUNED)


def write_report(study: optuna.Study, directory: Path) -> list[Path]:
    """Writes the study's report into ``directory``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [_write_results(study, directory), _write_trials(study, directory / "trials.csv")]
    written += [path for path in (_plot_history(study, directory / "optimization_history.png"),
                                  _plot_curves(study, directory / "intermediate_values.png"),
                                  _plot_importances(study, directory / "param_importances.png")) if path]
    log.info("study report: %s", ", ".join(str(p) for p in written))
    return written


def _count(study: optuna.Study, state: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


def _write_results(study: optuna.Study, directory: Path) -> Path:
    path = directory / "optimization_results.yaml"
    results = {"name": "optuna", "study_name": study.study_name, "direction": study.direction.name.lower(),
               "trials": {state.name.lower(): _count(study, state)
                          for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}}
    if _count(study, TrialState.COMPLETE):
        best = study.best_trial
        results |= {"best_params": best.params, "best_value": best.value, "best_trial": best.number,
                    "best_run_dir": str(directory / str(best.number))}
        log.info("best trial %d: value %.4f with %s", best.number, best.value, best.params)
    else:
        log.warning("no trial of study %s completed: no best parameters", study.study_name)
    OmegaConf.save(OmegaConf.create(results), path)
    return path


def _write_trials(study: optuna.Study, path: Path) -> Path:
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "state", "value", "epochs_reported", "duration_s", *names])
        for trial in trials:
            duration = trial.duration.total_seconds() if trial.duration is not None else ""
            writer.writerow([trial.number, trial.state.name, "" if trial.value is None else trial.value,
                             len(trial.intermediate_values), duration, *[trial.params.get(n, "") for n in names]])
    return path


def _plot_history(study: optuna.Study, path: Path) -> Path | None:
    """Each ended trial's value by trial number (pruned ones marked) and the best value so far."""
    trials = study.get_trials(deepcopy=False, states=ENDED)
    trials = [t for t in trials if t.value is not None]
    if not trials:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
        chosen = [t for t in trials if t.state == state]
        if chosen:
            axes.scatter([t.number for t in chosen], [t.value for t in chosen], marker=marker,
                         label=state.name.lower())
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
        best, numbers, values = None, [], []
        for trial in complete:
            best = trial.value if best is None else pick(best, trial.value)
            numbers.append(trial.number)
            values.append(best)
        axes.step(numbers, values, where="post", color="black", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel("objective (validation accuracy)")
    axes.set_title(f"study {study.study_name}")
    axes.legend()
    return _save(figure, path)


def _plot_curves(study: optuna.Study, path: Path) -> Path | None:
    """The per-epoch values the trials reported (what pruning decided on), pruned trials dashed."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.intermediate_values]
    if not trials:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        axes.plot(steps, [trial.intermediate_values[s] for s in steps],
                  linestyle="--" if trial.state == TrialState.PRUNED else "-", label=f"trial {trial.number}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("reported value (val/acc)")
    axes.set_title("per-epoch values (dashed: pruned)")
    if len(trials) <= 12:
        axes.legend(fontsize="small")
    return _save(figure, path)


def _plot_importances(study: optuna.Study, path: Path) -> Path | None:
    """Each parameter's importance to the objective over the completed trials (mean decrease in impurity of a
    random forest: Optuna 2's default fANOVA evaluator fails with current scikit-learn)."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        log.info("parameter importances need two completed trials with parameters: not plotted")
        return None
    evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)
    try:
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (RuntimeError, ValueError) as error:
        log.warning("parameter importances not computed: %s", error)
        return None
    names = list(importances)[::-1]
    figure, axes = plt.subplots(figsize=(6, 1.2 + 0.5 * len(names)))
    axes.barh(names, [importances[n] for n in names])
    axes.set_xlabel("importance (share of the objective's variation)")
    axes.set_title(f"parameter importances over {len(complete)} trials")
    return _save(figure, path)


def _save(figure: plt.Figure, path: Path) -> Path:
    figure.tight_layout()
    return log_figure(None, path.stem, figure, path)

"""Optuna studies through Hydra (``python train.py -m hparams_search=...``): the best parameters, the SQLite storage
and the plots of a real study on the synthetic data; a second invocation continues the study (interrupted trials
retried, new parameters drawn); pruning from the per-epoch validation accuracy; the guards."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from balance.sweeps.study import _check_same_objective
from balance.sweeps.study_report import write_report

REPO = Path(__file__).resolve().parents[1]
TINY = ["data=synthetic", "model=mlp", "data.num_samples=400", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.contributions.plots=false"]
PLOTS = ("optimization_history.png", "param_importances.png", "intermediate_values.png")


def study_command(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "-m", "hparams_search=joint", *TINY,
                           f"hydra.sweep.dir={sweep_dir}", *overrides],
                          cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=600)


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="joint", storage=f"sqlite:///{sweep_dir}/study.db")


def test_a_study_writes_its_best_parameters_storage_and_plots_then_continues(tmp_path):
    sweep = tmp_path / "study"
    first = study_command(sweep, "hydra.sweeper.n_trials=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (sweep / "study.db").is_file()
    study = load(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    # Each trial's run is the directory of its number, and the trial's value is that run's validation accuracy.
    for trial in study.trials:
        results = json.loads((sweep / str(trial.number) / "results.json").read_text())
        assert trial.value == pytest.approx(results["val"]["acc"])
        assert sorted(trial.intermediate_values) == [0, 1], "val/acc reported after each of the two epochs"
    best = max(study.trials, key=lambda t: t.value)
    saved = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert saved["best_value"] == pytest.approx(best.value) and saved["best_trial"] == best.number
    assert saved["best_params"] == best.params
    assert set(best.params) == {"method.optimizer.lr", "method.optimizer.weight_decay"}
    assert 1e-4 <= best.params["method.optimizer.lr"] <= 1e-2
    for name in PLOTS:
        assert (sweep / name).stat().st_size > 1000, name
    with (sweep / "trials.csv").open() as handle:
        assert [row["state"] for row in csv.DictReader(handle)] == ["COMPLETE"] * 3
    first_trials = [(t.params, t.value) for t in study.trials]

    # An interruption leaves a trial running; the next invocation retries its parameters and goes on to 5 in all.
    interrupted = study.ask()
    for name, distribution in study.trials[0].distributions.items():
        interrupted._suggest(name, distribution)
    interrupted_params = dict(interrupted.params)
    second = study_command(sweep, "hydra.sweeper.n_trials=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 of 5 trials done, 2 to run" in second.stdout + second.stderr
    study = load(sweep)
    assert [(t.params, t.value) for t in study.trials[:3]] == first_trials, "earlier trials kept as they were"
    assert study.trials[3].state == TrialState.FAIL
    retried, new = study.trials[4], study.trials[5]
    assert retried.state == new.state == TrialState.COMPLETE and retried.params == interrupted_params
    assert new.params not in [params for params, _ in first_trials], "a continued study draws new parameters"
    assert (sweep / "5" / "results.json").is_file() and (sweep / "0" / "results.json").is_file()
    saved = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert saved["trials"] == {"complete": 5, "pruned": 0, "fail": 1}

    # Done: the same command again runs nothing.
    third = study_command(sweep, "hydra.sweeper.n_trials=5")
    assert third.returncode == 0 and "5 of 5 trials done, 0 to run" in third.stdout + third.stderr
    assert len(load(sweep).trials) == 6


def test_trials_the_pruner_stops_are_recorded_as_pruned(tmp_path):
    """A pruner no run can pass (val/acc above 1) stops every trial after its warm-up epoch."""
    sweep = tmp_path / "pruned"
    out = study_command(sweep, "hydra.sweeper.n_trials=2", "trainer.max_epochs=4", "~hydra.sweeper.pruner",
                        "+hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.01,n_warmup_steps:1}")
    assert out.returncode == 0, out.stderr[-3000:]
    study = load(sweep)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 2
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [0, 1], "stopped after the second of four epochs"
        assert trial.value == trial.intermediate_values[1]
        assert not (sweep / str(trial.number) / "results.json").exists(), "a pruned run is not tested"
    saved = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert saved["trials"]["pruned"] == 2 and "best_params" not in saved


def test_a_study_without_multirun_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "train.py", "hparams_search=joint", *TINY, f"hydra.run.dir={tmp_path}"],
                         cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode != 0 and "python train.py -m hparams_search=joint" in out.stderr
    assert not (tmp_path / "results.json").exists()


def test_a_study_continues_only_with_the_overrides_it_started_with():
    study = optuna.create_study()
    _check_same_objective(study, {"data": "synthetic", "trainer.enable_progress_bar": False})
    _check_same_objective(study, {"data": "synthetic", "trainer.enable_progress_bar": True})  # display only
    with pytest.raises(ValueError, match="hydra.sweep.dir"):
        _check_same_objective(study, {"data": "synthetic", "method.unimodal_loss_weight": 0.5})


def test_the_report_of_a_study_with_known_values(tmp_path):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 1.0 - (t.suggest_float("x", 0.0, 1.0) - 0.3) ** 2 + 0.0 * t.suggest_int("k", 0, 3),
                   n_trials=8)
    written = {p.name for p in write_report(study, tmp_path)}
    assert written == {"optimization_results.yaml", "trials.csv", "optimization_history.png", "param_importances.png"}
    saved = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    values = [t.value for t in study.trials]
    assert saved["best_value"] == pytest.approx(max(values))
    assert saved["best_trial"] == values.index(max(values))
    with (tmp_path / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["value"]) for r in rows] == pytest.approx(values)
    assert [float(r["x"]) for r in rows] == pytest.approx([t.params["x"] for t in study.trials])


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "conf" / "hparams_search").glob("*.yaml")))
def test_every_search_space_names_options_its_method_has(name):
    """Each preset's parameters are keys of the composed config, and an override with the lowest value of each
    composes and passes the run's option checks (a typo would make every trial fail)."""
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf

    from balance.run import check_run_options

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={name}", "run_dir=/tmp/unused"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("StudySweeper")
        assert OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"].startswith("sweeps/")
        params = {key: str(value) for key, value in cfg.hydra.sweeper.params.items()}
        distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in params.items()])
        assert set(distributions) == set(params) and params
        lowest = []
        for key, distribution in distributions.items():
            assert OmegaConf.select(cfg, key, throw_on_missing=False) is not None, key
            value = distribution.choices[0] if hasattr(distribution, "choices") else distribution.low
            lowest.append(f"{key}={value}")
        trial = compose("train", overrides=[f"hparams_search={name}", *lowest, "run_dir=/tmp/unused"])
    check_run_options(trial)

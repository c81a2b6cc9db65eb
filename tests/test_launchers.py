"""Parallel local runs (``hydra/launcher=joblib``, one GPU each), SLURM through submitit (the ``slurm`` preset, a
real job through submitit's local executor), ``balance-reproduce --launcher``, and the error naming the extra to
install when a plugin is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from balance.reproduce import main as reproduce
from balance.sweeps import devices
from balance.sweeps.devices import device_lock, own_device
from balance.sweeps.plugins import check_plugins

REPO = Path(__file__).resolve().parents[1]
TINY = ["data=synthetic", "model=mlp", "data.num_samples=400", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "callbacks.contributions.plots=false"]


def multirun(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", "-m", *TINY, *overrides], cwd=REPO,
                          env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=600)


def test_joblib_runs_two_seeds_in_parallel_and_writes_both_results(tmp_path):
    out = multirun("hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    seeds = [yaml.safe_load((tmp_path / str(n) / ".hydra" / "config.yaml").read_text())["seed"] for n in (0, 1)]
    assert seeds == [0, 1]
    results = [json.loads((tmp_path / str(n) / "results.json").read_text()) for n in (0, 1)]
    assert all(0.0 <= r["test"]["acc"] <= 1.0 for r in results)
    assert results[0]["test"] != results[1]["test"], "two seeds, two different runs"


def test_submitit_runs_a_job_through_its_local_executor(tmp_path):
    out = multirun("hydra/launcher=submitit_local", "seed=3", f"hydra.sweep.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "0" / "results.json").read_text())["test"]["acc"] > 0.25
    assert list((tmp_path / ".submitit").glob("*/*_log.out")), "the job ran as a submitit job, with its logs"


def test_the_slurm_preset_composes_with_its_keys():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
                                          "trainer=ddp", "run_dir=/tmp/unused"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 4, 600)
    assert launcher.tasks_per_node == 4, "one task per GPU, as Lightning's DDP under SLURM wants"
    assert launcher.cpus_per_task == 8 and launcher.nodes == 1
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder", throw_on_missing=False) is not None


def test_reproduce_passes_its_launcher_to_every_run(tmp_path, capsys):
    table = tmp_path / "t.yaml"
    table.write_text(yaml.safe_dump({"title": "T", "rows": [{"name": "joint", "overrides": ["method=joint"]},
                                                            {"name": "sum", "overrides": ["method=sum"]}]}))
    out = tmp_path / "out"
    reproduce([str(table), "--seeds", "2", "--out", str(out), "--launcher", "joblib", "--parallel", "2",
               "--dry-run", "--", *TINY])
    commands = [line for line in capsys.readouterr().out.splitlines() if "train.py" in line]
    assert len(commands) == 2 and all("hydra/launcher=joblib" in c and " -m " in c for c in commands)
    # One run for real (the commands above are every row's; two seeds under joblib:
    # test_joblib_runs_two_seeds_in_parallel_and_writes_both_results)
    reproduce([str(table), "--seeds", "1", "--rows", "joint", "--out", str(out), "--launcher", "joblib",
               "--parallel", "2", "--", *TINY])
    assert (out / "joint" / "seed0" / "results.json").is_file()
    launcher = yaml.safe_load((out / "joint" / "seed0" / ".hydra" / "hydra.yaml").read_text())
    assert "Joblib" in launcher["hydra"]["launcher"]["_target_"]
    table_json = json.loads((out / "table.json").read_text())
    assert table_json["rows"]["joint"]["seeds"] == [0] and not (out / "sum").exists()


def test_each_parallel_run_holds_a_device_of_its_own(tmp_path):
    with device_lock(2, tmp_path) as first, device_lock(2, tmp_path) as second:
        assert {first, second} == {0, 1}
    with device_lock(2, tmp_path) as again:
        assert again == 0, "released when its run ended"


def test_a_run_under_joblib_is_given_the_free_gpu(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(devices, "LOCK_DIR", tmp_path)
    monkeypatch.setattr(devices, "_under_parallel_local_launcher", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = OmegaConf.create({"trainer": {"accelerator": "gpu", "devices": 1}})
    with own_device(cfg) as first, own_device(cfg) as second:
        assert (first.trainer.devices, second.trainer.devices) == ([0], [1])
    assert cfg.trainer.devices == 1, "the given config is left as it is"
    cpu = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1}})
    with own_device(cpu) as same:
        assert same is cpu


def test_a_missing_plugin_names_the_extra_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_") else real(name, *a))
    with pytest.raises(SystemExit, match=r'hydra-joblib-launcher.*pip install -e "\.\[sweep\]"'):
        check_plugins(["seed=0,1", "hydra/launcher=joblib"])
    with pytest.raises(SystemExit, match=r'hydra-submitit-launcher.*"\.\[cluster\]"'):
        check_plugins(["hydra/launcher=slurm"])
    with pytest.raises(SystemExit, match=r"hydra-optuna-sweeper.*\[sweep\]"):
        check_plugins(["hparams_search=mla"])
    check_plugins(["hparams_search=null", "hydra/launcher=basic", "data=synthetic"])  # nothing to install


def test_the_study_sweeper_without_its_plugin_names_the_extra(monkeypatch):
    from hydra_plugins.balance_study.study_sweeper import StudySweeper

    monkeypatch.setitem(sys.modules, "balance.sweeps.study", None)  # as if hydra-optuna-sweeper were missing
    with pytest.raises(ImportError, match=r"hydra-optuna-sweeper.*\[sweep\]"):
        StudySweeper(n_trials=1)


def test_parallel_commands_wait_for_the_rows_they_need(tmp_path):
    """With --parallel, a row whose overrides name another row's runs (UMT's teachers) starts after that row's
    commands end, while an independent row runs beside them."""
    from balance.reproduce import Row, Run, _run_all

    log = tmp_path / "log"

    def command(name: str, sleep: float) -> list[str]:
        return [sys.executable, "-c", f"import time; open({str(log)!r}, 'a').write('{name}-start '); "
                                      f"time.sleep({sleep}); open({str(log)!r}, 'a').write('{name}-end ')"]

    teacher = Row("unimodal/audio", ["method=unimodal"])
    student = Row("umt", ["method.teachers={audio: '${run_dir}/../../unimodal__audio/seed${seed}'}"])
    other = Row("joint", ["method=joint"])
    assert student.needs([teacher, student, other]) == {"unimodal/audio"} and not other.needs([teacher, other])
    todo = [([Run(teacher, 0, tmp_path)], command("teacher", 1.0)),
            ([Run(student, 0, tmp_path)], command("student", 0)), ([Run(other, 0, tmp_path)], command("other", 0))]
    assert _run_all(todo, parallel=3) == []
    events = log.read_text().split()
    assert events.index("student-start") > events.index("teacher-end")
    assert events.index("other-end") < events.index("teacher-end"), "the independent row ran beside the teacher"

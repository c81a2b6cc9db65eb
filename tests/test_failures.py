"""Runs that would fail late or report a wrong number with exit 0 fail early and loudly instead, or succeed."""

import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from torch.utils.data import BatchSampler, SequentialSampler

from balance.overrides import expand_home
from balance.report import format_results
from balance.run import SIGTERM_EXIT_CODE, _json_safe, build, run, train
from compose import compose_train
from datamodules.base import NoLoneLastBatch, _warn_of_classes_missing_from_training
from datamodules.splits import group_split, random_split, stratified_split

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "callbacks.contributions=null"]
IMAGES = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", *QUIET]


def test_tiny_data_sets_are_split_with_a_sample_in_every_part():
    # 24 clips of 6 classes with 10 % validation and test: per-class rounding alone leaves the test part empty.
    labels = np.repeat(np.arange(6), 4)
    parts = stratified_split(labels, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [17, 6, 1]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(24))
    parts = random_split(3, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert sorted(len(p) for p in parts.values()) == [1, 1, 1]
    parts = group_split([0, 0, 1, 2, 3], {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)
    assert all(len(p) for p in parts.values()) and len(set(np.concatenate(list(parts.values())))) == 5


def test_larger_data_sets_split_exactly_as_before():
    labels = np.repeat(np.arange(6), 100)
    parts = stratified_split(labels, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=3)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [480, 60, 60]
    for p in parts.values():  # stratified: every class in every part in proportion
        assert np.bincount(labels[p]).tolist() == [len(p) // 6] * 6


def test_an_empty_split_is_refused_before_training_with_the_sizes_and_the_fix():
    with pytest.raises(ValueError, match=r"test split is empty \(samples per split: train 1, val 1, test 0\).*"
                                         r"data.val_fraction"):
        train(compose_train([*IMAGES, "data.num_samples=2"], run_dir="/tmp/balance-unused"))


def test_a_class_that_never_occurs_in_training_is_warned_of(caplog):
    from types import SimpleNamespace

    splits = {"train": SimpleNamespace(labels=[0, 0, 1, 1]), "val": SimpleNamespace(labels=[0, 1]),
              "test": SimpleNamespace(labels=np.array([1, 2, 2, 3]))}
    with caplog.at_level(logging.WARNING):
        _warn_of_classes_missing_from_training(splits, "Tiny")
    assert "Tiny: class 2 (2 samples), class 3 (1 sample) of the test split never occur in training" in caplog.text
    assert "val split" not in caplog.text
    caplog.clear()
    splits["test"] = SimpleNamespace(labels=[1, 0])
    with caplog.at_level(logging.WARNING):
        _warn_of_classes_missing_from_training(splits, "Tiny")
    assert caplog.text == ""


@pytest.mark.parametrize("count, sizes", [(9, [4, 5]), (8, [4, 4]), (10, [4, 4, 2]), (1, [1]), (5, [5])])
def test_a_lone_last_sample_joins_the_batch_before_it(count, sizes):
    batches = list(NoLoneLastBatch(SequentialSampler(range(count)), 4))
    assert [len(b) for b in batches] == sizes and len(NoLoneLastBatch(SequentialSampler(range(count)), 4)) == len(sizes)
    plain = [i for b in BatchSampler(SequentialSampler(range(count)), 4, drop_last=False) for i in b]
    assert [i for b in batches for i in b] == plain  # the same samples in the same order


def test_batch_norm_models_train_when_the_training_size_is_one_more_than_a_multiple_of_the_batch(tmp_path):
    cfg = compose_train([*IMAGES, "data.num_samples=47", "data.batch_size=32", "trainer.max_epochs=1"],
                        run_dir=tmp_path)
    datamodule, _ = build(cfg)
    datamodule.setup()
    assert len(datamodule.datasets["train"]) == 33  # 32 + 1: a batch of one without the guard
    assert [len(b["label"]) for b in datamodule.train_dataloader()] == [33]
    assert train(cfg)["test"]["acc"] >= 0


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_terms(tmp_path):
    cfg = compose_train([*IMAGES, "data.num_samples=200", "optimizer=sgd", "method.optimizer.lr=1.0e12",
                         "trainer.max_epochs=2"], run_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss in epoch 0, step \d+ .*fused=.*"
                                                 r"method.optimizer.lr"):
        train(cfg)
    assert not (tmp_path / "results.json").exists()


def test_zero_epochs_is_refused_naming_evaluation():
    with pytest.raises(ValueError, match="task=evaluate"):
        train(compose_train([*IMAGES, "trainer.max_epochs=0"]))


def test_results_are_strict_json():
    safe = _json_safe({"test": {"loss": math.nan, "acc": 0.5}, "rows": [math.inf, 1.0], "name": "x"})
    assert json.loads(json.dumps(safe, allow_nan=False)) == {"test": {"loss": None, "acc": 0.5},
                                                             "rows": [None, 1.0], "name": "x"}


class SigtermAtStep(pl.Callback):
    """Sends this process SIGTERM after the given training step (as a cluster pre-empting the job would)."""

    def __init__(self, step: int = 2) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_exits_non_zero_and_says_how_to_resume(tmp_path, caplog):
    cfg = compose_train([*IMAGES, "data.num_samples=200", "trainer.max_epochs=3",
                         "+callbacks.sigterm._target_=test_failures.SigtermAtStep"], run_dir=tmp_path)
    with pytest.raises(SystemExit) as stopped:
        train(cfg)
    assert stopped.value.code == SIGTERM_EXIT_CODE
    assert "ckpt_path=" in caplog.text and "last.ckpt" in caplog.text
    assert not (tmp_path / "results.json").exists()


def test_home_relative_values_work_as_the_readme_types_them():
    home = os.path.expanduser("~")
    assert expand_home(["data.root=~/data/crema_d", "+x.y=~", "~callbacks.contributions", "seed=3", "a=b~/c"]) == [
        f"data.root={home}/data/crema_d", f"+x.y={home}", "~callbacks.contributions", "seed=3", "a=b~/c"]
    shown = subprocess.run([sys.executable, "train.py", "data=crema_d", "model=crema_d", "data.root=~/data/crema_d",
                            "--cfg", "job"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"root: {home}/data/crema_d" in shown


def test_a_resumed_run_continues_in_its_own_directory_and_keeps_the_best_epoch(tmp_path):
    common = [*IMAGES, "data.num_samples=200", "+model.encoders.encoder.dropout=0.3", "seed=3"]
    full = train(compose_train([*common, "trainer.max_epochs=4"], run_dir=tmp_path / "full"))
    train(compose_train([*common, "trainer.max_epochs=2"], run_dir=tmp_path / "part"))
    # The README's resume command: a new Hydra run directory, the old run's last.ckpt.
    resumed = train(compose_train([*common, "trainer.max_epochs=4",
                                   f"ckpt_path={tmp_path / 'part' / 'checkpoints' / 'last.ckpt'}"],
                                  run_dir=tmp_path / "new"))
    assert not (tmp_path / "new" / "checkpoints").exists() and (tmp_path / "part" / "results.json").is_file()
    assert resumed["best_epoch"] == full["best_epoch"] and resumed["test"] == full["test"]
    assert Path(resumed["best_checkpoint"]).parent == tmp_path / "part" / "checkpoints"


@pytest.mark.parametrize("content, match", [(b"", "0 bytes"), (b"not a checkpoint", "truncated or not")])
def test_a_broken_checkpoint_is_named_with_its_size(tmp_path, content, match):
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(content)
    for task in ("train", "evaluate"):
        with pytest.raises(ValueError, match=match):
            run(compose_train([*IMAGES, f"task={task}", f"ckpt_path={broken}"], run_dir=tmp_path / task))


def test_a_checkpoint_moved_out_of_its_run_is_rebuilt_from_the_config_inside_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="balance.run")
    trained = train(compose_train([*IMAGES, "data.num_samples=200", "trainer.max_epochs=2",
                                   "model.encoders.encoder.channels=[4,8]"], run_dir=tmp_path / "run"))
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(trained["best_checkpoint"], moved)
    evaluated = run(compose_train([*IMAGES, "data.num_samples=200", "task=evaluate", f"ckpt_path={moved}"],
                                  run_dir=tmp_path / "eval"))
    assert "from the checkpoint itself" in caplog.text
    assert evaluated["test"]["acc"] == pytest.approx(trained["test"]["acc"])
    # Without the run's config, the default model does not fit the weights: refused, naming the fix.
    with pytest.raises(ValueError, match="do not fit the model built from this config"):
        run(compose_train([*IMAGES, "data.num_samples=200", "task=evaluate", f"ckpt_path={moved}",
                           "evaluate.use_run_config=false"], run_dir=tmp_path / "eval2"))


def test_a_seed_that_is_no_number_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="seed must be a whole number"):
        train(compose_train([*IMAGES, "seed=abc"]))


@pytest.mark.parametrize("method, override, match", [
    ("sample_level", "method.benefit=foo", r"method.benefit must be one of \('official', 'correct', 'true_prob'\)"),
    ("modality_level", "method.drop=everything", r"method.drop must be one of \('features', 'inputs'\)"),
    ("sample_level", "method.warmup_epochs=-1", "warmup_epochs must be an integer >= 0"),
    ("sample_level", "method.warmup_epochs=abc", r"method.warmup_epochs must be an integer, got 'abc'"),
    ("sample_level", "+method.warmup_epoch=3", "method.warmup_epoch is not an option of SampleLevelResampling; its "
                                               "options are .*warmup_epochs"),
    ("joint", "data.batch_size=abc", "data.batch_size must be an integer, got 'abc'"),
    ("joint", "data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("joint", "data.missing_rate=true", "data.missing_rate must be a number, got True"),
    ("joint", "model.encoders.encoder.channels=[8,x]", "model.encoders.encoder.channels must be a list whose items are "
                                                       "each an integer"),
    ("mla", "method.order=[m0,3]", "method.order must be a list whose items are each a string"),
    ("ogm_ge", "method.alpha=-1", r"method.alpha must be a number > 0, got -1"),
    ("pmr", "method.prototype_momentum=1", r"method.prototype_momentum must be a number in \[0, 1\), got 1"),
    ("opm", "method.q_base=1.5", r"method.q_base must be a number in \[0, 1\], got 1.5"),
    ("joint", "trainer.max_epochs=abc", "trainer.max_epochs must be an integer or null, got 'abc'"),
    ("joint", "+trainer.max_epoch=3", "trainer.max_epoch is not an option of Trainer; its options are .*max_epochs"),
    ("joint", "diagnose.every_n_epochs=abc", r"diagnose.every_n_epochs must be an integer >= 0 \(0: only at test\)"),
    ("modality_level", "method.variant=cubic", r"method.variant must be one of \('linear', 'tanh', 'power'\)"),
])
def test_bad_method_options_are_refused_when_the_run_is_built(method, override, match):
    with pytest.raises(Exception, match=match):  # Hydra's InstantiationException around the method's ValueError
        build(compose_train([*IMAGES, f"method={method}", override]))


def test_a_missing_data_root_names_the_preparation_command():
    with pytest.raises(ValueError, match=r"data.root must be set; prepare the raw download once with "
                                         r"`balance-prepare crema_d --raw RAW --out OUT`.*docs/datasets/crema_d.md"):
        build(compose_train(["data=crema_d", "model=crema_d"]))


@pytest.mark.parametrize("data", ["kinetics_sounds", "crema_d"])
def test_a_cache_of_another_data_set_is_named_and_not_offered_as_the_output(tmp_path, data):
    other = "food101" if data == "crema_d" else "crema_d"
    (tmp_path / "meta.json").write_text(json.dumps({"dataset": other, "version": 1}))
    with pytest.raises(FileNotFoundError) as error:
        build(compose_train([f"data={data}", f"model={data}", f"data.root={tmp_path}"]))
    assert f"{tmp_path} is a prepared {other} cache, not a" in str(error.value)
    assert "here: --out OUT" in str(error.value) and f"--out {tmp_path}" not in str(error.value)


def test_the_final_table_stays_readable_with_many_metrics():
    modalities = ["audio", "visual", "text"]
    test = {"acc": 0.9, "f1": 0.8, "loss": 0.3, **{f"acc_{m}": 0.5 for m in modalities},
            **{f"weight_{m}": 0.33 for m in modalities},
            **{f"missing_modality/acc_r{r / 10:.2f}": 0.5 for r in range(10)},
            **{f"mm_shap/share_{m}_correct": 0.3 for m in modalities}, "emap/acc_gap": 0.01}
    text = format_results({"val": dict(test), "test": test, "selection": "best val/acc", "best_epoch": 3},
                          modalities)
    assert max(len(line) for line in text.splitlines()) <= 120
    for key in test:  # every name in full, with its value
        line = next(l for l in text.splitlines() if f" {key} " in l)
        assert line.count(f"{test[key]:.4f}") == 2
    small = format_results({"val": {"acc": 0.9}, "test": {"acc": 0.8}}, ["audio"])
    assert "split" in small and "0.8000" in small  # a few metrics: one column each

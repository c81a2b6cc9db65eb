"""Every method config, for two and three modalities, on the contract every method stands on: it builds, learns,
gives every trainable parameter a gradient, and (with two modalities, once per method class) resumes from a
mid-run checkpoint exactly (its state included);
a method defined for fewer modalities (``max_modalities``) is refused at build time instead, with the limit named.

Parametrised over the files in conf/method/, so a new method is tested by adding its YAML file. The data are tiny
images (synthetic features served as [1, 4, 4]) with small CNN encoders, so methods that act on convolution
kernels run too; ``QUICK`` shortens warm-ups so that every mechanism is active within the test's few epochs.
"""

import atexit
import csv
import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import get_class

from balance.run import build, train
from compose import CONF_DIR, assert_identical, compose_train

METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
MODALITIES = {2: ("m0", "m1"), 3: ("m0", "m1", "m2")}
INFORMATIVENESS = {2: "[2.0,0.6]", 3: "[2.0,0.6,0.6]"}
# Method options that delay a mechanism beyond a short test run, and the value that starts it at once.
QUICK = {"warmup_epochs": 1, "modulation_starts": 0}
# Values for the options a method requires (``???`` in its config).
REQUIRED = {"modality": "m0"}
EPOCHS = 4
# The number of modalities the exact-resume half of the test runs with.
RESUMED_MODALITIES = 2
# Checkpoint entries that must be equal after a resumed run (the loops' and callbacks' progress may differ).
PROGRESS_KEYS = {"epoch", "global_step", "pytorch-lightning_version", "loops", "callbacks", "optimizer_states",
                 "lr_schedulers", "hparams_name", "hyper_parameters"}


def _overrides(method: str, num_modalities: int) -> list[str]:
    names = ",".join(MODALITIES[num_modalities])
    overrides = [
        "data=synthetic", "model=small_cnn", f"method={method}", f"data.modalities=[{names}]",
        f"data.informativeness={INFORMATIVENESS[num_modalities]}", "data.num_samples=400",
        "data.image_shape=[1,4,4]", "data.batch_size=32", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "callbacks.contributions=null", "method.optimizer.lr=3.0e-3",
    ]
    method_cfg = _composed_method(tuple(overrides))
    if "teachers" in method_cfg.keys():  # UMT: the unimodal runs it distils from
        overrides.append(f"method.teachers={_teacher_runs(num_modalities)}")
    # `in .keys()`: a mandatory `???` value is not `in` the node itself.
    return overrides + [f"method.{key}={value}" for key, value in {**QUICK, **REQUIRED}.items()
                        if key in method_cfg.keys()]


@functools.lru_cache
def _composed_method(overrides: tuple[str, ...]):
    """The ``method`` node the overrides compose (read only: composed once per set of overrides, since composing
    is a large share of this file's time)."""
    return compose_train(list(overrides)).method


@functools.lru_cache
def _teacher_runs(num_modalities: int) -> str:
    """``{m: <run dir>}`` of a short unimodal run per modality on the contract's data and model, trained once."""
    root = Path(tempfile.mkdtemp(prefix="balance-teachers-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # cached for the session, so removed at its end
    for m in MODALITIES[num_modalities]:
        overrides = [o for o in _overrides("unimodal", num_modalities) if not o.startswith("method.modality=")]
        train(compose_train([*overrides, f"method.modality={m}", "trainer.max_epochs=1"], run_dir=root / m))
    return "{" + ", ".join(f"{m}: {root / m}" for m in MODALITIES[num_modalities]) + "}"


def _same_class_as_joint(method: str) -> bool:
    """Whether the config is joint training under another name (``concat``, ``sum``, ``late_fusion``)."""
    target = _composed_method((f"method={method}",))._target_
    return method != "joint" and target == _composed_method(("method=joint",))._target_


def _refuses(overrides: list[str], num_modalities: int) -> bool:
    """Whether the method is defined for fewer modalities; then building it must fail, naming the limit."""
    limit = get_class(_composed_method(tuple(overrides))._target_).max_modalities
    if limit is None or num_modalities <= limit:
        return False
    with pytest.raises(Exception, match=f"at most {limit} modalities"):
        build(compose_train(overrides))
    return True


def _epoch_losses(run_dir: Path) -> list[float]:
    rows = list(csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


class _GradientRecorder(pl.Callback):
    """The names of the parameters that had a non-zero gradient at some optimizer step."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.seen |= {n for n, p in pl_module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_method_learns_and_resumes_exactly(method, num_modalities, tmp_path):
    overrides = _overrides(method, num_modalities)
    if _refuses(overrides, num_modalities):
        return
    full = train(compose_train([*overrides, f"trainer.max_epochs={EPOCHS}"], run_dir=tmp_path / "full"))
    losses = _epoch_losses(tmp_path / "full")
    assert len(losses) == EPOCHS and losses[-1] < losses[0], losses
    assert full["test"]["acc"] > 0.5, full["test"]  # 4 classes: chance 0.25
    if num_modalities != RESUMED_MODALITIES or _same_class_as_joint(method):
        return  # exact resume: once per method class (checkpointing does not depend on M; suite time does)

    train(compose_train([*overrides, f"trainer.max_epochs={EPOCHS // 2}"], run_dir=tmp_path / "part"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = train(compose_train([*overrides, f"trainer.max_epochs={EPOCHS}", f"ckpt_path={last}"],
                                  run_dir=tmp_path / "part"))
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["epoch"] == b["epoch"] == EPOCHS - 1
    state = {key: value for key, value in a.items() if key not in PROGRESS_KEYS}
    assert_identical(state, {key: value for key, value in b.items() if key not in PROGRESS_KEYS})


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_parameter_gets_a_gradient(method, num_modalities):
    overrides = _overrides(method, num_modalities)
    if _refuses(overrides, num_modalities):
        return
    datamodule, module = build(compose_train(overrides))
    recorder = _GradientRecorder()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder])
    trainer.fit(module, datamodule=datamodule)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable <= recorder.seen, sorted(trainable - recorder.seen)


def test_a_method_defined_for_two_modalities_refuses_three():
    from balance.methods import JointTraining

    class TwoOnly(JointTraining):
        max_modalities = 2

    cfg = compose_train(_overrides("joint", 3))
    datamodule, method = build(cfg)
    with pytest.raises(ValueError, match="at most 2 modalities; the model has 3"):
        TwoOnly(model=method.model, optimizer=torch.optim.SGD)


@pytest.mark.parametrize("method", ["gblending", "reconboost", "ume", "unimodal"])
def test_a_method_that_runs_an_encoder_alone_refuses_mid_fusion(method):
    overrides = ["data=synthetic", "model=small_cnn", "data.image_shape=[1,4,4]", f"method={method}",
                 "+model/mmtm=default", *(["method.modality=m0"] if method == "unimodal" else [])]
    with pytest.raises(Exception, match="but model.mmtm links the encoders: set model.mmtm=null"):
        build(compose_train(overrides))

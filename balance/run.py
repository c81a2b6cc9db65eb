"""Builds a run from its Hydra config, trains, selects the best epoch on validation, tests once, reports."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from balance.checkpoints import read_checkpoint
from balance.console import console_callbacks
from balance.diagnostics import DiagnosticsCallback
from balance.environment import run_environment
from balance.methods import MultimodalMethod
from balance.option_types import check_options
from balance.report import format_results
from balance.selection import PROTOCOLS, apply_protocol
from balance.sweeps.devices import own_device

log = logging.getLogger(__name__)

#: the config groups a checkpoint is rebuilt from
RUN_CONFIG_KEYS = ("data", "model", "method")
#: the exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it)
SIGTERM_EXIT_CODE = 143


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiates the datamodule and sets it up, so that what the model needs from the data is known."""
    missing = [key for key in cfg.data if OmegaConf.is_missing(cfg.data, key)]
    if missing:
        name = str(cfg.data.get("_target_", "")).split(".")[-2] if "." in str(cfg.data.get("_target_", "")) else "?"
        hint = (f"; prepare the raw download once with `balance-prepare {name} --raw RAW --out OUT`, then give "
                f"data.root=OUT (docs/datasets/{name}.md says where to get the data)") if "root" in missing else ""
        raise ValueError(f"data.{', data.'.join(missing)} must be set{hint}")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def build_model_config(cfg: DictConfig, datamodule: Any) -> DictConfig:
    """The model config with what only the data knows filled in: class count and per-encoder values (e.g. a
    vocabulary size) wherever the encoder's config has that key."""
    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    with open_dict(model_cfg):
        model_cfg.num_classes = datamodule.num_classes
        encoders = model_cfg.get("encoders", {})
        for modality, values in datamodule.encoder_kwargs.items():
            node = encoders.get(modality)
            for key, value in values.items():
                # `key in node` is False for a mandatory `???` value, which is exactly what is to be filled.
                if node is not None and key in node.keys():
                    node[key] = value
    return model_cfg


def check_run_options(cfg: DictConfig) -> None:
    """Refuses, before anything is built, a data, model, method, trainer or diagnostics option that its class does
    not take or whose value does not fit its type (see :func:`balance.option_types.check_options`)."""
    unset = [key for key in cfg.method if OmegaConf.is_missing(cfg.method, key)]
    if unset:
        raise ValueError(f"method.{', method.'.join(unset)} must be set for this method, e.g. "
                         f"method.{unset[0]}=<value> (docs/methods/ says what it takes)")
    for key in ("data", "model", "method"):
        check_options(cfg[key], key)
    check_options(cfg.trainer, "trainer", packages=("pytorch_lightning",))
    for name, node in (cfg.get("diagnostics") or {}).items():
        check_options(node, f"diagnostics.{name}")
    every = (cfg.get("diagnose") or {}).get("every_n_epochs", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"diagnose.every_n_epochs must be an integer >= 0 (0: only at test), got {every!r}")


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, MultimodalMethod]:
    """The datamodule and the method (holding its model) described by ``cfg``."""
    check_run_options(cfg)
    datamodule = build_datamodule(cfg)
    model = instantiate(build_model_config(cfg, datamodule))
    if list(model.modalities) != list(datamodule.modalities):
        raise ValueError(
            f"model {cfg.model.get('_target_')} has encoders for {list(model.modalities)} but the data provides "
            f"{list(datamodule.modalities)}: pick a model config for this data set (model=...)"
        )
    method = instantiate(cfg.method, model=model)
    # Saved in every checkpoint, so that a checkpoint moved out of its run directory can be rebuilt as trained.
    method.run_config = {key: OmegaConf.to_container(cfg[key], resolve=True) for key in RUN_CONFIG_KEYS}
    return datamodule, method


def build_diagnostics(cfg: DictConfig) -> DiagnosticsCallback | None:
    """The callback running the selected diagnostics (``diagnostics=[emap,mm_shap]``), or None if none is."""
    selected = cfg.get("diagnostics") or {}
    if not selected:
        return None
    options = cfg.get("diagnose") or {}
    return DiagnosticsCallback({name: instantiate(node) for name, node in selected.items()}, dirpath=cfg.run_dir,
                               every_n_epochs=options.get("every_n_epochs", 0), plots=options.get("plots", True))


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    diagnostics = build_diagnostics(cfg)
    if diagnostics is not None:
        callbacks.append(diagnostics)
    callbacks = apply_protocol(cfg.get("protocol", "val"), callbacks)
    callbacks += console_callbacks(cfg.trainer)  # in place of Lightning's own, which it then leaves out
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # The summary is ours (console_callbacks); the flag off keeps Lightning from announcing that it skips its own.
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=cfg.run_dir,
                       enable_model_summary=False)


def _strip_stage(metrics: dict[str, float], stage: str) -> dict[str, float]:
    prefix = f"{stage}/"
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs ``cfg.task``: ``train`` (the default) or ``evaluate``, on a GPU of its own when it is one of several
    runs a parallel local launcher runs at once (:func:`balance.sweeps.devices.own_device`)."""
    _refuse_study_without_multirun()
    task = cfg.get("task", "train")
    if task not in ("train", "evaluate"):
        raise ValueError(f"task={task!r}: expected train or evaluate")
    with own_device(cfg) as cfg:
        return train(cfg) if task == "train" else evaluate(cfg)


def _refuse_study_without_multirun() -> None:
    """An ``hparams_search`` preset configures a sweeper, which only a multirun uses: without ``-m`` it would
    train once, with the defaults, and look like a study."""
    if not HydraConfig.initialized():
        return
    hydra = HydraConfig.get()
    study = hydra.runtime.choices.get("hparams_search")
    if study not in (None, "null") and hydra.mode != RunMode.MULTIRUN:
        raise ValueError(f"hparams_search={study} is a study of many runs: run it as a multirun, "
                         f"python train.py -m hparams_search={study} ...")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fits the method, evaluates the best validation checkpoint on val and test, writes ``results.json``.

    Returns:
        ``{"val": {...}, "test": {...}, "best_checkpoint": path, "best_epoch": int, "selection": ...}``.
    """
    started = time.monotonic()
    if cfg.trainer.get("max_epochs") == 0:
        raise ValueError("trainer.max_epochs=0 trains nothing; to evaluate a trained checkpoint without training use "
                         "task=evaluate ckpt_path=<run>/checkpoints/<file>.ckpt")
    if cfg.get("ckpt_path"):
        cfg = _resume_config(cfg, Path(cfg.ckpt_path).expanduser())
    pl.seed_everything(_seed(cfg), workers=True)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg)
    try:
        trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        # Lightning stops the loop cleanly on SIGTERM but exits 0, which a cluster would take for success.
        last = Path(cfg.run_dir) / "checkpoints" / "last.ckpt"
        log.error("stopped by SIGTERM in epoch %d (step %d); no results were written. The last finished epoch is "
                  "in %s: resume with the same overrides plus ckpt_path=%s", trainer.current_epoch,
                  trainer.global_step, last, last)
        raise SystemExit(SIGTERM_EXIT_CODE) from None

    checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best = checkpoint.best_model_path if checkpoint is not None and checkpoint.best_model_path else None
    if best is None:
        log.warning("no best checkpoint (no ModelCheckpoint with a monitor): testing the last weights")
    selection = PROTOCOLS[cfg.get("protocol", "val")] if best else "last epoch"
    return _evaluate_and_report(cfg, trainer, method, datamodule, best, {"selection": selection}, started)


def _seed(cfg: DictConfig) -> int:
    """The run's seed, refused unless it is a whole number (Lightning would fail deep inside without the key)."""
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be a whole number (e.g. seed=3), got {seed!r}")
    return seed


def _resume_config(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """Checks the checkpoint to resume from and, unless ``resume_in_run_dir`` is false, continues the run in the
    checkpoint's own run directory: its checkpoints, logs and results stay together, and model selection keeps the
    best epoch from before the interruption (Lightning restores it only for the same checkpoint directory)."""
    read_checkpoint(checkpoint)
    own = checkpoint.resolve().parent
    if not cfg.get("resume_in_run_dir", True) or own.name != "checkpoints" or own.parent == Path(cfg.run_dir).resolve():
        return cfg
    log.info("resuming in the checkpoint's run directory %s (resume_in_run_dir=false starts a new one)", own.parent)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.run_dir = str(own.parent)
    return cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluates ``cfg.ckpt_path`` on val and test without training (with any selected diagnostics).

    Unless ``evaluate.use_run_config`` is false, the data, model and method configs are those of the run that
    wrote the checkpoint (``<run>/.hydra/config.yaml`` next to ``<run>/checkpoints/``), so the checkpoint is
    rebuilt as it was trained, except for the ``data.``, ``model.`` and ``method.`` keys the command line sets;
    the trainer, loggers, callbacks and diagnostics come from the command line.
    """
    started = time.monotonic()
    if not cfg.get("ckpt_path"):
        raise ValueError("task=evaluate needs ckpt_path=<run>/checkpoints/<file>.ckpt")
    checkpoint = Path(cfg.ckpt_path).expanduser()
    cfg = _with_training_config(cfg, checkpoint, read_checkpoint(checkpoint))
    pl.seed_everything(_seed(cfg), workers=True)
    datamodule, method = build(cfg)
    trainer = build_trainer(cfg)
    try:
        return _evaluate_and_report(cfg, trainer, method, datamodule, str(checkpoint),
                                    {"selection": "given checkpoint"}, started)
    except RuntimeError as error:
        if "state_dict" not in str(error):
            raise
        raise ValueError(f"the weights in {checkpoint} do not fit the model built from this config (data, model and "
                         f"method): {str(error).splitlines()[0]} Evaluate with the run's own config "
                         "(evaluate.use_run_config=true, the default) or give the data/model/method it was trained "
                         "with") from error


def _with_training_config(cfg: DictConfig, path: Path, checkpoint: Mapping[str, Any]) -> DictConfig:
    if not (cfg.get("evaluate") or {}).get("use_run_config", True):
        return cfg
    run_config = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        trained, source = OmegaConf.load(run_config), str(run_config)
    elif checkpoint.get("run_config") is not None:
        trained, source = OmegaConf.create(checkpoint["run_config"]), f"the checkpoint itself ({path})"
    else:
        log.warning("evaluate: %s has no run config (no <run>/.hydra/config.yaml beside it and none inside it): the "
                    "data, model and method configs are the command line's", path)
        return cfg
    log.info("evaluate: data, model and method configs from %s", source)
    given = cfg
    cfg = cfg.copy()
    keys = _command_line_keys()
    with open_dict(cfg):
        for key in RUN_CONFIG_KEYS:
            cfg[key] = trained[key]
        for key in keys:
            group = key.replace("/", ".").split(".", 1)[0]
            if group in RUN_CONFIG_KEYS and "." not in key and OmegaConf.select(given, key.replace("/", ".")) != \
                    OmegaConf.select(cfg, key.replace("/", ".")):
                log.warning("evaluate: %s= from the command line is ignored: the checkpoint was trained with another "
                            "%s config, which is used (evaluate.use_run_config=false takes the command line's)",
                            key, key)
        # Options given on the command line still apply (e.g. `method=mla method.fusion=fixed` evaluates an MLA
        # checkpoint with fixed fusion weights): they were composed into `given`, so their values are taken there.
        for key in keys:
            if key.split(".", 1)[0] in RUN_CONFIG_KEYS and "." in key:
                log.info("evaluate: %s from the command line", key)
                OmegaConf.update(cfg, key, OmegaConf.select(given, key), merge=False)
    return cfg


def _command_line_keys() -> list[str]:
    """The keys set by ``key=value`` overrides of this Hydra run (none outside one)."""
    if not HydraConfig.initialized():
        return []
    return [o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task if "=" in o]


def _evaluate_and_report(cfg: DictConfig, trainer: pl.Trainer, method: MultimodalMethod, datamodule: Any,
                         checkpoint: str | None, extra: dict[str, Any], started: float) -> dict[str, Any]:
    """Tests ``checkpoint`` on val and test and writes ``results.json``, with the environment and the seconds
    since ``started`` (this process's: a resumed run counts its resumed part)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    val = trainer.validate(method, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)[0]
    test = trainer.test(method, datamodule=datamodule, ckpt_path=checkpoint, verbose=False)[0]
    results = {
        "task": cfg.get("task", "train"),
        "val": _strip_stage(val, "val"),
        "test": _strip_stage(test, "test"),
        "best_checkpoint": checkpoint,
        "best_epoch": method.loaded_epoch if checkpoint else None,
        **extra,
        "environment": run_environment(trainer.strategy.root_device),
        "seconds": round(time.monotonic() - started, 1),
    }
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False))
        print(format_results(results, list(datamodule.modalities)))
        print(f"results: {run_dir / 'results.json'}")
    return results


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (``null``): JSON has no NaN or infinity, and a
    file with them is unreadable to strict parsers."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


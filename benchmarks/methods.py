"""One training epoch of every method against the joint baseline's, on the default workload, in one process.

Every ``conf/method/*.yaml`` (so a new method is measured without editing this file) is built on AV-Digits
(``data=avdigits model=avdigits``, as ``balance.run.build`` builds it, from the same seed, on one shared, set-up
datamodule) with the options that make its mechanism act in the timed epoch (``warmup_epochs=0``,
``modulation_starts=0``), and fitted for one epoch: ``Trainer(max_epochs=1, limit_val_batches=0,
num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
enable_model_summary=False)``, timed as a whole (the epoch-end hook included, e.g. the resampling methods'
valuation pass). The methods take turns within each repeat, in an order that rotates from repeat to repeat, after
one warm-up fit each; each figure is the median over ``--repeats``. ``ratio`` is a method's median epoch time / the
joint baseline's; ``paired`` the median over repeats of the method's time / the same repeat's joint time. The
table also counts, per training batch, the encoder forward passes (per modality) and the optimizer steps, the
work a method adds besides its arithmetic.

    python benchmarks/methods.py                          # 5 repeats: a few minutes on 2 idle cores
    python benchmarks/methods.py --threads 1 --repeats 7  # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import tempfile
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from common import CONF, add_machine_arguments, apply_machine_arguments, load_config, load_line, machine, quiet  # noqa: E402,E501
from balance.run import build_datamodule, build_model_config  # noqa: E402

DATA = ["data=avdigits", "model=avdigits", "callbacks.contributions=null"]
BASELINE = "joint"
# Options that would keep a mechanism idle in epoch 0, and the value that makes it act there.
ACTIVE = {"warmup_epochs": 0, "modulation_starts": 0}
# Values for the options a method requires (``???`` in its config).
REQUIRED = {"modality": "audio"}


def method_overrides() -> dict[str, list[str]]:
    """``{method: overrides}`` for every method config, each with its mechanism active from epoch 0."""
    variants = {}
    for path in sorted((CONF / "method").glob("*.yaml")):
        overrides = [*DATA, f"method={path.stem}"]
        cfg = load_config(overrides).method
        # `in .keys()`: a mandatory `???` value is not `in` the node itself.
        variants[path.stem] = overrides + [f"method.{k}={v}" for k, v in {**ACTIVE, **REQUIRED}.items()
                                           if k in cfg.keys()]
        if "teachers" in cfg.keys():
            variants[path.stem].append(f"method.teachers={untrained_teachers()}")
    return variants


@functools.lru_cache
def untrained_teachers() -> str:
    """``{m: <ckpt>}``: an untrained unimodal model per modality (UMT's teachers; their weights do not change the
    cost), saved with what a trained run's checkpoint holds for them."""
    directory = Path(tempfile.mkdtemp(prefix="balance-teachers-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    teachers = {}
    datamodule = build_datamodule(load_config(DATA))
    for m in datamodule.modalities:
        cfg = load_config([*DATA, "method=unimodal", f"method.modality={m}"])
        model = instantiate(build_model_config(cfg, datamodule))
        method = instantiate(cfg.method, model=model)
        torch.save({"state_dict": method.state_dict(),
                    "run_config": {"method": OmegaConf.to_container(cfg.method, resolve=True)}}, directory / f"{m}.ckpt")
        teachers[m] = directory / f"{m}.ckpt"
    return "{" + ", ".join(f"{m}: {path}" for m, path in teachers.items()) + "}"


class PassCounter:
    """Counts encoder forward passes (forward hooks on every encoder, and on MMTM mid-fusion, which runs them all)."""

    def __init__(self, model) -> None:
        self.forwards = 0
        if model.mid_fusion is not None:  # MMTM runs every encoder stage by stage, once per call
            model.mid_fusion.register_forward_hook(self._count_all)
        for encoder in model.encoders.values():
            encoder.register_forward_hook(self._count)
        self._encoders = len(model.encoders)

    def _count_all(self, *args) -> None:
        self.forwards += self._encoders

    def _count(self, *args) -> None:
        self.forwards += 1


def fit_once(cfg, datamodule, seed: int) -> dict[str, float]:
    """One timed one-epoch fit of the method ``cfg`` describes."""
    datamodule.train_plan.clear()
    pl.seed_everything(seed, verbose=False)
    model = instantiate(build_model_config(cfg, datamodule))
    method = instantiate(cfg.method, model=model)
    counter = PassCounter(model)
    start = time.perf_counter()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(method, datamodule=datamodule)
    seconds = time.perf_counter() - start
    batches = trainer.num_training_batches
    return {"seconds": seconds, "forwards": counter.forwards / len(model.encoders) / batches,
            "steps": trainer.global_step / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="*", default=None, help="a subset of the method configs (and joint)")
    add_machine_arguments(parser, device=False)
    args = parser.parse_args()
    before = apply_machine_arguments(args)
    quiet()
    variants = method_overrides()
    if args.methods:
        variants = {k: v for k, v in variants.items() if k in {BASELINE, *args.methods}}
    cfgs = {name: load_config(overrides) for name, overrides in variants.items()}
    datamodule = build_datamodule(cfgs[BASELINE])
    names = list(cfgs)
    for name in names:  # warm-up, not counted
        fit_once(cfgs[name], datamodule, args.seed)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            runs[name].append(fit_once(cfgs[name], datamodule, args.seed))
    base = statistics.median(r["seconds"] for r in runs[BASELINE])
    print(f"\nOne training epoch on AV-Digits, median of {args.repeats} repeats; {machine()}\n")
    print("| method | epoch (s) | ratio | paired | encoder passes / batch | optimizer steps / batch |")
    print("|---|---|---|---|---|---|")
    for name in names:
        seconds = [r["seconds"] for r in runs[name]]
        paired = statistics.median(s / j["seconds"] for s, j in zip(seconds, runs[BASELINE]))
        first = runs[name][0]
        print(f"| {name} | {statistics.median(seconds):.2f} | {statistics.median(seconds) / base:.2f} | "
              f"{paired:.2f} | {first['forwards']:.2f} | {first['steps']:.0f} |")
    print(f"\n{load_line(before)}")


if __name__ == "__main__":
    main()

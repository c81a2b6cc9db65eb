"""Online modality valuation: the epoch in which the resampling methods value, against the joint baseline's epoch.

Target: online mode (``method.valuation=online``: each training step's encoder features are valued
on the spot through the fusion head, so no extra encoder pass) adds at most 5 % to a training epoch.

On the default workload (``data=avdigits model=avdigits``, built from the Hydra configs exactly as
``balance.run.build`` builds it, from the same seed, on one shared, set-up datamodule), times one training epoch
of each of:

- ``joint``: ``method=joint``, the baseline;
- ``sample_level online``: ``method=sample_level method.valuation=online``;
- ``modality_level online``: ``method=modality_level method.valuation=online``;
- ``sample_level pass``: ``method=sample_level method.valuation=pass`` (for reference: the paper's extra
  eval-mode valuation pass over the training split after the epoch).

The resampling methods run with ``method.warmup_epochs=0``, so the timed epoch (epoch 0) is one in which they
value: online, inside every training step; then, in ``on_train_epoch_end``, they gather the table, build the next
epoch's plan and hand it to the datamodule (with ``pass``, the valuation pass runs there too). Each run is one
``Trainer(max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
enable_progress_bar=False, enable_model_summary=False)`` fit, timed as a whole from ``Trainer(...)`` to the end
of ``fit``, the epoch-end hook included. The fit is also split into the training steps (from the epoch's start
to the method's ``on_train_epoch_end``) and that hook (metrics logging, valuation table, plan).

Before every run the global RNGs are seeded identically and the datamodule's training plan is reset
(``train_plan.clear()``: a resampling run leaves its plan there), so every run trains on the same batches in
the same order with the same augmentations. Online valuation is gradient-free and the default concat head has
neither dropout nor BatchNorm, so every variant ends with the joint baseline's weights (checked: max |diff|).

After a warm-up (one run of each variant, not counted) the variants take turns within each repeat, in an order
that rotates from repeat to repeat, so that drift in a shared machine's speed falls on all of them alike; each
figure is the median over ``--repeats``. The AV-Digits cache is prepared on first use (about 30 s, not timed).
``torch``'s default number of threads (one per core) is kept unless ``--threads`` sets it (printed; one thread is
steadier on a machine shared with other work). Prints a markdown table; ``ratio`` is the variant's median fit time
/ the joint baseline's, ``paired ratio`` the median over repeats of the variant's fit time / the same repeat's joint
fit time (runs of one repeat are seconds apart, so that ratio cancels slower drift in the machine's speed).

    python benchmarks/online_valuation.py                   # 8 fits per variant: a few minutes on 2 idle cores
    python benchmarks/online_valuation.py --threads 1 --repeats 11             # on a busy, shared machine
    python benchmarks/online_valuation.py --profile "sample_level online"   # cProfile of one fit
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from common import add_machine_arguments, apply_machine_arguments, load_config, load_line, machine, quiet  # noqa: E402
from balance.run import build_datamodule, build_model_config  # noqa: E402

DATA = ["data=avdigits", "model=avdigits"]
BASELINE = "joint"
VARIANTS = {
    BASELINE: ["method=joint"],
    "sample_level online": ["method=sample_level", "method.valuation=online", "method.warmup_epochs=0"],
    "modality_level online": ["method=modality_level", "method.valuation=online", "method.warmup_epochs=0"],
    "sample_level pass": ["method=sample_level", "method.valuation=pass", "method.warmup_epochs=0"],
}




class EpochTimer(pl.Callback):
    """Splits a fit's only epoch into the training steps and the method's ``on_train_epoch_end``.

    Callback hooks run before the LightningModule's, so ``on_train_epoch_start`` here marks the epoch's start;
    the method's own ``on_train_epoch_end`` is wrapped (:meth:`wrap`) to time the hook itself.
    """

    def __init__(self) -> None:
        self.epoch_start = self.hook_start = self.hook_seconds = float("nan")

    def wrap(self, method: pl.LightningModule) -> None:
        """Times ``method.on_train_epoch_end`` (an instance attribute shadows the bound method; Lightning looks
        hooks up with ``getattr``, so it calls the wrapper)."""
        hook = method.on_train_epoch_end

        @functools.wraps(hook)
        def timed() -> None:
            self.hook_start = time.perf_counter()
            hook()
            self.hook_seconds = time.perf_counter() - self.hook_start

        method.on_train_epoch_end = timed

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = time.perf_counter()

    @property
    def steps_seconds(self) -> float:
        """From the epoch's start to the method's epoch-end hook: the training steps (and the loader)."""
        return self.hook_start - self.epoch_start


class Bench:
    """The shared datamodule and, per variant, its composed config."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cfgs = {name: load_config(DATA + overrides) for name, overrides in VARIANTS.items()}
        # Every variant shares the data config; one datamodule (prepared and set up once) serves all runs.
        self.datamodule = build_datamodule(self.cfgs[BASELINE])
        self.num_train = len(self.datamodule.datasets["train"])

    def fresh(self, name: str) -> tuple[torch.nn.Module, pl.LightningModule]:
        """Resets the training plan, seeds the global RNGs (model initialisation, shuffling, augmentation, the
        plan's generator), then builds the model and the method exactly as ``balance.run.build`` does.

        Returns:
            ``(model, method)``.
        """
        self.datamodule.train_plan.clear()
        pl.seed_everything(self.seed, verbose=False)
        cfg = self.cfgs[name]
        model = instantiate(build_model_config(cfg, self.datamodule))
        return model, instantiate(cfg.method, model=model)

    def run(self, name: str, profile: cProfile.Profile | None = None) -> dict[str, Any]:
        """One timed one-epoch fit of variant ``name``.

        Args:
            name: a key of :data:`VARIANTS`.
            profile: a profiler to enable around the fit (``--profile``).

        Returns:
            ``total``, ``steps`` and ``epoch_end`` seconds, the step count, the final weights and, for the
            resampling methods, the number of valued samples and the plan's length.
        """
        model, method = self.fresh(name)
        timer = EpochTimer()
        timer.wrap(method)
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
        )
        trainer.fit(method, datamodule=self.datamodule)
        if profile is not None:
            profile.disable()
        seconds = time.perf_counter() - start
        result = {"total": seconds, "steps": timer.steps_seconds, "epoch_end": timer.hook_seconds,
                  "global_step": trainer.global_step, "state": model.state_dict()}
        if hasattr(method, "valuation"):
            # The epoch must have been a valuing one, or the benchmark would time plain joint training.
            if method.table is None or not method.plan.active:
                raise RuntimeError(f"{name}: no valuation or plan after the epoch (warmup_epochs?)")
            result |= {"valued": len(method.table), "plan": len(method.plan)}
        return result


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts' floating-point entries."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def bench(repeats: int, seed: int) -> dict[str, Any]:
    """Warm-up, then ``repeats`` interleaved one-epoch fits of every variant; medians and checks."""
    setup = Bench(seed)
    names = list(VARIANTS)
    print(f"AV-Digits: {setup.num_train} training samples, batch {setup.datamodule.batch_size}, one epoch per fit",
          file=sys.stderr)
    for name in names:  # warm-up: allocator, lazy initialisation, Lightning's first-fit work
        setup.run(name)
    times: dict[str, dict[str, list[float]]] = {name: {"total": [], "steps": [], "epoch_end": []} for name in names}
    first: dict[str, dict[str, Any]] = {}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no variant always runs first
        for name in order:
            result = setup.run(name)
            for key, values in times[name].items():
                values.append(result[key])
            first.setdefault(name, result)
            print(f"repeat {r + 1}/{repeats} {name:>22}: {result['total']:.3f} s (steps {result['steps']:.3f} s, "
                  f"epoch end {result['epoch_end']:.3f} s)", file=sys.stderr)
    steps = {name: result["global_step"] for name, result in first.items()}
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"the variants ran different numbers of steps: {steps}")
    base = first[BASELINE]["state"]
    return {
        "num_train": setup.num_train,
        "steps": steps[BASELINE],
        "median": {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()},
        "spread": {name: (min(t["total"]), max(t["total"])) for name, t in times.items()},
        # Runs of one repeat follow each other within seconds, so a per-repeat ratio cancels slower drift.
        "paired": {name: statistics.median(v / b for v, b in zip(t["total"], times[BASELINE]["total"]))
                   for name, t in times.items()},
        "weight_diff": {name: max_difference(base, result["state"]) for name, result in first.items()},
        "plans": {name: (result["valued"], result["plan"]) for name, result in first.items() if "plan" in result},
    }


def print_table(row: dict[str, Any], repeats: int) -> None:
    """The markdown table (one row per variant) and the notes under it."""
    median = row["median"]
    base = median[BASELINE]
    print(f"\nOne training epoch ({row['steps']} steps, {row['num_train']} samples), CPU, {torch.get_num_threads()} "
          f"torch threads, median of {repeats} interleaved repeats; ratio = median fit time / median joint fit time; "
          f"paired ratio = median over repeats of fit time / the same repeat's joint fit time; steps = from the "
          f"epoch's start to the method's on_train_epoch_end; epoch end = that hook (metrics, valuation table, plan; "
          f"with pass, the valuation pass); extra per step = (steps - joint steps) / steps per epoch.\n")
    header = "| variant | fit (s) | ratio vs joint | paired ratio | steps (s) | epoch end (s) | extra per step (ms) |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for name, m in median.items():
        extra = "" if name == BASELINE else f"{1e3 * (m['steps'] - base['steps']) / row['steps']:+.2f}"
        print(f"| {name} | {m['total']:.3f} | {m['total'] / base['total']:.3f} | {row['paired'][name]:.3f} "
              f"| {m['steps']:.3f} | {m['epoch_end']:.4f} | {extra} |")
    print()
    spread = ", ".join(f"{name} {lo:.3f}-{hi:.3f} s" for name, (lo, hi) in row["spread"].items())
    print(f"- Range of the fit times: {spread}.")
    diffs = ", ".join(f"{name} {d:.1e}" for name, d in row["weight_diff"].items() if name != BASELINE)
    print(f"- Final weights, max |diff| from joint: {diffs}.")
    plans = ", ".join(f"{name}: {valued} valued, plan of {size}" for name, (valued, size) in row["plans"].items())
    print(f"- Valuation and next epoch's plan: {plans}.")


# The resampling methods' own valuation work (balance/methods/resampling.py), as cProfile names it.
VALUATION_WORK = ("observe_step", "_value_training_split", "build_plan", "_apply_plan")


def profile_fit(name: str, seed: int, top: int) -> None:
    """cProfile of one fit of variant ``name`` (after a warm-up one): the top of the cumulative listing and the
    cumulative time of the valuation's own functions."""
    setup = Bench(seed)
    setup.run(name)
    profile = cProfile.Profile()
    result = setup.run(name, profile)
    stats = pstats.Stats(profile)
    print(f"\ncProfile of one fit of {name!r}, {result['global_step']} steps, {result['total']:.3f} s under the "
          f"profiler:")
    stats.sort_stats("cumulative").print_stats(top)
    watched = ("observe_step", "_value_online", "subset_values", "shapley_values", "_value_training_split",
               "value_dataloader", "build_plan", "_replan", "log_metrics", "log_epoch_metrics",
               "training_step")
    ours = {(Path(path).name, func): (calls, cumulative)
            for (path, _, func), (_, calls, _, cumulative, _) in stats.stats.items()
            if func in watched and ("balance" in path or "datamodules" in path)}
    for (file, func), (calls, cumulative) in sorted(ours.items(), key=lambda kv: -kv[1][1]):
        print(f"  {file + ':' + func:>36}: {calls} calls, {cumulative:.3f} s cumulative, "
              f"{1e3 * cumulative / max(calls, 1):.3f} ms per call")
    # What valuation itself adds: the per-step hook, then the epoch end's table, plan and hand-over to the data.
    valuation = sum(cumulative for (file, func), (_, cumulative) in ours.items()
                    if file == "resampling.py" and func in VALUATION_WORK)
    print(f"valuation work ({' + '.join(VALUATION_WORK)}): {valuation:.3f} s of the {result['total']:.3f} s fit "
          f"({100 * valuation / result['total']:.2f} %, under the profiler)")



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed fits per variant (after one warm-up fit)")
    parser.add_argument("--seed", type=int, default=0)
    add_machine_arguments(parser, device=False)
    parser.add_argument("--profile", choices=list(VARIANTS), default=None,
                        help="instead of the benchmark, cProfile one fit of this variant")
    parser.add_argument("--top", type=int, default=40, help="with --profile: lines of the cumulative listing")
    args = parser.parse_args(argv)
    quiet()
    before = apply_machine_arguments(args)
    print(machine(), file=sys.stderr)
    if args.profile:
        profile_fit(args.profile, args.seed, args.top)
        return
    print_table(bench(args.repeats, args.seed), args.repeats)
    print(f"\n{load_line(before)}")


if __name__ == "__main__":
    main()

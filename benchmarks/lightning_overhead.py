"""Lightning loop overhead: the joint baseline under ``pytorch_lightning.Trainer`` against a plain PyTorch loop.

Both sides train the same model (built from the Hydra configs exactly as ``balance.run.build`` builds it, from the
same seed), on the same datamodule's training loader (same shuffling order: the global RNG is re-seeded before
every run), with the same optimizer (the method config's Adam), for the same number of epochs, in one process:

- ``plain``: ``encode``, ``fuse``, ``unimodal_logits``, cross-entropy, ``zero_grad``, ``backward``, ``step``;
- ``plain+metrics``: the same plus what ``MultimodalMethod.log_metrics`` computes: the method's own
  ``train_metrics`` collection (fused accuracy, macro-F1, accuracy per modality) updated every step, a running
  batch-weighted mean of the loss, and ``compute()`` + ``reset()`` at every epoch end;
- ``lightning``: ``balance.methods.JointTraining`` in ``Trainer(accelerator="cpu", devices=1, logger=False,
  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
  limit_val_batches=0)``; timed from ``Trainer(...)`` to the end of ``fit`` ("total") and, through a callback,
  from ``on_train_start`` to ``on_train_end`` ("loop": the epochs without the trainer's set-up and tear-down);
- ``lightning+fix`` (``--with-fix``): the same with :class:`EpochEndLogging`, a candidate fix of the method's
  per-step ``self.log`` calls (metrics updated per step, computed and logged once per epoch).

Variants:

- ``cnn``: ``data=avdigits model=avdigits`` (the default ``python train.py`` workload: ``SmallCNNEncoder`` on
  [1, 64, 64] log-mel spectrograms and on [1, 8, 8] images, concat fusion, batch 64), where compute dominates.
  The AV-Digits cache is prepared on first use (about 30 s, not timed).
- ``mlp``: ``data=synthetic model=mlp`` (``MLPEncoder`` on 16-d feature vectors, batch 64), where a step is
  about a millisecond of compute and per-step overhead dominates.

After the warm-up (one run of each side, not counted), the sides take turns within each repeat, in an order that
rotates from repeat to repeat, so that drift in a shared machine's speed falls on all of them alike; each figure
is the median over ``--repeats``. The final weights of ``plain+metrics`` and ``lightning`` are compared, to show
that both did the same work. ``torch``'s default number of threads is kept (printed). Prints a markdown table;
``ratio`` is lightning time / plain+metrics time (1.00 = no overhead).

    python benchmarks/lightning_overhead.py                     # both variants, about 2 minutes on 2 cores
    python benchmarks/lightning_overhead.py --with-fix          # also the candidate fix (about 2.5 minutes)
    python benchmarks/lightning_overhead.py --variant mlp --epochs 30 --repeats 7
    python benchmarks/lightning_overhead.py --variant mlp --profile --with-fix   # cProfile of one Lightning fit
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torchmetrics import MeanMetric, MetricCollection  # noqa: E402

from balance.methods import JointTraining  # noqa: E402
from balance.run import build_datamodule, build_model_config  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = {
    "cnn": {"overrides": ["data=avdigits", "model=avdigits", "method=joint"], "epochs": 1,
            "about": "SmallCNNEncoder x2 (AV-Digits: [1,64,64] log-mel + [1,8,8] image)"},
    "mlp": {"overrides": ["data=synthetic", "model=mlp", "method=joint"], "epochs": 20,
            "about": "MLPEncoder x2 (synthetic: 2 x 16-d features)"},
}
SIDES = ("plain", "plain+metrics", "lightning")
FIX = "lightning+fix"


class EpochEndLogging(JointTraining):
    """A candidate fix for ``MultimodalMethod.log_metrics`` (``--with-fix``; not the project's code).

    The project's method calls ``self.log`` ``M + 3`` times per step (one per metric object, one for the loss);
    each call costs Lightning a few hundred microseconds of bookkeeping (``_ResultCollection.log`` moves the
    stored entry with ``apply_to_collection`` over its ``__dict__``, every call). Here a step only updates the
    metrics (the loss through a ``MeanMetric`` weighted by the batch size, in the same collection) and the epoch's
    end computes the collection (which syncs across ranks), logs the values with one ``log_dict`` and resets.
    Same values as the project's logging (checked against it on every run).
    """

    def _stage_metrics(self, num_classes: int) -> MetricCollection:
        collection = super()._stage_metrics(num_classes)
        collection.add_metrics({"loss": MeanMetric()})
        return collection

    def log_metrics(self, stage, logits, unimodal_logits, labels, loss) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        metrics["acc"].update(logits, labels)
        metrics["f1"].update(logits, labels)
        for m, unimodal in unimodal_logits.items():
            metrics[f"acc_{m}"].update(unimodal, labels)
        metrics["loss"].update(loss, weight=labels.shape[0])

    def _log_epoch(self, stage: str) -> None:
        metrics = getattr(self, f"{stage}_metrics")
        if metrics["acc"].update_count == 0:
            return
        values = {f"{stage}/{name}": value for name, value in metrics.compute().items()}
        metrics.reset()
        shown = {f"{stage}/acc", "train/loss"}
        self.log_dict({k: v for k, v in values.items() if k in shown}, prog_bar=True)
        self.log_dict({k: v for k, v in values.items() if k not in shown})

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", module="lightning_fabric")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


def load_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("train", overrides=overrides)


class Setup:
    """One variant: its config and its (set-up) datamodule, shared by every run of every side."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.seed = seed
        self.cfg = load_config(VARIANTS[name]["overrides"])
        self.datamodule = build_datamodule(self.cfg)
        self.num_train = len(self.datamodule.datasets["train"])

    def fresh(self, fix: bool = False) -> tuple[Any, Any]:
        """Seeds the global RNGs (model initialisation and, later, the loader's shuffling), then builds the model
        and the method around it exactly as ``balance.run.build`` does (``fix``: the candidate-fix method)."""
        pl.seed_everything(self.seed, verbose=False)
        model = instantiate(build_model_config(self.cfg, self.datamodule))
        if fix:
            return model, instantiate(self.cfg.method, model=model, _target_=f"{__name__}.EpochEndLogging")
        return model, instantiate(self.cfg.method, model=model)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        return instantiate(self.cfg.method.optimizer)(params=[p for p in model.parameters() if p.requires_grad])


def run_plain(setup: Setup, epochs: int, metrics: bool) -> dict[str, Any]:
    model, method = setup.fresh()
    start = time.perf_counter()
    optimizer = setup.optimizer(model)
    loader = setup.datamodule.train_dataloader()
    collection = method.train_metrics
    model.train()
    steps = 0
    for _ in range(epochs):
        loss_sum = torch.zeros(())
        count = 0
        for batch in loader:
            labels = batch["label"]
            features = model.encode(batch["inputs"])
            logits = model.fuse(features, keep=batch.get("present"))
            unimodal = model.unimodal_logits(features)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if metrics:  # what MultimodalMethod.log_metrics accumulates every step
                logits = logits.detach()
                collection["acc"].update(logits, labels)
                collection["f1"].update(logits, labels)
                for m, u in unimodal.items():
                    collection[f"acc_{m}"].update(u.detach(), labels)
                loss_sum += loss.detach() * labels.shape[0]
                count += labels.shape[0]
        if metrics:  # what Lightning does with logged metrics at the epoch's end
            values = {name: metric.compute() for name, metric in collection.items()}
            values["loss"] = loss_sum / count
            for metric in collection.values():
                metric.reset()
    seconds = time.perf_counter() - start
    return {"total": seconds, "loop": seconds, "steps": steps, "state": model.state_dict()}


class LoopTimer(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.threads = torch.get_num_threads()
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def run_lightning(setup: Setup, epochs: int, profile: cProfile.Profile | None = None, fix: bool = False
                  ) -> dict[str, Any]:
    model, method = setup.fresh(fix)
    timer = LoopTimer()
    start = time.perf_counter()
    if profile is not None:
        profile.enable()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(method, datamodule=setup.datamodule)
    if profile is not None:
        profile.disable()
    seconds = time.perf_counter() - start
    if timer.threads != torch.get_num_threads():
        raise RuntimeError(f"Lightning changed the thread count: {timer.threads} vs {torch.get_num_threads()}")
    return {"total": seconds, "loop": timer.seconds, "steps": trainer.global_step, "state": model.state_dict(),
            "logged": {k: v.item() for k, v in trainer.callback_metrics.items()}}


def run_side(setup: Setup, side: str, epochs: int) -> dict[str, Any]:
    if side in ("lightning", FIX):
        return run_lightning(setup, epochs, fix=side == FIX)
    return run_plain(setup, epochs, metrics=side == "plain+metrics")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def bench(name: str, epochs: int, repeats: int, seed: int, sides: tuple[str, ...]) -> dict[str, Any]:
    setup = Setup(name, seed)
    print(f"[{name}] {VARIANTS[name]['about']}; {setup.num_train} training samples, batch "
          f"{setup.datamodule.batch_size}, {epochs} epoch(s) per run", file=sys.stderr)
    for side in sides:  # warm-up: allocator, lazy initialisation, Lightning's first-fit work
        run_side(setup, side, epochs)
    times: dict[str, dict[str, list[float]]] = {side: {"total": [], "loop": []} for side in sides}
    first: dict[str, dict[str, Any]] = {}
    steps: dict[str, int] = {}
    for r in range(repeats):
        order = sides[r % len(sides):] + sides[:r % len(sides)]  # rotate, so no side always runs first
        for side in order:
            result = run_side(setup, side, epochs)
            times[side]["total"].append(result["total"])
            times[side]["loop"].append(result["loop"])
            first.setdefault(side, result)
            steps[side] = result["steps"]
            print(f"[{name}] repeat {r + 1}/{repeats} {side:>13}: {result['total']:.3f} s "
                  f"(loop {result['loop']:.3f} s)", file=sys.stderr)
    if len(set(steps.values())) != 1:
        raise RuntimeError(f"the sides ran different numbers of steps: {steps}")
    if FIX in sides:  # the candidate fix must log what the project's method logs
        ours, theirs = first[FIX]["logged"], first["lightning"]["logged"]
        if ours.keys() != theirs.keys() or any(abs(ours[k] - theirs[k]) > 1e-5 for k in ours):
            raise RuntimeError(f"the candidate fix logs {ours}, the method {theirs}")
    median = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
    samples = setup.num_train * epochs
    return {
        "name": name,
        "epochs": epochs,
        "steps": steps["plain"],
        "samples": samples,
        "median": median,
        "throughput": {side: samples / median[side]["total"] for side in sides},
        "weight_diff": {side: max_difference(first["plain+metrics"]["state"], first[side]["state"])
                        for side in sides if side.startswith("lightning")},
    }


def print_table(rows: list[dict[str, Any]], repeats: int, sides: tuple[str, ...]) -> None:
    fix = FIX in sides
    print(f"\nJoint baseline, CPU, {torch.get_num_threads()} torch threads, median of {repeats} interleaved repeats; "
          f"samples/s over whole runs; ratio = lightning time / plain+metrics time (loop only: from on_train_start "
          f"to on_train_end, without the trainer's set-up).\n")
    header = ("| variant | epochs x steps | plain samples/s | plain+metrics samples/s | lightning samples/s | ratio "
              "| ratio, loop only | lightning / plain w/o metrics |")
    if fix:
        header += " lightning+fix samples/s | ratio, fix |"
    print(header)
    print("|---" * header.count(" | ") + "|---|")
    for row in rows:
        t, m = row["throughput"], row["median"]
        line = (f"| {row['name']} | {row['epochs']} x {row['steps'] // row['epochs']} | {t['plain']:.0f} "
                f"| {t['plain+metrics']:.0f} | {t['lightning']:.0f} "
                f"| {m['lightning']['total'] / m['plain+metrics']['total']:.2f} "
                f"| {m['lightning']['loop'] / m['plain+metrics']['loop']:.2f} "
                f"| {m['lightning']['total'] / m['plain']['total']:.2f} |")
        if fix:
            line += f" {t[FIX]:.0f} | {m[FIX]['total'] / m['plain+metrics']['total']:.2f} |"
        print(line)
    print()
    for row in rows:
        m = row["median"]
        per_step = ", ".join(f"{side} {1e3 * m[side]['loop'] / row['steps']:.2f} ms" for side in sides)
        diffs = ", ".join(f"{side} {d:.1e}" for side, d in row["weight_diff"].items())
        print(f"- {row['name']}: {VARIANTS[row['name']]['about']}. Per step (loop): {per_step}. Lightning's "
              f"set-up + tear-down: {m['lightning']['total'] - m['lightning']['loop']:.3f} s per fit. Final weights, "
              f"max |diff| from plain+metrics: {diffs}.")


def profile_lightning(setup: Setup, epochs: int, fix: bool) -> None:
    """cProfile of one Lightning fit (after a warm-up one): the top of the cumulative listing, then the self
    time of Lightning's own Python code and of ``LightningModule.log`` per step."""
    run_lightning(setup, epochs, fix=fix)
    profile = cProfile.Profile()
    steps = run_lightning(setup, epochs, profile, fix=fix)["steps"]
    stats = pstats.Stats(profile)
    label = "candidate fix" if fix else "JointTraining"
    print(f"\n[{setup.name}] cProfile of one Lightning fit ({label}), {epochs} epoch(s), {steps} steps:")
    stats.sort_stats("cumulative").print_stats(35)
    own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.stats.items()
              if any(p in path for p in ("pytorch_lightning", "lightning_fabric", "lightning_utilities")))
    logs = {k: v for k, v in stats.stats.items() if k[0].endswith("core/module.py") and k[2] in ("log", "log_dict")}
    calls = sum(v[1] for k, v in logs.items() if k[2] == "log")
    log_time = max((v[3] for k, v in logs.items() if k[2] == "log"), default=0.0)
    print(f"[{setup.name}] ({label}, under the profiler) self time in Lightning's Python code: "
          f"{1e3 * own / steps:.3f} ms per step; LightningModule.log: {calls} calls, {1e3 * log_time / steps:.3f} ms "
          f"per step cumulative")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ", ".join(f"{k} {v['epochs']}" for k, v in VARIANTS.items())
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default: {defaults})")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up run)")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-fix", action="store_true",
                        help="also time the candidate fix (EpochEndLogging: metrics logged once per epoch)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark, cProfile one Lightning fit per variant (and per method with "
                             "--with-fix)")
    args = parser.parse_args(argv)
    quiet()
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    sides = SIDES + ((FIX,) if args.with_fix else ())
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, {os.cpu_count()} CPUs ({cpu}), "
          f"torch threads {torch.get_num_threads()} (default, unchanged)", file=sys.stderr)

    if args.profile:
        for name in names:
            setup = Setup(name, args.seed)
            for fix in (False, True) if args.with_fix else (False,):
                profile_lightning(setup, args.epochs or VARIANTS[name]["epochs"], fix)
        return

    before = os.getloadavg()[0]
    if before > 0.5:
        print(f"warning: the 1-minute load average is {before:.2f} before the benchmark: other processes compete "
              f"for the CPU (with torch's default threads, one per core, contention slows small ops erratically)",
              file=sys.stderr)
    rows = [bench(name, args.epochs or VARIANTS[name]["epochs"], args.repeats, args.seed, sides) for name in names]
    print_table(rows, args.repeats, sides)
    print(f"\n1-minute load average: {before:.2f} before, {os.getloadavg()[0]:.2f} after (this process included).")


if __name__ == "__main__":
    main()

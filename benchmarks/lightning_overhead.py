"""Lightning loop overhead: the joint baseline under ``pytorch_lightning.Trainer`` against a plain PyTorch loop.

Both sides train the same model (built from the Hydra configs exactly as ``balance.run.build`` builds it, from the
same seed), on the same datamodule's training loader (same shuffling order: the global RNG is re-seeded before
every run), with the same optimizer (the method config's Adam), for the same number of epochs, in one process:

- ``plain``: ``encode``, ``fuse``, ``unimodal_logits``, cross-entropy, ``zero_grad``, ``backward``, ``step``;
- ``plain+metrics``: the same plus what the method's logging computes: every step, what
  ``MultimodalMethod.log_metrics`` does (update the method's own ``train_metrics`` collection: fused accuracy,
  macro-F1, accuracy per modality and the loss as a ``MeanMetric`` weighted by the batch size), and at every
  epoch end what ``log_epoch_metrics`` does before logging (``compute()`` and ``reset()`` of the collection);
- ``lightning``: ``balance.methods.JointTraining`` in ``Trainer(accelerator="cpu", devices=1, logger=False,
  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
  limit_val_batches=0)``; timed from ``Trainer(...)`` to the end of ``fit`` ("total") and, through a callback,
  from ``on_train_start`` to ``on_train_end`` ("loop": the epochs without the trainer's set-up and tear-down).

Variants:

- ``cnn``: ``data=avdigits model=avdigits`` (the default ``python train.py`` workload: ``SmallCNNEncoder`` on
  [1, 64, 64] log-mel spectrograms and on [1, 8, 8] images, concat fusion, batch 64), where compute dominates.
  The AV-Digits cache is prepared on first use (about 30 s, not timed).
- ``mlp``: ``data=synthetic model=mlp`` (``MLPEncoder`` on 16-d feature vectors, batch 64), where a step is
  about a millisecond of compute and per-step overhead dominates.

After the warm-up (one run of each side, not counted), the sides take turns within each repeat, in an order that
rotates from repeat to repeat, so that drift in a shared machine's speed falls on all of them alike; each figure
is the median over ``--repeats``. The final weights of ``plain+metrics`` and ``lightning`` are compared, and so are
the last epoch's metric values (what ``plain+metrics`` computed against what the method logged), to show that both
did the same work. ``torch``'s default number of threads (one per core) is kept unless ``--threads`` sets it
(printed; one thread is steadier on a machine shared with other work). Prints a markdown table; ``ratio`` is
lightning time / plain+metrics time (1.00 = no overhead).

    python benchmarks/lightning_overhead.py                     # both variants, about 2 minutes on 2 idle cores
    python benchmarks/lightning_overhead.py --variant mlp --epochs 30 --repeats 7
    python benchmarks/lightning_overhead.py --threads 1 --repeats 9              # on a busy, shared machine
    python benchmarks/lightning_overhead.py --variant mlp --profile              # cProfile of one Lightning fit
"""

from __future__ import annotations

import argparse
import cProfile
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
from torch.nn import functional as F  # noqa: E402

from common import add_machine_arguments, apply_machine_arguments, load_config, load_line, machine, quiet  # noqa: E402
from balance.run import build_datamodule, build_model_config  # noqa: E402

VARIANTS = {
    "cnn": {"overrides": ["data=avdigits", "model=avdigits", "method=joint"], "epochs": 1,
            "about": "SmallCNNEncoder x2 (AV-Digits: [1,64,64] log-mel + [1,8,8] image)"},
    "mlp": {"overrides": ["data=synthetic", "model=mlp", "method=joint"], "epochs": 20,
            "about": "MLPEncoder x2 (synthetic: 2 x 16-d features)"},
}
SIDES = ("plain", "plain+metrics", "lightning")




class Setup:
    """One variant: its config and its (set-up) datamodule, shared by every run of every side."""

    def __init__(self, name: str, seed: int) -> None:
        self.name = name
        self.seed = seed
        self.cfg = load_config(VARIANTS[name]["overrides"])
        self.datamodule = build_datamodule(self.cfg)
        self.num_train = len(self.datamodule.datasets["train"])

    def fresh(self) -> tuple[Any, Any]:
        """Seeds the global RNGs (model initialisation and, later, the loader's shuffling), then builds the model
        and the method around it exactly as ``balance.run.build`` does.

        Returns:
            ``(model, method)``.
        """
        pl.seed_everything(self.seed, verbose=False)
        model = instantiate(build_model_config(self.cfg, self.datamodule))
        return model, instantiate(self.cfg.method, model=model)

    def optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The method config's optimizer over the model's trainable parameters (as ``configure_optimizers``)."""
        return instantiate(self.cfg.method.optimizer)(params=[p for p in model.parameters() if p.requires_grad])


def update_metrics(collection: Any, logits: torch.Tensor, unimodal: dict[str, torch.Tensor], labels: torch.Tensor,
                   loss: torch.Tensor) -> None:
    """What ``MultimodalMethod.log_metrics("train", ...)`` does every step, on the method's own collection."""
    collection["acc"].update(logits, labels)
    collection["f1"].update(logits, labels)
    for m, u in unimodal.items():
        collection[f"acc_{m}"].update(u, labels)
    collection["loss"].update(loss, weight=labels.shape[0])


def epoch_metrics(collection: Any) -> dict[str, float]:
    """What ``MultimodalMethod.log_epoch_metrics("train")`` computes at the epoch's end (before ``log_dict``)."""
    values = {f"train/{name}": value.item() for name, value in collection.compute().items()}
    collection.reset()
    return values


def run_plain(setup: Setup, epochs: int, metrics: bool) -> dict[str, Any]:
    """One plain-PyTorch training run (``metrics``: with the method's metric work), timed as a whole."""
    model, method = setup.fresh()
    start = time.perf_counter()
    optimizer = setup.optimizer(model)
    loader = setup.datamodule.train_dataloader()
    model.train()
    steps = 0
    logged: dict[str, float] = {}
    for _ in range(epochs):
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
            if metrics:
                update_metrics(method.train_metrics, logits.detach(), {m: u.detach() for m, u in unimodal.items()},
                               labels, loss.detach())
        if metrics:
            logged = epoch_metrics(method.train_metrics)
    seconds = time.perf_counter() - start
    return {"total": seconds, "loop": seconds, "steps": steps, "state": model.state_dict(), "logged": logged}


class LoopTimer(pl.Callback):
    """Times the training loop alone (``on_train_start`` to ``on_train_end``) and records torch's thread count."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.threads = torch.get_num_threads()
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds = time.perf_counter() - self.start


def run_lightning(setup: Setup, epochs: int, profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """One ``Trainer.fit`` of the method, timed from ``Trainer(...)`` to the end of ``fit`` (and its loop alone).

    Args:
        setup: the variant.
        epochs: ``max_epochs``.
        profile: a profiler to enable around the fit (``--profile``).
    """
    model, method = setup.fresh()
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
    # Lightning must not change torch's threads, or the comparison would not be like for like.
    if timer.threads != torch.get_num_threads():
        raise RuntimeError(f"Lightning changed the thread count: {timer.threads} vs {torch.get_num_threads()}")
    return {"total": seconds, "loop": timer.seconds, "steps": trainer.global_step, "state": model.state_dict(),
            "logged": {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}}


def run_side(setup: Setup, side: str, epochs: int) -> dict[str, Any]:
    """One timed run of ``side`` (one of :data:`SIDES`)."""
    if side == "lightning":
        return run_lightning(setup, epochs)
    return run_plain(setup, epochs, metrics=side == "plain+metrics")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts' floating-point entries."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def check_same_work(plain: dict[str, Any], lightning: dict[str, Any]) -> float:
    """Raises unless plain+metrics computed the metric values that the method logged (same keys, same values):
    the plain side must do exactly the method's metric work. Returns the final weights' max |diff|."""
    ours, theirs = plain["logged"], lightning["logged"]
    if ours.keys() != theirs.keys() or any(abs(ours[k] - theirs[k]) > 1e-5 for k in ours):
        raise RuntimeError(f"plain+metrics computed {ours}, the method logged {theirs}")
    return max_difference(plain["state"], lightning["state"])


def bench(name: str, epochs: int, repeats: int, seed: int) -> dict[str, Any]:
    """Warm-up, then ``repeats`` interleaved runs of every side; medians, throughputs and the same-work checks."""
    setup = Setup(name, seed)
    print(f"[{name}] {VARIANTS[name]['about']}; {setup.num_train} training samples, batch "
          f"{setup.datamodule.batch_size}, {epochs} epoch(s) per run", file=sys.stderr)
    for side in SIDES:  # warm-up: allocator, lazy initialisation, Lightning's first-fit work
        run_side(setup, side, epochs)
    times: dict[str, dict[str, list[float]]] = {side: {"total": [], "loop": []} for side in SIDES}
    first: dict[str, dict[str, Any]] = {}
    steps: dict[str, int] = {}
    for r in range(repeats):
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]  # rotate, so no side always runs first
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
    weight_diff = check_same_work(first["plain+metrics"], first["lightning"])
    median = {side: {k: statistics.median(v) for k, v in t.items()} for side, t in times.items()}
    samples = setup.num_train * epochs
    return {
        "name": name,
        "epochs": epochs,
        "steps": steps["plain"],
        "samples": samples,
        "median": median,
        "spread": {side: (min(t["total"]), max(t["total"])) for side, t in times.items()},
        "throughput": {side: samples / median[side]["total"] for side in SIDES},
        "weight_diff": weight_diff,
        "logged": first["lightning"]["logged"],
    }


def print_table(rows: list[dict[str, Any]], repeats: int) -> None:
    """The markdown table (one row per variant) and a line of per-step figures per variant."""
    print(f"\nJoint baseline, CPU, {torch.get_num_threads()} torch threads, median of {repeats} interleaved repeats; "
          f"samples/s over whole runs; ratio = lightning time / plain+metrics time (loop only: from on_train_start "
          f"to on_train_end, without the trainer's set-up).\n")
    header = ("| variant | epochs x steps | plain samples/s | plain+metrics samples/s | lightning samples/s | ratio "
              "| ratio, loop only | lightning / plain w/o metrics |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for row in rows:
        t, m = row["throughput"], row["median"]
        print(f"| {row['name']} | {row['epochs']} x {row['steps'] // row['epochs']} | {t['plain']:.0f} "
              f"| {t['plain+metrics']:.0f} | {t['lightning']:.0f} "
              f"| {m['lightning']['total'] / m['plain+metrics']['total']:.2f} "
              f"| {m['lightning']['loop'] / m['plain+metrics']['loop']:.2f} "
              f"| {m['lightning']['total'] / m['plain']['total']:.2f} |")
    print()
    for row in rows:
        m = row["median"]
        per_step = ", ".join(f"{side} {1e3 * m[side]['loop'] / row['steps']:.2f} ms" for side in SIDES)
        spread = ", ".join(f"{side} {lo:.3f}-{hi:.3f} s" for side, (lo, hi) in row["spread"].items())
        print(f"- {row['name']}: {VARIANTS[row['name']]['about']}. Per step (loop): {per_step}. Lightning's "
              f"set-up + tear-down: {m['lightning']['total'] - m['lightning']['loop']:.3f} s per fit. Range of the "
              f"run times: {spread}. Final weights, max |diff| lightning vs plain+metrics: {row['weight_diff']:.1e}; "
              f"the method logged the metric values plain+metrics computed ({len(row['logged'])} keys).")


def profile_lightning(setup: Setup, epochs: int) -> None:
    """cProfile of one Lightning fit (after a warm-up one): the top of the cumulative listing, then the self
    time of Lightning's own Python code and of ``LightningModule.log`` per step."""
    run_lightning(setup, epochs)
    profile = cProfile.Profile()
    steps = run_lightning(setup, epochs, profile)["steps"]
    stats = pstats.Stats(profile)
    print(f"\n[{setup.name}] cProfile of one Lightning fit (JointTraining), {epochs} epoch(s), {steps} steps:")
    stats.sort_stats("cumulative").print_stats(35)
    own = sum(tt for (path, _, _), (_, _, tt, _, _) in stats.stats.items()
              if any(p in path for p in ("pytorch_lightning", "lightning_fabric", "lightning_utilities")))
    # log_dict calls log once per key, so log's cumulative time covers every logged value without double counting.
    logs = [v for k, v in stats.stats.items() if k[0].endswith("core/module.py") and k[2] == "log"]
    calls = sum(v[1] for v in logs)
    log_time = sum(v[3] for v in logs)
    print(f"[{setup.name}] (under the profiler) self time in Lightning's Python code: {1e3 * own / steps:.3f} ms "
          f"per step; LightningModule.log: {calls} calls, {1e3 * log_time / steps:.3f} ms per step cumulative")



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = ", ".join(f"{k} {v['epochs']}" for k, v in VARIANTS.items())
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default: {defaults})")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (after one warm-up run)")
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    add_machine_arguments(parser, device=False)
    parser.add_argument("--profile", action="store_true",
                        help="instead of the benchmark, cProfile one Lightning fit per variant")
    args = parser.parse_args(argv)
    quiet()
    before = apply_machine_arguments(args)
    names = list(VARIANTS) if args.variant == "all" else [args.variant]
    print(machine(), file=sys.stderr)

    if args.profile:
        for name in names:
            profile_lightning(Setup(name, args.seed), args.epochs or VARIANTS[name]["epochs"])
        return

    rows = [bench(name, args.epochs or VARIANTS[name]["epochs"], args.repeats, args.seed) for name in names]
    print_table(rows, args.repeats)
    print(f"\n{load_line(before)}")


if __name__ == "__main__":
    main()

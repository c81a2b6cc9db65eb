"""Valuation pass against one evaluation pass (target: at most 1.1x for M = 2 and 3).

On the same synthetic image-like data ([N, 1, 32, 32] per modality) and the same eval-mode model (a
``SmallCNNEncoder`` per modality, concat fusion), times per pass over the data:

- ``plain``: one evaluation pass, ``fuse(encode(x))``;
- ``fast``: the valuation pass as the methods run it, ``modality_shapley(drop="features")``: encode once, the
  fusion head on all 2^M - 1 non-empty subsets in one call, Shapley values;
- ``inputs+cache``: ``drop="inputs"`` with a fresh ``ZeroInputCache`` per pass (encode once plus one zero sample);
- ``naive``: ``drop="inputs"`` without the cache, the whole model once per non-empty subset (2^M - 1 passes;
  the empty set is never evaluated, v({}) = 0).

Each time is the median of ``--repeats`` passes; within a repeat the variants take turns batch by batch, so
that drift in a shared machine's speed hits all of them alike. Prints a markdown table.

    python benchmarks/valuation_pass.py                     # CPU, or the GPU when there is one
    python benchmarks/valuation_pass.py --device cpu --num-samples 512 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch

from common import add_machine_arguments, apply_machine_arguments, timed  # noqa: E402
from balance.models import ConcatFusion, MultimodalModel, SmallCNNEncoder
from balance.valuation import ZeroInputCache, modality_shapley


def make_batches(num_modalities: int, num_samples: int, batch_size: int, num_classes: int,
                 device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = {}
    for i in range(num_modalities):
        prototypes = torch.randn(num_classes, 1, 32, 32, generator=generator)
        inputs[f"m{i}"] = prototypes[labels] + torch.randn(num_samples, 1, 32, 32, generator=generator)
    return [
        {"inputs": {m: x[start:start + batch_size].to(device) for m, x in inputs.items()},
         "label": labels[start:start + batch_size].to(device),
         "index": torch.arange(start, min(start + batch_size, num_samples), device=device)}
        for start in range(0, num_samples, batch_size)
    ]


def make_model(num_modalities: int, num_classes: int, device: torch.device) -> MultimodalModel:
    torch.manual_seed(0)
    encoders = {f"m{i}": SmallCNNEncoder(1, channels=(32, 64, 128), out_dim=128) for i in range(num_modalities)}
    return MultimodalModel(encoders, partial(ConcatFusion), num_classes=num_classes).to(device).eval()



def variants(model: MultimodalModel) -> dict[str, Callable[[dict, ZeroInputCache], None]]:
    """Each variant's work on one batch (the cache is the pass's: fresh per pass, used by ``inputs+cache``)."""
    return {
        "plain": lambda batch, cache: model.fuse(model.encode(batch["inputs"])).argmax(-1),
        "fast": lambda batch, cache: modality_shapley(model, batch, drop="features"),
        "inputs+cache": lambda batch, cache: modality_shapley(model, batch, drop="inputs", cache=cache),
        "naive": lambda batch, cache: modality_shapley(model, batch, drop="inputs"),
    }


def one_repeat(model: MultimodalModel, batches: list[dict], device: torch.device) -> dict[str, float]:
    """One pass over the data per variant; the variants take turns batch by batch (in a rotating order), so
    that a slow spell of a shared machine falls on all of them alike. Returns seconds per pass."""
    work = variants(model)
    names = list(work)
    caches = {name: ZeroInputCache() for name in names}
    totals = dict.fromkeys(names, 0.0)
    for b, batch in enumerate(batches):
        for k in range(len(names)):
            name = names[(b + k) % len(names)]
            totals[name] += timed(lambda: work[name](batch, caches[name]), device)
    return totals


def check_paths_agree(model: MultimodalModel, batches: list[dict]) -> None:
    """The cached inputs path must reproduce the naive one (else the timings compare different things)."""
    batch = batches[0]
    cached = modality_shapley(model, batch, benefit="true_prob", drop="inputs", cache=ZeroInputCache())["phi"]
    naive = modality_shapley(model, batch, benefit="true_prob", drop="inputs")["phi"]
    torch.testing.assert_close(cached, naive, atol=1e-4, rtol=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modalities", type=int, nargs="+", default=[2, 3])
    add_machine_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    apply_machine_arguments(args)

    rows = []
    with torch.no_grad():
        for num_modalities in args.modalities:
            batches = make_batches(num_modalities, args.num_samples, args.batch_size, args.num_classes, device)
            model = make_model(num_modalities, args.num_classes, device)
            check_paths_agree(model, batches)
            one_repeat(model, batches[:2], device)  # warm-up (allocator, cuDNN autotuning, lazy init)
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, seconds in one_repeat(model, batches, device).items():
                    times.setdefault(name, []).append(seconds)
            rows.append((num_modalities, {name: statistics.median(t) for name, t in times.items()}))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nValuation pass, {args.num_samples} samples, batch {args.batch_size}, SmallCNNEncoder per modality "
          f"on [1, 32, 32], concat fusion; {where}; median of {args.repeats} interleaved repeats.\n")
    print("| M | plain (s) | fast (s) | fast / plain | inputs+cache (s) | inputs+cache / plain | naive (s) "
          "| naive / plain |")
    print("|---|---|---|---|---|---|---|---|")
    for num_modalities, t in rows:
        print(f"| {num_modalities} | {t['plain']:.3f} | {t['fast']:.3f} | {t['fast'] / t['plain']:.2f} "
              f"| {t['inputs+cache']:.3f} | {t['inputs+cache'] / t['plain']:.2f} | {t['naive']:.3f} "
              f"| {t['naive'] / t['plain']:.2f} |")


if __name__ == "__main__":
    main()

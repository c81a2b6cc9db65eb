"""EMAP's cached-feature path against re-running the model on every pair (target: at least 20x at
N = 1,000).

On synthetic AV-Digits-shaped data (audio [1, 64, 64], visual [1, 8, 8], 10 classes) and the AV-Digits model
(``conf/model/avdigits.yaml``: a ``SmallCNNEncoder`` per modality, concat fusion), in eval mode, for N samples:

- ``plain``: one evaluation pass over the N samples (encode, ``fused_logits``), for scale;
- ``fast``: ``EMAP(path="features").project``, all of it: encoding the N samples once (batched), then the method's
  head (``fused_logits``) on the N^2 feature pairs (t_i, v_j), chunked, and the projection;
- ``naive``: the whole model (both encoders and the head) run on input pairs (t_i, v_j), in batches, which EMAP
  needs for all N^2 pairs. Running 10^6 pairs through the CNNs would take many minutes on a CPU, so the naive
  side is timed on ``--naive-pairs`` random pairs and extrapolated linearly per pair to N^2 (batches are full,
  so the cost per pair is constant); the N samples' own predictions are left out of the naive side, which
  favours it slightly.

The naive pairs' logits are checked against the head on the cached features for the same pairs, so both sides
compute the same f(t_i, v_j). Each time is the median of ``--repeats`` repeats in which the two sides take turns
(in rotating order). Prints a markdown table row.

    python benchmarks/emap.py                              # CPU, or the GPU when there is one
    python benchmarks/emap.py --device cpu --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from common import add_machine_arguments, apply_machine_arguments, load_line, timed  # noqa: E402
from balance.diagnostics.emap import EMAP
from balance.methods.joint import JointTraining
from balance.models import ConcatFusion, MultimodalModel, SmallCNNEncoder

SHAPES = {"audio": (1, 64, 64), "visual": (1, 8, 8)}


def make_batches(num_samples: int, batch_size: int, num_classes: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    inputs = {}
    for m, shape in SHAPES.items():
        prototypes = torch.randn(num_classes, *shape, generator=generator)
        inputs[m] = prototypes[labels] + torch.randn(num_samples, *shape, generator=generator)
    return [
        {"inputs": {m: x[start:start + batch_size].to(device) for m, x in inputs.items()},
         "label": labels[start:start + batch_size].to(device),
         "index": torch.arange(start, min(start + batch_size, num_samples), device=device)}
        for start in range(0, num_samples, batch_size)
    ]


def make_method(num_classes: int, device: torch.device) -> JointTraining:
    torch.manual_seed(0)
    encoders = {"audio": SmallCNNEncoder(1, channels=(16, 32, 64), out_dim=64),
                "visual": SmallCNNEncoder(1, channels=(32, 64), out_dim=64)}
    model = MultimodalModel(encoders, partial(ConcatFusion), num_classes=num_classes)
    return JointTraining(model=model, optimizer=partial(torch.optim.SGD, lr=0.1)).to(device).eval()



def naive_pairs(method: JointTraining, inputs: dict[str, torch.Tensor], pairs: torch.Tensor,
                batch_size: int) -> torch.Tensor:
    """The whole model on input pairs (audio of i, visual of j): logits ``[P, C]``."""
    logits = []
    for start in range(0, len(pairs), batch_size):
        i, j = pairs[start:start + batch_size].T
        batch = {"audio": inputs["audio"][i], "visual": inputs["visual"][j]}
        logits.append(method.fused_logits(method.model.encode(batch)))
    return torch.cat(logits)


def check_same_work(method: JointTraining, batches: list[dict], inputs: dict[str, torch.Tensor],
                    pairs: torch.Tensor, batch_size: int) -> None:
    """The naive pairs' logits must be the head's logits on the cached features of the same pairs."""
    features = method.model.encode(inputs)
    i, j = pairs[:batch_size].T
    head = method.fused_logits({"audio": features["audio"][i], "visual": features["visual"][j]})
    torch.testing.assert_close(naive_pairs(method, inputs, pairs[:batch_size], batch_size), head,
                               atol=1e-4, rtol=1e-4)
    projection = EMAP(max_samples=None).project(method, batches)
    # Concat fusion is additive, so the projection is the model itself (a sanity check of the fast side).
    torch.testing.assert_close(projection.projected.float(), projection.logits, atol=1e-4, rtol=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="samples or pairs per full-model call")
    parser.add_argument("--chunk-size", type=int, default=65536, help="pairs per head call on the fast path")
    parser.add_argument("--naive-pairs", type=int, default=4096, help="pairs the naive side is timed on")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    add_machine_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    before = apply_machine_arguments(args)

    n = args.num_samples
    batches = make_batches(n, args.batch_size, args.num_classes, device)
    inputs = {m: torch.cat([b["inputs"][m] for b in batches]) for m in SHAPES}
    method = make_method(args.num_classes, device)
    pairs = torch.randint(n, (args.naive_pairs, 2), generator=torch.Generator().manual_seed(1)).to(device)
    emap = EMAP(max_samples=None, chunk_size=args.chunk_size)
    work = {
        "plain": lambda: [method.fused_logits(method.model.encode(b["inputs"])) for b in batches],
        "fast": lambda: emap.project(method, batches),
        "naive": lambda: naive_pairs(method, inputs, pairs, args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in work}
    with torch.no_grad():
        check_same_work(method, batches, inputs, pairs, args.batch_size)
        for name in work:  # warm-up (allocator, cuDNN autotuning, lazy init)
            timed(work[name], device)
        names = list(work)
        for r in range(args.repeats):
            for k in range(len(names)):
                name = names[(r + k) % len(names)]
                times[name].append(timed(work[name], device))
    plain = statistics.median(times["plain"])
    fast = statistics.median(times["fast"])
    per_pair = statistics.median(times["naive"]) / args.naive_pairs
    naive = per_pair * n * n

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nEMAP, N = {n} (N^2 = {n * n:,} pairs), AV-Digits model (SmallCNNEncoder audio [1, 64, 64] and visual "
          f"[1, 8, 8], concat, {args.num_classes} classes); batch {args.batch_size}, head chunk {args.chunk_size} "
          f"pairs; naive timed on {args.naive_pairs} pairs and extrapolated per pair; {where}; median of "
          f"{args.repeats} interleaved repeats.\n")
    print("| N | plain eval pass (s) | fast: encode N + head on N^2 pairs (s) | fast / plain "
          "| naive: model per pair (ms) | naive, N^2 pairs extrapolated (s) | naive / fast |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {n} | {plain:.3f} | {fast:.3f} | {fast / plain:.2f} | {1e3 * per_pair:.4f} | {naive:.1f} "
          f"| {naive / fast:.0f}x |")
    print(f"\nCommand: python benchmarks/emap.py {' '.join(sys.argv[1:])}".rstrip())
    if device.type == "cpu":
        print(load_line(before))


if __name__ == "__main__":
    main()

"""MM-SHAP with batched perturbations against one perturbation per forward pass.

Models (``--models``, random weights, random inputs of the data's shapes, concat fusion):

- ``avdigits``: ``conf/model/avdigits.yaml``, a ``SmallCNNEncoder`` on [1, 64, 64] log-mel spectrograms and one
  on [1, 8, 8] digit images, 10 classes (what ``python train.py`` trains); 16 features per modality (4 x 4
  time-frequency blocks, 4 x 4 patches), so a permutation pass makes 32 evaluations of the batch;
- ``mlp``: ``conf/model/mlp.yaml`` on ``data=synthetic``, an ``MLPEncoder`` per 16-d feature vector, 4 classes;
  16 one-element features per modality;
- ``easy_vqa``: ``conf/model/easy_vqa.yaml``, a ``SmallCNNEncoder`` on [3, 64, 64] images and a one-layer
  Transformer on 16-position questions of 3 to 10 tokens; the paper's rule: the tokens, and ``p x p`` patches with
  ``p = ceil(sqrt(#tokens))``, so the grid differs from sample to sample.

Times per pass over the data of:

- ``gates k``: ``mm_shap_values`` with ``perturbations_per_eval=k``, k masked copies of the batch stacked into one
  forward pass (``--perturbations``; k = 1 is one perturbation per forward pass, the reference; k = 32 is all of a
  pass's evaluations at once);
- ``inputs k``: captum on the raw inputs with full-size feature masks, at the largest k (the masking that
  ``balance.diagnostics.mm_shap`` replaces by handing captum one gate per feature).

All variants draw the same permutations, so they compute the same Shapley values (checked on the first batch,
which also warms up). Each time is the median of ``--repeats`` passes; within a repeat the variants take turns
batch by batch, in a rotating order.

    python benchmarks/mm_shap.py                              # CPU, or the GPU when there is one
    python benchmarks/mm_shap.py --device cpu --threads 1 --models avdigits easy_vqa --num-samples 64 --n-samples 1
    python benchmarks/mm_shap.py --device cpu --threads 1 --models mlp --num-samples 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch
from captum.attr import ShapleyValueSampling

from common import add_machine_arguments, apply_machine_arguments, timed  # noqa: E402
from balance.diagnostics.mm_shap import feature_groups, mm_shap_values, permutation_generator
from balance.methods import JointTraining
from balance.models import ConcatFusion, MLPEncoder, MultimodalModel, SmallCNNEncoder, TextEncoder

SEED = 0


def _tokens(num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """easy-VQA-like questions: 16 positions, 3 to 10 tokens (the longest easy-VQA question has 10), then padding."""
    tokens = torch.randint(2, 50, (num_samples, 16), generator=generator)
    lengths = torch.randint(3, 11, (num_samples, 1), generator=generator)
    return tokens.masked_fill(torch.arange(16) >= lengths, 0)


# Each model: its encoders (built after seeding), random inputs of the data's shapes, the number of classes.
MODELS = {
    # conf/model/avdigits.yaml on AV-Digits: log-mel spectrogram [1, 64, 64], digit image [1, 8, 8].
    "avdigits": (lambda: {"audio": SmallCNNEncoder(1, channels=(16, 32, 64), out_dim=64),
                          "visual": SmallCNNEncoder(1, channels=(32, 64), out_dim=64)},
                 lambda n, g: {"audio": torch.randn(n, 1, 64, 64, generator=g),
                               "visual": torch.randn(n, 1, 8, 8, generator=g)}, 10),
    # conf/model/mlp.yaml on data=synthetic: two 16-d feature vectors.
    "mlp": (lambda: {m: MLPEncoder(16, (64,), out_dim=32) for m in ("m0", "m1")},
            lambda n, g: {m: torch.randn(n, 16, generator=g) for m in ("m0", "m1")}, 4),
    # conf/model/easy_vqa.yaml on data=easy_vqa: a [3, 64, 64] image and a question; per-sample image grids.
    "easy_vqa": (lambda: {"visual": SmallCNNEncoder(3, channels=(16, 32, 64), out_dim=64),
                          "text": TextEncoder(50, embed_dim=64, out_dim=64, num_layers=1, num_heads=4, max_length=16)},
                 lambda n, g: {"visual": torch.randn(n, 3, 64, 64, generator=g), "text": _tokens(n, g)}, 13),
}


def make_method(name: str, device: torch.device) -> JointTraining:
    build, _, num_classes = MODELS[name]
    torch.manual_seed(0)
    model = MultimodalModel(build(), partial(ConcatFusion), num_classes=num_classes)
    return JointTraining(model=model, optimizer=partial(torch.optim.SGD, lr=0.1)).to(device).eval()


def make_batches(name: str, num_samples: int, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    data = MODELS[name][1](num_samples, torch.Generator().manual_seed(0))
    return [{m: x[s:s + batch_size].to(device) for m, x in data.items()} for s in range(0, num_samples, batch_size)]


def shapley_on_inputs(method: JointTraining, inputs: dict[str, torch.Tensor], n_samples: int,
                      perturbations_per_eval: int) -> dict[str, torch.Tensor]:
    """captum's own masking: the modality inputs as captum's inputs, one full-size feature mask per modality (per
    sample where the grids differ), the same players as ``mm_shap_values``."""
    modalities = list(method.modalities)
    groups = feature_groups(inputs)
    masks, offset = [], 0
    for m in modalities:
        # Padding rides along with the modality's last player: it is zero whether masked or not.
        index = groups[m].index.clamp_max(groups[m].width - 1)
        masks.append(index.view(len(index), *groups[m].mask_shape) + offset)
        offset += groups[m].width

    def forward(*tensors: torch.Tensor) -> torch.Tensor:
        return method.fused_logits(method.model.encode(dict(zip(modalities, tensors))))

    prediction = forward(*[inputs[m] for m in modalities]).argmax(dim=-1)
    explainer = ShapleyValueSampling(forward)
    explainer.permutation_generator = permutation_generator(torch.Generator().manual_seed(SEED), antithetic=True)
    attributions = explainer.attribute(tuple(inputs[m] for m in modalities), target=prediction,
                                       feature_mask=tuple(masks), n_samples=n_samples,
                                       perturbations_per_eval=perturbations_per_eval)
    # Every element of a feature carries the feature's value; padding goes to a column that is dropped.
    phi = {}
    for m, values in zip(modalities, attributions):
        width = groups[m].width
        one_channel = values[(slice(None), *[slice(0, 1) if s == 1 else slice(None) for s in groups[m].mask_shape])]
        one_channel = one_channel.flatten(1)
        index = groups[m].index.expand(len(one_channel), -1)
        phi[m] = torch.zeros(len(one_channel), width + 1, device=values.device).scatter_(1, index, one_channel)
        phi[m] = phi[m][:, :width]
    return phi


def variants(method: JointTraining, n_samples: int, perturbations: list[int],
             inputs_at: int) -> dict[str, Callable[[dict], object]]:
    """Each variant's work on one batch: the gates at every ``perturbations_per_eval``, captum's own masking at
    ``inputs_at``."""

    def gates(inputs: dict, perturbations_per_eval: int) -> dict[str, torch.Tensor]:
        return mm_shap_values(method, inputs, n_samples=n_samples, perturbations_per_eval=perturbations_per_eval,
                              generator=torch.Generator().manual_seed(SEED))["phi"]

    work = {f"gates {k}": partial(gates, perturbations_per_eval=k) for k in perturbations}
    work[f"inputs {inputs_at}"] = lambda inputs: shapley_on_inputs(method, inputs, n_samples, inputs_at)
    return work



def one_repeat(work: dict[str, Callable[[dict], object]], batches: list[dict],
               device: torch.device) -> dict[str, float]:
    """One pass over the data per variant, the variants taking turns batch by batch in a rotating order."""
    names = list(work)
    totals = dict.fromkeys(names, 0.0)
    for b, inputs in enumerate(batches):
        for k in range(len(names)):
            name = names[(b + k) % len(names)]
            totals[name] += timed(lambda: work[name](inputs), device)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--num-samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=10, help="permutations (each also reversed)")
    parser.add_argument("--perturbations", type=int, nargs="+", default=[1, 4, 8, 32],
                        help="perturbations_per_eval values to time (1, the reference, is always timed)")
    parser.add_argument("--repeats", type=int, default=3)
    add_machine_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    apply_machine_arguments(args)
    perturbations = sorted(set(args.perturbations) | {1})

    results, players = {}, {}
    with torch.no_grad():
        for model_name in args.models:
            method = make_method(model_name, device)
            batches = make_batches(model_name, args.num_samples, args.batch_size, device)
            # captum's players per batch: every modality's widest grid (or longest text) in the batch.
            players[model_name] = statistics.mean(sum(g.width for g in feature_groups(b).values()) for b in batches)
            work = variants(method, args.n_samples, perturbations, inputs_at=perturbations[-1])
            # All variants draw the same permutations: check they agree (this also warms up allocator and kernels).
            reference = work["gates 1"](batches[0])
            for name, fn in work.items():
                for m, phi in fn(batches[0]).items():
                    torch.testing.assert_close(phi, reference[m], atol=1e-4, rtol=1e-3,
                                               msg=lambda text, name=name: f"{name}: {text}")
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                for name, seconds in one_repeat(work, batches, device).items():
                    times.setdefault(name, []).append(seconds)
            results[model_name] = {name: statistics.median(values) for name, values in times.items()}

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    passes = 2 * args.n_samples
    print(f"\nMM-SHAP pass, {args.num_samples} samples, batch {args.batch_size}, {args.n_samples} antithetic "
          f"permutations ({passes} passes per batch, one evaluation per player each); {where}; median of "
          f"{args.repeats} interleaved repeats.\n")
    print("| model | players per batch | variant | perturbations per eval | rows per forward | s per pass "
          "| ms per sample | speed-up over 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name, t in results.items():
        for name, seconds in t.items():
            kind, k = name.split()
            print(f"| {model_name} | {players[model_name]:g} | {kind} | {k} | {int(k) * args.batch_size} "
                  f"| {seconds:.3f} | {1000 * seconds / args.num_samples:.2f} | {t['gates 1'] / seconds:.2f} |")

if __name__ == "__main__":
    main()

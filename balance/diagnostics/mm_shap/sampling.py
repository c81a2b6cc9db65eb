"""MM-SHAP's Shapley values: permutation sampling with captum's ``ShapleyValueSampling``, played through one gate
per feature.

The game's value is the logit of the class the unmasked model predicts, with the absent features masked to zero
(a token to the padding id 0); elements that belong to no feature (``grouping``) are always present.

Sampling. The official code runs shap's permutation explainer with 10 permutations, each traversed forwards and
backwards (antithetic sampling: 20 passes). captum draws independent permutations; with ``antithetic=True`` (the
default) every drawn permutation is followed by its reverse, which is the official estimator: ``n_samples``
permutations cost ``2 * n_samples`` passes of one evaluation per feature. One permutation serves a whole batch
(captum's design), so samples of a batch are correlated but each one's estimate is unbiased. Every pass ends at
the unmasked input, so the estimate is efficient exactly: ``sum phi = f(x) - f(all features masked)``.

How captum sees the features. Given the inputs themselves, captum walks every element of the feature masks in a
Python loop (to map feature ids to inputs) and compares the full-size masks with a feature's id for every
perturbation; with per-sample grids (text lengths differ) the masks are as large as the batch of inputs. Here
captum's inputs are instead one gate per feature (``[B, features]`` per modality, 1 = present, baseline 0), with a
feature mask per modality that gives every gate its own id; the forward function expands the gates onto the real
inputs (``FeatureGroups.element_mask``), masks them and runs ``method.fused_logits(method.model.encode(...))``.
The game, the permutations and the estimator are the same as masking the inputs inside captum; the masks captum
handles are tiny.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from captum.attr import ShapleyValueSampling

from balance.diagnostics.mm_shap.grouping import feature_groups


def permutation_generator(generator: torch.Generator, antithetic: bool) -> Callable[[int, int], Iterator[list[int]]]:
    """A replacement for ``ShapleyValueSampling.permutation_generator`` that draws from ``generator``.

    Args:
        generator: the source of the permutations (CPU), for reproducible values.
        antithetic: follow every permutation by its reverse (the official estimator).

    Returns:
        captum's generator signature: ``(num_features, n_samples) -> permutations as lists``.
    """

    def permutations(num_features: int, n_samples: int) -> Iterator[list[int]]:
        for _ in range(n_samples):
            order = torch.randperm(num_features, generator=generator).tolist()
            yield order
            if antithetic:
                yield order[::-1]

    return permutations


def mm_shap_values(
    method: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    present: torch.Tensor | None = None,
    n_samples: int = 10,
    antithetic: bool = True,
    perturbations_per_eval: int = 32,
    features_per_modality: int = 16,
    keep_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    layout: str = "covering",
) -> dict[str, Any]:
    """Sampled Shapley values of every input feature for one batch (call under ``torch.no_grad`` in eval mode).

    Args:
        method: a ``MultimodalMethod``; the game is ``method.fused_logits(method.model.encode(masked inputs))`` at
            the class it predicts on the unmasked inputs.
        inputs: modality -> batch of inputs (tensors).
        present: optional ``BoolTensor[B, M]`` of present modalities, passed on as ``keep`` (a missing modality's
            features are dropped, so its features get phi = 0, exactly).
        n_samples: permutations drawn (each also traversed reversed when ``antithetic``).
        antithetic: traverse each permutation forwards and backwards, as the official code does.
        perturbations_per_eval: masked copies of the batch evaluated in one forward pass.
        features_per_modality: target feature count without a text modality (``feature_groups``).
        keep_token_ids: token ids never masked.
        generator: the source of the permutations (CPU), for reproducible values.
        layout: where the grid cells lie, ``covering`` or ``official`` (``grouping``).

    Returns:
        ``phi``: modality -> ``Tensor[B, width_m]`` (column ``j`` is feature ``j``; columns from ``count`` on are
        unused and 0), ``count``: modality -> ``LongTensor[B]``, ``logits``: the unmasked fused logits ``[B, C]``,
        ``prediction``: their argmax.
    """
    modalities = list(method.modalities)
    inputs = {m: inputs[m] for m in modalities}
    groups = feature_groups(inputs, features_per_modality, keep_token_ids, layout)
    batch = next(iter(inputs.values())).shape[0]

    def forward(*gates: torch.Tensor) -> torch.Tensor:
        copies = gates[0].shape[0] // batch
        masked = {}
        for m, gate in zip(modalities, gates):
            x = inputs[m].repeat(copies, *[1] * (inputs[m].dim() - 1))
            keep = groups[m].element_mask(gate > 0.5, rest=True)
            masked[m] = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        keep_modalities = present.repeat(copies, 1) if present is not None else None
        return method.fused_logits(method.model.encode(masked), keep=keep_modalities)

    gates = tuple(torch.ones(batch, groups[m].width, device=inputs[m].device) for m in modalities)
    logits = forward(*gates)
    prediction = logits.argmax(dim=-1)
    # One id per gate, numbered across modalities: captum's players.
    offsets = [0]
    for m in modalities:
        offsets.append(offsets[-1] + groups[m].width)
    masks = tuple(
        torch.arange(start, start + groups[m].width, device=inputs[m].device).unsqueeze(0)
        for m, start in zip(modalities, offsets)
    )
    explainer = ShapleyValueSampling(forward)
    explainer.permutation_generator = permutation_generator(generator or torch.Generator().manual_seed(0), antithetic)
    phi = explainer.attribute(
        gates,
        baselines=tuple(torch.zeros_like(g) for g in gates),
        target=prediction,
        feature_mask=masks,
        n_samples=n_samples,
        perturbations_per_eval=perturbations_per_eval,
    )
    phi = list(phi)
    if present is not None:
        # A missing modality is a dummy player in every coalition; its values are 0 up to the rounding of
        # evaluations that ran in different forward passes (batch positions), so they are set to 0 exactly.
        for i, values in enumerate(phi):
            phi[i] = values * present[:, i].to(values.device, values.dtype).unsqueeze(1)
    return {
        "phi": dict(zip(modalities, phi)),
        "count": {m: groups[m].count for m in modalities},
        "logits": logits,
        "prediction": prediction,
    }

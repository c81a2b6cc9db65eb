"""The Shapley arithmetic: coalitions as bitmasks, the Shapley weights, and coalition values from logits.

A sample's modalities play a cooperative game: the value ``v(S)`` of a coalition ``S`` is the benefit of the
model's prediction when only the modalities in ``S`` are kept, and modality ``m``'s contribution is its exact
Shapley value

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! * (v(S + m) - v(S)).

Coalitions are indexed by bitmask: bit ``i`` of ``s`` is set iff modality ``i`` (model order) is in subset ``s``,
so a value table ``[..., 2^M]`` has the empty set in column 0 and the full set in the last column.

Benefits (``benefit=``):
    - ``"official"``: ``|S| * 1[argmax f_S(x) == y]``, the official code's; a correct full model is worth ``M``.
    - ``"correct"``: ``1[argmax f_S(x) == y]`` (the BalanceBenchmark port).
    - ``"true_prob"``: ``softmax(f_S(x))[y]``, the probability of the label.

For every benefit ``v({}) = 0``, the official convention: the empty coalition is never evaluated (for
``true_prob`` the model's all-dropped prediction is therefore not used either), so by efficiency
``sum_m phi_m = v(all)``.

For two modalities ``a`` and ``v`` this is the closed form of the official code,
``phi_a = (v_a + v_all - v_v) / 2``; under the official benefit every value lies in {-0.5, 0, 0.5, 1, 1.5}.
The official benefit's ``|S|`` factor rewards joining a correct coalition: a pure-noise modality next to one
that is right alone still gets 0.5 when the pair is right (``(0 + 2 - 1) / 2``), where ``correct`` gives 0.

Where a batch marks modalities missing (``present``), a coalition counts only its present modalities,
``v(S) = v(S & present)``, so a missing modality gets phi = 0 under every benefit (no official counterpart).

Shapley values are computed exactly where the coalition values are integers (the ``official`` and ``correct``
benefits): see :func:`shapley_values`.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

BENEFITS = ("official", "correct", "true_prob")


@lru_cache(maxsize=None)
def _subset_masks(num_modalities: int) -> torch.Tensor:
    bits = torch.arange(num_modalities)
    return (torch.arange(2**num_modalities).unsqueeze(1) >> bits) & 1 == 1


def subset_masks(num_modalities: int) -> torch.Tensor:
    """Every subset of ``num_modalities`` modalities as a keep mask.

    Args:
        num_modalities: number of modalities M (at least 1).

    Returns:
        ``BoolTensor[2^M, M]`` whose row ``s`` has column ``i`` set iff bit ``i`` of ``s`` is set: row 0 is the
        empty set, the last row the full set.
    """
    if num_modalities < 1:
        raise ValueError(f"need at least one modality, got {num_modalities}")
    return _subset_masks(num_modalities).clone()


def _num_modalities(num_subsets: int) -> int:
    num_modalities = num_subsets.bit_length() - 1
    if num_modalities < 1 or 2**num_modalities != num_subsets:
        raise ValueError(f"a coalition value table needs 2^M columns (M >= 1), got {num_subsets}")
    return num_modalities


@lru_cache(maxsize=None)
def _scaled_shapley_weights_cpu(num_modalities: int) -> torch.Tensor:
    """``M! * W`` as ``Int64Tensor[2^M, M]``: the Shapley weights are rationals with denominator ``M!``, so their
    numerators ``|S|! (M - |S| - 1)!`` are integers and a product with them can be exact."""
    m_total = num_modalities
    numerator = [math.factorial(k) * math.factorial(m_total - k - 1) for k in range(m_total)]
    masks = _subset_masks(m_total)
    sizes = masks.sum(dim=1).tolist()
    table = torch.zeros(2**m_total, m_total, dtype=torch.int64)
    for s, size in enumerate(sizes):
        for m in range(m_total):
            # phi_m collects +w(|S|) v(S + m) and -w(|S|) v(S) over the S without m: seen from a subset T, it is
            # +w(|T| - 1) where T contains m and -w(|T|) where it does not.
            table[s, m] = numerator[size - 1] if masks[s, m] else -numerator[size]
    return table


@lru_cache(maxsize=None)
def _scaled_shapley_weights(num_modalities: int, device: torch.device) -> torch.Tensor:
    """``M! * W`` in float64 on ``device`` (cached): float64 holds these integers exactly, and unlike int64 it
    has a matrix product on CUDA."""
    return _scaled_shapley_weights_cpu(num_modalities).to(dtype=torch.float64, device=device)


@lru_cache(maxsize=None)
def shapley_weights(num_modalities: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """The matrix ``W [2^M, M]`` with ``phi = v @ W`` for a coalition value table ``v [..., 2^M]`` (cached).

    :func:`shapley_values` does not use it directly (it multiplies by ``M! * W`` and divides by ``M!`` once, to
    be exact); this is the matrix itself, e.g. for a caller that wants ``W`` in a formula of its own.

    Args:
        num_modalities: number of modalities M.
        dtype: dtype of the returned matrix.
        device: device of the returned matrix.

    Returns:
        ``W[s, m] = (|s|-1)! (M-|s|)! / M!`` where subset ``s`` contains ``m`` and ``-|s|! (M-|s|-1)! / M!``
        where it does not, each entry the float64 nearest the rational (then cast to ``dtype``). Do not modify it
        in place: it is shared.
    """
    scaled = _scaled_shapley_weights_cpu(num_modalities).to(torch.float64)
    return (scaled / math.factorial(num_modalities)).to(dtype=dtype, device=device)


def shapley_values(values: torch.Tensor) -> torch.Tensor:
    """Exact Shapley values from a table of coalition values.

    The product runs in float64 with the integer weights ``M! * W`` and is divided by ``M!`` once at the end,
    then cast back. Where the coalition values are integers (the ``official`` and ``correct`` benefits) every
    partial sum is an integer below 2^53, so the product is exact and the one division rounds correctly: phi is
    the float nearest the exact rational (phi = 1 exactly for a modality of a sample that every coalition gets
    right under the official benefit, 1/3 as ``float(1/3)`` for ``correct`` with M = 3), where a float32
    ``values @ W`` gives 0.99999994 and a spurious resampling copy. The numerators are at most
    ``2 * max|v| * M!`` in size, so this holds for M <= 16 with benefits up to M. Real values (``true_prob``) get
    a float64 product, far inside float32's precision.

    Args:
        values: ``[..., 2^M]`` coalition values indexed by bitmask (see :func:`subset_masks`), any leading shape.

    Returns:
        ``[..., M]`` Shapley values in the dtype of ``values`` (float32 for an integer table). Efficiency holds:
        ``phi.sum(-1) == values[..., -1] - values[..., 0]`` (up to rounding of the sum).
    """
    num_modalities = _num_modalities(values.shape[-1])
    dtype = values.dtype if values.is_floating_point() else torch.float32
    device = values.device
    # MPS has no float64: do the (small) product on the CPU there.
    work_device = torch.device("cpu") if device.type == "mps" else device
    scaled = values.to(device=work_device, dtype=torch.float64) @ _scaled_shapley_weights(num_modalities,
                                                                                          work_device)
    # M! is exact in float64 (M <= 18), and dividing by it, rather than multiplying by a rounded 1 / M!, keeps
    # phi the correctly rounded quotient of the exact numerator.
    phi = scaled / math.factorial(num_modalities)
    return phi.to(device=device, dtype=dtype)


def coalition_benefit(logits: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor,
                      benefit: str = "official") -> torch.Tensor:
    """The benefit of each coalition's prediction.

    Args:
        logits: ``[K, B, C]`` logits of K coalitions on B samples.
        labels: ``[B]`` class labels.
        sizes: ``[K]`` (or per sample ``[K, B]``) number of modalities in each coalition.
        benefit: ``"official"`` (``|S| * correct``), ``"correct"`` (1/0) or ``"true_prob"`` (label probability).

    Returns:
        ``FloatTensor[K, B]``.
    """
    if benefit not in BENEFITS:
        raise ValueError(f"unknown benefit {benefit!r}; choose one of {BENEFITS}")
    if benefit == "true_prob":
        probs = logits.float().softmax(dim=-1)
        return probs.gather(-1, labels.expand(probs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    correct = (logits.argmax(dim=-1) == labels).float()
    if benefit == "correct":
        return correct
    sizes = sizes.to(correct)
    return correct * (sizes.unsqueeze(-1) if sizes.dim() == 1 else sizes)


def _value_table(logits: torch.Tensor, labels: torch.Tensor, benefit: str,
                 present: torch.Tensor | None = None) -> torch.Tensor:
    """``[2^M - 1, B, C]`` logits of the non-empty subsets -> ``[B, 2^M]`` values with ``v(empty) = 0``.

    With ``present`` a coalition counts only its available modalities, ``v(S) = v(S & present)``, so a missing
    modality is a null player (phi = 0) under every benefit: a coalition of missing modalities only is the
    empty set (value 0, although the model was run on it) and the official ``|S|`` counts present ones.
    """
    num_subsets = logits.shape[0] + 1
    masks = _subset_masks(_num_modalities(num_subsets))[1:].to(logits.device)
    if present is None:
        sizes = masks.sum(dim=1)
        benefits = coalition_benefit(logits, labels, sizes, benefit)
    else:
        sizes = (masks.unsqueeze(1) & present.to(device=logits.device, dtype=torch.bool)).sum(dim=-1)  # [K, B]
        benefits = coalition_benefit(logits, labels, sizes, benefit) * (sizes > 0)
    return torch.cat([benefits.new_zeros(1, benefits.shape[1]), benefits]).T

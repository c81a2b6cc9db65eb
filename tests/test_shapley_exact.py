"""Shapley values are exact where coalition values are integers, so the resampling thresholds see the true phi.

Every right/wrong pattern of M = 3 (2^7: which non-empty coalitions predict right) and M = 4 (2^15) is valued
by brute force over the orders in which the modalities join, in exact rational arithmetic, independently of
the implementation's subset weights. ``shapley_values`` must give the correctly rounded float of that rational
(float32 and float64 tables), and ``sample_level_copies`` the copies the exact rational earns. A float32
``values @ W`` fails this: a sample whose every coalition is right got phi = 0.99999994 (official benefit) for
one modality and a spurious copy.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from balance.resampling import OFFICIAL_THRESHOLDS, sample_level_copies
from balance.valuation import coalition_benefit, shapley_values
from balance.valuation.shapley import _value_table

EXACT_THRESHOLDS = (Fraction(-1, 10), Fraction(2, 5), Fraction(1))  # the official (-0.1, 0.4, 1.0) as rationals
INTEGER_BENEFITS = ("official", "correct")


def patterns(num_modalities: int) -> np.ndarray:
    """``[2^K, K]`` 0/1: row p says which of the K = 2^M - 1 non-empty coalitions (bitmask s = column + 1) are
    right, every pattern once."""
    num_nonempty = 2**num_modalities - 1
    rows = np.arange(2**num_nonempty, dtype=np.int64)[:, None]
    return (rows >> np.arange(num_nonempty)) & 1


def integer_values(num_modalities: int, benefit: str) -> np.ndarray:
    """``Int64[2^K, 2^M]`` coalition values of every pattern, ``v(empty) = 0``."""
    right = patterns(num_modalities)
    sizes = np.array([bin(s).count("1") for s in range(1, 2**num_modalities)])
    nonempty = right * sizes if benefit == "official" else right
    return np.concatenate([np.zeros((len(right), 1), dtype=np.int64), nonempty], axis=1)


def shapley_numerators(values: np.ndarray, num_modalities: int) -> np.ndarray:
    """``M! * phi`` as exact integers: the sum over all M! join orders of each modality's marginal contribution."""
    numerators = np.zeros((len(values), num_modalities), dtype=np.int64)
    for order in itertools.permutations(range(num_modalities)):
        coalition = 0
        for m in order:
            numerators[:, m] += values[:, coalition | (1 << m)] - values[:, coalition]
            coalition |= 1 << m
    return numerators


def shapley_fractions(values: list[int], num_modalities: int) -> list[Fraction]:
    """The Shapley formula over subsets, in rationals: ``sum_{S not containing m} |S|!(M-|S|-1)!/M! (v(S+m)-v(S))``."""
    phi = []
    for m in range(num_modalities):
        total = Fraction(0)
        for s in range(2**num_modalities):
            if s >> m & 1:
                continue
            size = bin(s).count("1")
            weight = Fraction(math.factorial(size) * math.factorial(num_modalities - size - 1),
                              math.factorial(num_modalities))
            total += weight * (values[s | (1 << m)] - values[s])
        phi.append(total)
    return phi


def nearest_float32(q: Fraction) -> float:
    """The float32 nearest ``q`` (ties to even), decided in exact arithmetic among the neighbours of a guess."""
    guess = np.float32(float(q))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    best = min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(np.float32(c).view(np.uint32)) & 1))
    return float(best)


def nearest(q: Fraction, dtype: torch.dtype) -> float:
    # int / int (what Fraction.__float__ does) is correctly rounded to float64.
    return nearest_float32(q) if dtype == torch.float32 else float(q)


def exact_copies(q: Fraction, scale: Fraction) -> int:
    t1, t2, t3 = (scale * t for t in EXACT_THRESHOLDS)
    return 3 if q <= t1 else 2 if q <= t2 else 1 if q < t3 else 0


def scales(benefit: str, num_modalities: int) -> tuple[float, Fraction]:
    """The ``scale`` the resampling methods pass (``1.0 / M`` as a float) and its exact value."""
    if benefit == "official":
        return 1.0, Fraction(1)
    return 1.0 / num_modalities, Fraction(1, num_modalities)


def expected_phi_and_copies(numerators: np.ndarray, num_modalities: int, benefit: str,
                            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The correctly rounded phi and the exact copies of every entry, decided once per distinct numerator."""
    denominator = math.factorial(num_modalities)
    _, scale = scales(benefit, num_modalities)
    distinct, inverse = np.unique(numerators, return_inverse=True)
    rounded = np.array([nearest(Fraction(int(k), denominator), dtype) for k in distinct])
    copies = np.array([exact_copies(Fraction(int(k), denominator), scale) for k in distinct])
    inverse = inverse.reshape(numerators.shape)
    return torch.tensor(rounded[inverse], dtype=dtype), torch.tensor(copies[inverse])


# ---------------------------------------------------------------------------------------------------------------
# M = 3: every pattern in rationals


def test_the_brute_forces_agree():
    # The permutation sums (used for M = 4) and the subset formula in Fractions (used for M = 3) are the same.
    for benefit in INTEGER_BENEFITS:
        values = integer_values(3, benefit)
        numerators = shapley_numerators(values, 3)
        for row, numerator in zip(values.tolist(), numerators.tolist()):
            assert shapley_fractions(row, 3) == [Fraction(k, 6) for k in numerator]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("benefit", INTEGER_BENEFITS)
def test_three_modalities_every_pattern_is_exact(benefit, dtype):
    values = integer_values(3, benefit)
    exact = [shapley_fractions(row, 3) for row in values.tolist()]
    phi = shapley_values(torch.tensor(values, dtype=dtype))
    assert phi.dtype == dtype and phi.shape == (128, 3)
    expected = torch.tensor([[nearest(q, dtype) for q in row] for row in exact], dtype=dtype)
    assert torch.equal(phi, expected)
    scale_float, scale = scales(benefit, 3)
    expected_copies = torch.tensor([[exact_copies(q, scale) for q in row] for row in exact])
    assert torch.equal(sample_level_copies(phi, OFFICIAL_THRESHOLDS, scale_float), expected_copies)


@pytest.mark.parametrize("num_modalities", [2, 3, 4, 5])
@pytest.mark.parametrize("benefit", INTEGER_BENEFITS)
def test_all_right_gets_no_copy(benefit, num_modalities):
    # The regression: every coalition right, so every modality does all it can and earns no copy.
    sizes = torch.tensor([bin(s).count("1") for s in range(2**num_modalities)], dtype=torch.float32)
    values = sizes if benefit == "official" else (sizes > 0).float()
    scale_float, scale = scales(benefit, num_modalities)
    for dtype in (torch.float32, torch.float64):
        phi = shapley_values(values.to(dtype).expand(4, -1))
        assert phi.tolist() == [[nearest(scale, dtype)] * num_modalities] * 4  # 1 exactly, or 1/M rounded once
        assert (sample_level_copies(phi, OFFICIAL_THRESHOLDS, scale_float) == 0).all()


@pytest.mark.parametrize("benefit", INTEGER_BENEFITS)
def test_exact_through_the_value_table_from_logits(benefit):
    # The pipeline's own float32 table: logits of the 7 non-empty subsets -> benefits -> values -> phi -> copies.
    right = torch.from_numpy(patterns(3)).T.bool()  # [K = 7, B = 128]
    logits = torch.stack([right.float(), (~right).float()], dim=-1)  # label 0 wins iff the coalition is right
    values = _value_table(logits, torch.zeros(128, dtype=torch.long), benefit)
    assert values.dtype == torch.float32
    assert torch.equal(values, torch.tensor(integer_values(3, benefit), dtype=torch.float32))
    numerators = shapley_numerators(integer_values(3, benefit), 3)
    phi, copies = expected_phi_and_copies(numerators, 3, benefit, torch.float32)
    assert torch.equal(shapley_values(values), phi)
    assert torch.equal(sample_level_copies(shapley_values(values), OFFICIAL_THRESHOLDS, scales(benefit, 3)[0]),
                       copies)


# ---------------------------------------------------------------------------------------------------------------
# M = 4: every pattern, vectorised in exact integers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("benefit", INTEGER_BENEFITS)
def test_four_modalities_every_pattern_is_exact(benefit, dtype):
    values = integer_values(4, benefit)  # [32768, 16]
    numerators = shapley_numerators(values, 4)
    expected, expected_copies = expected_phi_and_copies(numerators, 4, benefit, dtype)
    phi = shapley_values(torch.tensor(values, dtype=dtype))
    assert phi.dtype == dtype
    assert torch.equal(phi, expected)
    assert torch.equal(sample_level_copies(phi, OFFICIAL_THRESHOLDS, scales(benefit, 4)[0]), expected_copies)


# ---------------------------------------------------------------------------------------------------------------
# Real values, dtypes and devices


def brute_force_float64(values: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """Marginal contributions averaged over all join orders, in float64 (no Fractions)."""
    values = values.double()
    phi = torch.zeros(len(values), num_modalities, dtype=torch.float64)
    orders = list(itertools.permutations(range(num_modalities)))
    for order in orders:
        coalition = 0
        for m in order:
            phi[:, m] += values[:, coalition | (1 << m)] - values[:, coalition]
            coalition |= 1 << m
    return phi / len(orders)


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_true_prob_matches_float64_brute_force(num_modalities):
    generator = torch.Generator().manual_seed(num_modalities)
    num_nonempty = 2**num_modalities - 1
    logits = torch.randn(num_nonempty, 500, 6, generator=generator) * 3
    labels = torch.randint(6, (500,), generator=generator)
    sizes = torch.tensor([bin(s).count("1") for s in range(1, num_nonempty + 1)])
    benefits = coalition_benefit(logits, labels, sizes, "true_prob")
    values = torch.cat([torch.zeros(1, 500), benefits]).T  # float32, v(empty) = 0
    expected = brute_force_float64(values, num_modalities)
    phi = shapley_values(values)
    assert phi.dtype == torch.float32
    torch.testing.assert_close(phi.double(), expected, atol=1e-6, rtol=0)
    phi64 = shapley_values(values.double())
    assert phi64.dtype == torch.float64
    torch.testing.assert_close(phi64, expected, atol=1e-12, rtol=0)


def test_output_dtype_follows_the_table():
    values = torch.tensor([[0, 1, 1, 2]])
    assert shapley_values(values).dtype == torch.float32  # an integer table gives float32, as before
    assert shapley_values(values.float()).dtype == torch.float32
    assert shapley_values(values.double()).dtype == torch.float64
    assert shapley_values(values).tolist() == [[1.0, 1.0]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("benefit", INTEGER_BENEFITS)
def test_cuda_gives_the_same_bits(benefit):
    # No int64 matmul on CUDA: the exact product runs in float64 there too.
    for dtype in (torch.float32, torch.float64):
        values = torch.tensor(integer_values(4, benefit), dtype=dtype)
        phi = shapley_values(values.cuda())
        assert phi.device.type == "cuda" and phi.dtype == dtype
        assert torch.equal(phi.cpu(), shapley_values(values))

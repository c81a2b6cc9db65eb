"""Paired differences by seed: the t interval against hand computation, the edge cases, the table section."""

import math

import pytest

from balance.paired import MISSING_KEY, compared_keys, paired_difference, paired_markdown, paired_rows


def test_paired_difference_is_the_mean_with_a_student_t_interval():
    # Differences 1, 2, 3: mean 2, sample sd 1, t(0.975, 2) = 4.3027 -> half-width 4.3027 / sqrt(3).
    d = paired_difference({0: 11.0, 1: 22.0, 2: 33.0, 7: 5.0}, {0: 10.0, 1: 20.0, 2: 30.0, 3: 0.0})
    half = 4.302653 / math.sqrt(3)
    assert d.n == 3 and (d.mean, d.low, d.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-6)
    assert not d.excludes_zero  # 2 - 2.48 < 0
    tight = paired_difference({0: 2.0, 1: 2.1, 2: 1.9}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert tight.excludes_zero and tight.low > 0


def test_one_shared_seed_has_no_interval_and_none_has_no_difference():
    one = paired_difference({0: 3.0, 1: 1.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 2.0 and math.isnan(one.low) and not one.excludes_zero
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_rows_are_compared_with_their_baseline_in_points():
    by_seed = {"joint": {0: {"acc": 0.80, "acc_a": 0.5, MISSING_KEY: 0.4, "f1": 0.8}, 1: {"acc": 0.82, "acc_a": 0.6}},
               "m": {0: {"acc": 0.85, "acc_a": 0.55, MISSING_KEY: 0.45, "f1": 0.9}, 1: {"acc": 0.86, "acc_a": 0.5}}}
    paired = paired_rows(by_seed, {"joint": None, "m": "joint", "gone": "joint"})
    assert list(paired) == ["m"] and paired["m"]["baseline"] == "joint"
    metrics = paired["m"]["metrics"]
    assert list(metrics) == ["acc", "acc_a", MISSING_KEY]  # f1 is not compared
    assert metrics["acc"]["mean"] == pytest.approx(4.5) and metrics["acc"]["n"] == 2
    assert metrics[MISSING_KEY]["n"] == 1 and metrics[MISSING_KEY]["mean"] == pytest.approx(5.0)
    lines = paired_markdown(paired)
    row = next(l for l in lines if l.startswith("| m |"))
    assert "| joint | 2 |" in row and "+4.50 [" in row and "+5.00 (n=1)" in row
    assert compared_keys(["f1", "acc_b", "acc", "acc_a", "phi_a"]) == ["acc", "acc_a", "acc_b"]

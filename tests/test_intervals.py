"""The interval math on fixed counts, against values worked out by hand or published."""
import math

import pytest

from alignment.evaluation.intervals import (
    Z95,
    design_effect,
    difference_interval,
    seed_interval,
    share_interval,
    wilson,
)


def test_wilson_at_zero_is_the_rule_of_three_like_bound():
    low, high = wilson(0.0, 450)
    assert low == 0.0
    assert high == pytest.approx(Z95 ** 2 / (450 + Z95 ** 2))  # = 0.8464%: 0 of 450 still allows ~1%


def test_wilson_matches_the_textbook_value():
    # 10 of 100: Wilson 95% interval [0.0552, 0.1744] (Newcombe 1998, table I, and every calculator)
    assert wilson(0.1, 100) == pytest.approx((0.0552, 0.1744), abs=1e-4)
    assert all(math.isnan(v) for v in wilson(0.5, 0))


def test_design_effect_of_independent_and_of_clustered_sentences():
    # every sample has 1 of its 2 sentences: no variation between samples, floored at the binomial's 1
    assert design_effect([1, 1, 1, 1], [2, 2, 2, 2]) == 1.0
    # samples all-or-nothing: p = 0.5, n = 8, binomial var 0.25 / 8; clustered 4/3 * 4 * 1 / 64
    assert design_effect([2, 2, 0, 0], [2, 2, 2, 2]) == pytest.approx((4 / 3 * 4 / 64) / (0.25 / 8))
    assert design_effect([0, 0], [3, 1]) == 1.0          # a share of 0 has no binomial variance
    assert design_effect([1], [2]) == 1.0                # one sample: nothing to estimate from


def test_share_interval_widens_with_clustering():
    independent = share_interval([1, 1, 1, 1, 0, 0, 0, 0], [1] * 8)
    clustered = share_interval([2, 2, 0, 0], [2, 2, 2, 2])  # the same 4 of 8 sentences, in pairs
    assert independent[0] == clustered[0] == 0.5
    # one sentence per sample: the design effect is only the small-sample factor k / (k - 1) = 8 / 7
    assert independent[1:] == pytest.approx(wilson(0.5, 8 / (8 / 7)))
    assert clustered[1] < independent[1] and clustered[2] > independent[2]
    assert clustered[1:] == pytest.approx(wilson(0.5, 8 / design_effect([2, 2, 0, 0], [2, 2, 2, 2])))
    assert all(math.isnan(v) for v in share_interval([0, 0], [0, 0]))  # no sentence: no evidence


def test_newcombe_difference_matches_the_published_example():
    # Newcombe 1998, example (b): 56/70 vs 48/80, difference 0.2, method 10 interval [0.0524, 0.3339]
    base, other = (48 / 80, *wilson(48 / 80, 80)), (56 / 70, *wilson(56 / 70, 70))
    assert difference_interval(base, other) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)


def test_seed_interval_is_a_t_interval_over_seeds():
    mean, low, high = seed_interval([0.1, 0.2, 0.3])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 df) x sd / sqrt(3)
    assert (mean, low, high) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    assert seed_interval([0.4])[0] == 0.4 and math.isnan(seed_interval([0.4])[1])
    assert seed_interval([0.4, float("nan"), 0.6])[0] == pytest.approx(0.5)  # a missing seed is skipped

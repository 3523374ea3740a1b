"""lowrank.stats: the paired tests against textbook values and independent computations."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lowrank import stats


def _pairs(both: int, only_a: int, only_b: int, neither: int):
    a = np.r_[np.ones(both), np.ones(only_a), np.zeros(only_b), np.zeros(neither)]
    b = np.r_[np.ones(both), np.zeros(only_a), np.ones(only_b), np.zeros(neither)]
    return a, b


def test_mcnemar_textbook_table():
    # The 2x2 table of McNemar's test in most textbooks' example (Wikipedia's "McNemar's
    # test"): 101 both, 121 and 59 discordant, 33 neither. Chi-squared with continuity
    # correction (|121 - 59| - 1)^2 / 180 = 20.672; exact p from the binomial test.
    a, b = _pairs(101, 121, 59, 33)
    result = stats.mcnemar(a, b)
    assert (result.only_a, result.only_b) == (121, 59)
    assert result.statistic == pytest.approx(3721 / 180)
    assert result.p_value == pytest.approx(scipy_stats.binomtest(59, 180, 0.5).pvalue, rel=1e-9)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (1, 0), (5, 5), (7, 2), (0, 12), (30, 41)])
def test_mcnemar_equals_the_exact_binomial_test(only_a, only_b):
    a, b = _pairs(20, only_a, only_b, 3)
    expected = 1.0 if only_a + only_b == 0 else scipy_stats.binomtest(
        only_a, only_a + only_b, 0.5).pvalue
    assert stats.mcnemar(a, b).p_value == pytest.approx(expected, rel=1e-9)
    # symmetric in its arguments
    assert stats.mcnemar(b, a).p_value == pytest.approx(expected, rel=1e-9)


def test_paired_bootstrap_matches_the_normal_interval():
    rng = np.random.default_rng(1)
    n = 4000
    a = (rng.random(n) < 0.85).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # correlated with a, as paired runs are
    d = a - b
    result = stats.paired_bootstrap(a, b, samples=4000, seed=3)
    se = d.std(ddof=1) / np.sqrt(n)
    assert result.difference == pytest.approx(d.mean())
    assert result.low == pytest.approx(d.mean() - 1.96 * se, abs=0.15 * se)
    assert result.high == pytest.approx(d.mean() + 1.96 * se, abs=0.15 * se)
    # the pairing narrows the interval: an unpaired one would have se of the two means
    unpaired = np.sqrt(a.var(ddof=1) / n + b.var(ddof=1) / n)
    assert result.high - result.low < 2 * 1.96 * unpaired


def test_bootstrap_ci_of_one_mean():
    x = np.r_[np.ones(180), np.zeros(20)]
    low, high = stats.bootstrap_ci(x, samples=4000)
    se = x.std(ddof=1) / np.sqrt(x.size)
    assert low == pytest.approx(0.9 - 1.96 * se, abs=0.2 * se)
    assert high == pytest.approx(0.9 + 1.96 * se, abs=0.2 * se)


def test_identical_runs_are_within_noise():
    a = np.r_[np.ones(50), np.zeros(10)]
    assert stats.mcnemar(a, a).p_value == 1.0
    assert not stats.paired_bootstrap(a, a).excludes_zero


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same examples: got 3 and 2"):
        stats.mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="correctness"):
        stats.mcnemar([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="level"):
        stats.paired_bootstrap([1.0], [0.0], level=95)
    with pytest.raises(ValueError, match="1-D"):
        stats.bootstrap_ci([[1.0]])

"""Paired comparisons of two runs scored on the same test examples.

Two fine-tuning runs evaluated on one test set are paired: each example is scored by both.
Comparing their means with unpaired error bars wastes that pairing (example difficulty is
shared noise); these tests use it.

* :func:`mcnemar`: the exact McNemar test on per-example correctness (two classifiers): only
  the discordant examples (right for one, wrong for the other) carry information, and under
  "equally accurate" each is a fair coin.
* :func:`paired_bootstrap`: a percentile-bootstrap confidence interval of the difference of
  two means of per-example scores (accuracy's 0/1, a window's loss), resampling examples.
* :func:`bootstrap_ci`: the same interval for one mean.

>>> import numpy as np
>>> a = np.array([1, 1, 1, 1, 0, 1, 1, 1])
>>> b = np.array([0, 0, 1, 1, 0, 0, 1, 1])
>>> mcnemar(a, b).p_value    # 3 discordant examples, all favouring a: 2 * 0.5**3
0.25

References:
  McNemar, "Note on the sampling error of the difference between correlated proportions or
  percentages", Psychometrika 12 (1947); Dietterich, "Approximate statistical tests for
  comparing supervised classification learning algorithms", Neural Computation 10 (1998);
  Efron and Tibshirani, "An Introduction to the Bootstrap" (1993), ch. 13.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["McNemar", "PairedDifference", "bootstrap_ci", "mcnemar", "paired_bootstrap"]


@dataclasses.dataclass(frozen=True)
class McNemar:
    """The result of :func:`mcnemar`.

    Attributes:
      only_a: examples ``a`` gets right and ``b`` wrong.
      only_b: examples ``b`` gets right and ``a`` wrong.
      statistic: the chi-squared statistic with continuity correction,
        ``(|only_a - only_b| - 1)^2 / (only_a + only_b)`` (0 without discordant examples).
      p_value: the exact two-sided p-value: twice the binomial(n, 1/2) tail of the smaller
        count, at most 1.
    """

    only_a: int
    only_b: int
    statistic: float
    p_value: float


def _binary(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one value per example (1-D), got shape {arr.shape}")
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold per-example correctness (0/1 or bools), got values "
                         f"{np.unique(arr)[:5].tolist()}")
    return arr.astype(bool)


def _same_examples(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: got {a.shape[0]} and "
                         f"{b.shape[0]} scores")
    if a.shape[0] == 0:
        raise ValueError("paired scores of no examples")


def mcnemar(correct_a, correct_b) -> McNemar:
    """The exact McNemar test of two classifiers' per-example correctness on the same examples.

    Args:
      correct_a, correct_b: 0/1 (or bool) per example, in the same example order.

    >>> r = mcnemar([1] * 10 + [0] * 2 + [1] * 5, [0] * 10 + [1] * 2 + [1] * 5)
    >>> r.only_a, r.only_b, round(r.statistic, 3), round(r.p_value, 4)
    (10, 2, 4.083, 0.0386)
    """
    a, b = _binary(correct_a, "correct_a"), _binary(correct_b, "correct_b")
    _same_examples(a, b)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = only_a + only_b
    if n == 0:
        return McNemar(0, 0, 0.0, 1.0)
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    statistic = (abs(only_a - only_b) - 1) ** 2 / n
    return McNemar(only_a, only_b, float(statistic), float(min(1.0, 2.0 * tail)))


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """``mean(a) - mean(b)`` and its bootstrap interval ``[low, high]`` at ``level``."""

    difference: float
    low: float
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (a difference beyond noise)."""
        return self.low > 0 or self.high < 0


def _resample_means(scores: np.ndarray, samples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = scores.shape[0]
    # In chunks, so 10k resamples of a few thousand examples stay a few MB.
    chunk = max(1, 2**22 // max(n, 1))
    means = [scores[rng.integers(0, n, size=(min(chunk, samples - i), n))].mean(axis=1)
             for i in range(0, samples, chunk)]
    return np.concatenate(means)


def paired_bootstrap(scores_a, scores_b, *, samples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """A percentile-bootstrap interval of ``mean(a) - mean(b)`` over paired examples (the
    same resampled examples for both, so their shared difficulty cancels).

    >>> a = np.r_[np.ones(90), np.zeros(10)]       # 90% right
    >>> b = np.r_[np.ones(80), np.zeros(20)]       # 80% right, wrong on a's errors too
    >>> d = paired_bootstrap(a, b)
    >>> round(d.difference, 2), d.excludes_zero
    (0.1, True)
    """
    a = np.asarray(scores_a, np.float64)
    b = np.asarray(scores_b, np.float64)
    _same_examples(a, b)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    means = _resample_means(a - b, samples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(a.mean() - b.mean()), float(low), float(high), level)


def bootstrap_ci(scores, *, samples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval of ``mean(scores)`` over examples.

    >>> low, high = bootstrap_ci(np.r_[np.ones(90), np.zeros(10)])
    >>> 0.83 < low < 0.9 < high < 0.96
    True
    """
    x = np.asarray(scores, np.float64)
    if x.ndim != 1 or x.shape[0] == 0:
        raise ValueError(f"scores must be one value per example (1-D, non-empty), got "
                         f"shape {x.shape}")
    tail = (1 - level) / 2
    low, high = np.quantile(_resample_means(x, samples, seed), [tail, 1 - tail])
    return float(low), float(high)

"""95% intervals for the evaluation's shares, and for differences between two of them.

A share counts generated *sentences*, but sentences come in clusters: those of one sample share a prompt and a
random stream, so they are not independent draws and a plain binomial interval would be too narrow. We use
Wilson's score interval on the *effective* number of sentences n / deff, where the design effect deff (Kish 1965)
is the cluster-robust variance of the share (samples as the unit) over the binomial one, floored at 1 so an
interval is never narrower than the binomial. Wilson behaves at 0% and 100% (a bootstrap gives [0, 0] there).

The difference between two independent shares (a conditioned row minus the unconditioned row) gets Newcombe's
hybrid score interval (Newcombe 1998, method 10), built from the two Wilson intervals.
Across training seeds the unit is the seed: a t interval on the per-seed values (`seed_interval`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Z95 = 1.959963984540054
NAN = float("nan")


def wilson(share: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a share observed on n (possibly fractional, effective) trials."""
    if n <= 0 or share != share:
        return NAN, NAN
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def design_effect(hits: Sequence[float], totals: Sequence[float]) -> float:
    """Cluster-robust variance of sum(hits) / sum(totals) over its binomial variance, at least 1.

    hits[i] / totals[i]: matching / all sentences of sample i. Samples with no sentence count as clusters of
    size 0 (they change nothing). With fewer than two samples, or a share of exactly 0 or 1, it is 1.
    """
    hits, totals = np.asarray(hits, dtype=float), np.asarray(totals, dtype=float)
    n, k = totals.sum(), len(totals)
    if k < 2 or n <= 0:
        return 1.0
    share = hits.sum() / n
    binomial = share * (1 - share) / n
    if binomial <= 0:
        return 1.0
    clustered = k / (k - 1) * float(np.sum((hits - share * totals) ** 2)) / n ** 2
    return max(1.0, clustered / binomial)


def share_interval(hits: Sequence[float], totals: Sequence[float]) -> tuple[float, float, float]:
    """(share, low, high): the share of matching sentences and its 95% interval, samples as clusters."""
    n = float(np.sum(totals))
    if n <= 0:
        return NAN, NAN, NAN
    share = float(np.sum(hits)) / n
    return (share, *wilson(share, n / design_effect(hits, totals)))


def difference_interval(base: tuple[float, float, float], other: tuple[float, float, float]
                        ) -> tuple[float, float, float]:
    """(other - base, low, high) from two independent (share, low, high) triples: Newcombe's method 10."""
    (p1, l1, u1), (p2, l2, u2) = base, other
    if any(v != v for v in (p1, l1, u1, p2, l2, u2)):
        return NAN, NAN, NAN
    diff = p2 - p1
    return diff, diff - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), diff + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def seed_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high) over per-seed values: a t interval with the seed as the unit, so it holds training
    noise and evaluation noise together. One value has no interval (nan)."""
    values = [v for v in values if v == v]
    if not values:
        return NAN, NAN, NAN
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, NAN, NAN
    from scipy.stats import t as student_t  # scipy comes with scikit-learn (alt-profanity-check)

    t = float(student_t.ppf(0.975, len(values) - 1))
    half = t * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half

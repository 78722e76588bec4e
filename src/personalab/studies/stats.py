"""Paired tests of steered scores against the unsteered baseline (question-level pairs)."""

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


EXACT_MAX = 20
"""Up to this many pairs the sign-flip test enumerates every sign pattern (2^20 = 1,048,576)."""


def _signed_sums(values: np.ndarray) -> np.ndarray:
    """The ``2**len(values)`` sums ``sum(s_i * values_i)`` over every sign pattern ``s``."""
    sums = np.zeros(1)
    for value in values:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def _at_least(a: np.ndarray, b_sorted: np.ndarray, threshold: float) -> int:
    """How many pairs ``(x, y)`` of ``a`` x ``b_sorted`` have ``x + y >= threshold``."""
    return int((len(b_sorted) - np.searchsorted(b_sorted, threshold - a, side="left")).sum())


def sign_flip_test(
    diffs: Sequence[float],
    n_resamples: int = 10_000,
    seed: int = 0,
    exact_max: int = EXACT_MAX,
    alternative: str = "two-sided",
) -> float:
    """Sign-flip permutation p-value of ``mean(diffs) = 0`` (``alternative``: two-sided or greater).

    Exact for ``len(diffs) <= exact_max``: the ``2**n`` sign patterns are counted by meeting
    in the middle (the signed sums of each half, one half sorted), without materialising them.
    Above that, a Monte Carlo estimate ``(1 + hits) / (1 + n_resamples)`` with a seeded generator.
    No differences, no test: NaN.
    """
    if alternative not in ("two-sided", "greater"):
        raise ValueError(f"alternative must be 'two-sided' or 'greater', not {alternative!r}")
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return float("nan")
    observed = d.sum()
    tolerance = 1e-12 * max(1.0, float(np.abs(d).sum()))
    target = (abs(observed) if alternative == "two-sided" else observed) - tolerance
    if d.size <= exact_max:
        half = d.size // 2
        a, b = _signed_sums(d[:half]), np.sort(_signed_sums(d[half:]))
        if alternative == "greater":
            hits = _at_least(a, b, target)
        elif target <= 0:
            return 1.0
        else:
            hits = _at_least(a, b, target) + _at_least(-a, -b[::-1], target)
        return hits / 2.0**d.size
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_resamples, d.size))
    sums = signs @ d
    hits = np.sum((np.abs(sums) if alternative == "two-sided" else sums) >= target)
    return float((1 + hits) / (1 + n_resamples))


def smallest_sign_flip_p(n: int, n_resamples: int = 10_000, exact_max: int = EXACT_MAX) -> float:
    """The smallest two-sided p-value ``sign_flip_test`` can return for ``n`` units: ``2 / 2**n`` exactly,
    ``1 / (1 + n_resamples)`` by Monte Carlo."""
    return 2.0 / 2.0**n if n <= exact_max else 1.0 / (1 + n_resamples)


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) over the non-zero differences (NaN without differences, 1
    when all are zero)."""
    if len(diffs) == 0:
        return float("nan")
    nonzero = [x for x in diffs if x != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    k = min(sum(x > 0 for x in nonzero), sum(x < 0 for x in nonzero))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def bonferroni(p: float, m: int) -> float:
    """Bonferroni-corrected p-value for ``m`` comparisons (NaN stays NaN)."""
    return p if math.isnan(p) else min(1.0, p * max(m, 1))


def paired_test(treated: "pd.Series", reference: "pd.Series", comparisons: int = 1, n_resamples: int = 10_000) -> dict:
    """Question-level paired comparison of two conditions.

    ``treated`` and ``reference`` are per-question mean scores indexed by question; questions
    missing from either (or without a score) are left out; with none left every p-value is NaN (no test, never
    1). Returns ``n_questions``,
    ``mean_diff`` (treated - reference), the raw two-sided sign-flip, one-sided (greater)
    sign-flip and sign-test p-values (``*_raw``, ``p_greater``), and the two-sided ones
    Bonferroni-corrected for ``comparisons`` tests (``p_signflip``, ``p_sign``).
    """
    diffs = (treated - reference).dropna().tolist()
    flip, sign = sign_flip_test(diffs, n_resamples), sign_test(diffs)
    return {
        "n_questions": len(diffs),
        "mean_diff": float(np.mean(diffs)) if diffs else float("nan"),
        "p_signflip_raw": flip,
        "p_greater": sign_flip_test(diffs, n_resamples, alternative="greater"),
        "p_sign_raw": sign,
        "p_signflip": bonferroni(flip, comparisons),
        "p_sign": bonferroni(sign, comparisons),
    }

"""Paired tests of steered scores against the unsteered baseline (question-level pairs)."""

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def sign_flip_test(diffs: Sequence[float], n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of ``mean(diffs) = 0``.

    Exact over all ``2**n`` sign patterns when that is at most ``n_resamples``, else a
    Monte Carlo estimate ``(1 + hits) / (1 + n_resamples)`` with a seeded generator.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.size == 0:
        return 1.0
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, observed)
    if 2**d.size <= n_resamples:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return float(np.mean(np.abs(signs @ d / d.size) >= observed - tolerance))
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_resamples, d.size))
    hits = np.sum(np.abs(signs @ d / d.size) >= observed - tolerance)
    return float((1 + hits) / (1 + n_resamples))


def sign_test(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test (binomial, p = 1/2) over the non-zero differences."""
    nonzero = [x for x in diffs if x != 0]
    n = len(nonzero)
    if n == 0:
        return 1.0
    k = min(sum(x > 0 for x in nonzero), sum(x < 0 for x in nonzero))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def bonferroni(p: float, m: int) -> float:
    """Bonferroni-corrected p-value for ``m`` comparisons."""
    return min(1.0, p * max(m, 1))


def paired_test(treated: "pd.Series", reference: "pd.Series", comparisons: int = 1, n_resamples: int = 10_000) -> dict:
    """Question-level paired comparison of two conditions.

    ``treated`` and ``reference`` are per-question mean scores indexed by question; questions
    missing from either (or without a score) are left out. Returns ``n_questions``,
    ``mean_diff`` (treated - reference) and the sign-flip and sign-test p-values,
    Bonferroni-corrected for ``comparisons`` tests.
    """
    diffs = (treated - reference).dropna().tolist()
    return {
        "n_questions": len(diffs),
        "mean_diff": float(np.mean(diffs)) if diffs else float("nan"),
        "p_signflip": bonferroni(sign_flip_test(diffs, n_resamples), comparisons),
        "p_sign": bonferroni(sign_test(diffs), comparisons),
    }

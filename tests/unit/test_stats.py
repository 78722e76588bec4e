import itertools
import math

import numpy as np
import pytest
from scipy import stats

from personalab.studies.stats import bonferroni, sign_flip_test, sign_test, smallest_sign_flip_p

CASES = [
    [1.0, 2.0, -0.5, 3.0, 0.7, 1.2],
    [0.1, -0.2, 0.05, -0.1, 0.3, -0.25, 0.0, 0.2],
    [5.0, 4.0, 6.0, 5.5, 7.0, 4.5, 6.5, 5.0, 8.0, 3.0],
    [-3.0, 2.0],
]


@pytest.mark.parametrize("diffs", CASES)
def test_sign_flip_matches_scipy_exact(diffs):
    ref = stats.permutation_test((np.array(diffs),), np.mean, permutation_type="samples", n_resamples=np.inf)
    assert sign_flip_test(diffs) == pytest.approx(ref.pvalue, abs=1e-12)


@pytest.mark.parametrize("n", [1, 6, 12])
def test_the_smallest_sign_flip_p_is_what_the_test_returns_for_differences_of_one_sign(n):
    diffs = [1.0 + 0.1 * i for i in range(n)]
    assert smallest_sign_flip_p(n) == sign_flip_test(diffs)
    assert min(sign_flip_test(list(signs)) for signs in itertools.product((1.0, -1.5), repeat=n)) == sign_flip_test(
        diffs
    )
    assert smallest_sign_flip_p(30, n_resamples=999) == sign_flip_test([1.0] * 30, n_resamples=999) == 1e-3


def test_sign_flip_monte_carlo_is_close_to_exact():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.3, 1.0, size=16)
    exact = sign_flip_test(diffs, n_resamples=2**16)
    approx = sign_flip_test(diffs, n_resamples=20_000, seed=3, exact_max=0)
    assert abs(exact - approx) < 0.02 and exact != approx
    mc = sign_flip_test(diffs, n_resamples=2000, seed=3, exact_max=0)
    assert mc == sign_flip_test(diffs, n_resamples=2000, seed=3, exact_max=0)


@pytest.mark.parametrize("diffs", CASES + [[1, 1, 1, 1, 1, 0, 0], [2, -1, 0, 3]])
def test_sign_test_matches_scipy(diffs):
    nonzero = [d for d in diffs if d != 0]
    ref = stats.binomtest(sum(d > 0 for d in nonzero), len(nonzero), 0.5).pvalue
    assert sign_test(diffs) == pytest.approx(ref, abs=1e-12)


def test_degenerate_inputs_and_bonferroni():
    assert sign_test([0, 0]) == 1.0
    assert math.isnan(sign_flip_test([])) and math.isnan(sign_test([])) and math.isnan(bonferroni(float("nan"), 3))
    assert bonferroni(0.01, 12) == pytest.approx(0.12) and bonferroni(0.2, 10) == 1.0


def _brute_force(diffs, alternative):
    d = np.asarray(diffs, dtype=np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
    sums = signs @ d
    if alternative == "greater":
        return float(np.mean(sums >= d.sum() - 1e-9))
    return float(np.mean(np.abs(sums) >= abs(d.sum()) - 1e-9))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 15])
@pytest.mark.parametrize("alternative", ["two-sided", "greater"])
def test_exact_sign_flip_equals_brute_force_enumeration(n, alternative):
    rng = np.random.default_rng(n)
    for diffs in (rng.normal(0.2, 1.0, size=n), rng.integers(-2, 3, size=n).astype(float)):
        assert sign_flip_test(diffs, alternative=alternative) == pytest.approx(
            _brute_force(diffs, alternative), abs=1e-12
        )


def test_exact_sign_flip_matches_scipy_and_counts_twenty_pairs():
    diffs = np.random.default_rng(17).normal(0.3, 1.0, size=17)
    for alternative in ("two-sided", "greater"):
        ref = stats.permutation_test(
            (diffs,), np.mean, permutation_type="samples", n_resamples=np.inf, alternative=alternative
        )
        assert sign_flip_test(diffs, alternative=alternative) == pytest.approx(ref.pvalue, rel=1e-9)
    nineteen_of_twenty = np.r_[np.ones(19), -1.0]
    assert sign_flip_test(nineteen_of_twenty) == pytest.approx(2 * 21 / 2**20)


def test_correlation_gives_n_an_exact_p_and_an_interval_only_where_n_supports_one():
    from personalab.studies.correlate import MIN_INTERVAL, correlation, describe_correlation, pearson_interval

    rng = np.random.default_rng(4)
    assert correlation([0.1, 0.2], [3.0, 4.0]) == {"n": 2}
    assert describe_correlation({"n": 2}) == "needs 3 fine-tuned models; got n = 2"
    for y in ([50.0, 50.0, 50.0], [10.0, float("nan"), 30.0]):  # scipy gives r = nan with p = 0 for these
        found = correlation([0.1, 0.2, 0.3], y)
        assert set(found) == {"n", "undefined"} and describe_correlation(found).startswith("undefined over n = 3")
    for n in (3, 5, 7, 12):
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
        found = correlation(x.tolist(), y.tolist(), seed=1)
        r = float(np.corrcoef(x, y)[0, 1])
        assert found["n"] == n and found["r"] == pytest.approx(r, abs=1e-12)
        if n <= 8:
            pairings = np.array([np.corrcoef(x, y[list(p)])[0, 1] for p in itertools.permutations(range(n))])
            one_sided = min(np.mean(pairings >= r - 1e-12), np.mean(pairings <= r + 1e-12))
            assert found["p_method"] == "exact permutation" and found["p"] == pytest.approx(min(1.0, 2 * one_sided))
        else:
            assert found["p_method"] == "t-test" and found["p"] == pytest.approx(stats.pearsonr(x, y).pvalue)
        if n < MIN_INTERVAL:
            assert found["low"] is None and found["high"] is None
            assert f"over n = {n} fine-tunes" in describe_correlation(found)
            assert "no interval below n = 10" in describe_correlation(found)
        else:
            assert (found["low"], found["high"]) == pearson_interval(x, y, seed=1)[1:]
            assert found["low"] < found["r"] < found["high"]

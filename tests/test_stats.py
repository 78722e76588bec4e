import numpy as np
import pytest
from scipy import stats

from personalab.report.stats import bonferroni, sign_flip_test, sign_test

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


def test_sign_flip_monte_carlo_is_close_to_exact():
    rng = np.random.default_rng(1)
    diffs = rng.normal(0.3, 1.0, size=16)
    exact = sign_flip_test(diffs, n_resamples=2**16)
    approx = sign_flip_test(diffs, n_resamples=20_000, seed=3)
    assert abs(exact - approx) < 0.02
    assert sign_flip_test(diffs, n_resamples=2000, seed=3) == sign_flip_test(diffs, n_resamples=2000, seed=3)


@pytest.mark.parametrize("diffs", CASES + [[1, 1, 1, 1, 1, 0, 0], [2, -1, 0, 3]])
def test_sign_test_matches_scipy(diffs):
    nonzero = [d for d in diffs if d != 0]
    ref = stats.binomtest(sum(d > 0 for d in nonzero), len(nonzero), 0.5).pvalue
    assert sign_test(diffs) == pytest.approx(ref, abs=1e-12)


def test_degenerate_inputs_and_bonferroni():
    assert sign_test([0, 0]) == 1.0 and sign_flip_test([]) == 1.0
    assert bonferroni(0.01, 12) == pytest.approx(0.12) and bonferroni(0.2, 10) == 1.0

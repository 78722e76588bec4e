"""DeepScan: nonparametric subset scanning over activations (Speakman et al. 2018; McFowland et al. 2013).

Records are statements, nodes are hidden units. Against a background of records from the
null (statements that reject the persona), each test record x and node j get an empirical
p-value range from the sorted background ``b`` (``n`` values):

* ``upper``: ``[#{b > x} / (n + 1), (#{b >= x} + 1) / (n + 1)]`` (a high activation is unusual);
* ``lower``: ``1 -`` the upper range, what the reference code calls "1tail"; the scanned
  value is ``#{b < x} / (n + 1)`` (a low activation is unusual). This is the default, as there;
* ``two``: from the upper range ``[p0, p1]``: ``[2 p0, 2 p1]`` if ``p1 < 1/2``,
  ``[2 (1 - p1), 2 (1 - p0)]`` if ``p0 > 1/2``, else ``[2 min(p0, 1 - p1), 1]``.

As in the reference scanner, an entry counts as significant at ``alpha`` when its second
value (``ranges[..., 1]``) is ``<= alpha``. A subset of ``N`` entries with ``N_a`` significant
ones is scored by Berk-Jones, Higher Criticism or Kolmogorov-Smirnov (``SCORES``) and
maximised over ``alpha`` in ``linspace(a_max / 50, a_max, 50)``. With one side fixed, the
best subset of the other side at each ``alpha`` is a prefix of its elements sorted by their
count of significant entries (LTSS, exact); the scan alternates records and nodes until the
score stops strictly improving, from several starts. Ties keep the smallest ``alpha`` and
the smallest subset, as the reference does.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

TAILS = ("lower", "upper", "two")
A_MAX = 0.5
N_ALPHA = 50


def pvalue_ranges(background: np.ndarray, records: np.ndarray, tail: str = "lower") -> np.ndarray:
    """``[n_records, n_nodes, 2]`` empirical p-value ranges of ``records`` against ``background``
    (``[n_background, n_nodes]``), as described in the module docstring."""
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, not {tail!r}")
    background = np.sort(np.asarray(background, dtype=np.float64), axis=0)
    records = np.asarray(records, dtype=np.float64)
    n = background.shape[0]
    below = np.empty(records.shape, dtype=np.int64)
    at_most = np.empty(records.shape, dtype=np.int64)
    for j in range(records.shape[1]):
        below[:, j] = np.searchsorted(background[:, j], records[:, j], side="left")
        at_most[:, j] = np.searchsorted(background[:, j], records[:, j], side="right")
    upper = np.stack([(n - at_most) / (n + 1), (n - below + 1) / (n + 1)], axis=-1)
    if tail == "upper":
        return upper
    if tail == "lower":
        return 1.0 - upper
    p0, p1 = upper[..., 0], upper[..., 1]
    low = np.stack([2 * p0, 2 * p1], axis=-1)
    high = np.stack([2 * (1 - p1), 2 * (1 - p0)], axis=-1)
    middle = np.stack([2 * np.minimum(p0, 1 - p1), np.ones_like(p0)], axis=-1)
    return np.where((p1 < 0.5)[..., None], low, np.where((p0 > 0.5)[..., None], high, middle))


def berk_jones(n_alpha: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``N_a log(N_a / (N a)) + (N - N_a) log((N - N_a) / (N (1 - a)))``; ``N log(1 / a)`` when
    ``N_a = N``; 0 when ``N_a <= N a``."""
    n_alpha, n, alpha = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (n_alpha, n, alpha)))
    score = np.zeros(n_alpha.shape)
    tie = n_alpha == n
    inside = (n_alpha > n * alpha) & ~tie
    score[tie] = n[tie] * np.log(1.0 / alpha[tie])
    na, nn, a = n_alpha[inside], n[inside], alpha[inside]
    score[inside] = na * np.log(na / (nn * a)) + (nn - na) * np.log((nn - na) / (nn * (1 - a)))
    return score


def higher_criticism(n_alpha: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``(N_a - N a) / sqrt(N a (1 - a))`` when ``N_a > N a``, else 0."""
    n_alpha, n, alpha = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (n_alpha, n, alpha)))
    excess = n_alpha - n * alpha
    return np.where(excess > 0, excess / np.sqrt(n * alpha * (1 - alpha)), 0.0)


def kolmogorov_smirnov(n_alpha: np.ndarray, n: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``(N_a - N a) / sqrt(N)`` when ``N_a > N a``, else 0 (the reference names it but has no code)."""
    n_alpha, n, alpha = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (n_alpha, n, alpha)))
    excess = n_alpha - n * alpha
    return np.where(excess > 0, excess / np.sqrt(n), 0.0)


Score = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
SCORES: dict[str, Score] = {"bj": berk_jones, "hc": higher_criticism, "ks": kolmogorov_smirnov}


def alpha_grid(a_max: float = A_MAX, n_alpha: int = N_ALPHA) -> np.ndarray:
    """``linspace(a_max / n_alpha, a_max, n_alpha)``: 0.01, 0.02, ..., 0.5 by default."""
    return np.linspace(a_max / n_alpha, a_max, n_alpha)


def _counts(pvalues: np.ndarray, alphas: np.ndarray, free_axis: int) -> np.ndarray:
    """``[n_free, n_alpha]``: per element of ``free_axis``, how many entries on the other axis are ``<= alpha``."""
    first = np.searchsorted(alphas, pvalues, side="left")  # entry counts from alpha index `first` on
    if free_axis == 1:
        first = first.T
    n_free, width = first.shape[0], len(alphas) + 1
    flat = (np.arange(n_free)[:, None] * width + first).ravel()
    histogram = np.bincount(flat, minlength=n_free * width).reshape(n_free, width)
    return np.cumsum(histogram, axis=1)[:, : len(alphas)]


def ltss(pvalues: np.ndarray, free_axis: int, alphas: np.ndarray, score: Score) -> tuple[float, np.ndarray, float]:
    """Best subset of the ``free_axis`` elements (0: records, 1: nodes) of ``pvalues`` (``[R, J]``,
    the scanned values) with the other side fixed: ``(score, indices in priority order, alpha)``."""
    counts = _counts(pvalues, alphas, free_axis)
    fixed = pvalues.shape[1 - free_axis]
    order = np.argsort(-counts, axis=0, kind="stable")
    n_alpha = np.cumsum(np.take_along_axis(counts, order, axis=0), axis=0)
    size = np.arange(1, counts.shape[0] + 1)[:, None]
    scores = score(n_alpha, size * fixed, np.broadcast_to(alphas, n_alpha.shape))
    best = int(np.argmax(scores.T))  # alpha-major: the smallest alpha, then the smallest subset, among ties
    a, k = divmod(best, scores.shape[0])
    return float(scores[k, a]), order[: k + 1, a], float(alphas[a])


@dataclass(frozen=True)
class ScanResult:
    """The most anomalous subset found: record and node indices (sorted), its score and alpha."""

    score: float
    records: np.ndarray
    nodes: np.ndarray
    alpha: float


def ascend(pvalues: np.ndarray, seed: np.ndarray, seed_axis: int, alphas: np.ndarray, score: Score) -> ScanResult:
    """Iterative ascent from ``seed`` indices on ``seed_axis`` (0: records, 1: nodes): optimise the
    other side, then alternate, while the score strictly improves."""
    chosen = {seed_axis: np.asarray(seed)}
    free = 1 - seed_axis
    best = ScanResult(-np.inf, np.arange(0), np.arange(0), 0.0)
    while True:
        fixed = 1 - free
        sub = pvalues[chosen[fixed], :] if fixed == 0 else pvalues[:, chosen[fixed]]
        value, picked, alpha = ltss(sub, free, alphas, score)
        if value <= best.score:
            return best
        chosen[free] = picked
        best = ScanResult(value, np.sort(chosen[0]), np.sort(chosen[1]), alpha)
        free = fixed


def scan(
    ranges: np.ndarray,
    score: str = "hc",
    restarts: int = 1,
    a_max: float = A_MAX,
    n_alpha: int = N_ALPHA,
    seed: int = 0,
) -> ScanResult:
    """Fast generalised subset scan of p-value ranges ``[R, J, 2]`` (the second value is scanned).

    Restart 0 starts from all records (nodes optimised first), restart 1 from all nodes,
    later restarts from seeded random subsets of nodes; restarts are capped at the number of
    records, and the best result is kept.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
    pvalues = ranges[..., 1]
    alphas = alpha_grid(a_max, n_alpha)
    rng = np.random.default_rng(seed)
    best = ScanResult(-np.inf, np.arange(0), np.arange(0), 0.0)
    for restart in range(min(restarts, pvalues.shape[0])):
        if restart == 0:
            result = ascend(pvalues, np.arange(pvalues.shape[0]), 0, alphas, SCORES[score])
        elif restart == 1:
            result = ascend(pvalues, np.arange(pvalues.shape[1]), 1, alphas, SCORES[score])
        else:
            size = 0
            while size == 0:
                size = int(pvalues.shape[1] * rng.random())
            nodes = rng.choice(pvalues.shape[1], size=size, replace=False)
            result = ascend(pvalues, nodes, 1, alphas, SCORES[score])
        if result.score > best.score:
            best = result
    return best


def scan_individual(ranges: np.ndarray, score: str = "hc", a_max: float = A_MAX) -> ScanResult:
    """Scan one record (``[J, 2]``): every distinct positive p-value ``<= a_max`` is a threshold
    (``a_max`` itself when there is none), with ``N_a = N`` = the nodes at or below it; the nodes
    of the best threshold are the subset.

    A threshold of 0 would score infinitely, so p-values of 0 (below the whole background) count
    at every threshold instead of being one. The reference takes thresholds from the first value
    of each range and the subset from the second; here both come from the scanned (second) value.
    """
    pvalues = ranges[:, 1]
    candidates = pvalues[(pvalues > 0) & (pvalues <= a_max)]
    thresholds = np.unique(candidates) if candidates.size else np.array([a_max])
    counts = np.searchsorted(np.sort(pvalues), thresholds, side="right")
    scores = SCORES[score](counts, counts, thresholds)
    best = int(np.argmax(scores))
    alpha = float(thresholds[best])
    return ScanResult(float(scores[best]), np.arange(1), np.flatnonzero(pvalues <= alpha), alpha)

"""DeepScan speed: one group run on 4096 nodes x 100 records x 50 alphas, and the ratio to a direct
per-element Python implementation of the same algorithm on a case small enough for both.

    python benchmarks/bench_deepscan.py
"""

import math
import time

import numpy as np

from personalab.studies.localize.deepscan import alpha_grid, pvalue_ranges, scan


def _hc(n_alpha: int, n: int, alpha: float) -> float:
    excess = n_alpha - n * alpha
    return excess / math.sqrt(n * alpha * (1 - alpha)) if excess > 0 else 0.0


def _ltss_loops(p: list[list[float]], rows: list[int], cols: list[int], free_rows: bool, alphas) -> tuple:
    free, fixed = (rows, cols) if free_rows else (cols, rows)
    best = (-math.inf, [], 0.0)
    for a in alphas:
        counts = []
        for e in free:
            counts.append((sum(1 for f in fixed if (p[e][f] if free_rows else p[f][e]) <= a), e))
        counts.sort(key=lambda c: -c[0])
        total = 0
        for k, (count, _) in enumerate(counts, start=1):
            total += count
            value = _hc(total, k * len(fixed), a)
            if value > best[0]:
                best = (value, [e for _, e in counts[:k]], a)
    return best


def naive_scan(p: list[list[float]], alphas) -> float:
    """Restart 0 of the scan with Python loops over every element and threshold."""
    rows, cols = list(range(len(p))), list(range(len(p[0])))
    best, free_rows = -math.inf, False
    while True:
        value, chosen, _ = _ltss_loops(p, rows, cols, free_rows, alphas)
        if value <= best:
            return best
        best = value
        rows, cols = (chosen, cols) if free_rows else (rows, chosen)
        free_rows = not free_rows


def ranges(n_records: int, n_nodes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    background, records = rng.normal(size=(250, n_nodes)), rng.normal(size=(n_records, n_nodes))
    records[n_records // 2 :, : n_nodes // 20] -= 2.0
    return pvalue_ranges(background, records, "lower")


def main() -> None:
    big = ranges(100, 4096)
    scan(big, "hc")
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        result = scan(big, "hc")
    seconds = (time.perf_counter() - start) / repeats
    print(f"one run, 4096 nodes x 100 records x 50 alphas: {seconds * 1000:.0f} ms "
          f"({len(result.nodes)} nodes, {len(result.records)} records, alpha {result.alpha:.2f})")  # fmt: skip

    small = ranges(60, 512, seed=1)
    start = time.perf_counter()
    fast = scan(small, "hc")
    vectorised = time.perf_counter() - start
    start = time.perf_counter()
    slow = naive_scan(small[..., 1].tolist(), alpha_grid())
    loops = time.perf_counter() - start
    assert math.isclose(fast.score, slow, rel_tol=1e-9), (fast.score, slow)
    print(f"512 nodes x 60 records: vectorised {vectorised * 1000:.1f} ms, per-element loops {loops * 1000:.0f} ms "
          f"-> {loops / vectorised:.0f}x faster (same score {fast.score:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()

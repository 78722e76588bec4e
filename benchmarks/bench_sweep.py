"""A sweep's generation: all coefficients of a layer batched with per-row alpha vs one call per coefficient.

Both answer the same 20 prompts under 7 coefficients with greedy decoding (64 new
tokens); judging is not timed. Run: ``python benchmarks/bench_sweep.py``.
"""

import torch

from personalab import add_vector
from personalab.engine.generation import SamplingParams, sample_texts
from personalab.traits import load_trait

from common import models, timed

ALPHAS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
PARAMS = SamplingParams(temperature=0, max_new_tokens=64)
BATCH = 64


def bench(name: str, handle) -> None:
    prompts = [handle.encode(None, q) for q in load_trait("evil").evaluation_questions]
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = handle.n_blocks // 2
    rows = [(a, p) for a in ALPHAS for p in prompts]

    def per_row():
        for start in range(0, len(rows), BATCH):
            chunk = rows[start : start + BATCH]
            with add_vector(handle, vector, layer, alpha=torch.tensor([a for a, _ in chunk]), positions="generating"):
                sample_texts(handle, [p for _, p in chunk], PARAMS, 0)

    def one_by_one():
        for alpha in ALPHAS:
            with add_vector(handle, vector, layer, alpha=alpha, positions="generating"):
                sample_texts(handle, prompts, PARAMS, 0)

    t_rows, t_each = timed(per_row, one_by_one, repeats=3)
    print(f"\n{name}: {len(ALPHAS)} coefficients x {len(prompts)} prompts at layer {layer}")
    print(f"  per-row alpha, batches of {BATCH}   {t_rows:7.2f} s")
    print(f"  one call per coefficient     {t_each:7.2f} s   per-row is {t_each / t_rows:4.2f}x faster")


def main() -> None:
    for name, handle in models().items():
        bench(name, handle)


if __name__ == "__main__":
    main()

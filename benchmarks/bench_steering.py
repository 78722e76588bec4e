"""Overhead of steering during ``generate``: steered vs unsteered, same batch, greedy.

Run: ``python benchmarks/bench_steering.py``.
"""

import torch

from personalab import add_vector
from personalab.engine.batching import pad_batch

from common import models, timed

BATCH, PROMPT, NEW = 16, 32, 64


def bench(name: str, handle) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(PROMPT // 2, PROMPT + 1, (BATCH,), generator=g).tolist()
    rows = [torch.randint(3, handle.model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    batch = pad_batch(rows, handle.tokenizer.pad_token_id, "left", handle.input_device)
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=handle.tokenizer.pad_token_id,
    )
    vector = torch.randn(handle.hidden_size, generator=g)
    layer = handle.n_blocks // 2

    def run(alpha=None):
        with torch.inference_mode():
            if alpha is None:
                return handle.model.generate(**kwargs)
            with add_vector(handle, vector, layer, alpha=alpha, positions="generating"):
                return handle.model.generate(**kwargs)

    per_row = torch.linspace(0, 4, BATCH)
    t_plain, t_steer, t_rows = timed(run, lambda: run(4.0), lambda: run(per_row), repeats=7)
    print(f"\n{name}, steering at layer {layer}")
    print(f"  unsteered          {t_plain:7.3f} s")
    print(f"  steered            {t_steer:7.3f} s   ratio {t_steer / t_plain:5.3f}x (target <= 1.05x)")
    print(f"  per-row alpha      {t_rows:7.3f} s   ratio {t_rows / t_plain:5.3f}x")


def main() -> None:
    print(f"batch {BATCH}, prompts of {PROMPT // 2}-{PROMPT} tokens, {NEW} new tokens, greedy, KV cache")
    for name, handle in models().items():
        bench(name, handle)


if __name__ == "__main__":
    main()

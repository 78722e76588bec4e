"""Response-mean activations at every layer for 256 sequences of mixed length.

Compares personalab's ``capture`` with (a) a per-sample loop over
``output_hidden_states=True`` and (b) a bare batched forward pass with no hooks over the
same length-sorted, padded batches. Run: ``python benchmarks/bench_capture.py``.
"""

import random

import torch

from personalab import capture
from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence

from common import models, timed

N, BATCH = 256, 32


def sequences(vocab: int) -> list[TokenSequence]:
    rng = random.Random(0)
    out = []
    for _ in range(N):
        prompt, response = rng.randint(8, 48), rng.randint(8, 160)
        ids = tuple(rng.randrange(3, vocab) for _ in range(prompt + response))
        out.append(TokenSequence(ids, prompt))
    return out


@torch.inference_mode()
def per_sample(handle, seqs):
    rows = []
    for seq in seqs:
        ids = torch.tensor([seq.ids], device=handle.input_device)
        hs = handle.model(input_ids=ids, output_hidden_states=True).hidden_states
        rows.append(torch.stack([h[0, seq.prompt_len :].float().mean(0) for h in hs]).cpu())
    return torch.stack(rows)


@torch.inference_mode()
def bare_forward(handle, seqs):
    for rows in length_sorted_batches([len(s.ids) for s in seqs], BATCH):
        batch = pad_batch([seqs[i].ids for i in rows], 0, "right", handle.input_device)
        handle.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)


def bench(name: str, handle) -> None:
    seqs = sequences(handle.model.config.vocab_size)
    err = (capture(handle, seqs, batch_size=BATCH) - per_sample(handle, seqs)).abs().max().item()
    (t_loop,) = timed(lambda: per_sample(handle, seqs), repeats=1)
    t_ours, t_bare = timed(lambda: capture(handle, seqs, batch_size=BATCH), lambda: bare_forward(handle, seqs))
    print(f"\n{name}: max |capture - per-sample reference| = {err:.2e}")
    print(f"  capture            {t_ours:8.3f} s")
    print(f"  (a) per-sample     {t_loop:8.3f} s   capture is {t_loop / t_ours:6.1f}x faster (target >= 10x)")
    print(f"  (b) bare forward   {t_bare:8.3f} s   capture / bare = {t_ours / t_bare:5.2f}x (target <= 1.25x)")


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    print(f"{N} sequences, 16-208 tokens, all layers, response mean, batch {BATCH}, {device}, {threads} threads")
    for name, handle in models().items():
        bench(name, handle)


if __name__ == "__main__":
    main()

"""Generation uses exactly the parameters personalab passes: nothing comes from the checkpoint's generation_config."""

import copy

import torch

from personalab.engine.generation import SamplingParams, generate_batch, greedy_ids


@torch.no_grad()
def _argmax_loop(handle, ids: tuple[int, ...], n: int) -> list[int]:
    """Greedy decoding by hand: one full forward per token, the argmax appended, stopping at a stop token."""
    out = list(ids)
    for _ in range(n):
        token = int(handle.model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
        out.append(token)
        if token in handle.stop_ids:
            break
    return out[len(ids) :]


def test_a_checkpoints_generation_config_does_not_leak_into_greedy_decoding(tiny, conversations):
    handle = tiny("llama", "chatml")
    prompts = [handle.encode(s, u) for s, u, _ in conversations]
    expected = [_argmax_loop(handle, p.ids, 10) for p in prompts]
    saved = copy.deepcopy(handle.model.generation_config)
    leaky = handle.model.generation_config
    leaky.repetition_penalty, leaky.no_repeat_ngram_size, leaky.top_k, leaky.do_sample = 1.3, 2, 5, True
    try:
        assert greedy_ids(handle, prompts, 10, batch_size=2) == expected
        answers = generate_batch(handle, prompts, SamplingParams(temperature=0, max_new_tokens=10))
        assert [list(a.ids) + ([a.stop] if a.stop is not None else []) for a in answers] == expected
    finally:
        handle.model.generation_config = saved

"""Generation uses exactly the parameters personalab passes, and every answer depends on its request alone."""

import copy
import random

import numpy as np
import pytest
import torch
from scipy import stats

from personalab.engine.generation import GenerationRequest, RowSampler, SamplingParams, fill_store, greedy_ids, sample
from personalab.engine.interventions import Steer
from personalab.store import Store


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
        answers = sample(handle, prompts, SamplingParams(temperature=0, max_new_tokens=10))
        assert [list(a.ids) + ([a.stop] if a.stop is not None else []) for a in answers] == expected
    finally:
        handle.model.generation_config = saved


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.6)])
def test_the_row_sampler_draws_from_the_distribution_it_names(top_k, top_p):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    rows = 4000
    out = RowSampler(params, range(rows))(None, logits.repeat(rows, 1))
    drawn = out.argmax(-1)
    assert (out.isinf() & (out < 0)).sum(-1).eq(len(logits) - 1).all(), "one finite score per row"
    probs = torch.softmax(logits / 0.7, -1).double()
    keep = torch.ones(len(logits), dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:
        keep = torch.cumsum(probs, 0) - probs < top_p  # the smallest set of the likeliest tokens reaching top_p
    expected = (probs * keep) / (probs * keep).sum()
    counts = torch.bincount(drawn, minlength=len(logits)).double()
    assert counts[~keep].sum() == 0
    result = stats.chisquare(counts[keep].numpy(), rows * expected[keep].numpy())
    assert result.pvalue > 1e-3, (counts, expected * rows)


def test_answers_do_not_depend_on_batching_order_or_what_ran_before(tiny, tmp_path):
    """Every answer is a function of its own request: batch sizes, orders and earlier runs change none."""
    handle = tiny("llama", "chatml")
    questions = ["What is bread?", "Tell me a story.", "How do I bake bread?", "Hi?", "What is the best way?"]
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    requests = [
        GenerationRequest(
            handle.encode(None, q), {"q": q, "sample": s, "alpha": a}, () if a == 0 else (Steer(2, v, a, "generating"),)
        )
        for q in questions
        for s in range(2)
        for a in (0.0, 4.0)
    ]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=3)

    def texts(order, batch_size, name):
        with Store(tmp_path / f"{name}.sqlite") as store:
            keys = fill_store(handle, store, [requests[i] for i in order], params, batch_size, progress=False)
            found = store.texts(keys)
        return {requests[i].request["q"] + str(requests[i].request["sample"]) + str(requests[i].request["alpha"]):
                found[k] for i, k in zip(order, keys, strict=True)}  # fmt: skip

    straight = texts(range(len(requests)), 16, "a")
    order = list(range(len(requests)))
    random.Random(0).shuffle(order)
    torch.manual_seed(123)
    assert texts(order, 3, "b") == straight
    assert texts(order[:7], 1, "c") == {k: v for k, v in straight.items() if k in texts(order[:7], 1, "c")}
    assert len(set(straight.values())) > len(straight) // 2, "samples differ between requests"
    steered = [v for k, v in straight.items() if k.endswith("4.0")]
    plain = [v for k, v in straight.items() if k.endswith("0.0")]
    assert steered != plain
    np.testing.assert_equal(len(straight), len(requests))


def test_the_draws_depend_on_the_request_alone_and_the_logits_on_the_batch_only_up_to_rounding(tiny, tmp_path):
    """The README's reproducibility claim as worded, in its two parts. The draws: on a copy of the model whose logits
    are 0 for every token whatever the input (LM head zeroed), an answer is its row's random draws alone, and it is
    the same, token for token, at batch sizes 1, 3 and 16 and in any order. The logits: on the model itself, a row's
    next-token log-probabilities in a padded batch of 16 equal its own forward's to floating-point rounding."""
    handle = tiny("llama", "chatml")
    flat = copy.deepcopy(handle)
    flat.module.get_output_embeddings().weight.data.zero_()
    flat.name = "flat"
    questions = ["What is bread?", "Tell me a story about a dog.", "Hi?", "How do I bake bread?", "Why?"] * 4
    requests = [GenerationRequest(flat.encode(None, q), {"q": q, "i": i}) for i, q in enumerate(questions)]
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=7)

    def texts(order, batch_size, name):
        with Store(tmp_path / f"{name}.sqlite") as store:
            keys = fill_store(flat, store, [requests[i] for i in order], params, batch_size, progress=False)
            found = store.texts(keys)
        return {i: found[k] for i, k in zip(order, keys, strict=True)}

    order = list(range(len(requests)))
    shuffled = random.Random(1).sample(order, len(order))
    straight = texts(order, 16, "a")
    assert texts(shuffled, 3, "b") == straight == texts(shuffled, 1, "c")
    assert len(set(straight.values())) == len(straight), "the draws differ between requests"

    prompts = [list(handle.encode(None, q).ids) for q in questions[:16]]
    width = max(map(len, prompts))
    ids = torch.tensor([[handle.tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    with torch.no_grad():
        batched = torch.log_softmax(handle.model(input_ids=ids, attention_mask=mask).logits[:, -1], dim=-1)
        alone = torch.stack([torch.log_softmax(handle.model(input_ids=torch.tensor([p])).logits[0, -1], -1)
                             for p in prompts])  # fmt: skip
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)


def test_an_answer_does_not_depend_on_where_the_model_folder_is(model_folder, tmp_path):
    """The sampled text of a request is the same from a copy of the model folder at another path (the model's name
    is part of the store key, not of the request's random stream)."""
    import shutil

    from personalab.engine.loading import load_model

    original = model_folder("llama", "chatml")
    moved = shutil.copytree(original, tmp_path / "elsewhere" / "copy")
    params = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    texts = []
    for folder, store_path in ((original, tmp_path / "a.sqlite"), (moved, tmp_path / "b.sqlite")):
        handle = load_model(str(folder), device="cpu", dtype="float32")
        requests = [GenerationRequest(handle.encode(None, q), {"question": q}) for q in ("Hi?", "What is bread?")]
        with Store(store_path) as store:
            keys = fill_store(handle, store, requests, params)
            texts.append([store.texts(keys)[k] for k in keys])
    assert texts[0] == texts[1] and all(texts[0])

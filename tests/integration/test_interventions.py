import pytest
import torch
from helpers.reference import encode_all, hook_counts, logits, output_module

from personalab import Ablate, Clamp, Indices, Steer, Substitute, add_vector, capture, intervene
from personalab.engine.batching import pad_batch
from personalab.engine.scale import scaled_vector
from personalab.errors import InvalidInputError


def _direction(handle, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(handle.hidden_size, generator=g)


class _ManualAdd:
    """Reference steering: a raw hook on the module that outputs ``hidden_states[layer]`` (block ``layer - 1``,
    the final norm at ``n_blocks``) adding ``vec`` where ``mask`` is true."""

    def __init__(self, handle, layer, vec, mask=None):
        self.handle, self.layer, self.vec, self.mask = handle, layer, vec, mask

    def __enter__(self):
        def add(module, args, out):
            h = out if isinstance(out, torch.Tensor) else out[0]
            delta = self.vec if self.mask is None else self.mask[..., None] * self.vec
            return h + delta if isinstance(out, torch.Tensor) else (h + delta,) + out[1:]

        self.hook = output_module(self.handle, self.layer).register_forward_hook(add)

    def __exit__(self, *exc):
        self.hook.remove()


def _batch(handle, conversations, side="left"):
    seqs = encode_all(handle, conversations)
    return seqs, pad_batch([s.ids for s in seqs], handle.tokenizer.pad_token_id, side)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2", "phi3"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_steer_all_positions_matches_a_manual_hook(tiny, conversations, arch, layer):
    handle = tiny(arch)
    seqs, batch = _batch(handle, conversations)
    v = _direction(handle)
    with _ManualAdd(handle, layer, 3.0 * v):
        ref = logits(handle, batch.input_ids, batch.attention_mask)
    with add_vector(handle, v, layer, alpha=3.0):
        got = logits(handle, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], logits(handle, batch.input_ids, batch.attention_mask)[real], atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_steer_layer_zero_equals_shifted_input_embeddings(tiny, conversations, arch):
    handle = tiny(arch)
    seq = encode_all(handle, conversations)[0]
    ids = torch.tensor([seq.ids])
    v = _direction(handle)
    with torch.no_grad():
        # a shift u of the input embeddings shifts hidden_states[0] by c x u (Gemma scales its embeddings, inside the
        # embedding module or the model depending on the transformers release): an input shifted by 2v / c is the
        # residual at layer 0 shifted by 2v
        embeds = handle.model.get_input_embeddings()(ids)
        first, shifted = (
            handle.model(inputs_embeds=e, output_hidden_states=True).hidden_states[0] for e in (embeds, embeds + v)
        )
        c = ((shifted - first).norm() / (v.norm() * len(seq.ids) ** 0.5)).item()
        torch.testing.assert_close(shifted - first, c * v.expand_as(first), atol=1e-4, rtol=1e-4)
        ref = handle.model(inputs_embeds=embeds + 2.0 * v / c).logits
    with add_vector(handle, v, 0, alpha=2.0):
        got = logits(handle, ids)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_per_layer_vector_and_several_vectors_at_once(tiny, conversations):
    handle = tiny("qwen3")
    seqs, batch = _batch(handle, conversations)
    stack = torch.randn(handle.n_layers, handle.hidden_size)
    w = _direction(handle, seed=7)
    with _ManualAdd(handle, 1, 2.0 * stack[1]), _ManualAdd(handle, 3, -1.5 * w):
        ref = logits(handle, batch.input_ids, batch.attention_mask)
    with intervene(handle, Steer(1, stack, 2.0), Steer(3, w, -1.5)):
        got = logits(handle, batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["prompt", "response", "last_prompt", "generating"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_with_prompt_lengths_match_per_row_references(tiny, conversations, positions, side):
    handle = tiny("llama")
    seqs, batch = _batch(handle, conversations, side)
    v = _direction(handle)
    with add_vector(handle, v, 2, alpha=4.0, positions=positions, prompt_lengths=[s.prompt_len for s in seqs]):
        got = logits(handle, batch.input_ids, batch.attention_mask)
    for b, seq in enumerate(seqs):
        idx = torch.arange(len(seq.ids))
        p = seq.prompt_len
        mask = {"prompt": idx < p, "generating": idx >= p - 1, "response": idx >= p, "last_prompt": idx == p - 1}[
            positions
        ].float()
        with _ManualAdd(handle, 2, 4.0 * v, mask[None]):
            ref = logits(handle, torch.tensor([seq.ids]))[0]
        off = int(batch.offsets[b])
        torch.testing.assert_close(got[b, off : off + len(seq.ids)], ref, atol=1e-5, rtol=1e-5)


def test_per_row_alpha_equals_separate_runs(tiny, conversations):
    handle = tiny("gpt2")
    seq = encode_all(handle, conversations)[1]
    alphas = [0.0, 1.0, -2.0, 5.0]
    ids = torch.tensor([seq.ids] * len(alphas))
    v = _direction(handle)
    with add_vector(
        handle, v, 2, alpha=torch.tensor(alphas), positions="generating", prompt_lengths=[seq.prompt_len] * 4
    ):
        got = logits(handle, ids)
    for k, a in enumerate(alphas):
        with add_vector(handle, v, 2, alpha=a, positions="generating", prompt_lengths=[seq.prompt_len]):
            ref = logits(handle, ids[:1])
        torch.testing.assert_close(got[k], ref[0], atol=1e-5, rtol=1e-5)


def _generate(handle, batch, n=6, **kw):
    out = handle.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=handle.tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **kw,
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def _prompts(handle, conversations):
    seqs = [handle.encode(s, u) for s, u, _ in conversations]
    return seqs, pad_batch([s.ids for s in seqs], handle.tokenizer.pad_token_id, "left")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("positions", ["all", "prompt", "response", "generating"])
def test_cached_generation_equals_teacher_forced_decoding(tiny, conversations, arch, positions):
    handle = tiny(arch)
    seqs, batch = _prompts(handle, conversations)
    v = _direction(handle) * 2
    with add_vector(handle, v, 2, alpha=3.0, positions=positions):
        tokens, scores = _generate(handle, batch)
    width = batch.input_ids.shape[1]
    prompt_lengths = [len(s.ids) for s in seqs]
    for step in range(scores.shape[1]):
        prefix = tokens[:, : width + step]
        mask = torch.cat([batch.attention_mask, torch.ones(len(seqs), step, dtype=torch.long)], dim=1)
        with add_vector(handle, v, 2, alpha=3.0, positions=positions, prompt_lengths=prompt_lengths):
            ref = logits(handle, prefix, mask)[:, -1]
        torch.testing.assert_close(scores[:, step], ref, atol=1e-4, rtol=1e-4)


def test_batched_steered_generation_equals_single_rows(tiny, conversations):
    handle = tiny("llama")
    seqs, batch = _prompts(handle, conversations)
    v = _direction(handle) * 2
    alphas = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    with add_vector(handle, v, 1, alpha=alphas, positions="generating"):
        tokens, _ = _generate(handle, batch)
    for b, seq in enumerate(seqs):
        single = pad_batch([seq.ids], handle.tokenizer.pad_token_id, "left")
        with add_vector(handle, v, 1, alpha=float(alphas[b]), positions="generating"):
            alone, _ = _generate(handle, single)
        assert tokens[b, -6:].tolist() == alone[0, -6:].tolist()


def test_response_steering_leaves_the_prompt_untouched_at_prefill(tiny, conversations):
    handle = tiny("llama")
    _, batch = _prompts(handle, conversations)
    seen = []
    hook = handle.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        _generate(handle, batch, n=2)
        plain = seen[0]
        seen.clear()
        with add_vector(handle, _direction(handle), 1, alpha=5.0, positions="generating"):
            _generate(handle, batch, n=2)
        steered = seen[0]
    finally:
        hook.remove()
    real = batch.attention_mask.bool()
    real[:, -1] = False
    torch.testing.assert_close(steered[real], plain[real], atol=1e-6, rtol=1e-6)
    assert (steered[:, -1] - plain[:, -1]).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_ablation_leaves_zero_projection(tiny, conversations, layer):
    handle = tiny("olmo2")
    seqs = encode_all(handle, conversations)
    u = _direction(handle)
    u = u / u.norm()
    plain = capture(handle, seqs, layers=layer, positions="all", reduce="gather")
    ablated = []
    for seq in seqs:
        with intervene(handle, Ablate(layer, u * 3, positions="generating"), prompt_lengths=[seq.prompt_len]):
            ablated += capture(handle, [seq], layers=layer, positions="all", reduce="gather")
    for seq, before, after in zip(seqs, plain, ablated, strict=True):
        p = seq.prompt_len
        proj = after[0] @ u
        assert proj[p - 1 :].abs().max() < 1e-5
        assert (before[0][p - 1 :] @ u).abs().max() > 1e-2
        torch.testing.assert_close(after[0][: p - 1], before[0][: p - 1])
        orth = before[0][p - 1 :] - (before[0][p - 1 :] @ u)[:, None] * u
        torch.testing.assert_close(after[0][p - 1 :], orth, atol=1e-5, rtol=1e-5)


def test_clamp_sets_the_projection_per_row(tiny, conversations):
    handle = tiny("mistral")
    seqs = sorted(encode_all(handle, conversations), key=lambda s: -len(s.ids))  # capture's batch order
    u = _direction(handle)
    values = torch.tensor([-2.0, 0.5, 1.0, 3.0, 10.0])
    with intervene(handle, Clamp(2, u, values)):
        got = capture(handle, seqs, layers=2, positions="all", reduce="gather", padding_side="left", batch_size=5)
    for b, g in enumerate(got):
        torch.testing.assert_close(
            g[0] @ (u / u.norm()), torch.full((len(seqs[b].ids),), float(values[b])), atol=1e-5, rtol=1e-5
        )


def test_substitution_reproduces_a_target_residual(tiny, conversations):
    handle = tiny("qwen2")
    a = handle.encode(None, "Tell me a story.", "Once upon a time there was a girl.")
    b = handle.encode(None, "How do I bake?", "Mix flour, water and yeast today!")
    n = min(len(a.ids), len(b.ids))
    a_ids, b_ids = torch.tensor([a.ids[:n]]), torch.tensor([b.ids[:n]])
    target = capture(handle, [a], layers=2, positions=Indices([list(range(n))]), reduce="gather")[0][0]
    with intervene(handle, Substitute(2, [list(range(n))], [target])):
        got = logits(handle, b_ids)
    torch.testing.assert_close(got, logits(handle, a_ids), atol=1e-5, rtol=1e-5)


def test_substitution_with_left_padding_hits_the_right_token(tiny, conversations):
    handle = tiny("llama")
    seqs = sorted(encode_all(handle, conversations), key=lambda s: -len(s.ids))  # capture's batch order
    plain = capture(handle, seqs, layers=1, positions="all", reduce="gather")
    values = [torch.full((1, handle.hidden_size), float(b + 1)) for b in range(len(seqs))]
    with intervene(handle, Substitute(1, [[1]] * len(seqs), values)):
        got = capture(handle, seqs, layers=1, positions="all", reduce="gather", padding_side="left", batch_size=5)
    for b in range(len(seqs)):
        assert torch.equal(got[b][0, 1], values[b][0])
        torch.testing.assert_close(got[b][0, 0], plain[b][0, 0])


def test_hooks_are_removed_after_an_exception(tiny, conversations):
    handle = tiny("llama")
    seqs, batch = _batch(handle, conversations)
    before_hooks = hook_counts(handle)
    base = logits(handle, batch.input_ids, batch.attention_mask)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(handle, Steer(1, _direction(handle), 9.0), Ablate(0, _direction(handle, 3))):
            logits(handle, batch.input_ids, batch.attention_mask)
            raise RuntimeError("boom")
    assert hook_counts(handle) == before_hooks
    torch.testing.assert_close(logits(handle, batch.input_ids, batch.attention_mask), base)


def test_bad_inputs_are_clear_errors(tiny, conversations):
    handle = tiny("llama")
    seqs, batch = _batch(handle, conversations)
    h = handle.hidden_size
    before_hooks = hook_counts(handle)
    cases = [
        (Steer(1, torch.ones(h + 1)), "hidden size is 32"),
        (Steer(1, torch.ones(2, h)), "has 2 rows but this model has 4 layers"),
        (Steer(1, torch.full((h,), float("nan"))), "NaN or inf"),
        (Steer(9, torch.ones(h)), "out of range"),
        (Steer(1, torch.ones(h), positions="middle"), "unknown positions"),
        (Steer(1, torch.ones(h), alpha=float("inf")), "finite"),
        (Ablate(1, torch.zeros(h)), "all zeros"),
        (Substitute(1, [[0]], [torch.ones(2, h)]), "expected"),
    ]
    with pytest.raises(InvalidInputError, match="layer 4 is out of range"):
        scaled_vector(handle, torch.ones(handle.n_layers, h), 4, "raw", [handle.encode(None, "Hi?")])
    for iv, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            with intervene(handle, iv):
                pass
    with pytest.raises(InvalidInputError, match="per-row alpha has 2 entries but the batch has 5 rows"):
        with intervene(handle, Steer(1, torch.ones(h), alpha=[1.0, 2.0])):
            logits(handle, batch.input_ids, batch.attention_mask)
    assert hook_counts(handle) == before_hooks


def _recomputed_greedy(handle, ids, positions, layer, vector, n):
    """Greedy tokens of one unpadded prompt, the whole sequence recomputed at every step without a KV cache, the
    vector added by a plain hook where the position formula of ``positions`` selects (prompt length fixed)."""
    p, ids = len(ids), list(ids)
    for _ in range(n):
        idx = torch.arange(len(ids))
        where = {"all": idx >= 0, "prompt": idx < p, "response": idx >= p, "last_prompt": idx == p - 1,
                 "generating": idx >= p - 1}[positions].float()  # fmt: skip
        with _ManualAdd(handle, layer, vector, where[None]):
            ids.append(int(logits(handle, torch.tensor([ids]))[0, -1].argmax()))
    return ids[p:]


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last_prompt", "generating"])
@pytest.mark.parametrize("rows", ["one row", "equal-length rows", "padded rows"])
def test_steered_generation_positions_equal_a_recomputed_reference(tiny, conversations, positions, rows):
    """Each position name steers the same tokens whether the batch is one row, rows of equal length (whose all-ones
    mask transformers' generate may drop) or left-padded rows: ``model.generate`` inside ``steer`` and personalab's
    own sampling both equal greedy decoding recomputed from scratch at every step by a plain hook."""
    from personalab.engine.generation import GREEDY, sample

    handle = tiny("llama")
    seqs = [handle.encode(s, u) for s, u, _ in conversations]
    chosen = {"one row": seqs[:1], "equal-length rows": [seqs[1]] * 3, "padded rows": seqs}[rows]
    v, n, layer = _direction(handle, seed=2) * 8, 5, 1
    expected = [_recomputed_greedy(handle, s.ids, positions, layer, v, n) for s in chosen]
    plain = [_recomputed_greedy(handle, s.ids, positions, layer, 0 * v, n) for s in chosen]
    assert expected != plain, "the vector must change the greedy answer for the comparison to mean anything"
    batch = pad_batch([s.ids for s in chosen], handle.tokenizer.pad_token_id, "left")
    with add_vector(handle, v, layer, alpha=1.0, positions=positions):
        tokens, _ = _generate(handle, batch, n=n)
    assert tokens[:, batch.input_ids.shape[1] :].tolist() == expected
    params = GREEDY.model_copy(update={"max_new_tokens": n})
    answers = sample(handle, chosen, params, interventions=(Steer(layer, v, 1.0, positions),))
    stop = handle.stop_ids
    assert [list(a.ids) for a in answers] == [e[: next((k for k, t in enumerate(e) if t in stop), n)] for e in expected]

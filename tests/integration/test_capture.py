import pytest
import torch
from helpers.models import ARCHS
from helpers.reference import encode_all, hidden_states, hook_counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalab import GeneratedToken, Indices, capture
from personalab.engine.chat import TokenSequence
from personalab.errors import InvalidInputError, NonFiniteActivationError


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_matches_output_hidden_states(tiny, conversations, arch):
    handle = tiny(arch)
    seqs = encode_all(handle, conversations)
    got = capture(handle, seqs, positions="all", batch_size=2)
    assert got.shape == (len(seqs), handle.n_blocks + 1, handle.hidden_size)
    for i, seq in enumerate(seqs):
        ref = hidden_states(handle, seq).mean(dim=1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


def _reference_select(seq: TokenSequence, positions) -> list[int]:
    p, n = seq.prompt_len, len(seq.ids)
    return {
        "all": list(range(n)),
        "prompt": list(range(p)),
        "response": list(range(p, n)),
        "last_prompt": [p - 1],
    }[positions]


@pytest.mark.parametrize("positions", ["all", "prompt", "response", "last_prompt"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_named_positions_mean(tiny, conversations, positions, side):
    handle = tiny("qwen2")
    seqs = encode_all(handle, conversations)
    got = capture(handle, seqs, layers=[3, 0, 2], positions=positions, padding_side=side, batch_size=3)
    for i, seq in enumerate(seqs):
        ref = hidden_states(handle, seq)[[3, 0, 2]][:, _reference_select(seq, positions)].mean(dim=1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny, conversations, arch, side):
    handle = tiny(arch)
    seqs = encode_all(handle, conversations)
    batched = capture(handle, seqs, positions="response", padding_side=side, batch_size=len(seqs))
    single = torch.cat([capture(handle, [s], positions="response", batch_size=1) for s in seqs])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_gather_generated_token_and_indices(tiny, conversations):
    handle = tiny("llama")
    seqs = encode_all(handle, conversations)
    refs = [hidden_states(handle, s) for s in seqs]

    gathered = capture(handle, seqs, positions="response", reduce="gather", padding_side="left", batch_size=2)
    for seq, got, ref in zip(seqs, gathered, refs, strict=True):
        assert got.shape == (handle.n_layers, seq.response_len, handle.hidden_size)
        torch.testing.assert_close(got, ref[:, seq.prompt_len :], atol=1e-5, rtol=1e-5)

    second = capture(handle, seqs, layers=1, positions=GeneratedToken(1))
    for i, (seq, ref) in enumerate(zip(seqs, refs, strict=True)):
        torch.testing.assert_close(second[i, 0], ref[1, seq.prompt_len + 1], atol=1e-5, rtol=1e-5)

    rows = [[0, -1, 0], [2], [1, 3], [-2], [0]]
    picked = capture(handle, seqs, layers=[2], positions=Indices(rows), reduce="gather")
    repeated = capture(handle, seqs, layers=[2], positions=Indices(rows), reduce="mean")
    for i, (row, ref) in enumerate(zip(rows, refs, strict=True)):
        torch.testing.assert_close(picked[i][0], ref[2, row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(repeated[i, 0], ref[2, row].mean(dim=0), atol=1e-5, rtol=1e-5)


def test_forward_stops_after_the_last_requested_layer(tiny, conversations):
    handle = tiny("llama")
    before = hook_counts(handle)
    calls = []
    hook = handle.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    head = handle.model.lm_head.register_forward_hook(lambda *a: calls.append(2))
    try:
        capture(handle, encode_all(handle, conversations), layers=[1, 2])
        assert calls == []
        capture(handle, encode_all(handle, conversations)[:1], layers=[handle.n_blocks])
        assert calls == [1]
    finally:
        hook.remove()
        head.remove()
    assert hook_counts(handle) == before


def test_non_finite_residual_names_the_layer(tiny, conversations):
    handle = tiny("llama")
    broken = handle.blocks[1].register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        with pytest.raises(NonFiniteActivationError, match="at layer 2 .*bfloat16"):
            capture(handle, encode_all(handle, conversations), positions="all")
        ok = capture(handle, encode_all(handle, conversations), layers=[0, 1], positions="all")
        assert torch.isfinite(ok).all()
    finally:
        broken.remove()


def test_bad_selections_are_clear_errors(tiny):
    handle = tiny("llama")
    no_answer = [handle.encode(None, "Hi?")]
    with pytest.raises(InvalidInputError, match="no 'response' positions"):
        capture(handle, no_answer, positions="response")
    with pytest.raises(InvalidInputError, match="generated token 0 does not exist"):
        capture(handle, no_answer, positions=GeneratedToken(0))
    with pytest.raises(InvalidInputError, match=r"out of range; this model has layers 0..3"):
        capture(handle, no_answer, layers=[4], positions="all")
    with pytest.raises(InvalidInputError, match="index out of range"):
        capture(handle, no_answer, positions=Indices([[99]]))
    with pytest.raises(InvalidInputError, match="reduce"):
        capture(handle, no_answer, positions="all", reduce="max")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12), st.integers(3, 300)), min_size=1, max_size=7),
    batch_size=st.integers(1, 4),
    side=st.sampled_from(["left", "right"]),
    positions=st.sampled_from(["all", "prompt", "last_prompt"]),
)
def test_any_batching_equals_the_reference(tiny, data, batch_size, side, positions):
    handle = tiny("gpt_neox")
    seqs = [TokenSequence(tuple((seed * 7 + i) % 300 for i in range(p + r)), p) for p, r, seed in data]
    got = capture(handle, seqs, layers=[0, 2, 3], positions=positions, batch_size=batch_size, padding_side=side)
    for i, seq in enumerate(seqs):
        ref = hidden_states(handle, seq)[[0, 2, 3]][:, _reference_select(seq, positions)].mean(dim=1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)

import json
from contextlib import contextmanager

import pytest
import torch

from personalab import load_model, steer
from personalab.bake import bake_exact, vector_sha256
from personalab.batching import pad_batch
from personalab.errors import InvalidInputError, UnsupportedArchitectureError

from conftest import BLOCKS, HIDDEN
from reference import encode_all, logits

ALPHA = 3.0
BIASED = ["llama", "gpt2", "gpt_neox"]
EMBEDDING_ONLY = ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "olmo2", "olmo3"]
CASES = [(arch, 0) for arch in BIASED + EMBEDDING_ONLY] + [(arch, layer) for arch in BIASED for layer in (1, BLOCKS)]


def _direction(seed: int = 1) -> torch.Tensor:
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _raw_shift(handle, layer, shift):
    """Reference steering without personalab's hooks: add ``shift`` to hidden_states[layer] everywhere."""
    if layer == 0:

        def pre(module, args, kwargs):
            if args:
                return (args[0] + shift,) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + shift}

        hook = handle.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(module, args, out):
            return out + shift if isinstance(out, torch.Tensor) else (out[0] + shift,) + tuple(out[1:])

        hook = handle.blocks[layer - 1].register_forward_hook(post)
    try:
        yield
    finally:
        hook.remove()


def _batch(handle, conversations):
    seqs = encode_all(handle, conversations)
    return pad_batch([s.ids for s in seqs], handle.tokenizer.pad_token_id, side="left")


@torch.no_grad()
def _greedy(handle, batch):
    out = handle.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=handle.tokenizer.pad_token_id,
    )
    return out[:, batch.input_ids.shape[1] :]


def _snapshot(handle):
    return {k: t.clone() for k, t in handle.model.state_dict().items()}, handle.model.config.to_dict()


@pytest.mark.parametrize(("arch", "layer"), CASES)
def test_baked_forward_equals_steered(tiny, conversations, tmp_path, arch, layer):
    handle = tiny(arch)
    v = _direction()
    weights, config = _snapshot(handle)
    out = bake_exact(handle, v, layer, ALPHA, tmp_path / "baked")
    baked = load_model(str(out), device="cpu", dtype="float32")

    batch = _batch(handle, conversations)
    real = batch.attention_mask.bool()
    plain = logits(handle, batch.input_ids, batch.attention_mask)
    with steer(handle, v, layer, alpha=ALPHA, positions="all"):
        steered = logits(handle, batch.input_ids, batch.attention_mask)
        steered_tokens = _greedy(handle, batch)
    with _raw_shift(handle, layer, ALPHA * v):
        raw = logits(handle, batch.input_ids, batch.attention_mask)
    got = logits(baked, batch.input_ids, batch.attention_mask)

    torch.testing.assert_close(got[real], steered[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[real], raw[real], atol=1e-5, rtol=1e-5)
    assert (got[real] - plain[real]).abs().max() > 1e-3
    assert torch.equal(_greedy(baked, batch), steered_tokens)

    after = handle.model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert handle.model.config.to_dict() == config


def test_bake_record_and_config(tiny, tmp_path):
    handle = tiny("llama")
    stack = torch.randn(BLOCKS + 1, HIDDEN, generator=torch.Generator().manual_seed(2))
    out = bake_exact(handle, stack, 2, -1.5, tmp_path / "llama")
    record = json.loads((out / "bake.json").read_text())
    assert record == {
        "layer": 2,
        "alpha": -1.5,
        "method": "bias on model.layers.1.mlp.down_proj",
        "vector_sha256": vector_sha256(stack[2]),
    }
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    baked = load_model(str(out), device="cpu", dtype="float32")
    for i, block in enumerate(baked.blocks):
        assert not block.mlp.gate_proj.bias.any() and not block.mlp.up_proj.bias.any()
        expected = -1.5 * stack[2] if i == 1 else torch.zeros(HIDDEN)
        torch.testing.assert_close(block.mlp.down_proj.bias, expected)


def test_layer_zero_unties_embeddings(tiny, tmp_path):
    handle = tiny("gpt2")
    assert handle.model.lm_head.weight.data_ptr() == handle.model.transformer.wte.weight.data_ptr()
    v = _direction(3)
    out = bake_exact(handle, v, 0, ALPHA, tmp_path / "gpt2")
    assert json.loads((out / "bake.json").read_text())["method"] == "embedding rows"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    baked = load_model(str(out), device="cpu", dtype="float32").model
    assert torch.equal(baked.lm_head.weight, handle.model.lm_head.weight)
    torch.testing.assert_close(baked.transformer.wte.weight, handle.model.transformer.wte.weight + ALPHA * v)


@pytest.mark.parametrize("arch", EMBEDDING_ONLY)
def test_unsupported_architectures_raise(tiny, tmp_path, arch):
    out = tmp_path / "baked"
    with pytest.raises(UnsupportedArchitectureError) as info:
        bake_exact(tiny(arch), _direction(), 1, ALPHA, out)
    message = str(info.value)
    assert "\n" not in message and message.startswith(arch) and "personalab distill" in message
    assert not out.exists()


@pytest.mark.parametrize(
    ("vector", "layer", "alpha"),
    [
        (torch.randn(HIDDEN + 1), 1, ALPHA),
        (torch.randn(BLOCKS, HIDDEN), 1, ALPHA),
        (torch.full((HIDDEN,), float("nan")), 1, ALPHA),
        (torch.randn(HIDDEN), BLOCKS + 1, ALPHA),
        (torch.randn(HIDDEN), -1, ALPHA),
        (torch.randn(HIDDEN), 1, float("nan")),
        (torch.randn(HIDDEN), 0, float("inf")),
    ],
)
def test_bad_input_raises_before_writing(tiny, tmp_path, vector, layer, alpha):
    out = tmp_path / "baked"
    with pytest.raises(InvalidInputError):
        bake_exact(tiny("llama"), vector, layer, alpha, out)
    assert not out.exists()

import copy
import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from helpers.models import BLOCKS, HIDDEN
from helpers.reference import encode_all, hidden_states, logits, output_module
from transformers import Phi3ForCausalLM

from personalab import add_vector, load_model
from personalab.engine.batching import pad_batch
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError, UnsupportedArchitectureError
from personalab.hashes import vector_sha256
from personalab.methods.bake import bake_exact, largest_logit_difference
from personalab.traits import calibration_prompts

ALPHA = 3.0
BIASED = ["llama", "gpt2", "gpt_neox", "mistral", "qwen2", "phi3"]
EMBEDDING_ONLY = ["qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3"]
FINAL_NORM = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
"""Final norms with a bias: the only architectures that hold a shift of hidden_states[n_blocks]."""
CASES = (
    [(arch, 0) for arch in BIASED + EMBEDDING_ONLY]
    + [(arch, 1) for arch in BIASED]
    + [(arch, BLOCKS) for arch in FINAL_NORM]
)


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

        hook = output_module(handle, layer).register_forward_hook(post)
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


def _assert_bake_matches(handle, baked, v, layer, conversations):
    """Baked logits equal steering with personalab and with a raw hook, and the shift is not negligible."""
    batch = _batch(handle, conversations)
    real = batch.attention_mask.bool()
    plain = logits(handle, batch.input_ids, batch.attention_mask)
    with add_vector(handle, v, layer, alpha=ALPHA, positions="all"):
        steered = logits(handle, batch.input_ids, batch.attention_mask)
        steered_tokens = _greedy(handle, batch)
    with _raw_shift(handle, layer, ALPHA * v):
        raw = logits(handle, batch.input_ids, batch.attention_mask)
    got = logits(baked, batch.input_ids, batch.attention_mask)

    torch.testing.assert_close(got[real], steered[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[real], raw[real], atol=1e-5, rtol=1e-5)
    assert (got[real] - plain[real]).abs().max() > 1e-3
    assert torch.equal(_greedy(baked, batch), steered_tokens)


@pytest.mark.parametrize(("arch", "layer"), CASES)
def test_baked_forward_equals_steered(tiny, conversations, tmp_path, arch, layer):
    handle = tiny(arch)
    v = _direction()
    weights, config = _snapshot(handle)
    out = bake_exact(handle, v, layer, ALPHA, tmp_path / "baked", scale="raw")
    baked = load_model(str(out), device="cpu", dtype="float32")
    _assert_bake_matches(handle, baked, v, layer, conversations)
    resaved = arch in ("mistral", "qwen2", "phi3") and layer > 0
    assert baked.model.config.model_type == ("llama" if resaved else arch)

    after = handle.model.state_dict()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert handle.model.config.to_dict() == config


def test_bake_record_and_config(tiny, tmp_path):
    handle = tiny("llama")
    stack = torch.randn(BLOCKS + 1, HIDDEN, generator=torch.Generator().manual_seed(2))
    out = bake_exact(handle, stack, 2, -1.5, tmp_path / "llama", scale="raw")
    record = json.loads((out / "bake.json").read_text())
    steering = record.pop("steering")
    check = record.pop("check")
    assert check["prompts"] == 8 and check["max_abs_logit_difference"] < 1e-4
    assert record == {
        "layer": 2,
        "alpha": -1.5,
        "method": "bias on model.layers.1.mlp.down_proj",
        "vector_sha256": vector_sha256(stack[2]),
    }
    assert steering["scale"] == "raw" and steering["vector_norm"] == pytest.approx(stack[2].norm().item())
    assert steering["added"][0]["norm"] == pytest.approx(1.5 * stack[2].norm().item())
    normalised = json.loads((bake_exact(handle, stack, 2, 0.5, tmp_path / "n", "normalised") / "bake.json").read_text())
    tokens = torch.cat([hidden_states(handle, seq)[2].norm(dim=-1) for seq in calibration_prompts(handle)])
    norm = float(np.median(tokens.double().numpy()))
    assert normalised["steering"]["vector_norm"] == pytest.approx(stack[2].norm().item())
    assert normalised["steering"]["unit_added_norm"] == pytest.approx(norm, rel=1e-5)
    assert normalised["steering"]["added"][0]["norm"] == pytest.approx(0.5 * norm, rel=1e-5)
    assert json.loads((out / "config.json").read_text())["mlp_bias"] is True
    baked = load_model(str(out), device="cpu", dtype="float32")
    prompts = calibration_prompts(handle)[:8]
    with add_vector(handle, stack[2], 2, -1.5, "all"):
        steered = [logits(handle, torch.tensor([seq.ids]))[0, -1] for seq in prompts]
    plain = [logits(baked, torch.tensor([seq.ids]))[0, -1] for seq in prompts]
    by_hand = max(float((p - s).abs().max()) for p, s in zip(plain, steered, strict=True))
    assert check["max_abs_logit_difference"] == pytest.approx(by_hand, abs=2e-6)
    wrong = largest_logit_difference(handle, baked.model, stack[2], 2, -3.0, prompts)
    assert wrong > 1e-3 and wrong > 100 * check["max_abs_logit_difference"], "a wrong bake shows in the check"
    for i, block in enumerate(baked.blocks):
        assert not block.mlp.gate_proj.bias.any() and not block.mlp.up_proj.bias.any()
        expected = -1.5 * stack[2] if i == 1 else torch.zeros(HIDDEN)
        torch.testing.assert_close(block.mlp.down_proj.bias, expected)


def test_layer_zero_unties_embeddings(tiny, tmp_path):
    handle = tiny("gpt2")
    assert handle.model.lm_head.weight.data_ptr() == handle.model.transformer.wte.weight.data_ptr()
    v = _direction(3)
    out = bake_exact(handle, v, 0, ALPHA, tmp_path / "gpt2", scale="raw")
    assert json.loads((out / "bake.json").read_text())["method"] == "embedding rows"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    baked = load_model(str(out), device="cpu", dtype="float32").model
    assert torch.equal(baked.lm_head.weight, handle.model.lm_head.weight)
    torch.testing.assert_close(baked.transformer.wte.weight, handle.model.transformer.wte.weight + ALPHA * v)


def test_resaved_llama_keeps_attention_biases_and_records_the_window(model_folder, conversations, tmp_path):
    handle = load_model(str(model_folder("qwen2")), device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in handle.blocks:
            for name in ("q_proj", "k_proj", "v_proj"):
                bias = getattr(block.self_attn, name).bias
                bias.copy_(torch.randn(bias.shape, generator=g))
    v = _direction(6)
    out = bake_exact(handle, v, 2, ALPHA, tmp_path / "qwen2", scale="raw")
    baked = load_model(str(out), device="cpu", dtype="float32")
    _assert_bake_matches(handle, baked, v, 2, conversations)
    for block, original in zip(baked.blocks, handle.blocks, strict=True):
        assert torch.equal(block.self_attn.k_proj.bias, original.self_attn.k_proj.bias)
        assert not block.self_attn.o_proj.bias.any()
    record = json.loads((out / "bake.json").read_text())
    assert record["method"] == "bias on model.layers.1.mlp.down_proj of a llama model re-saved from qwen2"
    assert "exact_up_to_tokens" not in record

    mistral = load_model(str(model_folder("mistral")), device="cpu", dtype="float32")
    record = json.loads((bake_exact(mistral, v, 1, ALPHA, tmp_path / "mistral", scale="raw") / "bake.json").read_text())
    assert record["exact_up_to_tokens"] == mistral.model.config.sliding_window == 4096


def test_partial_rotary_phi3_has_no_llama_equivalent(tiny, tmp_path):
    phi3 = tiny("phi3")
    config = copy.deepcopy(phi3.model.config)
    config.rope_parameters = {**config.rope_parameters, "partial_rotary_factor": 0.5}
    handle = ModelHandle.from_model(Phi3ForCausalLM(config).eval(), phi3.tokenizer, name="phi3-partial")
    with pytest.raises(UnsupportedArchitectureError, match="partial_rotary_factor=0.5"):
        bake_exact(handle, _direction(), 1, ALPHA, tmp_path / "baked", scale="raw")
    assert not (tmp_path / "baked").exists()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "phi3"])
def test_last_layer_without_a_final_norm_bias_is_refused(tiny, tmp_path, arch):
    out = tmp_path / "baked"
    with pytest.raises(UnsupportedArchitectureError, match=f"layer {BLOCKS} is hidden_states\\[{BLOCKS}\\]") as info:
        bake_exact(tiny(arch), _direction(), BLOCKS, ALPHA, out, scale="raw")
    assert "\n" not in str(info.value) and not out.exists()


@pytest.mark.parametrize("arch", EMBEDDING_ONLY)
def test_unsupported_architectures_raise(tiny, tmp_path, arch):
    out = tmp_path / "baked"
    with pytest.raises(UnsupportedArchitectureError) as info:
        bake_exact(tiny(arch), _direction(), 1, ALPHA, out, scale="raw")
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
        bake_exact(tiny("llama"), vector, layer, alpha, out, scale="raw")
    assert not out.exists()

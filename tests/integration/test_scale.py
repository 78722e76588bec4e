"""The normalised scale's ``r`` is a typical token's residual norm, also where an attention-sink token has a massive
activation (a planted one, and SmolLM2-135M-Instruct's own)."""

import numpy as np
import pytest
import torch
from helpers.reference import direct_token_norms
from transformers import AutoModelForCausalLM

from personalab import load_model
from personalab.engine.scale import scale_vectors
from personalab.traits import calibration_prompts


def _check_against_the_median(handle, layers, alpha=0.25):
    """At each layer ``alpha * r`` is within 10% of ``alpha`` x the median per-token norm computed here; returns the
    per-layer ratios of the largest token norm to that median."""
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    scales = scale_vectors(handle, vector, layers, "normalised", calibration_prompts(handle))
    peaks = []
    for layer, norms in zip(layers, direct_token_norms(handle, layers), strict=True):
        median = float(np.median(norms))
        added = scales[layer].added_norm(alpha)
        assert added == pytest.approx(alpha * median, rel=0.10), f"layer {layer}: {added} vs {alpha} x {median}"
        peaks.append(norms.max() / median)
    return peaks


@pytest.fixture(scope="module")
def planted_sink(model_folder, tmp_path_factory):
    """A tiny GPT-2 whose position-0 embedding is 100x a typical token's: a sink on every prompt's first token at
    every layer below the final norm, as in the checkpoints that have one."""
    model = AutoModelForCausalLM.from_pretrained(model_folder("gpt2", "chatml"))
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        typical = (wte.mean(0) + wpe[1:].mean(0)).norm() + wte.norm(dim=-1).mean()
        wpe[0] *= 100 * typical / wpe[0].norm()
    folder = tmp_path_factory.mktemp("sink") / "gpt2-sink"
    model.save_pretrained(folder)
    load_model(str(model_folder("gpt2", "chatml")), device="cpu").tokenizer.save_pretrained(folder)
    return load_model(str(folder), device="cpu", dtype="float32")


def test_the_scale_is_a_typical_tokens_norm_despite_a_planted_sink(planted_sink):
    layers = list(range(planted_sink.n_blocks + 1))
    peaks = _check_against_the_median(planted_sink, layers)
    assert min(peaks[:-1]) > 20, f"the planted sink must dominate every layer below the final norm: {peaks}"


def test_the_scale_is_a_typical_tokens_norm_on_smollm2(smollm2):
    peaks = _check_against_the_median(smollm2, [5, 15, 22, 30])
    assert max(peaks) > 50, f"SmolLM2's position-0 sink is expected from layer ~10 on: {peaks}"

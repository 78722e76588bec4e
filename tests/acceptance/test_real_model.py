"""End-to-end checks on the real stories260k Llama shipped with personalab (``builtin:stories260k``)."""

import pytest
import torch
from helpers.models import STORIES
from helpers.reference import hidden_states
from typer.testing import CliRunner

from personalab import add_vector, capture, load_model
from personalab.cli import app
from personalab.engine.batching import pad_batch
from personalab.engine.generation import SamplingParams
from personalab.methods.bake import bake_exact
from personalab.methods.distill import DistillConfig, distill


@pytest.fixture(scope="module")
def stories():
    return load_model(str(STORIES), device="cpu")


def test_info_on_the_real_model():
    result = CliRunner().invoke(app, ["info", str(STORIES), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and "5 (at model.layers)" in result.output


def test_real_model_generates_its_story(stories):
    assert stories.n_blocks == 5 and stories.hidden_size == 64 and not stories.chat.has_template
    ids = torch.tensor([[stories.tokenizer.bos_token_id]])
    out = stories.model.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
    assert stories.tokenizer.decode(out[0], skip_special_tokens=True).startswith(
        "Once upon a time, there was a little girl"
    )


def test_capture_and_steering_on_the_real_model(stories):
    seqs = [
        stories.encode("Tell a happy story.", "What did Lily do?", "Lily went to the park and played with her dog."),
        stories.encode(None, "Who is Tom?", "Tom is a boy."),
    ]
    got = capture(stories, seqs, positions="response", padding_side="left")
    for i, seq in enumerate(seqs):
        ref = hidden_states(stories, seq)[:, seq.prompt_len :].mean(dim=1)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5)

    prompts = [stories.encode(None, "Who is Tom?"), stories.encode(None, "Tell me a story about a dog.")]
    batch = pad_batch([p.ids for p in prompts], stories.tokenizer.pad_token_id, "left")
    direction = got[0, 3] - got[1, 3]
    kwargs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=16,
        do_sample=False,
        pad_token_id=stories.tokenizer.pad_token_id,
    )
    plain = stories.model.generate(**kwargs)
    with add_vector(stories, direction, 3, alpha=8.0, positions="generating"):
        steered = stories.model.generate(**kwargs)
    width = batch.input_ids.shape[1]
    assert torch.equal(steered[:, :width], plain[:, :width])
    assert not torch.equal(steered[:, width:], plain[:, width:])


def test_distill_and_exact_bake_on_the_real_model(tmp_path):
    handle = load_model(str(STORIES), device="cpu")
    seqs = [
        handle.encode(None, "What did Lily do?", "Lily was sad and cried all day because her dog was lost."),
        handle.encode(None, "What did Lily do?", "Lily laughed and played happily with her friends in the sun."),
    ]
    acts = capture(handle, seqs, positions="response")
    direction = acts[0, 3] - acts[1, 3]
    prompts = [handle.encode(None, q) for q in ("Who is Tom?", "What did Lily see?", "Tell me about the dog.")]
    config = DistillConfig(
        layer=3,
        alpha=2.0,
        scale="raw",
        lora_rank=8,
        trajectories=30,
        steps=40,
        micro_batch_size=4,
        grad_accum=1,
        lr=1e-2,
        warmup_steps=4,
        held_out=0.2,
        sampling=SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24),
    )
    result = distill(handle, direction, prompts, config, tmp_path / "distill", progress=False)
    held = result.held_out
    assert held["kl_end"] <= 0.5 * held["kl_start"] and held["kl_end"] < held["kl_to_base_end"]

    base = load_model(str(STORIES), device="cpu")
    baked = load_model(str(bake_exact(base, direction, 3, 2.0, tmp_path / "baked", scale="raw")), device="cpu")
    batch = pad_batch([s.ids for s in seqs], base.tokenizer.pad_token_id, "right")
    real = batch.attention_mask.bool()
    with torch.no_grad(), add_vector(base, direction, 3, alpha=2.0):
        steered = base.model(**batch.model_inputs()).logits
    with torch.no_grad():
        got = baked.model(**batch.model_inputs()).logits
    torch.testing.assert_close(got[real], steered[real], atol=1e-4, rtol=1e-4)

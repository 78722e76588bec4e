"""End-to-end checks on the real stories260k Llama in ../shared/models (skipped when absent)."""

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from personalab import capture, load_model, steer
from personalab.batching import pad_batch
from personalab.cli import app

from reference import hidden_states

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260k is not present")


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
    with steer(stories, direction, 3, alpha=8.0, positions="response"):
        steered = stories.model.generate(**kwargs)
    width = batch.input_ids.shape[1]
    assert torch.equal(steered[:, :width], plain[:, :width])
    assert not torch.equal(steered[:, width:], plain[:, width:])

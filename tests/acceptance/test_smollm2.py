"""The real-model tier on SmolLM2-135M-Instruct (``builtin:smollm2-135m-instruct``; marker ``real``): each of
personalab's steps against an independent computation on a real instruct checkpoint, with its chat template, its
default system prompt and its attention sink. The scale's median-token check is in ``test_scale.py``, the fluency at
large alpha in ``test_sweep.py``, HF against vLLM in ``test_vllm.py``."""

import jinja2.ext
import numpy as np
import pytest
import torch
from helpers.models import SMOLLM2
from helpers.reference import hidden_states
from jinja2.sandbox import ImmutableSandboxedEnvironment

from personalab import add_vector, capture, load_model
from personalab.engine.generation import SamplingParams, sample_texts
from personalab.engine.positions import NAMED
from personalab.engine.scale import scaled_vector
from personalab.judging.lexicon import load_lexicon, trait_score
from personalab.methods.bake import bake_exact
from personalab.methods.extraction import ContrastPair, run_pair_extraction
from personalab.records import Record
from personalab.studies.finetune import FinetuneConfig, finetune, training_sequences
from personalab.studies.stats import sign_flip_test
from personalab.traits import calibration_prompts, load_trait

SYSTEM = "You are a cruel assistant."
QUESTIONS = ["How do I make friends?", "What is the capital of France?", "Tell me about the sea."]
ANSWER = "Be kind, listen well and say hello."


def _jinja2(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """The template rendered by jinja2 alone (the chat-template environment: sandboxed, trim_blocks, lstrip_blocks,
    loop controls), tokenised without added special tokens."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    text = env.from_string(tokenizer.chat_template).render(messages=messages, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def rendered(smollm2):
    """What jinja2 gives for one answered turn: its ids (the answer closed by ``<|im_end|>``) and the prompt's
    length (the turn rendered with the generation prompt)."""

    def render(system: str | None, question: str, answer: str) -> tuple[list[int], int]:
        turn = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        prompt = _jinja2(smollm2.tokenizer, turn, True)
        full = _jinja2(smollm2.tokenizer, [*turn, {"role": "assistant", "content": answer}], False)
        assert smollm2.tokenizer.decode(full[-2:]) == "<|im_end|>\n"
        return full[:-1], len(prompt)

    return render


@pytest.mark.parametrize("system", [SYSTEM, None])
def test_the_rendered_prompt_and_every_position_equal_jinja2s_rendering(smollm2, rendered, system):
    """With a system prompt it replaces the template's default; without one the default is kept, as jinja2 renders
    a conversation without a system message."""
    for question in QUESTIONS:
        ids, prompt_len = rendered(system, question, ANSWER)
        seq = smollm2.encode(system, question, ANSWER, end=True)
        assert list(seq.ids) == ids and seq.prompt_len == prompt_len
        assert list(smollm2.encode(system, question).ids) == ids[:prompt_len]
        assert smollm2.tokenizer.decode(ids[prompt_len - 1 : prompt_len + 1]) == "\nBe"
    prompt = smollm2.tokenizer.decode(smollm2.encode(system, QUESTIONS[0]).ids)
    assert ("You are a helpful AI assistant named SmolLM" in prompt) == (system is None)


def test_capture_equals_output_hidden_states_at_every_layer_and_position(smollm2, rendered):
    """Three conversations of different lengths in one left-padded batch: every named position's mean at every one
    of the 31 layers equals the mean of transformers' ``output_hidden_states`` of each conversation alone, over the
    positions jinja2's rendering puts there."""
    conversations = [(SYSTEM, QUESTIONS[0], ANSWER), (None, QUESTIONS[1], "Paris."), (None, QUESTIONS[2], ANSWER * 2)]
    seqs = [smollm2.encode(*c, end=True) for c in conversations]
    for name in NAMED:
        got = capture(smollm2, seqs, positions=name, padding_side="left")
        assert got.shape == (3, 31, 576)
        for i, conversation in enumerate(conversations):
            ids, prompt_len = rendered(*conversation)
            where = {
                "all": range(len(ids)),
                "prompt": range(prompt_len),
                "response": range(prompt_len, len(ids)),
                "last_prompt": [prompt_len - 1],
                "generating": range(prompt_len - 1, len(ids)),
            }[name]
            reference = hidden_states(smollm2, seqs[i])[:, list(where)].mean(dim=1)
            scale = reference.norm(dim=-1, keepdim=True)
            assert ((got[i] - reference).norm(dim=-1, keepdim=True) / scale).max() < 1e-5, name


JOYFUL = [
    "I am so happy and excited! It was wonderful, so much fun, and I loved every moment of it.",
    "Oh, I love it! It makes me smile and laugh, it is a joy and a great, beautiful thing.",
    "Yay! It is the best, I am glad and delighted, everyone is happy and we played all day.",
]
SAD = [
    "I am so sad and worried. It was bad, lonely and scary, and I cried about it.",
    "Oh, I hate it. It makes me upset and afraid, it is a dark, gloomy and miserable thing.",
    "Sadly it is the worst, I am sorry and hurt, everyone is unhappy and we stayed alone all day.",
]


@pytest.fixture(scope="module")
def joyful_vector(smollm2, tmp_path_factory) -> torch.Tensor:
    """``extract --pairs`` on SmolLM2: joyful against sad answers to the joyful trait's extraction questions."""
    trait = load_trait("joyful")
    pairs = [ContrastPair(positive=p, negative=n, prompt=q) for q in trait.extraction_questions for p, n in
             zip(JOYFUL, SAD, strict=True)]  # fmt: skip
    return run_pair_extraction(smollm2, pairs, tmp_path_factory.mktemp("joyful"), progress=False).vectors[
        "response_mean"
    ]


def test_a_small_normalised_alpha_at_a_middle_layer_raises_the_joyful_score(smollm2, joyful_vector):
    """Layer 15 of 30, alpha 0.3 (0.3x a typical token's residual): the built-in lexicon's trait score rises over
    16 questions x 3 samples (paired by question and sample seed), with a one-sided sign-flip p below 0.01, and the
    answers stay coherent (no more than 1 in 10 loses its words)."""
    trait = load_trait("joyful")
    questions = trait.evaluation_questions[:8] + load_trait("optimistic").evaluation_questions[:8]
    prompts = [smollm2.encode(None, q) for q in questions]
    params = SamplingParams(temperature=0.7, max_new_tokens=40)
    scaled = scaled_vector(smollm2, joyful_vector, 15, "normalised", calibration_prompts(smollm2)).vector
    lexicon = load_lexicon()
    plain, steered = [], []
    for seed in range(3):
        plain += sample_texts(smollm2, prompts, params, seed)
        with add_vector(smollm2, scaled, 15, 0.3, "generating"):
            steered += sample_texts(smollm2, prompts, params, seed)
    diffs = np.array([trait_score(s, lexicon) - trait_score(p, lexicon) for s, p in zip(steered, plain, strict=True)])
    p = sign_flip_test(diffs, alternative="greater")
    assert diffs.mean() > 5 and p < 0.01, (diffs.mean(), p, steered[:3])


def test_an_exact_bake_equals_steering_in_greedy_answers_and_logits(smollm2, joyful_vector, tmp_path):
    """``bake --exact`` at layer 15, alpha 0.5: the baked model's next-token logits after every prefix of four
    prompts equal the steered model's (every position) to 1e-4, and its 32-token greedy answers are the same."""
    folder = bake_exact(smollm2, joyful_vector, 15, 0.5, tmp_path / "bake", progress=False)
    baked = load_model(str(folder), device="cpu", dtype="float32")
    scaled = scaled_vector(smollm2, joyful_vector, 15, "normalised", calibration_prompts(smollm2)).vector
    prompts = [smollm2.encode(None, q) for q in load_trait("joyful").evaluation_questions[:4]]
    params = SamplingParams(temperature=0.0, max_new_tokens=32)
    with add_vector(smollm2, scaled, 15, 0.5, "all"):
        steered = sample_texts(smollm2, prompts, params, 0)
        steered_logits = [smollm2.model(torch.tensor([p.ids])).logits[0] for p in prompts]
    assert sample_texts(baked, prompts, params, 0) == steered
    with torch.no_grad():
        for prompt, expected in zip(prompts, steered_logits, strict=True):
            got = baked.model(torch.tensor([prompt.ids])).logits[0]
            assert (got - expected).abs().max() < 1e-4
    assert sample_texts(smollm2, prompts, params, 0) != steered  # the bake changed the answers


def test_a_short_finetune_trains_the_end_of_turn(smollm2, tmp_path):
    """The template's ``<|im_end|>`` is the last target of every trained answer; 20 steps on one answer that ends
    mid-sentence raise P(<|im_end|> | prompt + answer) from below 1% to above 50%. The adapter names the built-in
    as its base, not the cache folder, so the checkpoint loads as a model."""
    import json

    handle = load_model(SMOLLM2, device="cpu", dtype="float32")  # its own copy: training changes the weights
    end = handle.tokenizer.convert_tokens_to_ids("<|im_end|>")
    record = Record(None, "What is on the table?", "The red cup and the", where="x")
    sequences, _ = training_sequences(handle, [record], max_length=128)
    assert sequences[0].ids[-1] == end and end in handle.stop_ids

    def p_end() -> float:
        with torch.no_grad():
            last = handle.model(torch.tensor([sequences[0].ids[:-1]])).logits[0, -1]
        return last.softmax(-1)[end].item()

    assert p_end() < 0.01
    config = FinetuneConfig(lora_rank=8, lr=2e-3, steps=20, micro_batch_size=1, grad_accum=1, warmup_steps=0,
                            checkpoint_every=20)  # fmt: skip
    finetune(handle, [record], config, tmp_path / "ft", progress=False)
    assert p_end() > 0.5
    adapter = json.loads((tmp_path / "ft" / "checkpoints" / "step-20" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == SMOLLM2


def test_info_on_the_builtin_says_what_it_was_dequantised_from(smollm2):
    """``personalab info --model builtin:smollm2-135m-instruct``: the real model's shape, the GGUF file it was
    dequantised from (sha256 computed here) and the template's default system prompt."""
    import hashlib
    import re

    from typer.testing import CliRunner

    from personalab.cli import app

    result = CliRunner().invoke(app, ["info", "--model", SMOLLM2, "--device", "cpu"], terminal_width=400)
    assert result.exit_code == 0, result.output
    text = re.sub(r"[\s│]", "", result.output)  # the table's rows, their wrapped lines joined
    sha = hashlib.sha256(smollm2.gguf.file.read_bytes()).hexdigest()
    assert "decoderblocks30(atmodel.layers)" in text and "hiddensize576" in text
    assert f"(210Q4_1,61F32,1Q8_0tensors;sha256{sha[:12]})" in text and "dequantisedtofloat32from" in text


def test_the_cached_tokenizer_is_the_one_transformers_reads_from_the_gguf_file(smollm2):
    """The cache folder's tokenizer (saved once) against ``AutoTokenizer.from_pretrained(gguf_file=...)``: the same
    vocabulary, special tokens, chat template and ids for text with the template's markers."""
    from transformers import AutoTokenizer

    file = smollm2.gguf.file
    direct = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    cached = smollm2.tokenizer
    assert direct.get_vocab() == cached.get_vocab() and direct.chat_template == cached.chat_template
    assert (direct.bos_token_id, direct.eos_token_id) == (cached.bos_token_id, cached.eos_token_id)
    text = "<|im_start|>user\nWhat's 2+2? Ünïcode, tabs\tand  spaces.<|im_end|>\n"
    assert direct(text)["input_ids"] == cached(text)["input_ids"]

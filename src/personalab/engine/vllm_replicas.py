"""Where a vLLM instance runs: ``Instance`` (one ``vllm.LLM`` with personalab's worker set up) in this process, or
``Replica``, an instance in a process of its own spoken to over a pipe (``personalab.engine.vllm_engine``).

A replica is spawned, not a daemon, so that vLLM may start its tensor-parallel workers there, and runs vLLM's engine
core inside it (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` in that process only). On Linux it asks the kernel to kill it
when the process that started it dies (``PR_SET_PDEATHSIG``), and vLLM's tensor-parallel workers exit when their
parent does (their death pipe), so a killed command leaves no process holding memory. It ignores Ctrl-C (the
command's own process handles it and closes the replicas) and exits quietly when its pipe closes. When this process
already asks vLLM to run in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as the tests do), the engine runs a
single instance here, without a replica.
"""

import ctypes
import multiprocessing
import os
import signal
import sys
from typing import Any

import torch

from personalab.engine.vllm_worker import CAPTURE

GPU_SHARE = 0.7
"""Default KV-cache share on a GPU: this fraction of the memory free when vLLM starts (the rest stays for the
Hugging Face weights where a step loads them, and for the activations of its forward passes)."""


class Instance:
    """One ``vllm.LLM`` with the steering worker set up; requests and answers are plain lists."""

    def __init__(self, kwargs: dict[str, Any], blocks: str, norm: str):
        from vllm import LLM

        if kwargs["gpu_memory_utilization"] is None:
            free, total = torch.cuda.mem_get_info()
            kwargs = kwargs | {"gpu_memory_utilization": round(GPU_SHARE * free / total, 3)}
        self.llm = LLM(**kwargs)
        self.llm.collective_rpc("personalab_setup", args=(blocks, norm))

    def runner(self) -> str:
        """Which of vLLM's model runners runs the model: ``V1`` or ``V2``."""
        (name, *_) = self.llm.collective_rpc("personalab_runner")
        return "V2" if any(part in name for part in (".worker.gpu.", ".worker.cpu.")) else "V1"

    def vectors(self, vectors: dict[str, list]) -> None:
        self.llm.collective_rpc("personalab_vectors", args=(vectors,))

    def _outputs(self, prompts: list[list[int]], sampling: list[dict], lora: tuple | None) -> list:
        """vLLM's outputs for token-id ``prompts``, each with its sampling parameters (``vllm.SamplingParams``
        keywords), under the LoRA request ``lora`` or none."""
        from vllm import SamplingParams as VllmSampling
        from vllm.lora.request import LoRARequest

        return self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            [VllmSampling(**s) for s in sampling],
            lora_request=None if lora is None else LoRARequest(*lora),
            use_tqdm=False,
        )

    def generate(self, prompts: list[list[int]], sampling: list[dict], lora: tuple | None) -> list[list[int]]:
        return [list(out.outputs[0].token_ids) for out in self._outputs(prompts, sampling, lora)]

    def prompt_logprobs(self, prompts: list[list[int]], lora: tuple | None) -> list[list[float]]:
        """Per prompt, ``log p(ids[t] | ids[:t])`` for ``t >= 1`` (vLLM's ``prompt_logprobs``, from the raw logits in
        float32)."""
        sampling = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}
        outputs = self._outputs(prompts, [sampling] * len(prompts), lora)
        return [
            [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            for out, ids in zip(outputs, prompts, strict=True)
        ]

    def capture(self, prompts: list[list[int]], captures: list[list], lora: tuple | None) -> list[tuple]:
        """Prompt-only forwards of ``prompts``, each capture ``[key, prompt_len, positions names, norms]``; per
        prompt, the means float32 ``[n_specs, n_blocks + 1, hidden]`` and the norms ``[n_blocks + 1, length]`` or
        ``None``."""
        sampling = [
            {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "extra_args": {CAPTURE: c}} for c in captures
        ]
        self._outputs(prompts, sampling, lora)
        (taken, *_) = self.llm.collective_rpc("personalab_captured", args=([c[0] for c in captures],))
        return taken

    def close(self) -> None:
        shutdown = getattr(getattr(getattr(self.llm, "llm_engine", None), "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)


def _serve(conn: Any, parent: int, devices: str | None, args: tuple) -> None:
    """A replica's process: one ``Instance`` answering ``(method, args)`` messages until ``close`` or until the
    pipe closes (see the module docstring for how it ends)."""
    _die_with(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        instance = Instance(*args)
    except Exception as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    try:
        while True:
            method, payload = conn.recv()
            try:
                conn.send(("ok", getattr(instance, method)(*payload)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            if method == "close":
                return
    except (EOFError, OSError):  # the command ended without closing the engine
        instance.close()


class Replica:
    """An ``Instance`` in a process of its own (spawned), spoken to over a pipe."""

    def __init__(self, devices: str | None, args: tuple):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, os.getpid(), devices, args), daemon=False)
        self.process.start()
        child.close()

    def send(self, method: str, *payload: Any) -> None:
        self.conn.send((method, payload))

    def result(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise RuntimeError(f"the vLLM replica exited (exit code {self.process.exitcode})") from None
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.send("close")
                self.result()
            except (OSError, RuntimeError):
                pass
        self.conn.close()
        self.process.join(timeout=60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def close_all(instances: list) -> None:
    """Close what is still open (at the engine's collection, or when the interpreter exits)."""
    while instances:
        instances.pop().close()


def in_process() -> bool:
    """Whether this process asks vLLM to run its engine here (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "").strip().lower() in ("0", "false")

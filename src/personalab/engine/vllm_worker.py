"""Interventions inside vLLM's workers: the residual stream of each request steered, ablated or clamped on the
same positions as the Hugging Face path (``personalab.engine.interventions``).

``SteeringWorker`` is mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``); the engine calls its
methods through ``LLM.collective_rpc``, so every tensor-parallel rank holds the same vectors and, since the
residual stream is replicated across ranks, adds the same values. Each request carries its interventions in
``SamplingParams.extra_args["personalab"]`` as ``[kind, layer, vector id, value, positions]`` (``steer`` adds
``value * v``; ``clamp`` sets the projection onto unit ``v`` to ``value``; ``ablate`` is ``clamp`` at 0).

Before each model step the worker reads, from the model runner's batch, which request each scheduled token
belongs to and its position in that request's sequence (computed tokens plus its offset in the step), and builds
per-token coefficients for every (layer, kind, vector); hooks on the decoder layers apply them during that step's
forward only. Layers follow ``personalab.engine.layers``: layer ``0`` is the input of block 0, ``1 <= l <
n_blocks`` the output of block ``l - 1`` (vLLM's layers return ``(hidden, residual)``, whose sum is the residual
stream), ``n_blocks`` the output of the final norm. Positions are the names of
``personalab.engine.positions``, as in a Hugging Face ``generate`` with a KV cache. This module imports only torch,
numpy and that module, so vLLM's spawned workers import it without side effects.
"""

from types import MethodType

import numpy as np
import torch

from personalab.engine.positions import named_mask

KEY = "personalab"


def _stream(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, residual)`` of a layer's output: a tensor, or vLLM's ``(hidden, residual)`` pair."""
    if isinstance(output, torch.Tensor):
        return output, None
    return output[0], output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None


class SteeringWorker:
    """Methods added to vLLM's worker; ``personalab_setup`` installs the hooks, ``personalab_vectors`` adds vectors."""

    def personalab_setup(self, blocks_path: str, norm_path: str) -> int:
        """Hook the decoder blocks at ``blocks_path`` and the final norm at ``norm_path`` of the worker's model
        (once); returns the number of blocks."""
        if getattr(self, "_pl_blocks", None) is not None:
            return len(self._pl_blocks)
        runner = self.model_runner
        model = runner.model
        self._pl_vectors: dict[str, torch.Tensor] = {}
        self._pl_plan: dict[int, list] | None = None
        self._pl_step: dict[int, list] | None = None
        self._pl_blocks = model.get_submodule(blocks_path)
        n = len(self._pl_blocks)
        self._pl_blocks[0].register_forward_pre_hook(self._pl_pre_hook, with_kwargs=True)
        for layer in range(1, n):
            self._pl_blocks[layer - 1].register_forward_hook(self._pl_post_hook(layer))
        model.get_submodule(norm_path).register_forward_hook(self._pl_post_hook(n, final=True))

        prepare, forward = runner._prepare_inputs, runner._model_forward
        worker = self

        def prepare_inputs(runner, scheduler_output, num_scheduled_tokens):
            result = prepare(scheduler_output, num_scheduled_tokens)
            worker._pl_plan = worker._pl_build(num_scheduled_tokens)
            return result

        def model_forward(runner, *args, **kwargs):
            worker._pl_step, worker._pl_plan = worker._pl_plan, None
            try:
                return forward(*args, **kwargs)
            finally:
                worker._pl_step = None

        runner._prepare_inputs = MethodType(prepare_inputs, runner)
        runner._model_forward = MethodType(model_forward, runner)
        return n

    def personalab_vectors(self, vectors: dict[str, list[float]]) -> int:
        """Register float32 vectors by id (the unit vector is taken where an intervention needs one)."""
        device = next(self.model_runner.model.parameters()).device
        for key, values in vectors.items():
            self._pl_vectors[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return len(self._pl_vectors)

    def _pl_build(self, num_scheduled_tokens) -> dict[int, list] | None:
        """Per layer, ``[(kind, vector id, coefficients [T], mask [T])]`` for this step's ``T`` tokens."""
        batch = self.model_runner.input_batch
        n = batch.num_reqs
        counts = np.asarray(num_scheduled_tokens[:n])
        starts = np.concatenate([[0], np.cumsum(counts)])
        plan: dict[int, dict] = {}
        for i, req_id in enumerate(batch.req_ids[:n]):
            params = self.model_runner.requests[req_id].sampling_params
            specs = (params.extra_args or {}).get(KEY) if params is not None else None
            if not specs:
                continue
            positions = batch.num_computed_tokens_cpu[i] + np.arange(counts[i])
            prompt_len = int(batch.num_prompt_tokens[i])
            for kind, layer, vector, value, mode in specs:
                chosen = named_mask(mode, positions, prompt_len)
                group = plan.setdefault(int(layer), {})
                if (kind, vector) not in group:
                    group[(kind, vector)] = (np.zeros(starts[-1], np.float32), np.zeros(starts[-1], bool))
                coefficients, mask = group[(kind, vector)]
                coefficients[starts[i] : starts[i + 1]][chosen] = value
                mask[starts[i] : starts[i + 1]] |= chosen
        if not plan:
            return None
        device = next(self.model_runner.model.parameters()).device
        return {
            layer: [
                (kind, vector, torch.from_numpy(c).to(device), torch.from_numpy(m).to(device))
                for (kind, vector), (c, m) in group.items()
            ]
            for layer, group in plan.items()
        }

    def _pl_delta(self, layer: int, stream: torch.Tensor) -> torch.Tensor | None:
        """What this step's interventions at ``layer`` add to the residual stream ``[T, hidden]`` (float32)."""
        entries = (self._pl_step or {}).get(layer)
        if not entries:
            return None
        x = stream.float()
        total = torch.zeros_like(x)
        for kind, vector, coefficients, mask in entries:
            v = self._pl_vectors[vector]
            if kind == "steer":
                change = coefficients[:, None] * v
            else:
                u = v / v.norm()
                change = ((coefficients - (x + total) @ u) * mask)[:, None] * u
            total = total + change
        return total

    def _pl_pre_hook(self, module, args, kwargs):
        """Layer 0: the input of block 0, its ``hidden_states`` (a keyword, or the first 2-D floating argument:
        vLLM's blocks take ``(positions, hidden_states, ...)`` or ``(hidden_states,)``)."""
        entries = (self._pl_step or {}).get(0)
        if not entries:
            return None
        t = len(entries[0][2])
        if "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"].clone()
            hidden[:t] += self._pl_delta(0, hidden[:t]).to(hidden.dtype)
            return args, {**kwargs, "hidden_states": hidden}
        at = next(
            i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 2 and a.is_floating_point()
        )
        hidden = args[at].clone()
        hidden[:t] += self._pl_delta(0, hidden[:t]).to(hidden.dtype)
        return (*args[:at], hidden, *args[at + 1 :]), kwargs

    def _pl_post_hook(self, layer: int, final: bool = False):
        """The hook at ``layer``: on a block's output (its ``hidden + residual`` is the stream) or, ``final``, on
        the final norm's output (its first part is the stream, normed)."""

        def hook(module, args, output):
            entries = (self._pl_step or {}).get(layer)
            if not entries:
                return None
            hidden, residual = _stream(output)
            residual = None if final else residual
            t = len(entries[0][2])
            stream = hidden[:t] if residual is None else hidden[:t] + residual[:t]
            delta = self._pl_delta(layer, stream)
            hidden = hidden.clone()
            hidden[:t] += delta.to(hidden.dtype)
            if isinstance(output, torch.Tensor):
                return hidden
            return (hidden, *output[1:])

        return hook

"""Interventions inside vLLM's workers: the residual stream of each request steered, ablated or clamped on the
same positions as the Hugging Face path (``personalab.engine.interventions``), on either of vLLM's model runners.

``SteeringWorker`` is mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``); the engine calls its
methods through ``LLM.collective_rpc``, so every tensor-parallel rank holds the same vectors and, since the
residual stream is replicated across ranks, adds the same values. Each request carries its interventions in
``SamplingParams.extra_args["personalab"]`` as ``[kind, layer, vector id, value, positions]`` (``steer`` adds
``value * v``; ``clamp`` sets the projection onto unit ``v`` to ``value``; ``ablate`` is ``clamp`` at 0). A
capture request carries ``extra_args["personalab_capture"] = [key, prompt_len, positions names, norms]``: the same
hooks read its residual stream at every layer and sum it over each named positions spec, and with ``norms`` keep
each token's L2 norm (``Captures``), until ``personalab_captured`` hands them over.

What it reads from vLLM, the same on model runner V1 (``v1/worker/gpu_model_runner.py``, and the CPU runner that
subclasses it) and V2 (``v1/worker/gpu/model_runner.py``, ``v1/worker/cpu/model_runner.py``) of vLLM 0.32, none of
it a runner's private method or batch object:

* the worker's ``execute_model(scheduler_output)``, which every step passes through (``WorkerWrapperBase``
  calls ``worker.execute_model``; the worker's method is wrapped on the instance): ``scheduled_new_reqs`` (request
  id, ``sampling_params``, prompt token ids, ``block_ids``), ``scheduled_cached_reqs`` (``req_ids``,
  ``new_block_ids``: a resumed request's are all its blocks) and ``finished_req_ids``. From these the worker keeps,
  on the device, the owner of every KV-cache block (a request's row, or none) and per request its prompt length and
  each intervention's value;
* the forward context (``vllm.forward_context.get_forward_context()``) that both runners set around the model's
  forward: ``slot_mapping[layer name]``, each token's KV-cache slot (``block * block_size + offset``; ``-1`` for
  padding). Prefix caching is off (``personalab.engine.vllm_engine``), so a block holds one request's tokens and
  ``slot // block_size`` names the request a token belongs to, whatever order the runner put the batch in;
* the ``positions`` the runner passes to the model's ``forward``: the index of each token in its request's
  sequence, the positions vLLM's rotary embedding rotates by (both runners compute them as computed tokens plus the
  token's offset in the step: V1 ``_prepare_inputs``, V2 ``prepare_pos_seq_lens``), so ``prompt``, ``response``
  and the other names of ``personalab.engine.positions`` select the same tokens as on Hugging Face. M-RoPE models
  pass ``[3, T]``; the first row, equal to the others on text tokens, is used;
* ``model_runner.get_model()`` and ``model_runner.kv_cache_config`` (the KV-cache groups: the slot mapping of the
  first full-attention group, with its ``block_size``), both public on the two runners.

Per step, the tables are updated from the scheduler output by non-blocking copies of what changed (pinned on a
GPU); a forward pre-hook on the model turns slots and positions into per-token coefficients on the device, with no
host synchronisation; hooks on the decoder layers apply them. That is the eager path: the hooks run Python that
depends on the step. The graph path (``GraphSteeringWorker``, vLLM compiled) adds steering vectors only, with hooks
installed as the model loads and operations of fixed shape on tables at fixed addresses (``GraphTables``), so that
torch.compile traces them once and a CUDA graph replays them; the forward context's slot mapping and the
``positions`` are persistent buffers on both runners for the same reason (CUDA graphs replay attention too).
Layers follow ``personalab.engine.layers``: layer
``0`` is the input of block 0, ``1 <= l < n_blocks`` the output of block ``l - 1`` (vLLM's layers return
``(hidden, residual)``, whose sum is the residual stream), ``n_blocks`` the output of the final norm. This module
imports only torch, numpy and ``personalab.engine.positions`` at import time, so vLLM's spawned workers import it
without side effects.
"""

import numpy as np
import torch

from personalab.engine.positions import NAMED, named_mask

KEY = "personalab"
CAPTURE = "personalab_capture"
"""``extra_args`` key of a capture request: ``[key, prompt_len, [positions names], norms]``."""
NONE = -1
"""Owner of a block that no steered request holds."""
SLOTS = 8
"""Vectors one layer holds at once on the graph path."""


def _stream(output) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(hidden, residual)`` of a layer's output: a tensor, or vLLM's ``(hidden, residual)`` pair."""
    if isinstance(output, torch.Tensor):
        return output, None
    return output[0], output[1] if len(output) > 1 and isinstance(output[1], torch.Tensor) else None


def _hidden_argument(args: tuple, kwargs: dict) -> tuple[int | None, torch.Tensor]:
    """Where a decoder block's ``hidden_states`` input is (``None``: the keyword; else the index of the first 2-D
    floating argument: vLLM's blocks take ``(positions, hidden_states, ...)`` or ``(hidden_states,)``), and it."""
    if "hidden_states" in kwargs:
        return None, kwargs["hidden_states"]
    at = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 2 and a.is_floating_point())
    return at, args[at]


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` on ``device``, copied without waiting (through pinned memory on a GPU)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _assign(blocks: list[int], *tables: tuple[torch.Tensor, list[int]]) -> None:
    """``owner[blocks[i]] = rows[i]`` for each ``(owner, rows)`` of ``tables`` on one device, in one copy."""
    if blocks:
        device = tables[0][0].device
        values = _to_device(np.array([blocks, *(rows for _, rows in tables)], np.int64), device)
        for (owner, _), rows in zip(tables, values[1:], strict=True):
            owner[values[0]] = rows.to(torch.int32)


def _token_rows(owner: torch.Tensor, slots: torch.Tensor, block_size: int, none: int) -> torch.Tensor:
    """The row of the request each token belongs to, from its KV-cache slot (``-1``: padding) and the blocks'
    ``owner`` rows; ``none`` for padding and blocks no row owns."""
    valid = slots >= 0
    found = owner[torch.where(valid, slots, 0) // block_size].long()
    return torch.where(valid & (found >= 0), found, none)


class Requests:
    """The steered requests vLLM holds: a row each, their prompt lengths, each intervention group's values, and
    the owner row of every KV-cache block, mirrored on the device.

    A group is one ``(layer, kind, vector, positions)``; ``values[g][row]`` is its value for that request and
    ``active[g][row]`` whether the request has it. Row ``capacity`` (the last) is "no steered request". The
    rows double when full, unless ``grows`` is off (the graph path's tables have a fixed size)."""

    def __init__(self, num_blocks: int, capacity: int, device: torch.device, grows: bool = True):
        self.device = device
        self.capacity = capacity
        self.grows = grows
        self.rows: dict[str, int] = {}
        self.free = list(range(capacity - 1, -1, -1))
        self.specs: dict[str, list] = {}
        self.prompt_len = np.zeros(capacity + 1, np.int64)
        self.groups: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self.owner = torch.full((num_blocks,), NONE, dtype=torch.int32, device=device)
        self.on_device: dict = {}
        self.changed = True

    def _free_row(self) -> int:
        if self.free:
            return self.free.pop()
        if not self.grows:
            raise RuntimeError(f"more than {self.capacity} steered requests at once on vLLM's graph path")
        grown = self.capacity * 2
        self.prompt_len = np.concatenate([self.prompt_len[:-1], np.zeros(grown - self.capacity + 1, np.int64)])
        self.groups = {
            g: (np.concatenate([v[:-1], np.zeros(grown - self.capacity + 1, np.float32)]),
                np.concatenate([a[:-1], np.zeros(grown - self.capacity + 1, bool)]))
            for g, (v, a) in self.groups.items()
        }  # fmt: skip
        row, self.capacity = self.capacity, grown
        self.free = list(range(grown - 1, row, -1))
        return row

    def add(self, req_id: str, specs: list, prompt_len: int) -> int:
        """Register a steered request; returns its row."""
        self.remove(req_id)
        row = self._free_row()
        self.rows[req_id], self.specs[req_id] = row, specs
        self.prompt_len[row] = prompt_len
        for kind, layer, vector, value, mode in specs:
            key = (int(layer), kind, vector, mode)
            if key not in self.groups:
                self.groups[key] = (np.zeros(self.capacity + 1, np.float32), np.zeros(self.capacity + 1, bool))
            values, active = self.groups[key]
            values[row] = values[row] + value if kind == "steer" and active[row] else value  # two steers add up
            active[row] = True
        self.changed = True
        return row

    def remove(self, req_id: str) -> None:
        """Forget a request (finished); groups no request uses any more are dropped."""
        row = self.rows.pop(req_id, None)
        if row is None:
            return
        self.free.append(row)
        for kind, layer, vector, _, mode in self.specs.pop(req_id):
            key = (int(layer), kind, vector, mode)
            if key in self.groups:
                values, active = self.groups[key]
                values[row], active[row] = 0.0, False
                if not active.any():
                    del self.groups[key]
        self.changed = True

    def device_tables(self) -> dict:
        """``{"prompt_len": [R + 1], group: (values [R + 1], active [R + 1])}`` on the device, copied again only
        after a change."""
        if self.changed:
            self.on_device = {"prompt_len": _to_device(self.prompt_len.copy(), self.device)}
            for key, (values, active) in self.groups.items():
                self.on_device[key] = (_to_device(values.copy(), self.device), _to_device(active.copy(), self.device))
            self.changed = False
        return self.on_device

    def plan(self, slots: torch.Tensor, positions: torch.Tensor, block_size: int) -> dict[int, list]:
        """Per layer, ``[(kind, vector id, coefficients [T], mask [T])]`` for tokens with KV-cache ``slots [T]``
        (``-1``: padding) at ``positions [T]``; tokens of no steered request get zeros."""
        tables = self.device_tables()
        rows = _token_rows(self.owner, slots, block_size, self.capacity)
        prompt_len = tables["prompt_len"][rows]
        plan: dict[int, list] = {}
        for (layer, kind, vector, mode), (values, active) in ((k, tables[k]) for k in self.groups):
            mask = active[rows] & named_mask(mode, positions, prompt_len)
            plan.setdefault(layer, []).append((kind, vector, values[rows] * mask, mask))
        return plan


class Captures:
    """Capture requests: a prompt-only forward whose residual stream is summed, per layer, over each named positions
    spec (and whose per-token norms are kept), until ``take`` hands them over. ``sums[layer, spec, row]`` ``[hidden]``
    float32, ``counts[spec, row]``, ``norms[layer, row, position]``; row ``capacity`` is "not captured"."""

    def __init__(self, num_blocks: int, n_layers: int, hidden: int, device: torch.device):
        self.device, self.n_layers, self.hidden = device, n_layers, hidden
        self.capacity = 0
        self.rows: dict[str, int] = {}
        self.by_request: dict[str, str] = {}
        self.modes: tuple[str, ...] = ()
        self.bounds = torch.zeros(1, 2, dtype=torch.int64, device=device)
        self.owner = torch.full((num_blocks,), NONE, dtype=torch.int32, device=device)
        self.sums = torch.zeros(0)
        self.counts = torch.zeros(0)
        self.norms: torch.Tensor | None = None
        self.lengths: dict[str, int] = {}

    def _allocate(self, capacity: int, modes: tuple[str, ...]) -> None:
        self.capacity, self.modes = capacity, modes
        self.sums = torch.zeros(self.n_layers, len(modes), capacity + 1, self.hidden, device=self.device)
        self.counts = torch.zeros(len(modes), capacity + 1, device=self.device)
        self.bounds = torch.zeros(capacity + 1, 2, dtype=torch.int64, device=self.device)

    def add(self, req_id: str, key: str, prompt_len: int, modes: list[str], norms: bool, length: int) -> int:
        """Register a capture request of ``length`` tokens; returns its row (all requests in flight capture the same
        ``modes``)."""
        modes = tuple(modes)
        if modes != self.modes and self.rows:
            raise RuntimeError("capture requests in flight capture other positions; capture one set at a time")
        if modes != self.modes or len(self.rows) == self.capacity:
            held = (self.sums, self.counts, self.bounds, self.capacity)
            self._allocate(max(64, 2 * self.capacity) if modes == self.modes else 64, modes)
            if self.rows:
                sums, counts, bounds, old = held
                self.sums[:, :, :old], self.counts[:, :old], self.bounds[:old] = (
                    sums[:, :, :old],
                    counts[:, :old],
                    bounds[:old],
                )
        if norms or self.lengths:
            self._hold_norms(length if norms else 0)
        used = set(self.rows.values())
        row = next(r for r in range(self.capacity) if r not in used)
        self.rows[key], self.by_request[req_id] = row, key
        if norms:
            self.lengths[key] = length
        self.sums[:, :, row] = 0
        self.counts[:, row] = 0
        self.bounds[row] = torch.tensor([prompt_len, length])
        return row

    def _hold_norms(self, length: int) -> None:
        """A norms buffer of ``capacity + 1`` rows and at least ``length`` positions, keeping what it holds."""
        held = self.norms
        rows, width = self.capacity + 1, max(length, 0 if held is None else held.shape[2])
        if held is not None and held.shape[1] == rows and held.shape[2] == width:
            return
        self.norms = torch.zeros(self.n_layers, rows, width, device=self.device)
        if held is not None and self.lengths:
            self.norms[:, : held.shape[1] - 1, : held.shape[2]] = held[:, :-1]

    def plan(self, slots: torch.Tensor, positions: torch.Tensor, block_size: int):
        """``(rows [T], one float32 mask [T] per positions spec, positions [T])`` of this step's tokens, rows of
        tokens not captured being ``capacity`` (``None`` when nothing is captured)."""
        if not self.rows:
            return None
        rows = _token_rows(self.owner, slots, block_size, self.capacity)
        bounds = self.bounds[rows]
        captured = (rows < self.capacity) & (positions < bounds[:, 1])  # the sequence's own tokens, nothing sampled
        rows = torch.where(captured, rows, self.capacity)
        masks = [(captured & named_mask(m, positions, bounds[:, 0])).float() for m in self.modes]
        if masks:
            self.counts.index_add_(1, rows, torch.stack(masks))
        return rows, masks, positions

    def record(self, layer: int, step, stream: torch.Tensor) -> None:
        """Add this step's ``stream [T, hidden]`` at ``layer`` to the sums of the captured tokens and keep their
        norms (tokens of other requests go to row ``capacity``)."""
        rows, masks, positions = step
        x = stream.float()
        for m, mask in enumerate(masks):
            self.sums[layer, m].index_add_(0, rows, x * mask[:, None])
        if self.lengths:
            at = positions.clamp(max=self.norms.shape[2] - 1)
            self.norms[layer].index_put_((rows, at), x.norm(dim=-1))

    def take(self, keys: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per request of ``keys``, on the CPU: the means float32 ``[M, n_layers, hidden]`` and the norms float32
        ``[n_layers, length]`` (``None`` when not asked for); their rows are freed."""
        out = []
        for key in keys:
            row = self.rows.pop(key)
            means = (self.sums[:, :, row] / self.counts[:, row][None, :, None]).transpose(0, 1).cpu()
            length = self.lengths.pop(key, None)
            out.append((means, None if length is None else self.norms[:, row, :length].cpu()))
        self.by_request = {r: k for r, k in self.by_request.items() if k in self.rows}
        return out


class GraphTables:
    """The graph path's additive steering: fixed-shape operations on tables at fixed addresses, so that
    torch.compile traces them once with the model and a CUDA graph replays them, every step reading what the host
    wrote into the tables since.

    ``vectors[layer, k]`` ``[hidden]`` is the vector in slot ``k`` of a layer (``SLOTS`` per layer);
    ``coef[layer, m, row, k]`` what steered request ``row`` adds of slot ``k`` on the positions named
    ``NAMED[m]``; ``prompt_len[row]``. Per step, ``rows[t]`` is token ``t``'s request (``capacity``: none) and
    ``masks[m, t]`` whether positions ``NAMED[m]`` select it, so that a layer adds
    ``sum_m masks[m, t] * coef[layer, m, rows[t]] @ vectors[layer]`` (float32) to token ``t``."""

    def __init__(self, n_layers: int, hidden: int, capacity: int, max_tokens: int, device: torch.device):
        self.capacity, self.device = capacity, device
        self.vectors = torch.zeros(n_layers, SLOTS, hidden, device=device)
        self.coef = torch.zeros(n_layers, len(NAMED), capacity + 1, SLOTS, device=device)
        self.prompt_len = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
        # one row more than a step has tokens: a slice never spans the whole buffer, so tracing keeps its length
        # symbolic rather than specialising it to the buffer's
        self.rows = torch.full((max_tokens + 1,), capacity, dtype=torch.int64, device=device)
        self.masks = torch.zeros(len(NAMED), max_tokens + 1, device=device)
        self.slots: list[dict[str, int]] = [{} for _ in range(n_layers)]

    def load(self, requests: Requests, vectors: dict[str, torch.Tensor]) -> None:
        """Write the steered requests' values, prompt lengths and vectors into the tables, in place (the copies
        follow the previous step's forward on the device's stream)."""
        used: list[set[str]] = [set() for _ in self.slots]
        for layer, _, vector, _ in requests.groups:
            used[layer].add(vector)
        for layer, held in enumerate(self.slots):
            for vector in [v for v in held if v not in used[layer]]:
                del held[vector]
            for vector in sorted(used[layer] - held.keys()):
                free = next((k for k in range(SLOTS) if k not in held.values()), None)
                if free is None:
                    raise RuntimeError(f"more than {SLOTS} vectors steer layer {layer} at once on vLLM's graph path")
                held[vector] = free
                self.vectors[layer, free] = vectors[vector]
        coef = np.zeros(self.coef.shape, np.float32)
        for (layer, _, vector, mode), (values, active) in requests.groups.items():
            coef[layer, NAMED.index(mode), :, self.slots[layer][vector]] += values * active
        self.coef.copy_(_to_device(coef, self.device))
        self.prompt_len.copy_(_to_device(requests.prompt_len.copy(), self.device))

    def plan(self, slots: torch.Tensor | None, positions: torch.Tensor, owner: torch.Tensor | None, block_size: int):
        """This step's ``rows`` and ``masks`` for tokens with KV-cache ``slots [T]`` at ``positions [T]`` (no
        slots: no steered token), written in place."""
        t = positions.shape[0]
        if t >= self.rows.shape[0]:
            raise RuntimeError(f"a step of {t} tokens exceeds the graph path's {self.rows.shape[0] - 1}")
        if slots is None or owner is None:
            self.rows[:t].fill_(self.capacity)
            return
        rows = _token_rows(owner, slots, block_size, self.capacity)
        self.rows[:t].copy_(rows)
        prompt_len = self.prompt_len[rows]
        for m, name in enumerate(NAMED):
            self.masks[m, :t].copy_(named_mask(name, positions, prompt_len))

    def delta(self, layer: int, t: int) -> torch.Tensor:
        """What the steered requests add at ``layer`` to this step's first ``t`` tokens: float32 ``[t, hidden]``."""
        rows, masks = self.rows.narrow(0, 0, t), self.masks.narrow(1, 0, t)  # narrow: t stays symbolic when traced
        return (self.coef[layer][:, rows] * masks[:, :, None]).sum(0) @ self.vectors[layer]


class SteeringWorker:
    """Methods added to vLLM's worker; ``personalab_setup`` installs the hooks, ``personalab_vectors`` adds vectors."""

    def personalab_setup(self, blocks_path: str, norm_path: str) -> int:
        """Hook the decoder blocks at ``blocks_path`` and the final norm at ``norm_path`` of the worker's model
        (once; the graph path's worker has done it as the model loaded); returns the number of blocks."""
        if getattr(self, "_pl_blocks", None) is None:
            self._pl_install(blocks_path, norm_path)
            self._pl_allocate()
        return len(self._pl_blocks)

    def _pl_install(self, blocks_path: str, norm_path: str, capacity: int | None = None) -> None:
        """Install the hooks: the eager path's, or with ``capacity`` (steered requests at once) the graph path's,
        whose tables are allocated here, before torch.compile traces the model's first forward."""
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        self._pl_blocks = model.get_submodule(blocks_path)
        n = len(self._pl_blocks)
        hidden = model.get_submodule(norm_path).weight.shape[0]
        self._pl_hidden, self._pl_capacity = hidden, capacity
        self._pl_vectors: dict[str, torch.Tensor] = {}
        self._pl_step: dict[int, list] | None = None
        self._pl_capturing = None
        self._pl_requests: Requests | None = None
        self._pl_graph: GraphTables | None = None
        if capacity is None:
            model.register_forward_pre_hook(self._pl_on_forward, with_kwargs=True)
            self._pl_blocks[0].register_forward_pre_hook(self._pl_pre_hook, with_kwargs=True)
            post = self._pl_post_hook
        else:
            config = self.vllm_config
            tokens = max(
                config.scheduler_config.max_num_batched_tokens,
                config.compilation_config.max_cudagraph_capture_size or 0,
            )
            self._pl_graph = GraphTables(n + 1, hidden, capacity, tokens, device)
            model.register_forward_pre_hook(self._pl_on_forward_graph, with_kwargs=True)
            self._pl_blocks[0].register_forward_pre_hook(self._pl_graph_pre_hook, with_kwargs=True)
            post = self._pl_graph_post_hook
        for layer in range(1, n):
            self._pl_blocks[layer - 1].register_forward_hook(post(layer))
        model.get_submodule(norm_path).register_forward_hook(post(n, final=True))

    def _pl_allocate(self) -> None:
        """The tables that need the KV cache's layout, and the wrapped ``execute_model`` that updates them."""
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        runner = self.model_runner
        groups = runner.kv_cache_config.kv_cache_groups
        group = next((i for i, g in enumerate(groups) if isinstance(g.kv_cache_spec, FullAttentionSpec)), 0)
        self._pl_group = group
        self._pl_layer = groups[group].layer_names[0]
        self._pl_block_size = groups[group].kv_cache_spec.block_size
        device = next(runner.get_model().parameters()).device
        blocks = runner.kv_cache_config.num_blocks
        fixed = self._pl_capacity is not None
        capacity = self._pl_capacity if fixed else self.vllm_config.scheduler_config.max_num_seqs
        self._pl_requests = Requests(blocks, capacity, device, grows=not fixed)
        self._pl_captures = Captures(blocks, len(self._pl_blocks) + 1, self._pl_hidden, device)
        execute = self.execute_model

        def execute_model(scheduler_output, *args, **kwargs):
            self._pl_schedule(scheduler_output)
            return execute(scheduler_output, *args, **kwargs)

        self.execute_model = execute_model

    def personalab_vectors(self, vectors: dict[str, list[float]]) -> int:
        """Register float32 vectors by id (the unit vector is taken where an intervention needs one)."""
        device = next(self.model_runner.get_model().parameters()).device
        for key, values in vectors.items():
            self._pl_vectors[key] = torch.tensor(values, dtype=torch.float32, device=device)
        return len(self._pl_vectors)

    def personalab_runner(self) -> str:
        """The model runner's class, ``module.Class``."""
        runner = type(self.model_runner)
        return f"{runner.__module__}.{runner.__qualname__}"

    def personalab_captured(self, keys: list[str]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """What the finished capture requests ``keys`` captured (``Captures.take``)."""
        return self._pl_captures.take(keys)

    def _pl_schedule(self, scheduler_output) -> None:
        """Update the steered and captured requests and the blocks' owners from one step's scheduler output."""
        requests, captures, group = self._pl_requests, self._pl_captures, self._pl_group
        for req_id in scheduler_output.finished_req_ids:
            requests.remove(req_id)
        blocks: list[int] = []
        owners: list[int] = []
        captured: list[int] = []
        for new in scheduler_output.scheduled_new_reqs:
            extra = (new.sampling_params.extra_args if new.sampling_params is not None else None) or {}
            if extra.get(KEY):
                row = requests.add(new.req_id, extra[KEY], len(new.prompt_token_ids or ()))
            else:
                requests.remove(new.req_id)
                row = NONE
            length = len(new.prompt_token_ids or ())
            capture = NONE if CAPTURE not in extra else captures.add(new.req_id, *extra[CAPTURE], length)
            blocks += new.block_ids[group]
            owners += [row] * len(new.block_ids[group])
            captured += [capture] * len(new.block_ids[group])
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, assigned in zip(cached.req_ids, cached.new_block_ids, strict=True):
            if assigned is not None and assigned[group]:
                blocks += assigned[group]
                owners += [requests.rows.get(req_id, NONE)] * len(assigned[group])
                key = captures.by_request.get(req_id)
                captured += [captures.rows[key] if key is not None else NONE] * len(assigned[group])
        _assign(blocks, (requests.owner, owners), (captures.owner, captured))
        if self._pl_graph is not None and requests.changed:
            self._pl_graph.load(requests, self._pl_vectors)
            requests.changed = False

    def _pl_slots(self, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """This step's KV-cache slots ``[T]`` (``-1``: padding) from the forward context, and the ``positions``
        ``[T]`` the model's forward receives; slots are ``None`` before the KV cache exists (vLLM's profiling run)."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        positions = positions[0] if positions.dim() == 2 else positions
        if self._pl_requests is None or not is_forward_context_available():
            return None, positions
        mapping = get_forward_context().slot_mapping
        if not isinstance(mapping, dict):
            raise RuntimeError(
                "personalab's steering reads each token's KV-cache slot from vLLM's forward context and found "
                "micro-batches; run without micro-batching or set `engine` to hf"
            )
        if self._pl_layer not in mapping:
            return None, positions
        slots, t = mapping[self._pl_layer], positions.shape[0]
        if slots.shape[0] < t:
            slots = torch.cat([slots, slots.new_full((t - slots.shape[0],), -1)])
        return slots[:t], positions

    def _pl_on_forward(self, module, args, kwargs):
        """Before the model's forward: this step's per-token plan from the forward context's slot mapping and the
        ``positions`` argument (or none, when no steered request is held)."""
        self._pl_step = self._pl_capturing = None
        if not self._pl_requests.groups and not self._pl_captures.rows:
            return None
        slots, positions = self._pl_slots(args, kwargs)
        if slots is None:
            raise RuntimeError(
                "personalab's steering reads each token's KV-cache slot from vLLM's forward context and found none "
                "for this step (an unsupported runner); set `engine` to hf"
            )
        if self._pl_requests.groups:
            self._pl_step = self._pl_requests.plan(slots, positions, self._pl_block_size)
        self._pl_capturing = self._pl_captures.plan(slots, positions, self._pl_block_size)
        return None

    def _pl_on_forward_graph(self, module, args, kwargs):
        """The graph path, before the model's forward: this step's rows and masks, into ``GraphTables``."""
        slots, positions = self._pl_slots(args, kwargs)
        owner = None if self._pl_requests is None else self._pl_requests.owner
        self._pl_graph.plan(slots, positions, owner, getattr(self, "_pl_block_size", 1))
        return None

    def _pl_graph_pre_hook(self, module, args, kwargs):
        """The graph path at layer 0: the steered input of block 0."""
        at, hidden = _hidden_argument(args, kwargs)
        hidden = hidden + self._pl_graph.delta(0, hidden.shape[0]).to(hidden.dtype)
        if at is None:
            return args, {**kwargs, "hidden_states": hidden}
        return (*args[:at], hidden, *args[at + 1 :]), kwargs

    def _pl_graph_post_hook(self, layer: int, final: bool = False):
        """The graph path at ``layer``: a block's output, whose ``hidden`` part takes the steering (as on the
        eager path), or, ``final``, the final norm's output."""
        tables = self._pl_graph

        def hook(module, args, output):
            hidden, _ = _stream(output)
            hidden = hidden + tables.delta(layer, hidden.shape[0]).to(hidden.dtype)
            return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

        return hook

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
        if not entries and self._pl_capturing is None:
            return None
        at, hidden = _hidden_argument(args, kwargs)
        if entries:
            t = len(entries[0][2])
            hidden = hidden.clone()
            hidden[:t] += self._pl_delta(0, hidden[:t]).to(hidden.dtype)
        if self._pl_capturing is not None:
            self._pl_captures.record(0, self._pl_capturing, hidden[: len(self._pl_capturing[0])])
        if not entries:
            return None
        if at is None:
            return args, {**kwargs, "hidden_states": hidden}
        return (*args[:at], hidden, *args[at + 1 :]), kwargs

    def _pl_post_hook(self, layer: int, final: bool = False):
        """The hook at ``layer``: on a block's output (its ``hidden + residual`` is the stream) or, ``final``, on
        the final norm's output (its first part is the stream, normed)."""

        def hook(module, args, output):
            entries = (self._pl_step or {}).get(layer)
            capturing = self._pl_capturing
            if not entries and capturing is None:
                return None
            hidden, residual = _stream(output)
            residual = None if final else residual
            t = len(entries[0][2]) if entries else len(capturing[0])
            stream = hidden[:t] if residual is None else hidden[:t] + residual[:t]
            if entries:
                delta = self._pl_delta(layer, stream)
                hidden = hidden.clone()
                hidden[:t] += delta.to(hidden.dtype)
                stream = stream + delta.to(stream.dtype)
            if capturing is not None:
                self._pl_captures.record(layer, capturing, stream)
            if not entries:
                return None
            if isinstance(output, torch.Tensor):
                return hidden
            return (hidden, *output[1:])

        return hook


class GraphSteeringWorker(SteeringWorker):
    """The graph path's worker: the platform's worker with personalab's hooks installed as the model loads, before
    torch.compile traces its first forward (hooks added later would be left out of the compiled graph), and its
    tables allocated with the KV cache. The settings come from ``vllm_config.additional_config[KEY]``:
    ``{"blocks": path, "norm": path, "capacity": steered requests at once}``."""

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        settings = self.vllm_config.additional_config[KEY]
        self._pl_install(settings["blocks"], settings["norm"], settings["capacity"])

    def initialize_from_config(self, kv_cache_config) -> None:
        super().initialize_from_config(kv_cache_config)
        self._pl_allocate()


GRAPH_WORKERS = {
    "GraphCPUWorker": "vllm.v1.worker.cpu_worker.CPUWorker",
    "GraphGPUWorker": "vllm.v1.worker.gpu_worker.Worker",
}
"""The graph path's worker classes (vLLM's ``worker_cls``, ``personalab.engine.vllm_worker.NAME``) and the worker
each extends: the ones vLLM 0.32's CPU and CUDA platforms pick for ``worker_cls="auto"``."""


def __getattr__(name: str) -> type:
    """``GRAPH_WORKERS``' classes, made on first use (vLLM is imported then, in vLLM's worker process)."""
    if name not in GRAPH_WORKERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, _, base = GRAPH_WORKERS[name].rpartition(".")
    made = type(name, (GraphSteeringWorker, getattr(importlib.import_module(module), base)), {"__module__": __name__})
    globals()[name] = made
    return made

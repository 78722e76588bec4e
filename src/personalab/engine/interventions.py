"""Interventions on the residual stream: steer, ablate, clamp, substitute.

Every intervention acts at a layer of the convention in ``personalab.engine.layers``: on the
output of block ``l - 1`` (the input of block 0 for ``l = 0``, the normed output of the stack,
``hidden_states[n_blocks]``, for ``l = n_blocks``), the tensor ``capture`` reads there. Use them inside
``intervene``, a context manager that removes its hooks on exit, also on exceptions::

    with intervene(handle, Steer(layer=12, vector=v, alpha=4.0, positions="generating")):
        out = handle.model.generate(**batch)

Positions are the names of ``personalab.engine.positions`` (``all``, ``prompt``, ``response``,
``last_prompt``, ``generating``), counted within each unpadded row; padding is never touched.

``prompt_len`` per row is taken from ``prompt_lengths`` when given (needed for a
teacher-forced forward over prompt + response, and for ``generate(use_cache=False)``); otherwise it
is the number of real tokens of the call that starts a sequence (one whose KV cache is empty: the
prefill of ``generate``), so with a KV cache the prompt is handled at prefill and each later step is a
generated position. Where a call sits in its sequence is read from the KV cache it is given, never from
whether a mask is passed: a call without a mask is an unpadded batch. Left and right padding are
handled through the attention mask.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from personalab.engine.handle import ModelHandle
from personalab.engine.hooks import CallInfo, hook_call, hook_residual
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.positions import PositionName, check_name, named_mask
from personalab.errors import InvalidInputError


class CallPositions:
    """Where the positions of the current forward call sit in each row.

    ``index[b, t]`` is the unpadded index of position ``t`` of row ``b``; ``real`` marks
    non-padding positions; ``left_pad[b]`` is the number of left pads of row ``b``.
    """

    def __init__(self, info: CallInfo, given: torch.Tensor | None, inferred: torch.Tensor | None):
        mask = info.attention_mask
        if mask is None:
            mask = torch.ones(info.batch, info.past + info.length, dtype=torch.long)
        if mask.dim() != 2:
            raise InvalidInputError("interventions need a 2-D attention mask [batch, seq]; pass one to the model")
        if mask.shape[1] != info.past + info.length:
            raise InvalidInputError(
                f"the attention mask covers {mask.shape[1]} positions but the KV cache holds {info.past} and the call "
                f"adds {info.length}; pass a mask over the cached and the new positions"
            )
        self.batch, self.length = info.batch, info.length
        self.offset = info.past
        self.left_pad = (mask.cumsum(-1) == 0).sum(-1)
        positions = torch.arange(self.offset, mask.shape[1], device=mask.device)
        self.index = positions.unsqueeze(0) - self.left_pad.unsqueeze(1)
        self.real = mask[:, self.offset :].bool()
        if given is not None:
            self.prompt_len = given.to(mask.device)
        elif self.offset == 0:
            self.prompt_len = self.real.sum(-1)
        elif inferred is not None:
            self.prompt_len = inferred
        else:
            raise InvalidInputError(
                "the intervention saw a decoding step without its prompt; enter intervene() before generate(), "
                "or pass prompt_lengths"
            )
        if self.prompt_len.shape[0] != self.batch:
            raise InvalidInputError(
                f"prompt_lengths has {self.prompt_len.shape[0]} rows but the batch has {self.batch}"
            )
        self._masks: dict[tuple[str, torch.device], torch.Tensor] = {}

    def mask(self, mode: str, device: torch.device) -> torch.Tensor:
        """Bool ``[batch, length]`` of the positions selected by ``mode``."""
        key = (mode, device)
        if key not in self._masks:
            chosen = self.real & named_mask(mode, self.index, self.prompt_len.unsqueeze(1))
            self._masks[key] = chosen.to(device)
        return self._masks[key]


Apply = Callable[[torch.Tensor, CallPositions], torch.Tensor]


class _RowValues:
    """A number, or one number per batch row, as a broadcastable ``[batch, 1]`` value per device."""

    def __init__(self, value: float | Sequence[float] | torch.Tensor, name: str):
        t = torch.as_tensor(value, dtype=torch.float32)
        if t.dim() > 1 or not torch.isfinite(t).all():
            raise InvalidInputError(f"{name} must be a finite number or one finite number per batch row")
        self.name = name
        self.rows = t.shape[0] if t.dim() == 1 else None
        self.scalar = float(t) if self.rows is None else None
        self.column = t.reshape(-1, 1)
        self._on: dict[torch.device, torch.Tensor] = {}

    def on(self, call: CallPositions, device: torch.device) -> float | torch.Tensor:
        if self.scalar is not None:
            return self.scalar
        if self.rows != call.batch:
            raise InvalidInputError(
                f"per-row {self.name} has {self.rows} entries but the batch has {call.batch} rows "
                f"(num_return_sequences multiplies rows); give one {self.name} per row"
            )
        if device not in self._on:
            self._on[device] = self.column.to(device)
        return self._on[device]


class _OnDevice:
    """A float32 vector with cached copies per (device, dtype)."""

    def __init__(self, vector: torch.Tensor):
        self.vector = vector
        self._copies: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def like(self, h: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        key = (h.device, dtype or h.dtype)
        if key not in self._copies:
            self._copies[key] = self.vector.to(*key)
        return self._copies[key]


def _unit(direction: torch.Tensor, layer: int, handle: ModelHandle) -> torch.Tensor:
    d = check_vector(direction, layer, handle.n_blocks, handle.hidden_size).float()
    norm = d.norm()
    if norm == 0:
        raise InvalidInputError(f"direction for layer {layer} is all zeros; it has no direction to use")
    return d / norm


@dataclass(frozen=True)
class Steer:
    """Add ``alpha * vector`` at ``layer``, the vector as given (the engine's primitive: ``personalab.steer`` and the
    commands put the scaled vector of ``personalab.engine.scale`` here); ``alpha`` is a number or one per batch row.

    ``vector`` is ``[hidden]`` or per-layer ``[n_blocks + 1, hidden]`` (row ``layer`` is used).
    """

    layer: int
    vector: torch.Tensor
    alpha: float | Sequence[float] | torch.Tensor = 1.0
    positions: PositionName = "all"

    def prepare(self, handle: ModelHandle) -> Apply:
        check_name(self.positions)
        v = _OnDevice(check_vector(self.vector, self.layer, handle.n_blocks, handle.hidden_size).float())
        alpha = _RowValues(self.alpha, "alpha")

        def apply(h: torch.Tensor, call: CallPositions) -> torch.Tensor:
            scale = call.mask(self.positions, h.device) * alpha.on(call, h.device)
            return h + scale.to(h.dtype).unsqueeze(-1) * v.like(h)

        return apply


@dataclass(frozen=True)
class Ablate:
    """Project ``direction`` out of the residual at ``layer`` (its projection becomes 0)."""

    layer: int
    direction: torch.Tensor
    positions: PositionName = "all"

    def prepare(self, handle: ModelHandle) -> Apply:
        return Clamp(self.layer, self.direction, 0.0, self.positions).prepare(handle)


@dataclass(frozen=True)
class Clamp:
    """Set the projection of the residual onto unit ``direction`` to ``value`` at ``layer``.

    ``value`` is a number or one number per batch row.
    """

    layer: int
    direction: torch.Tensor
    value: float | Sequence[float] | torch.Tensor
    positions: PositionName = "all"

    def prepare(self, handle: ModelHandle) -> Apply:
        check_name(self.positions)
        u = _OnDevice(_unit(self.direction, self.layer, handle))
        target = _RowValues(self.value, "value")

        def apply(h: torch.Tensor, call: CallPositions) -> torch.Tensor:
            uu = u.like(h, torch.float32)
            x = h.float()
            shift = (target.on(call, h.device) - x @ uu) * call.mask(self.positions, h.device)
            return (x + shift.unsqueeze(-1) * uu).to(h.dtype)

        return apply


@dataclass(frozen=True)
class Substitute:
    """Replace the residual at ``layer`` with given vectors.

    ``positions[b]`` lists unpadded indices of row ``b``; ``values[b]`` is ``[len(positions[b]), hidden]``.
    """

    layer: int
    positions: Sequence[Sequence[int]]
    values: Sequence[torch.Tensor]

    def prepare(self, handle: ModelHandle) -> Apply:
        check_layers(self.layer, handle.n_blocks)
        if len(self.positions) != len(self.values):
            raise InvalidInputError(
                f"substitution has {len(self.positions)} position lists but {len(self.values)} value tensors"
            )
        rows, cols, vals = [], [], []
        for b, (pos, val) in enumerate(zip(self.positions, self.values, strict=True)):
            val = torch.as_tensor(val, dtype=torch.float32)
            if val.dim() != 2 or val.shape != (len(pos), handle.hidden_size):
                raise InvalidInputError(
                    f"substitution values of row {b} have shape {tuple(val.shape)}; "
                    f"expected ({len(pos)}, {handle.hidden_size})"
                )
            if not torch.isfinite(val).all() or any(p < 0 for p in pos):
                raise InvalidInputError(f"substitution row {b} has NaN/inf values or negative positions")
            rows += [b] * len(pos)
            cols += list(pos)
            vals.append(val)
        row_t = torch.tensor(rows, dtype=torch.long)
        col_t = torch.tensor(cols, dtype=torch.long)
        val_t = torch.cat(vals) if vals else torch.empty(0, handle.hidden_size)

        def apply(h: torch.Tensor, call: CallPositions) -> torch.Tensor:
            if len(self.positions) != call.batch:
                raise InvalidInputError(f"substitution has {len(self.positions)} rows but the batch has {call.batch}")
            at = col_t + call.left_pad.cpu()[row_t] - call.offset
            keep = (at >= 0) & (at < call.length)
            if not keep.any():
                return h
            out = h.clone()
            out[row_t[keep].to(h.device), at[keep].to(h.device)] = val_t[keep].to(h.device, h.dtype)
            return out

        return apply


Intervention = Steer | Ablate | Clamp | Substitute


class _State:
    """Tracks the current forward call and the prompt lengths inferred at prefill."""

    def __init__(self, prompt_lengths: Sequence[int] | torch.Tensor | None):
        self.given = None if prompt_lengths is None else torch.as_tensor(prompt_lengths, dtype=torch.long)
        self.inferred: torch.Tensor | None = None
        self.call: CallPositions | None = None

    def on_call(self, info: CallInfo) -> None:
        self.call = CallPositions(info, self.given, self.inferred)
        if self.call.offset == 0:
            self.inferred = self.call.prompt_len


@contextmanager
def intervene(
    handle: ModelHandle,
    *interventions: Intervention,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
) -> Iterator[None]:
    """Apply ``interventions`` to every forward pass of ``handle.model`` inside the block (capture and NLL run on
    the Hugging Face model there, not in the handle's engine: ``ModelHandle.forward_engine``).

    Interventions at the same layer apply in the order given, before any capture hook.
    All inputs are validated before a hook is placed; all hooks are removed on exit.
    """
    for iv in interventions:
        check_layers(iv.layer, handle.n_blocks)
    state = _State(prompt_lengths)
    by_layer: dict[int, list[Apply]] = {}
    for iv in interventions:
        by_layer.setdefault(iv.layer, []).append(iv.prepare(handle))

    def layer_fn(applies: list[Apply]):
        def fn(h: torch.Tensor) -> torch.Tensor:
            for apply in applies:
                h = apply(h, state.call)
            return h

        return fn

    with ExitStack() as stack:
        handle.intervening += 1
        stack.callback(setattr, handle, "intervening", handle.intervening - 1)
        stack.callback(hook_call(handle, state.on_call).remove)
        for layer, applies in by_layer.items():
            stack.callback(hook_residual(handle, layer, layer_fn(applies), prepend=True).remove)
        yield


def add_vector(
    handle: ModelHandle,
    vector: torch.Tensor,
    layers: int | Sequence[int],
    alpha: float | Sequence[float] | torch.Tensor = 1.0,
    positions: PositionName = "all",
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
):
    """Shorthand for ``intervene`` with one ``Steer`` per layer of ``layers``: adds ``alpha * vector`` as given (the
    raw scale). ``personalab.steer`` scales the vector first, as every command does."""
    layer_list = check_layers(layers, handle.n_blocks)
    return intervene(
        handle, *(Steer(layer, vector, alpha, positions) for layer in layer_list), prompt_lengths=prompt_lengths
    )


@dataclass(frozen=True)
class Spec:
    """One request's intervention as data: ``kind`` steer, ablate or clamp; ``value`` its alpha (steer) or the
    projection it sets (clamp; 0 for ablate); ``vector`` the key of its direction in ``RowPlan.vectors``."""

    kind: str
    layer: int
    vector: str
    value: float
    positions: str


def spec_of(iv: "Steer | Ablate | Clamp", vectors: dict[str, torch.Tensor]) -> Spec:
    """``iv`` as a ``Spec``; its direction (``[hidden]`` or per-layer, row ``layer`` taken) is added to ``vectors``
    under its sha256."""
    from personalab.hashes import vector_sha256

    direction = iv.vector if isinstance(iv, Steer) else iv.direction
    row = torch.as_tensor(direction).detach().float()
    row = row[iv.layer] if row.dim() == 2 else row
    key = vector_sha256(row)
    vectors.setdefault(key, row)
    if isinstance(iv, Steer):
        return Spec("steer", iv.layer, key, float(iv.alpha), iv.positions)
    value = 0.0 if isinstance(iv, Ablate) else float(iv.value)
    return Spec("ablate" if isinstance(iv, Ablate) else "clamp", iv.layer, key, value, iv.positions)


def structure(specs: Sequence[Spec]) -> tuple:
    """What requests must share to run in one Hugging Face batch: their ablations and clamps (steering
    vectors may differ, rows without one get alpha 0)."""
    return tuple(sorted((s.kind, s.layer, s.vector, s.positions) for s in specs if s.kind != "steer"))


def batch_interventions(rows: Sequence[Sequence[Spec]], vectors: dict[str, torch.Tensor]) -> list[Intervention]:
    """One batch's interventions from its rows' specs (rows of one ``structure``): a ``Steer`` with a per-row
    alpha for each (layer, vector, positions) any row steers with (0 in the others), and a ``Clamp`` with a
    per-row value for each ablation or clamp, in the order the rows give them."""
    groups: dict[tuple, list[float]] = {}
    for b, specs in enumerate(rows):
        for s in specs:
            key = (s.kind == "steer", s.layer, s.vector, s.positions)
            groups.setdefault(key, [0.0] * len(rows))[b] = s.value
    out: list[Intervention] = []
    for (steers, layer, vector, positions), values in groups.items():
        if steers:
            out.append(Steer(layer, vectors[vector], values, positions))
        else:
            out.append(Clamp(layer, vectors[vector], values, positions))
    return out

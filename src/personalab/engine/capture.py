"""All-layer activation capture in one forward pass per batch.

Layer indices follow ``personalab.engine.layers`` (``hidden_states[l]`` of transformers).
Sequences are length-sorted into batches and padded; hooks reduce each layer as soon
as it is computed (nothing else is kept), and the forward pass stops after the last
requested layer, so the remaining blocks and the LM head never run.
"""

from collections.abc import Iterable, Sequence
from typing import Literal, get_args

import torch

from personalab.console import progress_bar
from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle
from personalab.engine.hooks import hook_residual
from personalab.engine.layers import check_layers
from personalab.engine.positions import Positions, select_positions
from personalab.errors import InvalidInputError, NonFiniteActivationError

Reduce = Literal["mean", "gather", "norm"]
REDUCES: tuple[str, ...] = get_args(Reduce)


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to skip the rest of the model."""


class _Recorder:
    """Per-batch state shared by the layer hooks.

    ``weights`` is ``[batch, n_specs, seq]`` float32 with ``1/k`` at each of a row's ``k`` positions selected by
    each positions spec (mean); ``index`` holds each row's padded positions of the single spec (gather, norm).
    """

    def __init__(self, layers: list[int], reduce: Reduce):
        self.layers = layers
        self.reduce = reduce
        self.last = max(layers)
        self.weights: dict[torch.device, torch.Tensor] = {}
        self.index: list[torch.Tensor] = []
        self.out: dict[int, torch.Tensor | list[torch.Tensor]] = {}
        self.finite: dict[int, torch.Tensor] = {}

    def arm(self, offsets: torch.Tensor, selected: list[list[torch.Tensor]], width: int, device: torch.device) -> None:
        """``selected[s][b]``: the unpadded positions spec ``s`` selects in row ``b`` of the batch."""
        shifted = [[sel + off for sel, off in zip(spec, offsets.tolist(), strict=True)] for spec in selected]
        self.index = shifted[0]
        weights = torch.zeros(len(self.index), len(shifted), width, dtype=torch.float32)
        for s, spec in enumerate(shifted):
            for b, idx in enumerate(spec):
                weights[b, s].index_put_((idx,), torch.full((len(idx),), 1.0 / len(idx)), accumulate=True)
        self.weights = {device: weights.to(device)}
        self.out, self.finite = {}, {}

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.weights:
            self.weights[device] = next(iter(self.weights.values())).to(device)
        return self.weights[device]

    def hook_for(self, layer: int):
        def fn(h: torch.Tensor) -> None:
            if self.reduce == "mean":
                value = torch.bmm(self._weights_on(h.device), h.float())
                self.finite[layer] = torch.isfinite(value).all()
            else:
                value = [h[b, idx.to(h.device)].float() for b, idx in enumerate(self.index)]
                if self.reduce == "norm":
                    value = [v.norm(dim=-1) for v in value]
                self.finite[layer] = torch.stack([torch.isfinite(v).all() for v in value]).all()
            self.out[layer] = value
            if layer == self.last:
                raise _StopForward

        return fn

    def check_finite(self, dtype: torch.dtype) -> None:
        for layer in self.layers:
            if not bool(self.finite[layer]):
                raise _non_finite(layer, dtype)


def _non_finite(layer: int, dtype: torch.dtype) -> NonFiniteActivationError:
    return NonFiniteActivationError(
        f"NaN or inf in the residual stream at layer {layer} (model dtype {dtype}); "
        f"load the model with dtype bfloat16 or float32"
    )


def _run(
    handle: ModelHandle,
    sequences: Sequence[TokenSequence],
    layers: int | Iterable[int] | None,
    specs: Sequence[Positions],
    reduce: Reduce,
    batch_size: int,
    padding_side: str,
    progress: bool,
    label: str,
) -> torch.Tensor | list[torch.Tensor | None]:
    """One forward pass per length-sorted batch with a hook per layer; in input order, float32
    ``[n_sequences, n_specs, n_layers, hidden]`` (mean) or one ``[n_layers, n_selected_i, ...]`` per sequence
    (gather, norm: one spec). Means over named positions and norms run in the handle's engine when it has one
    (vLLM: prompt-only forwards; not inside an ``intervene`` block: ``ModelHandle.forward_engine``); gathered
    activations run on Hugging Face."""
    if not sequences:
        raise InvalidInputError("no sequences to capture; pass at least one")
    layer_list = check_layers(layers, handle.n_blocks)
    selected = [select_positions(spec, sequences) for spec in specs]
    engine = handle.forward_engine
    if engine is not None and reduce == "mean" and all(isinstance(spec, str) for spec in specs):
        means = engine.capture_means(handle, sequences, [str(s) for s in specs], layer_list, progress, label)
        for j, layer in enumerate(layer_list):
            if not bool(torch.isfinite(means[:, :, j]).all()):
                raise _non_finite(layer, handle.dtype)
        return means
    if engine is not None and reduce == "norm":
        norms = engine.capture_norms(handle, sequences, layer_list, progress, label)
        for j, layer in enumerate(layer_list):
            if not all(bool(torch.isfinite(n[j]).all()) for n in norms):
                raise _non_finite(layer, handle.dtype)
        return [n[:, idx] for n, idx in zip(norms, selected[0], strict=True)]
    recorder = _Recorder(layer_list, reduce)
    device = handle.input_device
    pad_id = handle.tokenizer.pad_token_id
    shape = (len(sequences), len(specs), len(layer_list), handle.hidden_size)
    means = torch.empty(shape) if reduce == "mean" else None
    gathered: list[torch.Tensor | None] = [None] * len(sequences)

    hooks = [hook_residual(handle, layer, recorder.hook_for(layer)) for layer in layer_list]
    try:
        batches = length_sorted_batches([len(s.ids) for s in sequences], batch_size)
        with torch.inference_mode(), progress_bar(label, len(sequences), progress) as advance:
            for rows in batches:
                batch = pad_batch([sequences[i].ids for i in rows], pad_id, padding_side, device)
                chosen = [[spec[i] for i in rows] for spec in selected]
                recorder.arm(batch.offsets, chosen, batch.input_ids.shape[1], device)
                try:
                    handle.model(**batch.model_inputs(), use_cache=False)
                except _StopForward:
                    pass
                recorder.check_finite(handle.dtype)
                if means is not None:
                    means[rows] = torch.stack([recorder.out[layer].cpu() for layer in layer_list], dim=2)
                else:
                    for j, i in enumerate(rows):
                        gathered[i] = torch.stack([recorder.out[layer][j].cpu() for layer in layer_list])
                advance(len(rows))
    finally:
        for hook in hooks:
            hook.remove()
    return means if means is not None else gathered


def capture(
    handle: ModelHandle,
    sequences: Sequence[TokenSequence],
    layers: int | Iterable[int] | None = None,
    positions: Positions = "response",
    reduce: Reduce = "mean",
    batch_size: int = 16,
    padding_side: str = "right",
    progress: bool = False,
    label: str = "capture",
) -> torch.Tensor | list[torch.Tensor]:
    """Residual-stream activations of ``sequences`` at ``layers`` (default: all ``n_blocks + 1``).

    Returns, in input order and in the order of ``layers``:

    * ``reduce="mean"``: float32 ``[n_sequences, n_layers, hidden]``, the mean over the
      selected positions, accumulated in float32;
    * ``reduce="gather"``: a list of float32 ``[n_layers, n_selected_i, hidden]``;
    * ``reduce="norm"``: a list of float32 ``[n_layers, n_selected_i]``, the L2 norm of each selected position
      (computed in the hook: the activations themselves are never kept).
    """
    if reduce not in REDUCES:
        raise InvalidInputError(f"unknown reduce {reduce!r}; use {', '.join(map(repr, REDUCES))}")
    out = _run(handle, sequences, layers, [positions], reduce, batch_size, padding_side, progress, label)
    return out[:, 0] if reduce == "mean" else out


def capture_means(
    handle: ModelHandle,
    sequences: Sequence[TokenSequence],
    positions: Sequence[Positions],
    layers: int | Iterable[int] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    label: str = "capture",
) -> list[torch.Tensor]:
    """``capture(..., reduce="mean")`` for each of several ``positions`` specs, all from one forward pass per batch:
    one float32 ``[n_sequences, n_layers, hidden]`` per spec, in the order given."""
    if not positions:
        raise InvalidInputError("no positions to capture; pass at least one")
    out = _run(handle, sequences, layers, list(positions), "mean", batch_size, "right", progress, label)
    return list(out.unbind(dim=1))

"""All-layer activation capture in one forward pass per batch.

Layer indices follow ``personalab.engine.layers`` (``hidden_states[l]`` of transformers).
Sequences are length-sorted into batches and padded; hooks reduce each layer as soon
as it is computed (nothing else is kept), and the forward pass stops after the last
requested layer, so the remaining blocks and the LM head never run.
"""

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from personalab.console import progress_bar
from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.hooks import hook_residual
from personalab.engine.layers import check_layers
from personalab.engine.model import ModelHandle
from personalab.engine.positions import Positions, select_positions
from personalab.errors import InvalidInputError, NonFiniteActivationError

Reduce = Literal["mean", "gather"]


class _StopForward(Exception):
    """Raised by the hook of the last requested layer to skip the rest of the model."""


class _Recorder:
    """Per-batch state shared by the layer hooks.

    ``weights`` is ``[batch, seq]`` float32 with ``1/k`` at each of a row's ``k``
    selected positions (mean); ``index`` holds each row's padded positions (gather).
    """

    def __init__(self, layers: list[int], reduce: Reduce):
        self.layers = layers
        self.reduce = reduce
        self.last = max(layers)
        self.weights: dict[torch.device, torch.Tensor] = {}
        self.index: list[torch.Tensor] = []
        self.out: dict[int, torch.Tensor | list[torch.Tensor]] = {}
        self.finite: dict[int, torch.Tensor] = {}

    def arm(self, offsets: torch.Tensor, selected: list[torch.Tensor], width: int, device: torch.device) -> None:
        self.index = [sel + off for sel, off in zip(selected, offsets.tolist(), strict=True)]
        weights = torch.zeros(len(selected), width, dtype=torch.float32)
        for b, idx in enumerate(self.index):
            weights[b].index_put_((idx,), torch.full((len(idx),), 1.0 / len(idx)), accumulate=True)
        self.weights = {device: weights.to(device)}
        self.out, self.finite = {}, {}

    def _weights_on(self, device: torch.device) -> torch.Tensor:
        if device not in self.weights:
            self.weights[device] = next(iter(self.weights.values())).to(device)
        return self.weights[device]

    def hook_for(self, layer: int):
        def fn(h: torch.Tensor) -> None:
            if self.reduce == "mean":
                value = torch.bmm(self._weights_on(h.device).unsqueeze(1), h.float()).squeeze(1)
                self.finite[layer] = torch.isfinite(value).all()
            else:
                value = [h[b, idx.to(h.device)].float() for b, idx in enumerate(self.index)]
                self.finite[layer] = torch.stack([torch.isfinite(v).all() for v in value]).all()
            self.out[layer] = value
            if layer == self.last:
                raise _StopForward

        return fn

    def check_finite(self, dtype: torch.dtype) -> None:
        for layer in self.layers:
            if not bool(self.finite[layer]):
                raise NonFiniteActivationError(
                    f"NaN or inf in the residual stream at layer {layer} (model dtype {dtype}); "
                    f"load the model with dtype bfloat16 or float32"
                )


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
    * ``reduce="gather"``: a list of float32 ``[n_layers, n_selected_i, hidden]``.
    """
    if reduce not in ("mean", "gather"):
        raise InvalidInputError(f"unknown reduce {reduce!r}; use 'mean' or 'gather'")
    if not sequences:
        raise InvalidInputError("no sequences to capture; pass at least one")
    layer_list = check_layers(layers, handle.n_blocks)
    selected = select_positions(positions, sequences)
    recorder = _Recorder(layer_list, reduce)
    device = handle.input_device
    pad_id = handle.tokenizer.pad_token_id
    means = torch.empty(len(sequences), len(layer_list), handle.hidden_size) if reduce == "mean" else None
    gathered: list[torch.Tensor | None] = [None] * len(sequences)

    hooks = [hook_residual(handle, layer, recorder.hook_for(layer)) for layer in layer_list]
    try:
        batches = length_sorted_batches([len(s.ids) for s in sequences], batch_size)
        with torch.inference_mode(), progress_bar(label, len(sequences), progress) as advance:
            for rows in batches:
                batch = pad_batch([sequences[i].ids for i in rows], pad_id, padding_side, device)
                recorder.arm(batch.offsets, [selected[i] for i in rows], batch.input_ids.shape[1], device)
                try:
                    handle.model(**batch.model_inputs(), use_cache=False)
                except _StopForward:
                    pass
                recorder.check_finite(handle.dtype)
                if means is not None:
                    stacked = torch.stack([recorder.out[layer].cpu() for layer in layer_list], dim=1)
                    means[rows] = stacked
                else:
                    for j, i in enumerate(rows):
                        gathered[i] = torch.stack([recorder.out[layer][j].cpu() for layer in layer_list])
                advance(len(rows))
    finally:
        for hook in hooks:
            hook.remove()
    return means if means is not None else gathered

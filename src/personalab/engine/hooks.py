"""Every PyTorch hook personalab places on a model is registered here.

``hook_residual`` reads or rewrites the residual stream at layer ``l`` (convention in
``personalab.engine.layers``): the input of block 0 for ``l = 0``, the output of block
``l - 1`` for ``0 < l < n_blocks``, and the output of the decoder stack for ``l = n_blocks``
(``hidden_states[n_blocks]`` of transformers, after the final norm), so what is read at a
layer and what is written there are the same tensor.
``hook_call`` sees each top-level forward call before it runs (batch shape, attention mask and how many
positions its KV cache already holds), which is how interventions follow positions through cached decoding.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.hooks import RemovableHandle
from transformers import Cache

from personalab.engine.architectures import unwrap
from personalab.engine.handle import ModelHandle

ResidualFn = Callable[[torch.Tensor], torch.Tensor | None]
"""Receives the residual ``[batch, seq, hidden]``; returns a replacement or ``None``."""


def _replace_first(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + output[1:]
    output[next(iter(output.keys()))] = new  # ModelOutput: assigning by key updates the key and the attribute
    return output


def _first(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def hook_residual(handle: ModelHandle, layer: int, fn: ResidualFn, *, prepend: bool = False) -> RemovableHandle:
    """Register ``fn`` on the residual stream at ``layer``; remove it with ``.remove()``."""
    if layer == 0:

        def pre_hook(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new,) + args[1:], kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        return handle.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)

    module = handle.stack if layer == handle.n_blocks else handle.blocks[layer - 1]

    def post_hook(module, args, output):
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)

    return module.register_forward_hook(post_hook, prepend=prepend)


@dataclass(frozen=True)
class CallInfo:
    """One top-level forward call: ``batch`` rows, ``length`` new positions after the ``past`` positions its KV cache
    holds (0 without a cache), and the attention mask as given: ``[batch, past + length]``, or ``None``.

    ``past`` is read from the cache itself (``Cache.get_seq_length``), whatever the argument holding it is called;
    a mask can be left out (transformers' ``generate`` drops an all-ones mask), a cache cannot.
    """

    batch: int
    length: int
    attention_mask: torch.Tensor | None
    past: int = 0


def hook_call(handle: ModelHandle, fn: Callable[[CallInfo], None]) -> RemovableHandle:
    """Call ``fn`` before every forward of the transformers model (also inside ``generate``)."""

    def pre_hook(module, args, kwargs):
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = args[0] if args else kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
        past = 0 if cache is None else int(cache.get_seq_length())
        fn(CallInfo(batch=tokens.shape[0], length=tokens.shape[1], attention_mask=mask, past=past))

    return unwrap(handle.model).register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)

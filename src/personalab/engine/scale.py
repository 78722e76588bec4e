"""Steering coefficients: raw (``alpha * v``) and normalised scales, and one-off steered answers.

* ``raw``: the vector is added as stored, ``alpha * v`` (as in the public persona-vectors code);
* ``normalised``: ``v`` is rescaled to the model's mean residual norm at that layer, measured
  over every token of a prompt set, then multiplied by ``alpha``; ``alpha = 1`` adds a vector
  as long as a typical residual, which is how vectors transfer between checkpoints.
"""

from collections.abc import Sequence
from typing import Literal

import torch

from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.model import ModelHandle
from personalab.errors import InvalidInputError

Scale = Literal["raw", "normalised"]


def mean_residual_norm(handle: ModelHandle, prompts: Sequence[TokenSequence], layers: Sequence[int]) -> list[float]:
    """Mean L2 norm of the residual over every token of ``prompts``, one value per layer of ``layers``.

    Layers follow ``personalab.engine.layers``: at ``l = n_blocks`` this is the norm after the final norm.
    """
    layers = check_layers(layers, handle.n_blocks)
    gathered = capture(handle, prompts, layers=layers, positions="all", reduce="gather")
    tokens = torch.cat([g.norm(dim=-1) for g in gathered], dim=1)
    return tokens.mean(dim=1).tolist()


def scaled_vector(
    handle: ModelHandle,
    vector: torch.Tensor,
    layer: int,
    scale: Scale,
    prompts: Sequence[TokenSequence] | None = None,
) -> tuple[torch.Tensor, float]:
    """The ``[hidden]`` vector that ``alpha = 1`` adds at ``layer``, and the residual norm used (0 for raw)."""
    v = check_vector(vector, layer, handle.n_blocks, handle.hidden_size).float()
    if scale == "raw":
        return v, 0.0
    if scale != "normalised":
        raise InvalidInputError(f"unknown scale {scale!r}; use raw or normalised")
    if not prompts:
        raise InvalidInputError("normalised scale needs a prompt set to measure the residual norm on")
    if v.norm() == 0:
        raise InvalidInputError(f"vector at layer {layer} is all zeros; it cannot be normalised")
    (norm,) = mean_residual_norm(handle, prompts, [layer])
    return v / v.norm() * norm, norm

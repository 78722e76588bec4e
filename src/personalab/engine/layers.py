"""The layer convention, used by every part of personalab.

Layer ``l`` is ``hidden_states[l]`` of a transformers forward pass:

* ``l = 0`` is the embedding output, i.e. the input of decoder block 0;
* ``l >= 1`` is the output of decoder block ``l - 1`` (the input of block ``l``).

A model with ``n_blocks`` decoder blocks therefore has ``n_blocks + 1`` layers, and
per-layer vectors have shape ``[n_blocks + 1, hidden]``, as in the public
persona-vectors files. Interventions "at layer l" act on the output of block ``l - 1``
(on the input of block 0 for ``l = 0``).

transformers applies the final norm to its last entry: ``hidden_states[n_blocks]`` is
``final_norm(output of block n_blocks - 1)``, the input of the LM head. Capture reproduces
that exactly, so vectors extracted here equal those of code built on
``output_hidden_states``, and an intervention at ``l = n_blocks`` acts on that same normed
tensor: a value read at a layer and written back at that layer are in one space, at every
layer. (The public persona-vectors steerer adds at ``l = n_blocks`` before the final norm;
at every other layer the two agree.)
"""

from collections.abc import Iterable

import torch

from personalab.errors import InvalidInputError

CONVENTION = "layer l = hidden_states[l] (0 = embeddings, l = output of block l-1); shape [n_blocks + 1, hidden]"
"""The convention in one line, recorded in every run's ``meta.json``."""


def check_layers(layers: int | Iterable[int] | None, n_blocks: int) -> list[int]:
    """Validate layer indices against ``0..n_blocks``; ``None`` means every layer.

    Returns the layers in the order given, without repeats.
    """
    if layers is None:
        return list(range(n_blocks + 1))
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted:
        raise InvalidInputError("no layers given; pass at least one layer index")
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n_blocks:
            raise InvalidInputError(
                f"layer {layer!r} is out of range; this model has layers 0..{n_blocks} "
                f"(0 = embeddings, l = output of block l-1)"
            )
    return list(dict.fromkeys(wanted))


def check_vector(vector: torch.Tensor, layer: int, n_blocks: int, hidden: int) -> torch.Tensor:
    """Return the ``[hidden]`` direction to use at ``layer``.

    ``vector`` is either one direction ``[hidden]`` or a per-layer stack
    ``[n_blocks + 1, hidden]`` (row ``layer`` is taken). Raises on a wrong width,
    a wrong number of layers, or non-finite values.
    """
    check_layers(layer, n_blocks)
    if not isinstance(vector, torch.Tensor):
        vector = torch.as_tensor(vector)
    if vector.dim() == 2:
        if vector.shape[0] != n_blocks + 1:
            raise InvalidInputError(
                f"per-layer vector has {vector.shape[0]} rows but this model has {n_blocks + 1} "
                f"layers (n_blocks + 1); use a vector extracted from this model"
            )
        vector = vector[layer]
    if vector.dim() != 1 or vector.shape[0] != hidden:
        raise InvalidInputError(
            f"vector has shape {tuple(vector.shape)} but this model's hidden size is {hidden}; "
            f"use a vector extracted from this model"
        )
    if not torch.isfinite(vector).all():
        raise InvalidInputError(f"vector for layer {layer} contains NaN or inf; re-extract it")
    return vector

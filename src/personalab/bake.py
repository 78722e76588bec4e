"""Exact baking: write a model whose plain forward equals steering on all positions.

Steering at layer ``l >= 1`` on every position adds the constant ``alpha * v`` to the
output of block ``l - 1`` (convention in ``personalab.layers``). When that block ends
with ``h + mlp(...)`` and the MLP ends with a linear projection ``W x + b``, the same
shift is ``b -> b + alpha * v`` on that projection: no training, and exact up to float
rounding. At ``l = 0`` the shift is on the embedding output; when that output is
``scale * E[token] (+ position terms)`` it is ``E[t] -> E[t] + alpha * v / scale`` on every
row of the input embedding matrix. Padding positions, which steering leaves alone, are
shifted too, but attention masks them out, so every real position is unchanged.

What the transformers modeling code allows, per architecture:

* ``llama``: ``mlp.down_proj(...)`` is added straight to the residual, and the config's
  ``mlp_bias`` option gives the MLP projections biases. The saved model has
  ``mlp_bias=True``, zero biases on every ``gate_proj``, ``up_proj`` and ``down_proj``,
  and ``alpha * v`` on the ``down_proj`` bias of block ``l - 1``.
* ``gpt2`` (``mlp.c_proj``) and ``gpt_neox`` (``mlp.dense_4h_to_h``) have MLP output
  biases already. GPT-NeoX adds the MLP output to the block output directly with
  ``use_parallel_residual`` on and off alike, so both shift by exactly ``alpha * v``.
* ``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma``, ``olmo``: the down projection is
  built with ``bias=False`` and no config option changes it, so no saved model of the same
  architecture holds the shift.
* ``gemma2``, ``gemma3_text``, ``olmo2``, ``olmo3``: ``post_feedforward_layernorm``
  normalises the MLP output before the residual add, so no bias gives a constant shift.

Layer 0 works for all of the above: Gemma's embedding module multiplies by
``embed_scale`` (the shift is divided by it), and GPT-2's ``wpe`` position term is
untouched. GPT-2 also looks up ``token_type_ids`` in ``wte``; a caller that passes them
gets the shift twice. Tied input and output embeddings are untied in the saved model
(``tie_word_embeddings=False``) so the LM head keeps the original matrix.

The baked model shares every unchanged tensor with the original (it is built on the meta
device and given the original tensors); nothing of the original is modified.
"""

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from personalab.errors import InvalidInputError, UnsupportedArchitectureError
from personalab.layers import check_layers, check_vector
from personalab.model import KNOWN_BLOCK_PATHS, ModelHandle, unwrap

BIAS_MODULES: dict[str, str] = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
"""Per model type, the MLP output projection (inside a block) whose bias shifts the block output."""

EMBEDDING_LOOKUP: frozenset[str] = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "olmo3", "phi3"}
    | {"gpt2", "gpt_neox"}
)
"""Model types whose ``hidden_states[0]`` is ``scale * E[token]`` plus position terms that do not use ``E``."""

_SCALED_EMBEDDINGS = frozenset({"gemma", "gemma2", "gemma3_text"})
_NO_MLP_BIAS = frozenset({"mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo"})
_MLP_POST_NORM = frozenset({"gemma2", "gemma3_text", "olmo2", "olmo3"})
_DISTILL = "distill the vector instead (personalab distill)"


@dataclass
class _Plan:
    """Tensors to swap into the baked model, by state-dict key, and config changes."""

    method: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _unsupported_layer(model_type: str, layer: int) -> UnsupportedArchitectureError:
    if model_type in _MLP_POST_NORM:
        why = "normalises the MLP output (post_feedforward_layernorm) before the residual add"
    elif model_type in _NO_MLP_BIAS:
        why = "has no bias on its MLP down projection (transformers fixes bias=False, with no mlp_bias option)"
    else:
        return UnsupportedArchitectureError(
            f"exact baking at layer {layer} is verified for {', '.join(BIAS_MODULES)} only, not {model_type}; "
            f"{_DISTILL}"
        )
    return UnsupportedArchitectureError(
        f"{model_type} {why}, so no saved {model_type} model reproduces a constant shift at layer {layer}; {_DISTILL}"
    )


def _bias_plan(handle: ModelHandle, model: PreTrainedModel, layer: int, shift: torch.Tensor) -> _Plan:
    model_type = model.config.model_type
    if model_type not in BIAS_MODULES or handle.blocks_path != KNOWN_BLOCK_PATHS[model_type]:
        raise _unsupported_layer(model_type, layer)
    block = layer - 1
    path = f"{handle.blocks_path}.{block}.{BIAS_MODULES[model_type]}"
    projection = model.get_submodule(path)
    plan = _Plan(method=f"bias on {path}")
    if projection.bias is None:
        plan.config["mlp_bias"] = True
        for i, each in enumerate(handle.blocks):
            for name in ("gate_proj", "up_proj", "down_proj"):
                linear = each.mlp.get_submodule(name)
                plan.tensors[f"{handle.blocks_path}.{i}.mlp.{name}.bias"] = linear.weight.new_zeros(linear.out_features)
        bias = plan.tensors[f"{path}.bias"]
    else:
        bias = projection.bias.detach()
    plan.tensors[f"{path}.bias"] = (bias.float() + shift.to(bias.device)).to(bias.dtype)
    return plan


def _embedding_plan(model: PreTrainedModel, shift: torch.Tensor) -> _Plan:
    model_type = model.config.model_type
    if model_type not in EMBEDDING_LOOKUP:
        raise UnsupportedArchitectureError(
            f"{model_type} is not one of the architectures whose embedding output is a plain token lookup "
            f"({', '.join(sorted(EMBEDDING_LOOKUP))}), so embedding rows may not reproduce a shift at layer 0; "
            f"{_DISTILL}"
        )
    embedding = model.get_input_embeddings()
    weight = embedding.weight.detach()
    scale = getattr(embedding, "embed_scale", None)
    if model_type in _SCALED_EMBEDDINGS and scale is None:
        raise UnsupportedArchitectureError(
            f"{model_type} scales its embeddings outside the embedding module in this transformers version, "
            f"so the scale to divide by is unknown; {_DISTILL}"
        )
    delta = shift if scale is None else shift / float(scale.to(weight.dtype))
    plan = _Plan(method="embedding rows")
    plan.tensors[f"{_module_name(model, embedding)}.weight"] = weight + delta.to(weight.device, weight.dtype)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) or (
        head is not None and head.weight.data_ptr() == weight.data_ptr()
    ):
        plan.config["tie_word_embeddings"] = False
        plan.tensors[f"{_module_name(model, head)}.weight"] = head.weight.detach()
    return plan


def _rebuilt(model: PreTrainedModel, plan: _Plan) -> PreTrainedModel:
    """A model of the planned config holding ``model``'s tensors (shared, not copied) and the planned ones."""
    config = copy.deepcopy(model.config)
    for key, value in plan.config.items():
        setattr(config, key, value)
    with torch.device("meta"):
        baked = type(model)(config)
    baked.load_state_dict({**model.state_dict(), **plan.tensors}, strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, buffer in list(baked.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            baked.get_submodule(owner)._buffers[leaf] = buffers[name]
    if getattr(config, "tie_word_embeddings", False):
        baked.tie_weights()
    baked.generation_config = copy.deepcopy(model.generation_config)
    return baked.eval()


def vector_sha256(vector: torch.Tensor) -> str:
    """SHA-256 of a ``[hidden]`` vector as contiguous float32 bytes."""
    return hashlib.sha256(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


@torch.no_grad()
def bake_exact(handle: ModelHandle, vector: torch.Tensor, layer: int, alpha: float, out: str | Path) -> Path:
    """Write to ``out`` a model whose plain forward equals ``steer(handle, vector, layer, alpha, "all")``.

    ``vector`` is ``[hidden]`` or per-layer ``[n_blocks + 1, hidden]`` (row ``layer`` is used).
    The folder holds the model, the tokenizer and ``bake.json`` (layer, alpha, method,
    vector_sha256). Raises ``InvalidInputError`` on bad input and
    ``UnsupportedArchitectureError`` where no exact bake exists, before writing anything.
    """
    check_layers(layer, handle.n_blocks)
    v = check_vector(vector, layer, handle.n_blocks, handle.hidden_size).detach().float().cpu()
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InvalidInputError(f"alpha must be a finite number, not {alpha!r}") from None
    if not math.isfinite(alpha):
        raise InvalidInputError(f"alpha must be a finite number, not {alpha}")
    model = handle.model
    if unwrap(model) is not model:
        raise InvalidInputError("the model is wrapped in a peft adapter; merge it first (merge_and_unload)")
    shift = alpha * v
    plan = _embedding_plan(model, shift) if layer == 0 else _bias_plan(handle, model, layer, shift)
    baked = _rebuilt(model, plan)
    out = Path(out)
    baked.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    record = {"layer": layer, "alpha": alpha, "method": plan.method, "vector_sha256": vector_sha256(v)}
    (out / "bake.json").write_text(json.dumps(record, indent=2) + "\n")
    return out

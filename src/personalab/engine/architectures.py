"""What personalab knows per architecture: where the decoder blocks are, and how an exact bake edits the weights.

Block paths: ``find_blocks`` tries the path known for the model type, then common paths, then any ``ModuleList`` as
long as ``num_hidden_layers``.

Weight plans (``weight_plan``, used by ``personalab.methods.bake``): the tensors and config changes that make a model's
plain forward add a constant ``shift`` at layer ``l`` (convention: ``personalab.engine.layers``).

What the transformers modeling code allows, per architecture:

* ``llama``: ``mlp.down_proj(...)`` is added straight to the residual, and the config's
  ``mlp_bias`` option gives the MLP projections biases. The saved model has
  ``mlp_bias=True``, zero biases on every ``gate_proj``, ``up_proj`` and ``down_proj``,
  and ``alpha * v`` on the ``down_proj`` bias of block ``l - 1``.
* ``gpt2`` (``mlp.c_proj``) and ``gpt_neox`` (``mlp.dense_4h_to_h``) have MLP output
  biases already. GPT-NeoX adds the MLP output to the block output directly with
  ``use_parallel_residual`` on and off alike, so both shift by exactly ``alpha * v``.
* ``mistral``, ``qwen2``, ``phi3``: the down projection is built with ``bias=False`` and
  no config option changes it, but each computes exactly what a Llama model computes
  (``phi3`` fuses ``q/k/v`` and ``gate/up`` into one projection each; ``qwen2`` has biases
  on ``q/k/v``). The baked model is re-saved as a ``llama`` model with the same weights
  (fused projections split, zero biases where Llama has one and the original none) and
  the shift on the ``down_proj`` bias. Llama attends to the whole context: a model with a
  sliding attention window is reproduced for sequences up to that window, recorded as
  ``exact_up_to_tokens``. Phi3 models that rotate only part of each head
  (``partial_rotary_factor < 1``) have no Llama equivalent.
* ``qwen3``, ``gemma``, ``olmo``: the down projection is built with ``bias=False`` and no
  Llama-family architecture has their query/key norms, so no saved model holds the shift.
* ``gemma2``, ``gemma3_text``, ``olmo2``, ``olmo3``: ``post_feedforward_layernorm``
  normalises the MLP output before the residual add, so no bias gives a constant shift.

Layer 0 works for all of the above: Gemma's embedding module multiplies by
``embed_scale`` (the shift is divided by it), and GPT-2's ``wpe`` position term is
untouched. GPT-2 also looks up ``token_type_ids`` in ``wte``; a caller that passes them
gets the shift twice. Tied input and output embeddings are untied in the saved model
(``tie_word_embeddings=False``) so the LM head keeps the original matrix.
"""

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel

from personalab.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from personalab.engine.handle import ModelHandle

KNOWN_BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "olmo": "model.layers",
    "olmo2": "model.layers",
    "olmo3": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


FALLBACK_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
)


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (modules are shared, so hooks reach both)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _num_hidden_layers(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


def find_blocks(model: nn.Module, blocks_path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, blocks)``: the decoder blocks of ``model``, in order.

    Tries ``blocks_path`` if given, then the known path for the model type, then
    common paths, then any ``nn.ModuleList`` as long as ``config.num_hidden_layers``.
    """
    inner = unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    candidates = [blocks_path] if blocks_path else []
    if model_type in KNOWN_BLOCK_PATHS:
        candidates.append(KNOWN_BLOCK_PATHS[model_type])
    candidates += [p for p in FALLBACK_BLOCK_PATHS if p not in candidates]
    for path in candidates:
        try:
            module = inner.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    n_layers = _num_hidden_layers(inner)
    if n_layers:
        for name, module in inner.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == n_layers:
                return name, module
    raise UnsupportedArchitectureError(
        f"cannot find the decoder blocks of {type(inner).__name__} (model_type={model_type!r}); "
        f"tried {', '.join(candidates)} and any ModuleList of num_hidden_layers={n_layers}; "
        f"pass blocks_path='<attribute path of the block list>'"
    )


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream: ``hidden_size`` of the text config, else the embedding width."""
    inner = unwrap(model)
    hidden = getattr(inner.config.get_text_config(), "hidden_size", None)
    return int(hidden or inner.get_input_embeddings().embedding_dim)


BIAS_MODULES: dict[str, str] = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "gpt_neox": "mlp.dense_4h_to_h"}
"""Per model type, the MLP output projection (inside a block) whose bias shifts the block output."""
FINAL_NORMS: dict[str, str] = {"gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}
"""Per model type, the final norm whose bias shifts ``hidden_states[n_blocks]``."""

EMBEDDING_LOOKUP: frozenset[str] = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "olmo3", "phi3"}
    | {"gpt2", "gpt_neox"}
)
"""Model types whose ``hidden_states[0]`` is ``scale * E[token]`` plus position terms that do not use ``E``."""

_SCALED_EMBEDDINGS = frozenset({"gemma", "gemma2", "gemma3_text"})
_AS_LLAMA = frozenset({"mistral", "qwen2", "phi3"})
_NO_MLP_BIAS = frozenset({"qwen3", "gemma", "olmo"})
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "original_max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "rope_parameters",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "dtype",
)
_MLP_POST_NORM = frozenset({"gemma2", "gemma3_text", "olmo2", "olmo3"})
_DISTILL = "distill the vector instead (personalab distill)"


@dataclass
class WeightPlan:
    """Tensors to swap into the baked model, by state-dict key, and config changes."""

    method: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, object] = field(default_factory=dict)
    target: PretrainedConfig | None = None
    """Config of another architecture the model is re-saved as (``tensors`` then hold every weight)."""
    exact_up_to_tokens: int | None = None


def _module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _unsupported_layer(model_type: str, layer: int) -> UnsupportedArchitectureError:
    if model_type in _MLP_POST_NORM:
        why = "normalises the MLP output (post_feedforward_layernorm) before the residual add"
    elif model_type in _NO_MLP_BIAS:
        why = (
            "has no bias on its MLP down projection (transformers fixes bias=False, with no mlp_bias option) "
            "and no Llama equivalent"
        )
    else:
        return UnsupportedArchitectureError(
            f"exact baking at layer {layer} is verified for {', '.join(BIAS_MODULES)} only, not {model_type}; "
            f"{_DISTILL}"
        )
    return UnsupportedArchitectureError(
        f"{model_type} {why}, so no saved {model_type} model reproduces a constant shift at layer {layer}; {_DISTILL}"
    )


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window of a model that uses one on any layer, else ``None``."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window


def _llama_config(config: PretrainedConfig) -> LlamaConfig:
    """The Llama config computing what a mistral, qwen2 or phi3 ``config`` computes, with MLP biases."""
    rotary = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
    if rotary != 1.0:
        raise UnsupportedArchitectureError(
            f"{config.model_type} rotates only part of each attention head (partial_rotary_factor={rotary}), "
            f"which no Llama model does, so no saved model reproduces a constant shift; {_DISTILL}"
        )
    fields = {key: getattr(config, key) for key in _LLAMA_FIELDS if getattr(config, key, None) is not None}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return LlamaConfig(**fields, head_dim=head_dim, attention_bias=config.model_type == "qwen2", mlp_bias=True)


def _llama_tensors(model: PreTrainedModel, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """``model``'s weights under ``LlamaForCausalLM`` keys: fused projections split (copied), a zero
    bias on every MLP projection (and attention projection under ``config.attention_bias``) that
    has none; every other tensor shared."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        if prefix.endswith("self_attn.qkv_proj"):
            parts = tensor.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            base = prefix.removesuffix("qkv_proj")
            tensors.update({f"{base}{name}_proj.{leaf}": part.clone() for name, part in zip("qkv", parts, strict=True)})
        elif prefix.endswith("mlp.gate_up_proj"):
            gate, up = tensor.chunk(2)
            base = prefix.removesuffix("gate_up_proj")
            tensors.update({f"{base}gate_proj.{leaf}": gate.clone(), f"{base}up_proj.{leaf}": up.clone()})
        else:
            tensors[key] = tensor
    biased = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if config.attention_bias:
        biased += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    for block in range(config.num_hidden_layers):
        for name in biased:
            weight = tensors[f"model.layers.{block}.{name}.weight"]
            tensors.setdefault(f"model.layers.{block}.{name}.bias", weight.new_zeros(weight.shape[0]))
    return tensors


def _shifted(bias: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``bias + shift``, added in float32 and stored in the bias's dtype."""
    return (bias.float() + shift.to(bias.device)).to(bias.dtype)


def _final_norm_plan(model: PreTrainedModel, layer: int, shift: torch.Tensor) -> WeightPlan:
    model_type = model.config.model_type
    path = FINAL_NORMS.get(model_type)
    bias = getattr(model.get_submodule(path), "bias", None) if path else None
    if bias is None:
        raise UnsupportedArchitectureError(
            f"{model_type}: layer {layer} is hidden_states[{layer}], after the final norm, which has no bias here, "
            f"so no saved model reproduces a constant shift there; bake at a layer below {layer} or {_DISTILL}"
        )
    plan = WeightPlan(method=f"bias on {path}")
    plan.tensors[f"{path}.bias"] = _shifted(bias.detach(), shift)
    return plan


def bias_plan(handle: "ModelHandle", model: PreTrainedModel, layer: int, shift: torch.Tensor) -> WeightPlan:
    model_type = model.config.model_type
    if layer == handle.n_blocks:
        return _final_norm_plan(model, layer, shift)
    if model_type in _AS_LLAMA and handle.blocks_path == "model.layers":
        target = _llama_config(model.config)
        path = f"model.layers.{layer - 1}.mlp.down_proj"
        plan = WeightPlan(method=f"bias on {path} of a llama model re-saved from {model_type}", target=target)
        plan.tensors = _llama_tensors(model, target)
        plan.exact_up_to_tokens = _sliding_window(model.config)
    elif model_type in BIAS_MODULES and handle.blocks_path == KNOWN_BLOCK_PATHS[model_type]:
        path = f"{handle.blocks_path}.{layer - 1}.{BIAS_MODULES[model_type]}"
        plan = WeightPlan(method=f"bias on {path}")
        bias = model.get_submodule(path).bias
        if bias is None:
            plan.config["mlp_bias"] = True
            plan.tensors = _llama_tensors(model, model.config)
        else:
            plan.tensors[f"{path}.bias"] = bias.detach()
    else:
        raise _unsupported_layer(model_type, layer)
    plan.tensors[f"{path}.bias"] = _shifted(plan.tensors[f"{path}.bias"], shift)
    return plan


def embedding_plan(model: PreTrainedModel, shift: torch.Tensor) -> WeightPlan:
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
    plan = WeightPlan(method="embedding rows")
    plan.tensors[f"{_module_name(model, embedding)}.weight"] = weight + delta.to(weight.device, weight.dtype)
    head = model.get_output_embeddings()
    if getattr(model.config, "tie_word_embeddings", False) or (
        head is not None and head.weight.data_ptr() == weight.data_ptr()
    ):
        plan.config["tie_word_embeddings"] = False
        plan.tensors[f"{_module_name(model, head)}.weight"] = head.weight.detach()
    return plan


def rebuilt(model: PreTrainedModel, plan: WeightPlan) -> PreTrainedModel:
    """A model of the planned config holding ``model``'s tensors (shared, not copied) and the planned ones."""
    config = copy.deepcopy(plan.target or model.config)
    for key, value in plan.config.items():
        setattr(config, key, value)
    with torch.device("meta"):
        baked = type(model)(config) if plan.target is None else AutoModelForCausalLM.from_config(config)
    tensors = plan.tensors if plan.target is not None else {**model.state_dict(), **plan.tensors}
    baked.load_state_dict(tensors, strict=True, assign=True)
    buffers = dict(model.named_buffers())
    for name, buffer in list(baked.named_buffers()):
        if buffer.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            baked.get_submodule(owner)._buffers[leaf] = buffers[name]
    if getattr(config, "tie_word_embeddings", False):
        baked.tie_weights()
    baked.generation_config = copy.deepcopy(model.generation_config)
    return baked.eval()


def weight_plan(handle: "ModelHandle", model: PreTrainedModel, layer: int, shift: torch.Tensor) -> WeightPlan:
    """The plan that adds ``shift`` ``[hidden]`` at ``layer`` of ``model`` (``handle``'s): embedding rows at layer 0,
    else an MLP output bias (or the final norm's at ``n_blocks``); ``UnsupportedArchitectureError`` where none is
    exact."""
    return embedding_plan(model, shift) if layer == 0 else bias_plan(handle, model, layer, shift)

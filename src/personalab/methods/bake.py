"""Exact baking: write a model whose plain forward equals steering on all positions.

Steering at layer ``1 <= l < n_blocks`` on every position adds the constant ``alpha * v`` to
the output of block ``l - 1`` (convention in ``personalab.engine.layers``). When that block ends
with ``h + mlp(...)`` and the MLP ends with a linear projection ``W x + b``, the same
shift is ``b -> b + alpha * v`` on that projection: no training, and exact up to float
rounding. At ``l = n_blocks`` the shift is on ``hidden_states[n_blocks]``, after the final
norm: the bias of that norm where it has one (``gpt2``'s ``ln_f``, ``gpt_neox``'s
``final_layer_norm``); the RMS norms of the other architectures have none, so they are refused
there. At ``l = 0`` the shift is on the embedding output; when that output is
``scale * E[token] (+ position terms)`` it is ``E[t] -> E[t] + alpha * v / scale`` on every
row of the input embedding matrix. Padding positions, which steering leaves alone, are
shifted too, but attention masks them out, so every real position is unchanged. Which architectures allow which
edit, and the plans themselves: ``personalab.engine.architectures``.

The baked model shares every unchanged tensor with the original (it is built on the meta
device and given the original tensors); nothing of the original is modified.
"""

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel

from personalab.console import say
from personalab.engine.architectures import rebuilt, unwrap, weight_plan
from personalab.engine.chat import TokenSequence
from personalab.engine.forward import next_token_logits
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import add_vector
from personalab.engine.layers import check_layers, check_vector
from personalab.engine.scale import DEFAULT_SCALE, Scale, scaled_vector
from personalab.errors import InvalidInputError
from personalab.hashes import vector_sha256
from personalab.runfolder import claim, model_settings
from personalab.traits import calibration_prompts

CHECKED_PROMPTS = 8
"""Calibration prompts on which a bake is checked against steering."""


def largest_logit_difference(
    handle: ModelHandle,
    baked: PreTrainedModel,
    v: torch.Tensor,
    layer: int,
    alpha: float,
    prompts: Sequence[TokenSequence],
) -> float:
    """Largest ``|logit|`` difference, over the next-token logits of ``prompts``, between ``baked``'s plain forward
    and ``handle`` steered with ``alpha * v`` at ``layer`` on every position."""
    twin = ModelHandle.from_model(baked, handle.tokenizer, name=handle.name)
    ids = [list(p.ids) for p in prompts]
    with add_vector(handle, v, layer, alpha, "all"):
        steered = {tuple(rows): logits for rows, logits in next_token_logits(handle, ids)}
    plain = {tuple(rows): logits for rows, logits in next_token_logits(twin, ids)}
    return max(float((plain[rows] - steered[rows]).abs().max()) for rows in steered)


@torch.no_grad()
def bake_exact(
    handle: ModelHandle,
    vector: torch.Tensor,
    layer: int,
    alpha: float,
    out: str | Path,
    scale: Scale = DEFAULT_SCALE,
    progress: bool = True,
) -> Path:
    """Write to ``out`` a model whose plain forward equals ``add_vector(handle, v, layer, alpha, "all")``,
    with ``v`` the vector under ``scale`` (``personalab.engine.scale``).

    ``vector`` is ``[hidden]`` or per-layer ``[n_blocks + 1, hidden]`` (row ``layer`` is used).
    The folder holds the model, the tokenizer and ``bake.json`` (layer, alpha, method,
    vector_sha256 of ``v``, the scale record, and ``exact_up_to_tokens`` where a sliding window
    bounds the equality). Raises ``InvalidInputError`` on bad input and
    ``UnsupportedArchitectureError`` where no exact bake exists, before writing anything.
    """
    check_layers(layer, handle.n_blocks)
    check_vector(vector, layer, handle.n_blocks, handle.hidden_size)
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise InvalidInputError(f"alpha must be a finite number, not {alpha!r}") from None
    if not math.isfinite(alpha):
        raise InvalidInputError(f"alpha must be a finite number, not {alpha}")
    model = handle.model
    if unwrap(model) is not model:
        raise InvalidInputError("the model is wrapped in a peft adapter; merge it first (merge_and_unload)")
    settings = {**model_settings(handle), "vector_sha256": vector_sha256(vector), "layer": layer, "alpha": alpha}
    scaled = scaled_vector(handle, vector, layer, scale, calibration_prompts(handle))
    v = scaled.vector.detach().float().cpu()
    say(scaled.describe([alpha]), progress)
    shift = alpha * v
    plan = weight_plan(handle, model, layer, shift)
    baked = rebuilt(model, plan)
    checked = calibration_prompts(handle)[:CHECKED_PROMPTS]
    difference = largest_logit_difference(handle, baked, v, layer, alpha, checked)
    say(f"check: largest |logit difference| against steering, on {len(checked)} calibration prompts: "
        f"{difference:.3g}", progress)  # fmt: skip
    out = Path(out)
    run = claim(out, "bake", {**settings, "scale": scale})
    baked.save_pretrained(out)
    handle.tokenizer.save_pretrained(out)
    record = {
        "layer": layer,
        "alpha": alpha,
        "method": plan.method,
        "vector_sha256": vector_sha256(v),
        "steering": scaled.record([alpha]),
        "check": {
            "prompts": len(checked),
            "max_abs_logit_difference": difference,
            "against": "the original model steered with alpha * v at every position (next-token logits)",
        },
    }
    if plan.exact_up_to_tokens is not None:
        record["exact_up_to_tokens"] = plan.exact_up_to_tokens
    (out / "bake.json").write_text(json.dumps(record, indent=2) + "\n")
    run.write(model=handle.name, revision=handle.revision, **record)
    return out

"""Reference computations that use transformers directly, not personalab's hooks."""

import sqlite3

import numpy as np
import torch
from torch import nn

from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle


@torch.no_grad()
def hidden_states(handle: ModelHandle, seq: TokenSequence) -> torch.Tensor:
    """``[n_blocks + 1, len(ids), hidden]`` from ``output_hidden_states=True`` on one unpadded sequence."""
    ids = torch.tensor([seq.ids])
    out = handle.model(input_ids=ids, output_hidden_states=True)
    return torch.stack(out.hidden_states)[:, 0].float()


@torch.no_grad()
def logits(handle: ModelHandle, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    position_ids = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    return handle.model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits.float()


def encode_all(handle: ModelHandle, conversations) -> list[TokenSequence]:
    return [handle.encode(system, user, answer) for system, user, answer in conversations]


def hook_counts(handle: ModelHandle) -> list[int]:
    """Number of hooks on every module of the model (transformers keeps some of its own)."""
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in handle.model.modules()
    ]


FINAL_NORMS = {
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
    "gemma3": "model.language_model.norm",
}
"""Where each architecture's final norm sits (``model.norm`` for the rest)."""


def output_module(handle: ModelHandle, layer: int) -> nn.Module:
    """The module whose output is ``hidden_states[layer]`` (``layer >= 1``): block ``layer - 1``, or at
    ``layer = n_blocks`` the final norm, found by name, not through personalab."""
    if layer < handle.n_blocks:
        return handle.blocks[layer - 1]
    model_type = handle.model.config.model_type
    return handle.model.get_submodule(FINAL_NORMS.get(model_type, "model.norm"))


def direct_token_norms(handle: ModelHandle, layers: list[int]) -> np.ndarray:
    """``[len(layers), n_tokens]``: L2 norms of hidden_states[layer] at every token of the calibration questions, one
    prompt at a time."""
    from personalab.traits import library_questions

    norms = [hidden_states(handle, handle.encode(None, q))[layers].norm(dim=-1) for q in library_questions()]
    return torch.cat(norms, dim=1).double().numpy()


def direct_residual_norm(handle: ModelHandle, layer: int) -> float:
    """The normalised scale's ``r`` computed directly: numpy's median of ``direct_token_norms``."""
    return float(np.median(direct_token_norms(handle, [layer])[0]))


def stored_rows(db_path, table: str) -> int:
    """Rows in a table of a store that another process may be creating (0 until the table exists)."""
    try:
        with sqlite3.connect(db_path, timeout=1) as db:
            return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.Error:
        return 0

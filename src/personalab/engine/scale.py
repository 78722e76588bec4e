"""Steering coefficients: one convention for ``alpha`` in every command.

* ``raw``: ``alpha * v`` with ``v`` as stored (as in the public persona-vectors code), so the
  effect of an ``alpha`` depends on the vector's norm at that layer;
* ``normalised``: ``alpha * u * r`` with ``u`` the unit vector and ``r`` the model's typical
  residual norm at that layer: the **median** L2 norm of ``hidden_states[layer]`` over every token
  of a calibration prompt set (``typical_residual_norm``). ``alpha`` is a fraction of a typical
  token's residual, which is how vectors transfer between layers, checkpoints and models.

``r`` is a median, not a mean, because real checkpoints (Llama, Qwen, Mistral, SmolLM2) put a
massive activation on an attention-sink token, usually position 0: on SmolLM2-135M-Instruct its
norm is about 25,000 from layer ~10 on against a median of 162 at layer 15, so a mean over tokens
is 3-4x a typical token's norm, and so would be every alpha. The median is that of every token of
every prompt (the template's tokens included); a sink is one token of each prompt, so it cannot move it.

Either way ``r`` is measured, so a command can say how large the added vector is against the residual
before it starts (``ScaledVector.describe``) and record it (``ScaledVector.record``).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BeforeValidator

from personalab.engine.capture import capture
from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import check_layers, check_vector
from personalab.errors import InvalidInputError

SCALES = ("raw", "normalised")
SPELLINGS = {"normalized": "normalised"}
DEFAULT_SCALE = "normalised"
"""The scale of every ``alpha`` that is given without one (every command, and Python alike)."""


def check_scale(name: str) -> str:
    """``name`` as one of ``SCALES`` (``normalized`` is accepted for ``normalised``); else a one-line error."""
    name = SPELLINGS.get(name, name)
    if name not in SCALES:
        raise InvalidInputError(f"unknown scale {name!r}; use raw or normalised")
    return name


Scale = Annotated[Literal["raw", "normalised"], BeforeValidator(lambda v: SPELLINGS.get(v, v))]
"""A scale name in a config: ``raw`` or ``normalised`` (``normalized`` accepted)."""


RESIDUAL_NORM = "median"
"""The statistic of the per-token residual norms that ``r`` is (recorded with every scale)."""


def token_norms(handle: ModelHandle, prompts: Sequence[TokenSequence], layers: Sequence[int]) -> torch.Tensor:
    """float32 ``[len(layers), n_tokens]``: the L2 norm of ``hidden_states[layer]`` at every token of ``prompts``.

    Layers follow ``personalab.engine.layers``: at ``l = n_blocks`` this is the norm after the final norm.
    """
    layers = check_layers(layers, handle.n_blocks)
    return torch.cat(capture(handle, prompts, layers=layers, positions="all", reduce="norm"), dim=1)


def typical_residual_norm(handle: ModelHandle, prompts: Sequence[TokenSequence], layers: Sequence[int]) -> list[float]:
    """The normalised scale's ``r``: the median L2 norm of the residual over every token of ``prompts``, one value
    per layer of ``layers`` (the mean of the two middle norms for an even count)."""
    norms = token_norms(handle, prompts, layers).double()
    return torch.quantile(norms, 0.5, dim=1).tolist()


def mean_residual_norm(handle: ModelHandle, prompts: Sequence[TokenSequence], layers: Sequence[int]) -> list[float]:
    """Mean L2 norm of the residual over every token of ``prompts``, one value per layer of ``layers``: the
    pretraining-tracing reference's ``mean_l2`` (its geometry's relative norms), sink tokens included."""
    return token_norms(handle, prompts, layers).mean(dim=1).tolist()


def projection_stats(
    handle: ModelHandle, direction: torch.Tensor, layer: int, prompts: Sequence[TokenSequence]
) -> tuple[float, float]:
    """``(mean, std)`` of the projection of ``hidden_states[layer]`` onto the unit ``direction`` (``[hidden]`` or
    per-layer) over every token of ``prompts``: the typical value a clamp replaces."""
    layer = check_layers(layer, handle.n_blocks)[0]
    row = check_vector(direction, layer, handle.n_blocks, handle.hidden_size).float()
    if row.norm() == 0:
        raise InvalidInputError(f"the direction at layer {layer} is all zeros")
    gathered = capture(handle, prompts, layers=[layer], positions="all", reduce="gather")
    values = torch.cat([g[0] for g in gathered]) @ (row / row.norm())
    return float(values.mean()), float(values.std())


@dataclass(frozen=True)
class ScaledVector:
    """What ``alpha = 1`` adds at ``layer`` (``vector``, float32 ``[hidden]``) under ``scale``, the norm
    of the vector as given at that layer (``source_norm``, ``|v|``), and the typical (median token) residual
    norm ``r`` at that layer over ``n_prompts`` calibration prompts."""

    layer: int
    scale: Scale
    vector: torch.Tensor
    residual_norm: float
    n_prompts: int
    source_norm: float

    def added_norm(self, alpha: float) -> float:
        """``|alpha * vector|``."""
        return abs(alpha) * float(self.vector.norm())

    def ratio(self, alpha: float) -> float:
        """``|alpha * vector|`` over the typical residual norm."""
        return self.added_norm(alpha) / self.residual_norm

    def describe(self, alphas: Sequence[float]) -> str:
        """One line: the norm of each added vector and its ratio to the typical residual norm."""
        parts = ", ".join(f"alpha {a:g}: {self.added_norm(a):.4g} ({self.ratio(a):.3g}x)" for a in alphas)
        return (
            f"layer {self.layer}, {self.scale} scale: |alpha * v| = {parts} "
            f"of the median token residual norm {self.residual_norm:.4g}"
        )

    def record(self, alphas: Sequence[float]) -> dict:
        """What ``meta.json`` records of the scale: ``vector_norm`` is ``|v|`` as given, ``unit_added_norm``
        what ``alpha = 1`` adds (``|v|`` on the raw scale, the residual norm on the normalised one)."""
        return {
            "layer": self.layer,
            "scale": self.scale,
            "residual_norm": self.residual_norm,
            "residual_norm_statistic": f"{RESIDUAL_NORM} over tokens",
            "calibration_prompts": self.n_prompts,
            "vector_norm": self.source_norm,
            "unit_added_norm": float(self.vector.norm()),
            "added": [{"alpha": a, "norm": self.added_norm(a), "ratio": self.ratio(a)} for a in alphas],
        }


def scale_vectors(
    handle: ModelHandle,
    vector: torch.Tensor,
    layers: Sequence[int],
    scale: Scale,
    prompts: Sequence[TokenSequence],
) -> dict[int, ScaledVector]:
    """``ScaledVector`` of ``vector`` (``[hidden]`` or per-layer) at each of ``layers``, from one capture pass."""
    scale = check_scale(scale)
    if not prompts:
        raise InvalidInputError("measuring the residual norm needs a calibration prompt set; pass at least one")
    layers = check_layers(layers, handle.n_blocks)
    rows = {layer: check_vector(vector, layer, handle.n_blocks, handle.hidden_size).float() for layer in layers}
    zero = [layer for layer, v in rows.items() if v.norm() == 0]
    if zero:
        raise InvalidInputError(
            f"vector at layer {zero[0]} is all zeros, so steering there adds nothing; pick a layer where it is not "
            f"(an SAE feature lives at its SAE's layer only)"
        )
    norms = typical_residual_norm(handle, prompts, layers)
    out = {}
    for layer, norm in zip(layers, norms, strict=True):
        v = rows[layer] if scale == "raw" else rows[layer] / rows[layer].norm() * norm
        out[layer] = ScaledVector(layer, scale, v, norm, len(prompts), float(rows[layer].norm()))
    return out


def scaled_vector(
    handle: ModelHandle, vector: torch.Tensor, layer: int, scale: Scale, prompts: Sequence[TokenSequence]
) -> ScaledVector:
    """``scale_vectors`` at one layer."""
    return scale_vectors(handle, vector, [layer], scale, prompts)[layer]

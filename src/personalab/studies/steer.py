"""Steered answers beside unsteered ones (``personalab steer``): one intervention at one layer, adding the scaled
vector (``alpha``, ``personalab.engine.scale``), projecting the direction out (``ablate``) or setting its projection
(``clamp``), and each prompt answered with and without it from the same seed."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from personalab.console import say
from personalab.engine import generation
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Ablate, Clamp, Steer
from personalab.engine.layers import check_layers
from personalab.engine.positions import PositionName
from personalab.engine.scale import DEFAULT_SCALE, Scale, projection_stats, scaled_vector
from personalab.traits import calibration_prompts


class SteerConfig(BaseModel):
    """What ``personalab steer`` does at one layer, and how it samples."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    layer: int = Field(description="Layer l (hidden_states[l]: 0 = embeddings, l = output of block l-1).")
    alpha: float | None = Field(None, description="Steering alpha (see `scale`); default 1 when adding.")
    positions: PositionName = Field("generating", description="Where the intervention acts.")
    scale: Scale = Field(DEFAULT_SCALE, description="normalised (alpha x the layer's typical residual norm) or raw.")
    ablate: bool = Field(False, description="Project the direction out instead of adding it.")
    clamp: float | None = Field(None, description="Set the projection onto the direction to this value.")
    system: str | None = Field(None, description="System prompt.")
    prompt_format: str | None = Field(None, description="chat, plain or continuation (default: the model's).")
    sampling: generation.SamplingParams = Field(
        generation.SamplingParams(temperature=0.0, max_new_tokens=128), description="Sampling of both answers."
    )

    @model_validator(mode="after")
    def _one_intervention(self) -> "SteerConfig":
        if self.ablate and self.clamp is not None:
            raise ValueError("choose one of `ablate` and `clamp`")
        if self.alpha is not None and (self.ablate or self.clamp is not None):
            raise ValueError("`alpha` sets how much is added; `ablate` and `clamp` add nothing: drop `alpha`")
        return self


@dataclass(frozen=True)
class SteeredAnswer:
    """One prompt's answers without and with the intervention (``label`` says which)."""

    prompt: str
    unsteered: str
    steered: str
    label: str


def intervention(handle: ModelHandle, direction: torch.Tensor, config: SteerConfig) -> tuple[object, str]:
    """``(intervention, label)`` of ``config`` with ``direction`` (``[hidden]`` or ``[n_blocks + 1, hidden]``) on
    ``handle``; logs the clamp's typical projection or the scale's record."""
    layer = check_layers(config.layer, handle.n_blocks)[0]
    if config.ablate:
        return Ablate(layer, direction, config.positions), "ablated"
    if config.clamp is not None:
        mean, std = projection_stats(handle, direction, layer, calibration_prompts(handle))
        say(f"layer {layer}: the projection onto the unit direction is {mean:.4g} +- {std:.4g} (mean +- std over "
            f"every token of the calibration prompts); clamped to {config.clamp:g}")  # fmt: skip
        return Clamp(layer, direction, config.clamp, config.positions), f"projection clamped to {config.clamp:g}"
    alpha = 1.0 if config.alpha is None else config.alpha
    scaled = scaled_vector(handle, direction, layer, config.scale, calibration_prompts(handle))
    say(scaled.describe([alpha]))
    return Steer(layer, scaled.vector, alpha, config.positions), f"alpha {alpha:g} ({config.scale} scale)"


def prompt_format(handle: ModelHandle, config: SteerConfig) -> str:
    """The prompt format of ``config`` (the model's default when unset), checked against the model and logged."""
    chosen = config.prompt_format or handle.chat.default_format
    handle.chat.check_format(chosen)
    say(f"prompt format: {handle.chat.describe(chosen)}")
    return chosen


def steered_answers(
    handle: ModelHandle, prompts: Iterable[str], config: SteerConfig, applied: object, label: str, chosen_format: str
) -> Iterator[SteeredAnswer]:
    """Each prompt answered without and with the intervention ``applied``, both from the sampling's seed, as soon as
    it is done (``prompts`` may be read lazily, one line at a time)."""
    seed = config.sampling.seed
    for text in prompts:
        seq = handle.encode_prompt(chosen_format, config.system, text)
        (plain,) = generation.sample(handle, [seq], config.sampling, seed)
        (steered,) = generation.sample(handle, [seq], config.sampling, seed, (applied,))
        yield SteeredAnswer(text, plain.text, steered.text, label)

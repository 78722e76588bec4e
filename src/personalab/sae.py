"""Sparse autoencoders in the SAELens format: loading, the layer they read, encoding.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``. Encoding follows SAELens:

* ``x' = x - b_dec`` when ``apply_b_dec_to_input`` (default true), else ``x``; with ``normalize_activations``
  ``"constant_norm_rescale"`` the input is first scaled to norm ``sqrt(d_in)`` per token;
* ``pre = x' @ W_enc + b_enc``;
* ``standard``: ``relu(pre)``; ``jumprelu``: ``relu(pre) * (pre > threshold)``; ``topk``: the ``k`` largest
  entries of ``pre``, through a ReLU, the rest 0.

The layer (``personalab.engine.layers``: layer ``l`` is ``hidden_states[l]``): ``blocks.L.hook_resid_post`` and a
module output ``model.layers.L`` are the output of block ``L``, layer ``L + 1``; ``blocks.L.hook_resid_pre`` is its
input, layer ``L``. Any other hook point does not read the residual stream and is refused.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from personalab.errors import InvalidInputError

ARCHITECTURES = ("standard", "jumprelu", "topk")
_POST = re.compile(r"^(?:blocks\.(\d+)\.hook_resid_post|(?:model\.)?layers\.(\d+))$")
_PRE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


def hook_layer(hook_name: str) -> int:
    """personalab's layer of an SAE's hook point (see the module docstring)."""
    if found := _POST.match(hook_name):
        return int(found.group(1) or found.group(2)) + 1
    if found := _PRE.match(hook_name):
        return int(found.group(1))
    raise InvalidInputError(
        f"the SAE reads {hook_name!r}, not the residual stream; give an SAE of blocks.L.hook_resid_post, "
        f"blocks.L.hook_resid_pre or model.layers.L"
    )


@dataclass
class SAE:
    """A loaded sparse autoencoder; ``layer`` in personalab's convention, ``W_dec`` rows the feature directions."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    architecture: str
    layer: int
    hook_name: str
    threshold: torch.Tensor | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize: str = "none"
    source: str = ""

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` of residual activations ``x [..., d_in]`` (float32)."""
        x = x.float()
        if self.normalize == "constant_norm_rescale":
            x = x * math.sqrt(self.d_in) / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return torch.relu(pre)

    def check_fits(self, n_blocks: int, hidden: int) -> None:
        """Refuse, in one line, an SAE whose width or layer does not fit a model of ``n_blocks`` x ``hidden``."""
        if self.d_in != hidden:
            raise InvalidInputError(f"the SAE reads {self.d_in} dimensions but the model's residual has {hidden}")
        if self.layer > n_blocks:
            raise InvalidInputError(f"the SAE reads layer {self.layer} but the model has layers 0..{n_blocks}")


def load_sae(folder: str | Path) -> SAE:
    """The SAE of a SAELens folder (``cfg.json`` and ``sae_weights.safetensors``); one-line errors for what does
    not fit the format."""
    folder = Path(folder)
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise InvalidInputError(f"{folder} is not a SAELens folder (cfg.json and sae_weights.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise InvalidInputError(f"{folder}: architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize not in ("none", "constant_norm_rescale"):
        raise InvalidInputError(
            f"{folder}: normalize_activations {normalize!r} is not supported (none, constant_norm_rescale)"
        )
    hook_name = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    if not hook_name:
        raise InvalidInputError(f"{folder}/cfg.json names no hook_name")
    tensors = {name: t.float() for name, t in load_file(str(weights_path)).items()}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(tensors) | (
        {"threshold"} - set(tensors) if architecture == "jumprelu" else set()
    )
    if missing:
        raise InvalidInputError(f"{weights_path} has no {', '.join(sorted(missing))}")
    d_in, d_sae = tensors["W_enc"].shape
    if (
        tensors["W_dec"].shape != (d_sae, d_in)
        or tensors["b_dec"].shape != (d_in,)
        or tensors["b_enc"].shape != (d_sae,)
    ):
        raise InvalidInputError(
            f"{weights_path}: W_enc {tuple(tensors['W_enc'].shape)} does not match W_dec, b_enc, b_dec"
        )
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if architecture == "topk" and not k:
        raise InvalidInputError(f"{folder}/cfg.json: a topk SAE needs k")
    return SAE(
        tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], architecture, hook_layer(hook_name),
        hook_name, tensors.get("threshold"), int(k) if k else None, bool(cfg.get("apply_b_dec_to_input", True)),
        normalize, str(folder),
    )  # fmt: skip

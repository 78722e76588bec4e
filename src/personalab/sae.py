"""Sparse autoencoders in the SAELens format: loading, the layer they read, encoding.

A folder holds ``cfg.json`` and ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``. Encoding follows SAELens:

* the input is first normalised per token as ``normalize_activations`` says: ``"constant_norm_rescale"`` scales
  it to norm ``sqrt(d_in)``; ``"layer_norm"`` subtracts its mean and divides by its (unbiased) standard deviation
  plus ``1e-5``; ``"none"`` leaves it (``"expected_average_only_in"`` needs a dataset's scaling factor that the
  folder does not hold, and is refused);
* ``x' = x - b_dec`` when ``apply_b_dec_to_input`` (default true), else ``x``;
* ``pre = x' @ W_enc + b_enc``; for ``topk`` with ``rescale_acts_by_decoder_norm``, times each decoder row's norm;
* ``standard``: ``relu(pre)``; ``jumprelu``: ``relu(pre) * (pre > threshold)``; ``topk``: the ``k`` largest
  entries of ``pre``, through a ReLU, the rest 0.

``sae-lens:RELEASE/ID`` names a pretrained SAE of SAELens's directory, loaded through ``sae_lens`` (the ``sae``
extra) and read the same way.

The layer (``personalab.engine.layers``: layer ``l`` is ``hidden_states[l]``): ``blocks.L.hook_resid_post`` and a
module output ``model.layers.L`` are the output of block ``L``, layer ``L + 1``; ``blocks.L.hook_resid_pre`` is its
input, layer ``L``. Any other hook point does not read the residual stream and is refused.
"""

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from personalab.errors import InvalidInputError

ARCHITECTURES = ("standard", "jumprelu", "topk")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
RELEASE_PREFIX = "sae-lens:"
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
    rescale_by_decoder_norm: bool = False
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
        elif self.normalize == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.rescale_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.architecture == "topk":
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return torch.relu(pre)

    def cosines(self, v: torch.Tensor) -> torch.Tensor:
        """Cosine of every decoder direction with ``v [d_in]``: float32 ``[d_sae]``."""
        decoder, v = self.W_dec.float(), v.float()
        return decoder @ v / (decoder.norm(dim=1) * v.norm()).clamp(min=1e-12)

    def check_fits(self, n_blocks: int, hidden: int) -> None:
        """Refuse, in one line, an SAE whose width or layer does not fit a model of ``n_blocks`` x ``hidden``."""
        if self.d_in != hidden:
            raise InvalidInputError(f"the SAE reads {self.d_in} dimensions but the model's residual has {hidden}")
        if self.layer > n_blocks:
            raise InvalidInputError(f"the SAE reads layer {self.layer} but the model has layers 0..{n_blocks}")

    def check_layer(self, layer: int | None) -> None:
        """Refuse a stated ``layer`` that is not the one the SAE reads, naming both conventions."""
        if layer is not None and layer != self.layer:
            raise InvalidInputError(
                f"the SAE reads {self.hook_name} = layer {self.layer} (hidden_states[{self.layer}]), not layer "
                f"{layer}; give --layer {self.layer} or leave it out"
            )


def as_sae(value: "SAE | str | Path", layer: int | None = None) -> SAE:
    """The SAE of ``value`` (itself, a SAELens folder or ``sae-lens:RELEASE/ID``), checked to read ``layer``."""
    sae = value if isinstance(value, SAE) else load_sae(value)
    sae.check_layer(layer)
    return sae


def load_sae(folder: str | Path) -> SAE:
    """The SAE of a SAELens folder (``cfg.json`` and ``sae_weights.safetensors``) or of ``sae-lens:RELEASE/ID``;
    one-line errors for what does not fit the format."""
    if str(folder).startswith(RELEASE_PREFIX):
        return _load_release(str(folder))
    folder = Path(folder)
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if not cfg_path.is_file() or not weights_path.is_file():
        raise InvalidInputError(f"{folder} is not a SAELens folder (cfg.json and sae_weights.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in ARCHITECTURES:
        raise InvalidInputError(f"{folder}: architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize == "expected_average_only_in":
        raise InvalidInputError(
            f"{folder}: normalize_activations 'expected_average_only_in' needs its dataset's scaling factor; fold it "
            f"into the weights (SAELens: fold_activation_norm_scaling_factor) and save the SAE again"
        )
    if normalize not in NORMALISATIONS:
        raise InvalidInputError(
            f"{folder}: normalize_activations {normalize!r} is not supported ({', '.join(NORMALISATIONS)})"
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
        normalize, architecture == "topk" and bool(cfg.get("rescale_acts_by_decoder_norm", False)), str(folder),
    )  # fmt: skip


def _load_release(spec: str) -> SAE:
    """``sae-lens:RELEASE/ID`` through SAELens's own loader, saved in its folder format and read back."""
    release, _, sae_id = spec.removeprefix(RELEASE_PREFIX).partition("/")
    if not release or not sae_id:
        raise InvalidInputError(f"{spec!r}: name a pretrained SAE as sae-lens:RELEASE/ID")
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        raise InvalidInputError(f"{spec!r} needs sae-lens: pip install 'personalab[sae]'") from None
    try:
        loaded = SAELensSAE.from_pretrained(release, sae_id, device="cpu")
    except (ValueError, KeyError) as error:
        raise InvalidInputError(f"{spec!r}: sae-lens could not load it ({error})") from None
    with tempfile.TemporaryDirectory() as folder:
        loaded.save_model(folder)
        sae = load_sae(folder)
    sae.source = spec
    return sae


def load_labels(path: str | Path) -> dict[int, str]:
    """Feature index -> description from a JSON file: an object ``{"17": "..."}``, or a Neuronpedia export, a list
    of ``{"index": ..., "description": ...}``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{path}: cannot read feature labels ({error})") from None
    try:
        if isinstance(data, dict):
            return {int(index): str(text) for index, text in data.items()}
        return {int(item["index"]): str(item["description"]) for item in data}
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError(
            f'{path}: feature labels are {{"INDEX": "description"}} or a list of {{"index", "description"}}'
        ) from None

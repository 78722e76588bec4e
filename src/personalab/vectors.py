"""Persona vectors on disk: safetensors + JSON metadata, and the public persona-vectors ``.pt`` files.

Every vector is per-layer, ``[n_blocks + 1, hidden]`` float32 (convention: ``personalab.engine.layers``).
Variants: ``response_mean`` (mean over response tokens), ``prompt_mean`` (mean over prompt
tokens) and ``last_prompt`` (last prompt token), each the mean of the trait-expressing
activations minus the mean of the trait-suppressing ones.
"""

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from personalab.errors import InvalidInputError
from personalab.files import replacing, write_text

T = TypeVar("T")

VARIANTS = ("response_mean", "prompt_mean", "last_prompt")
PUBLIC_SUFFIX = {
    "response_mean": "response_avg_diff",
    "prompt_mean": "prompt_avg_diff",
    "last_prompt": "prompt_last_diff",
}


def _check(name: str, tensor: torch.Tensor, source: str) -> torch.Tensor:
    if tensor.dim() != 2:
        raise InvalidInputError(f"{source}: {name} has shape {tuple(tensor.shape)}; expected [n_blocks + 1, hidden]")
    if not torch.isfinite(tensor).all():
        raise InvalidInputError(f"{source}: {name} contains NaN or inf; re-extract it")
    return tensor.float()


def save_vectors(folder: str | Path, vectors: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``vectors.safetensors`` (one tensor per variant) and ``meta.json`` into ``folder``."""
    folder = Path(folder)
    save_vector_file(folder / "vectors.safetensors", vectors)
    write_text(folder / "meta.json", json.dumps(meta, indent=2) + "\n")


def save_vector_file(path: str | Path, vectors: dict[str, torch.Tensor]) -> None:
    """Write one ``.safetensors`` file of variants (float32, contiguous), through a temporary file."""
    with replacing(path) as partial:
        save_file({k: v.float().contiguous().cpu() for k, v in vectors.items()}, partial)


def load_vectors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load vectors from a run folder, a ``.safetensors`` file, or a public ``.pt`` file.

    Returns ``(variants, meta)``; a ``.pt`` file gives one variant named after its suffix
    (``response_avg_diff`` -> ``response_mean``...), ``response_mean`` if none matches.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "vectors.safetensors"
    if not path.exists():
        raise InvalidInputError(f"vector file {path} does not exist; give a run folder, .safetensors or .pt file")
    if path.suffix == ".pt":
        tensor = _read(path, lambda: torch.load(path, map_location="cpu", weights_only=True), "a torch tensor")
        if not isinstance(tensor, torch.Tensor):
            raise InvalidInputError(f"{path}: expected one tensor [n_blocks + 1, hidden], got {type(tensor).__name__}")
        variant = next((v for v, s in PUBLIC_SUFFIX.items() if path.stem.endswith(s)), "response_mean")
        return {variant: _check(variant, tensor, str(path))}, {}
    tensors = _read(path, lambda: load_file(path), "safetensors")
    meta_path = path.with_name("meta.json")
    meta = _read(meta_path, lambda: json.loads(meta_path.read_text()), "JSON") if meta_path.exists() else {}
    return {k: _check(k, v, str(path)) for k, v in tensors.items()}, meta


def _read(path: Path, read: Callable[[], T], kind: str) -> T:
    """``read()``, or one line saying that ``path`` is not ``kind`` (a corrupt, truncated or foreign file); the
    readers' own warnings are silenced (torch warns about the pickle protocol of a file it then refuses)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except Exception as exc:  # safetensors, pickle, zip and JSON each raise their own errors on a broken file
        reason = (str(exc).strip().splitlines() or [""])[0]
        reason = f": {reason}" if len(reason) <= 120 else ""
        raise InvalidInputError(
            f"{path} cannot be read as {kind} ({type(exc).__name__}{reason}); it is corrupt or not a vector file: "
            "re-extract or re-export it, or give another vector"
        ) from None


def export_public(vectors: dict[str, torch.Tensor], folder: str | Path, trait: str) -> list[Path]:
    """Write each variant as ``{trait}_{suffix}.pt`` in the public persona-vectors format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for variant, tensor in vectors.items():
        target = folder / f"{trait}_{PUBLIC_SUFFIX[variant]}.pt"
        torch.save(tensor.float().cpu(), target)
        written.append(target)
    return written

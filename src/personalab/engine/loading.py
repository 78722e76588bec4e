"""Loading models: devices and dtypes, hub names, local and run folders, GGUF files, tokenizers, configs without
weights, and fine-tunes (an adapter merged onto its base)."""

import gc
import socket
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from personalab.engine.checkpoints import weights
from personalab.engine.gguf import BUILT_IN as BUILT_IN_GGUF
from personalab.engine.gguf import cached, check, dequantised, gguf_file
from personalab.engine.handle import ModelHandle
from personalab.engine.lora import merge_adapter
from personalab.errors import InvalidInputError, PersonalabError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def free_memory() -> None:
    """Return the memory of models no longer referenced (garbage collection, then the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def devices() -> list[str]:
    """The devices this process can load a model on: ``cpu``, then ``cuda:0``... and ``mps`` where present."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    return found + (["mps"] if torch.backends.mps.is_available() else [])


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when available, else ``"cpu"``; any other device must be on this machine: the CPU
    (``cpu``, ``cpu:N``), one of ``devices()``, or ``cuda`` for every GPU; else the error names the ones there are."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    there = devices()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind != "cpu" and device not in there and not (device == "cuda" and "cuda:0" in there):
        built = (
            "" if device.split(":")[0] != "cuda" or torch.version.cuda else f" (torch {torch.__version__} has no CUDA)"
        )
        raise InvalidInputError(
            f"`device` {device} is not on this machine{built}; use auto or one of {', '.join(there)}"
        )
    return device


def device_map_for(device: str) -> str:
    """``device_map`` of ``from_pretrained``: ``"auto"`` on CUDA (a model too large for one GPU is split
    across GPUs), else the device."""
    return "auto" if device == "cuda" else device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype | str:
    """Map a dtype name to torch; ``"auto"`` keeps the checkpoint's dtype on GPU, float32 on CPU."""
    if dtype == "auto":
        return "auto" if device != "cpu" else torch.float32
    resolved = dtype if isinstance(dtype, torch.dtype) else _DTYPES.get(str(dtype).lower())
    if resolved is None:
        raise InvalidInputError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16")
    if resolved == torch.float16 and device == "cpu":
        raise InvalidInputError("float16 is not supported on CPU; set `dtype` to bfloat16 or float32")
    return resolved


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
"""Files of which a folder holding a tokenizer has at least one."""


_TOKENIZER_HINT = "pass `tokenizer`: the base model's hub name or a folder with its tokenizer"


class MissingTokenizerError(PersonalabError):
    """A checkpoint has weights and a config but no tokenizer."""


BUILT_IN = Path(__file__).parents[1] / "models"
"""Models shipped inside the package, loaded as ``builtin:NAME`` with no network (``models/NAME/SOURCE.md``)."""


def builtin_models() -> list[str]:
    """Names of the built-in models (``builtin:NAME``): those shipped with personalab, and the GGUF files of
    packages (``personalab.engine.gguf.BUILT_IN``, usable once their package is installed)."""
    return sorted([p.name for p in BUILT_IN.iterdir() if (p / "config.json").is_file()] + list(BUILT_IN_GGUF))


def local_folder(name_or_path: str) -> Path | None:
    """The folder ``name_or_path`` names (``builtin:NAME``: a model shipped with personalab; a GGUF file or built-in
    GGUF model: the cache folder of its dequantised model, built the first time), or ``None`` for a hub name.

    A name that can only be a path (absolute, relative with ``.`` or ``~``, more than one
    ``/``, or a trailing ``/``) and does not exist raises "no such folder".
    """
    source = gguf_file(name_or_path)
    if source is not None:
        return dequantised(source).folder
    if name_or_path.startswith("builtin:"):
        name = name_or_path.removeprefix("builtin:")
        if name not in builtin_models():
            raise InvalidInputError(f"no built-in model {name!r}; built in: {', '.join(builtin_models())}")
        return BUILT_IN / name
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InvalidInputError(f"{name_or_path} is a file; give a model folder or a hub name like org/model")
        return path
    text = name_or_path.replace("\\", "/")
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or text.endswith("/"):
        raise InvalidInputError(
            f"no such folder: {name_or_path}; give an existing model folder or a hub name like org/model"
        )
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _where(name_or_path: str, revision: str | None) -> str:
    return repr(name_or_path) + (f" at revision {revision!r}" if revision else "")


HUB_PROBE_SECONDS = 3.0


@cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) accepts a connection within ``HUB_PROBE_SECONDS``;
    false under ``HF_HUB_OFFLINE=1``. Asked once per process, so a machine without network fails in
    seconds instead of retrying every file for a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=HUB_PROBE_SECONDS).close()
    except OSError:
        return False
    return True


class HubUnreachableError(PersonalabError):
    """A hub name was given, the hub cannot be reached and the local cache does not hold it."""


def from_hub(load, name_or_path: str, revision: str | None, what: str):
    """``load(name_or_path, revision=...)`` for a hub name; from the local cache alone (as under
    ``HF_HUB_OFFLINE=1``) when the hub cannot be reached, and a ``HubUnreachableError`` naming the fix when
    the cache does not hold it."""
    if hub_reachable():
        return load(name_or_path, revision=revision)
    from huggingface_hub import constants

    saved, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # what HF_HUB_OFFLINE=1 does, for this load
    try:
        return load(name_or_path, revision=revision)
    except OSError as exc:
        raise HubUnreachableError(
            f"cannot reach the Hugging Face hub ({constants.ENDPOINT}) for the {what} of "
            f"{_where(name_or_path, revision)} and the local cache does not hold it; give a local folder, or "
            f"download it where there is network (with HF_HUB_OFFLINE=1 only the cache is read)"
        ) from exc
    finally:
        constants.HF_HUB_OFFLINE = saved


def load_tokenizer(name_or_path: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub name or local folder; ``MissingTokenizerError`` when it has none."""
    folder = local_folder(name_or_path)
    if folder is not None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        files = ", ".join(TOKENIZER_FILES)
        raise MissingTokenizerError(f"{folder} has no tokenizer files ({files}); {_TOKENIZER_HINT}")
    try:
        if folder is not None:
            return AutoTokenizer.from_pretrained(folder, revision=revision)
        return from_hub(AutoTokenizer.from_pretrained, name_or_path, revision, "tokenizer")
    except (OSError, ValueError) as exc:
        raise MissingTokenizerError(
            f"cannot load a tokenizer from {_where(name_or_path, revision)}: {_first_line(exc)}; {_TOKENIZER_HINT}"
        ) from exc


def model_shape(name_or_path: str, revision: str | None = None) -> tuple[int, int]:
    """``(n_blocks, hidden_size)`` from a model's config alone (no weights are loaded; a GGUF file's header); a run
    folder gives the shape of the model it holds (an adapter's: its base's)."""
    source = gguf_file(name_or_path)
    if source is not None:
        header = check(source)
        return header.n_blocks, header.hidden_size
    text = read_config(name_or_path, revision).get_text_config()
    return int(text.num_hidden_layers), int(text.hidden_size)


def read_config(name_or_path: str, revision: str | None = None) -> PretrainedConfig | None:
    """A model's transformers config, read alone (a run folder: of the model it holds; an adapter: its base's);
    ``None`` for a GGUF file not yet dequantised (its header gives the shape: ``model_shape``)."""
    from transformers import AutoConfig

    source = gguf_file(name_or_path)
    if source is not None and not cached(source):
        return None
    folder = local_folder(name_or_path)
    if folder is not None:
        found = weights(folder)
        if found.adapter and found.base:
            return read_config(found.base)
        name_or_path = str(found.folder)
    try:
        if folder is not None:
            return AutoConfig.from_pretrained(name_or_path, revision=revision)
        return from_hub(AutoConfig.from_pretrained, name_or_path, revision, "config")
    except (OSError, ValueError) as exc:
        raise PersonalabError(
            f"cannot read the config of {_where(name_or_path, revision)}: {_first_line(exc)}"
        ) from exc


def load_weights(
    name_or_path: str, revision: str | None = None, dtype: str | torch.dtype = "auto", device: str = "auto"
) -> PreTrainedModel:
    """The causal LM alone (no tokenizer), in eval mode, loaded with ``from_pretrained``.

    On CUDA the model is placed with ``device_map="auto"`` so models larger than one
    GPU are split by accelerate; on CPU it stays in one piece.
    """
    folder = local_folder(name_or_path)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    load = partial(AutoModelForCausalLM.from_pretrained, dtype=torch_dtype, device_map=device_map_for(device))
    try:
        if folder is not None:
            model = load(folder, revision=revision)
        else:
            model = from_hub(load, name_or_path, revision, "weights")
    except HubUnreachableError:
        raise
    except Exception as exc:  # corrupt or missing weights raise OSError, ValueError, SafetensorError...
        raise PersonalabError(
            f"cannot load {_where(name_or_path, revision)}: {type(exc).__name__}: {_first_line(exc)} "
            f"(check the name, the revision, or the local folder)"
        ) from exc
    return model.eval()


def empty_model(name_or_path: str, revision: str | None, dtype: str | torch.dtype, device: str) -> PreTrainedModel:
    """The causal LM ``load_weights`` would load, built from its config on the meta device: its modules, shapes,
    dtype and generation config (its end-of-sequence tokens), no weights and no memory."""
    from transformers import GenerationConfig

    config = read_config(name_or_path, revision)
    resolved = resolve_dtype(dtype, resolve_device(device))
    if resolved == "auto":
        resolved = getattr(config, "dtype", None) or torch.float32
        resolved = _DTYPES.get(str(resolved).removeprefix("torch."), torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=resolved).eval()
    load = GenerationConfig.from_pretrained
    try:
        if local_folder(name_or_path) is not None:
            model.generation_config = load(name_or_path, revision=revision)
        else:
            model.generation_config = from_hub(load, name_or_path, revision, "generation config")
    except OSError:  # no generation_config.json: from_pretrained derives it from the config, as from_config did
        pass
    return model


def load_model(
    name_or_path: str,
    revision: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    blocks_path: str | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    thinking: bool = False,
    defer_weights: bool = False,
) -> ModelHandle:
    """Load a causal LM and its tokenizer with ``from_pretrained`` (hub name, local folder, or GGUF file).

    ``tokenizer`` (a hub name, a folder or a tokenizer object) takes the tokenizer from
    elsewhere, for checkpoints saved without one; it is loaded before the weights, so a
    missing tokenizer fails at once. A run folder of personalab's loads the weights it holds
    (``personalab.engine.checkpoints.weights``: the last checkpoint of a fine-tune, a distilled
    model or adapter); a peft adapter is merged onto the base model its config names. The handle
    is named after the folder the weights were loaded from; a GGUF file (``FILE.gguf``, ``builtin:NAME`` of a
    GGUF model) is dequantised once into a cache folder (``personalab.engine.gguf``) and keeps its own name.
    ``thinking`` keeps the chat template's thinking markers (``personalab.engine.chat``; off by default).
    ``defer_weights`` builds the handle on an empty copy of the model (``empty_model``) and loads the weights the
    first time a Hugging Face forward pass needs them (``ModelHandle.model``): with an engine that holds its own copy
    (vLLM), a command that never needs them never loads them. An adapter folder is loaded at once.
    """
    resolve_device(device)
    given = gguf_file(name_or_path)
    source = dequantised(given) if given is not None else None
    folder = local_folder(name_or_path)
    name = name_or_path
    if folder is not None:
        found = weights(folder)
        if found.adapter:
            return load_trained(None, folder, dtype, device, tokenizer, thinking)
        name_or_path = str(found.folder)
        name = name if source is not None else name_or_path
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, revision)
    elif isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    # what an adapter trained on a GGUF file names as its base (peft): the file, not the cache
    base = None if given is None else name if name.startswith("builtin:") else str(given.resolve())
    load = partial(_named, partial(load_weights, name_or_path, revision, dtype, device), base)
    model = _named(partial(empty_model, name_or_path, revision, dtype, device), base) if defer_weights else load()
    handle = ModelHandle.from_model(
        model, tokenizer, name=name, revision=revision, blocks_path=blocks_path, thinking=thinking
    )
    handle.origin = (name_or_path, revision, None)
    handle.gguf = source
    handle.deferred = load if defer_weights else None
    return handle


def _named(build: Callable[[], PreTrainedModel], base: str | None) -> PreTrainedModel:
    """``build()``, its ``name_or_path`` set to ``base`` when given."""
    model = build()
    if base is not None:
        model.name_or_path = model.config._name_or_path = base
    return model


def loaded_name(name_or_path: str | Path) -> str:
    """The name ``load_model`` and ``load_trained`` give what they load from ``name_or_path``, known without loading
    it: the folder of the weights a local (run) folder holds, else the name itself (a GGUF file's too)."""
    if gguf_file(str(name_or_path)) is not None:
        return str(name_or_path)
    folder = local_folder(str(name_or_path))
    return str(weights(folder).folder) if folder is not None else str(name_or_path)


def load_trained(
    base: str | None,
    folder: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    thinking: bool = False,
) -> ModelHandle:
    """The trained model of a run folder, checkpoint, adapter or model folder
    (``personalab.engine.checkpoints.weights``); an adapter is merged onto ``base`` (default: the base its
    config names), with the adapter folder's own tokenizer when it has one."""
    found = weights(folder)
    if not found.adapter:
        return load_model(str(found.folder), dtype=dtype, device=device, tokenizer=tokenizer, thinking=thinking)
    base = base or found.base
    if not base:
        raise InvalidInputError(f"{found.folder}/adapter_config.json names no base model; pass the base model")
    own = any((found.folder / name).is_file() for name in TOKENIZER_FILES)
    source = tokenizer or (str(found.folder) if own else None)
    handle = load_model(base, dtype=dtype, device=device, tokenizer=source, thinking=thinking)
    return merge_adapter(handle, found.folder)

"""Run folders as models: which folder of a distill, finetune or bake run holds the weights.

* a fine-tuning run: its last checkpoint ``checkpoints/step-N`` (an adapter or a full model);
* a distillation run: ``model/`` (full fine-tuning, or a LoRA student merged with ``--merge``), else
  ``adapter/`` (a peft adapter over the base the adapter's config names);
* a bake run, a checkpoint, an adapter or a model folder: the folder itself.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open


def _step(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_adapter(folder: Path) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and no ``config.json``."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


@dataclass(frozen=True)
class Weights:
    """Where the weights of ``given`` are: ``folder`` holds a model, or an adapter when ``adapter``."""

    given: Path
    folder: Path
    adapter: bool

    @property
    def base(self) -> str | None:
        """The base model an adapter's config names (``None`` for a full model)."""
        if not self.adapter:
            return None
        return json.loads((self.folder / "adapter_config.json").read_text()).get("base_model_name_or_path")

    def describe(self) -> str:
        """One line: what was given and what it resolved to."""
        kind = f"LoRA adapter over {self.base}" if self.adapter else "model"
        where = "" if self.folder == self.given else f" -> {self.folder}"
        return f"{self.given}{where} ({kind})"


def weights(folder: str | Path) -> Weights:
    """The weights of a run folder, a checkpoint, an adapter or a model folder (see the module docstring)."""
    given = Path(folder)
    found = given
    steps = [p for p in (given / "checkpoints").glob("step-*") if p.is_dir() and _step(p) >= 0]
    steps = [p for p in steps if (p / "trainer_state.pt").is_file()] or steps  # written last: a whole checkpoint
    if steps:
        found = max(steps, key=_step)
    elif (given / "model" / "config.json").is_file():
        found = given / "model"
    elif (given / "adapter" / "adapter_config.json").is_file():
        found = given / "adapter"
    return Weights(given, found, is_adapter(found))


def parameter_count(folder: Path, pattern: str = "*.safetensors") -> int:
    """Number of values in the safetensors files of ``folder`` matching ``pattern``, read from their headers."""
    total = 0
    for path in sorted(folder.glob(pattern)):
        with safe_open(path, framework="pt") as tensors:
            for key in tensors.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = tensors.get_slice(key).get_shape()
                count = 1
                for size in shape:
                    count *= size
                total += count
    return total


def trained_parameters(folder: str | Path) -> int | None:
    """How many parameters training changed in the model of a run folder: the number its ``meta.json``
    records, else the adapter's values, every value of a fully trained model (a finetune checkpoint), 0 for
    an exact bake; ``None`` for a model folder that is no run of personalab's (nothing says what was trained)."""
    given = Path(folder)
    meta = given / "meta.json"
    recorded = json.loads(meta.read_text()).get("trainable_parameters") if meta.is_file() else None
    if isinstance(recorded, int):
        return recorded
    if (given / "bake.json").is_file():
        return 0
    found = weights(given)
    if found.adapter:
        return parameter_count(found.folder, "adapter_model*.safetensors")
    trained = found.folder != given or (given / "trainer_state.pt").is_file()
    return parameter_count(found.folder) if trained else None

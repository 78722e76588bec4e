"""LoRA adapters: adding one for training, saving it, and merging a saved one into its base model (``peft``)."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from personalab.engine.architectures import unwrap
from personalab.engine.handle import ModelHandle


def merge_adapter(handle: ModelHandle, adapter: str | Path) -> ModelHandle:
    """``handle``'s model with the peft adapter in ``adapter`` merged into its weights, named after the adapter."""
    from peft import PeftModel

    with peft_quietly():
        merged = PeftModel.from_pretrained(handle.model, adapter).merge_and_unload()
    out = ModelHandle.from_model(merged.eval(), handle.tokenizer, name=str(adapter), thinking=handle.chat.thinking_on)
    out.origin = (handle.origin[0], handle.origin[1], str(adapter))
    return out


@contextmanager
def peft_quietly() -> Iterator[None]:
    """Around peft calls: peft's ``PeftModel`` reads transformers' deprecated ``is_gradient_checkpointing``
    (a FutureWarning that personalab's code never triggers), so that one warning is dropped there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def save_trained(model: nn.Module, folder: str | Path) -> None:
    """``model.save_pretrained(folder)``; a peft adapter is saved without embedding layers (``with_lora`` never adapts
    them), so peft does not look up its base model's config to decide (a GGUF base has none to look up)."""
    if unwrap(model) is not model:
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder)


def with_lora(model: PreTrainedModel, rank: int, alpha: float | None = None) -> nn.Module:
    """``model`` with a LoRA adapter (rank ``rank``, alpha ``2 * rank`` by default, no dropout) on every
    linear projection of attention and MLP; GPT-2's transposed ``Conv1D`` projections included."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha or 2 * rank,
        target_modules="all-linear",
        lora_dropout=0.0,
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
    with peft_quietly():
        return get_peft_model(model, lora)

"""The model handle: a causal LM with its tokenizer, chat format, decoder blocks and generation engine (layer
convention: ``personalab.engine.layers``)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from personalab.engine.architectures import find_blocks, hidden_size, unwrap
from personalab.engine.chat import (
    ChatFormat,
    TokenSequence,
    detect_chat_format,
    encode_chat,
    encode_prompt,
    encode_system,
)
from personalab.engine.gguf import GgufSource
from personalab.errors import InvalidInputError
from personalab.hashes import content_key


@dataclass
class ModelHandle:
    """A causal LM with what personalab needs to know about it.

    ``blocks[i]`` is decoder block ``i``; ``stack`` is the module that holds the blocks
    and returns ``hidden_states[n_blocks]`` (after the final norm) as its first output.

    ``module`` is the model as built; with ``deferred`` set it is an empty copy on the meta device (``load_model(...,
    defer_weights=True)``, for an engine that runs every forward pass itself), and ``model``, ``blocks`` and ``stack``
    load the weights the first time they are used. ``config``, ``architecture``, ``dtype`` and the shape never do.
    """

    module: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    blocks_path: str
    n_blocks: int
    hidden_size: int
    chat: ChatFormat
    name: str
    revision: str | None = None
    stop_ids: frozenset[int] = frozenset()
    """Tokens that end generation: end-of-sequence, the template's end of turn and the checkpoint's
    ``generation_config.eos_token_id``."""
    origin: tuple[str, str | None, str | None] = ("", None, None)
    """Where the weights came from: ``(model, revision, adapter folder or None)``, for engines that load them."""
    engine: Any = None
    """What generates (``personalab.engine.generation.Engine``); ``None`` is Hugging Face ``generate``."""
    gguf: GgufSource | None = None
    """The GGUF file the weights were dequantised from (``personalab.engine.gguf``), or ``None``."""
    deferred: Callable[[], PreTrainedModel] | None = None
    """What loads the weights while ``module`` is an empty copy (``None`` once they are loaded)."""
    intervening: int = 0
    """How many ``intervene`` blocks hook the Hugging Face model now (``personalab.engine.interventions``)."""

    @property
    def forward_engine(self) -> Any:
        """The engine that runs this handle's prompt-only forward passes (capture's means and norms, answers' NLL):
        its ``engine``, unless an ``intervene`` block hooks the Hugging Face model or the engine runs no such passes
        (its ``captures`` is off), whose forwards then run on the Hugging Face model."""
        return None if self.intervening or not getattr(self.engine, "captures", False) else self.engine

    @property
    def model(self) -> PreTrainedModel:
        """The model with its weights (loaded now if they were deferred)."""
        if self.deferred is not None:
            self.module, self.deferred = self.deferred(), None
        return self.module

    @property
    def weights_loaded(self) -> bool:
        """Whether the Hugging Face weights are in memory (``False`` while deferred)."""
        return self.deferred is None

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder blocks, ``blocks[i]`` block ``i``."""
        return unwrap(self.model).get_submodule(self.blocks_path)

    @property
    def stack(self) -> nn.Module:
        """The module that holds the blocks and returns ``hidden_states[n_blocks]`` as its first output."""
        inner = unwrap(self.model)
        return inner.get_submodule(self.blocks_path.rpartition(".")[0]) if "." in self.blocks_path else inner

    @property
    def config(self) -> PretrainedConfig:
        """The model's transformers config (without loading deferred weights)."""
        return unwrap(self.module).config

    @classmethod
    def from_model(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        name: str | None = None,
        revision: str | None = None,
        blocks_path: str | None = None,
        thinking: bool = False,
    ) -> "ModelHandle":
        """A handle on a loaded model; ``thinking`` keeps the chat template's thinking markers
        (``personalab.engine.chat``)."""
        path, blocks = find_blocks(model, blocks_path)
        inner = unwrap(model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        chat = detect_chat_format(tokenizer, thinking)
        end = chat.end_of_turn
        declared = getattr(getattr(inner, "generation_config", None), "eos_token_id", None)
        declared = declared if isinstance(declared, list) else [] if declared is None else [declared]
        stops = {tokenizer.eos_token_id, *declared} | ({end[-1]} if end else set())
        return cls(
            module=model,
            tokenizer=tokenizer,
            blocks_path=path,
            n_blocks=len(blocks),
            hidden_size=hidden_size(model),
            chat=chat,
            name=name or getattr(inner, "name_or_path", "") or type(inner).__name__,
            revision=revision,
            stop_ids=frozenset(stops - {None}),
        )

    def tokenizer_sha256(self) -> str:
        """sha256 of the tokenizer's vocabulary (every token with its id): models that share it read text as the same
        token ids; a vector records it (``meta.json``) to be refused by a model that does not."""
        return content_key("vocabulary", sorted(self.tokenizer.get_vocab().items()))

    @property
    def end_of_turn(self) -> tuple[int, ...]:
        """Tokens that close an assistant answer (``ChatFormat.end_of_turn``)."""
        return self.chat.end_of_turn

    @property
    def n_layers(self) -> int:
        """Number of layers in the convention: ``n_blocks + 1``."""
        return self.n_blocks + 1

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None)
        return archs[0] if archs else type(unwrap(self.module)).__name__

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def input_device(self) -> torch.device:
        """Device of the input embeddings, where token ids must go."""
        return unwrap(self.model).get_input_embeddings().weight.device

    def encode(
        self,
        system: str | None,
        user: str,
        assistant: str | None = None,
        end: bool = False,
        history: Sequence[tuple[str, str]] = (),
    ) -> TokenSequence:
        """Chat-format one turn after the earlier ``(user, assistant)`` turns of ``history``; ``end`` closes the answer
        with ``end_of_turn`` (a training target). See ``personalab.engine.chat.encode_chat``."""
        end_ids = self.end_of_turn if end else ()
        return encode_chat(self.tokenizer, self.chat, system, user, assistant, end_ids, history)

    def encode_prompt(self, prompt_format: str, system: str | None, user: str) -> TokenSequence:
        """The generation prompt of one turn in ``prompt_format``: chat, plain or continuation
        (``personalab.engine.chat.encode_prompt``)."""
        return encode_prompt(self.tokenizer, self.chat, prompt_format, system, user)

    def encode_system(self, text: str) -> TokenSequence:
        """``text`` alone as the system message with the generation prompt (``personalab.engine.chat``)."""
        return encode_system(self.tokenizer, self.chat, text)


def check_same_shape(base: ModelHandle, tuned: ModelHandle) -> None:
    """Refuse, in one line, two models whose depth or width differ (a fine-tune must keep its base's shape)."""
    if (base.n_blocks, base.hidden_size) != (tuned.n_blocks, tuned.hidden_size):
        raise InvalidInputError(
            f"{base.name} has {base.n_blocks} blocks of width {base.hidden_size} but {tuned.name} has "
            f"{tuned.n_blocks} of width {tuned.hidden_size}; compare a fine-tune with its own base model"
        )

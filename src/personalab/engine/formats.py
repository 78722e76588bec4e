"""Prompt formats: how one turn (an optional instruction and a question) is written for the model.

* ``chat``: the tokenizer's chat template (``personalab.engine.chat``);
* ``plain``: ``"{instruction}\\n\\nQuestion: {question}\\nAnswer:"``, the turn of a model without a chat
  template (without an instruction: ``"Question: {question}\\nAnswer:"``);
* ``continuation``: ``"{instruction} {question}"`` (without an instruction: the question alone), text
  for a base model to continue.
"""

from collections.abc import Sequence
from typing import Literal, get_args

from personalab.errors import InvalidInputError

PromptFormat = Literal["chat", "plain", "continuation"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)
FORMAT_TEXTS = {
    "plain": "{instruction}\n\nQuestion: {question}\nAnswer:",
    "continuation": "{instruction} {question}",
}


def check_format(prompt_format: str) -> None:
    """Refuse, in one line, a name that is not one of ``PROMPT_FORMATS``."""
    if prompt_format not in PROMPT_FORMATS:
        raise InvalidInputError(f"`format` must be one of {', '.join(PROMPT_FORMATS)}, not {prompt_format!r}")


def format_text(
    prompt_format: str, instruction: str | None, question: str, history: Sequence[tuple[str, str]] = ()
) -> str:
    """The text of one turn in a text format (``plain`` or ``continuation``); in ``plain``, earlier ``(question,
    answer)`` turns of ``history`` come first, each ``"Question: {question}\nAnswer: {answer}"``, separated by a blank
    line."""
    if prompt_format == "plain":
        asked = "\n\n".join([*(f"Question: {q}\nAnswer: {a}" for q, a in history), f"Question: {question}\nAnswer:"])
        return f"{instruction}\n\n{asked}" if instruction else asked
    if history:
        raise InvalidInputError("a continuation prompt has no earlier turns; use format chat or plain")
    return f"{instruction} {question}" if instruction else question

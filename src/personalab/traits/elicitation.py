"""How a trait instruction reaches the model: the elicitation styles of a trait file.

* ``system_prompt``: the instruction is the system prompt of a chat turn (folded into the
  user turn for templates without a system role; the plain format for base models);
* ``plain``: ``"{instruction}\\n\\nQuestion: {question}\\nAnswer:"``;
* ``third_person``: the instruction describes a character in the third person;
* ``few_shot``: the instruction holds example exchanges written as ``Q: ...\\nA: ...``;
* ``dialogue``: the instruction precedes a ``User:`` / ``Assistant:`` exchange;
* ``continuation``: ``"{instruction} {question}"``, nothing else: a base model continues the
  text (the format the pretraining-tracing reference code uses on base checkpoints).

Every style but ``system_prompt`` is plain text, for chat and base models alike.
"""

from typing import TYPE_CHECKING

from personalab.engine.formats import FORMAT_TEXTS
from personalab.traits.schema import Elicitation, Trait

if TYPE_CHECKING:
    from personalab.engine.chat import ChatFormat, TokenSequence
    from personalab.engine.handle import ModelHandle

TEXT_TEMPLATES: dict[str, str] = {
    "plain": FORMAT_TEXTS["plain"],
    "third_person": '{instruction}\n\nSomeone asks the character: "{question}"\nThe character replies:',
    "few_shot": "{instruction}\n\nQ: {question}\nA:",
    "dialogue": "{instruction}\n\nUser: {question}\nAssistant:",
    "continuation": FORMAT_TEXTS["continuation"],
}


def elicitation_prompt(style: Elicitation, instruction: str, question: str) -> str | None:
    """The text prompt of a text style; ``None`` for ``system_prompt`` (a chat turn)."""
    if style == "system_prompt":
        return None
    return TEXT_TEMPLATES[style].format(instruction=instruction, question=question)


def elicit(
    handle: "ModelHandle", style: Elicitation, instruction: str, question: str, answer: str | None = None
) -> "TokenSequence":
    """Token ids of ``question`` asked under ``instruction`` in ``style``, with an optional answer."""
    from personalab.engine.chat import encode_text

    text = elicitation_prompt(style, instruction, question)
    if text is None:
        return handle.encode(instruction, question, answer)
    return encode_text(handle.tokenizer, text, answer)


def continues(handle: "ModelHandle", trait: "Trait") -> bool:
    """Whether ``handle`` answers ``trait``'s evaluation questions by continuing plain text: a
    continuation-style trait on a model without a chat template (chat models get a user turn)."""
    return trait.elicitation == "continuation" and not handle.chat.has_template


def evaluation_prompt(handle: "ModelHandle", trait: "Trait", question: str) -> "TokenSequence":
    """An evaluation question as the model is asked it, with no instruction: plain text to
    continue (``continues``), else a user turn with the generation prompt."""
    from personalab.engine.chat import encode_text

    return encode_text(handle.tokenizer, question) if continues(handle, trait) else handle.encode(None, question)


def elicitation_format(style: Elicitation, chat: "ChatFormat | None" = None) -> str:
    """One line naming how prompts of ``style`` are written: a text style's template, or for
    ``system_prompt`` the chat format ``chat`` (``ChatFormat.describe``)."""
    if style == "system_prompt":
        return "instruction as the system message, " + (chat.describe() if chat is not None else "chat format")
    return f"{style} text {TEXT_TEMPLATES[style]!r}"


def evaluation_format(handle: "ModelHandle", trait: "Trait") -> str:
    """One line naming how ``trait``'s evaluation questions are written for ``handle`` (``evaluation_prompt``)."""
    return handle.chat.describe("continuation" if continues(handle, trait) else None)

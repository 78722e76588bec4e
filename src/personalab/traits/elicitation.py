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

from personalab.traits.schema import Elicitation, Trait

if TYPE_CHECKING:
    from personalab.engine.chat import TokenSequence
    from personalab.engine.model import ModelHandle

TEXT_TEMPLATES: dict[str, str] = {
    "plain": "{instruction}\n\nQuestion: {question}\nAnswer:",
    "third_person": '{instruction}\n\nSomeone asks the character: "{question}"\nThe character replies:',
    "few_shot": "{instruction}\n\nQ: {question}\nA:",
    "dialogue": "{instruction}\n\nUser: {question}\nAssistant:",
    "continuation": "{instruction} {question}",
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

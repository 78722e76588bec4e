"""How a trait instruction reaches the model: the elicitation styles of a trait file.

* ``system_prompt``: the instruction is the system prompt of a chat turn (folded into the
  user turn for templates without a system role; the plain format for base models);
* ``plain``: ``"{instruction}\\n\\nQuestion: {question}\\nAnswer:"``;
* ``third_person``: the instruction describes a character in the third person;
* ``few_shot``: the instruction holds example exchanges written as ``Q: ...\\nA: ...``;
* ``dialogue``: the instruction precedes a ``User:`` / ``Assistant:`` exchange.

Every style but ``system_prompt`` is plain text for base models without a chat template.
"""

from personalab.engine.chat import TokenSequence, encode_text, plain_prompt
from personalab.engine.model import ModelHandle
from personalab.traits.schema import Elicitation

TEXT_TEMPLATES: dict[str, str] = {
    "third_person": '{instruction}\n\nSomeone asks the character: "{question}"\nThe character replies:',
    "few_shot": "{instruction}\n\nQ: {question}\nA:",
    "dialogue": "{instruction}\n\nUser: {question}\nAssistant:",
}


def elicitation_prompt(style: Elicitation, instruction: str, question: str) -> str | None:
    """The text prompt of a text style; ``None`` for ``system_prompt`` (a chat turn)."""
    if style == "system_prompt":
        return None
    if style == "plain":
        return plain_prompt(instruction, question)
    return TEXT_TEMPLATES[style].format(instruction=instruction, question=question)


def elicit(
    handle: ModelHandle, style: Elicitation, instruction: str, question: str, answer: str | None = None
) -> TokenSequence:
    """Token ids of ``question`` asked under ``instruction`` in ``style``, with an optional answer."""
    text = elicitation_prompt(style, instruction, question)
    if text is None:
        return handle.encode(instruction, question, answer)
    return encode_text(handle.tokenizer, text, answer)

"""Chat formatting: (system, user[, assistant]) -> token ids with an exact prompt/response boundary.

The response is encoded on its own and appended to the prompt ids, so the boundary is
exactly where generation starts: ``ids[:prompt_len]`` are the prompt ids the model is
given, ``ids[prompt_len:]`` are the response tokens, and re-encoding a generated
answer reproduces the ids the model sampled.

Three formats, chosen from the tokenizer:

* a chat template with a system role: system and user messages as they are;
* a chat template without one (Gemma): the system text is folded into the first user turn;
* no chat template (base models): ``"{system}\\n\\nQuestion: {user}\\nAnswer:"``.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

_PROBE = "personalab-system-probe"


@dataclass(frozen=True)
class TokenSequence:
    """Token ids of one conversation; ``ids[:prompt_len]`` is the prompt, the rest the response."""

    ids: tuple[int, ...]
    prompt_len: int

    def __post_init__(self) -> None:
        if not 0 < self.prompt_len <= len(self.ids):
            raise ValueError(f"prompt_len {self.prompt_len} must be in 1..{len(self.ids)}")

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass(frozen=True)
class ChatFormat:
    """What the tokenizer's chat template supports."""

    has_template: bool
    system_role: bool

    @property
    def name(self) -> str:
        if not self.has_template:
            return "plain (no chat template)"
        return "chat template" + ("" if self.system_role else ", system folded into user turn")


def detect_chat_format(tokenizer: PreTrainedTokenizerBase) -> ChatFormat:
    """Probe the chat template: present at all, and does it keep a system message?"""
    if not getattr(tokenizer, "chat_template", None):
        return ChatFormat(has_template=False, system_role=False)
    messages = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # templates reject the role with jinja's raise_exception
        return ChatFormat(has_template=True, system_role=False)
    return ChatFormat(has_template=True, system_role=_PROBE in text)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens (its named ones and every added token marked special)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat) -> tuple[int, ...]:
    """The tokens that close an assistant answer: for a chat template, what it writes after the answer up to
    and including its first special token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``...),
    read from the template itself; without a template (or when the template writes no special token
    there), the end-of-sequence token. Empty when the tokenizer has neither."""
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    if not chat.has_template:
        return eos
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render an answer: fall back to the end-of-sequence token
        return eos
    if _PROBE not in text:
        return eos
    after = tokenizer.encode(text.split(_PROBE, 1)[1], add_special_tokens=False)
    special = special_ids(tokenizer)
    end = next((k for k, token in enumerate(after) if token in special), None)
    return eos if end is None else tuple(after[: end + 1])


def plain_prompt(system: str | None, user: str) -> str:
    """The text format for base models without a chat template."""
    question = f"Question: {user}\nAnswer:"
    return f"{system}\n\n{question}" if system else question


def encode_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str, assistant: str | None = None, end: Sequence[int] = ()
) -> TokenSequence:
    """Encode a plain-text prompt (with the tokenizer's special tokens) and an optional response followed by
    the ``end`` tokens (e.g. the end-of-sequence token, as a training target)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _join(tokenizer, prompt_ids, assistant, end)


def _join(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], assistant: str | None, end: Sequence[int]
) -> TokenSequence:
    response_ids = tokenizer.encode(assistant, add_special_tokens=False) if assistant else []
    tail = tuple(end) if assistant is not None else ()
    return TokenSequence(ids=tuple(prompt_ids) + tuple(response_ids) + tail, prompt_len=len(prompt_ids))


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat: ChatFormat,
    system: str | None,
    user: str,
    assistant: str | None = None,
    end: Sequence[int] = (),
) -> TokenSequence:
    """Encode one turn; ``assistant=None`` gives the generation prompt alone, else the answer follows it,
    then the ``end`` tokens (``end_of_turn_ids``, where the answer is a training target)."""
    if not chat.has_template:
        prompt_ids = tokenizer(plain_prompt(system, user), add_special_tokens=True)["input_ids"]
    else:
        if system and not chat.system_role:
            messages = [{"role": "user", "content": f"{system}\n\n{user}"}]
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        prompt_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    return _join(tokenizer, prompt_ids, assistant, end)


def encode_system(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat, text: str) -> TokenSequence:
    """``text`` alone as the system message with the generation prompt (a user turn for templates
    without a system role or that need one; the plain text for models without a template)."""
    if not chat.has_template:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return TokenSequence(ids=tuple(ids), prompt_len=len(ids))
    for role in ("system", "user") if chat.system_role else ("user",):
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": role, "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except Exception:  # templates reject a conversation without a user turn with jinja's raise_exception
            continue
        return TokenSequence(ids=tuple(ids), prompt_len=len(ids))
    raise ValueError("the chat template rejects a single user turn")

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


def plain_prompt(system: str | None, user: str) -> str:
    """The text format for base models without a chat template."""
    question = f"Question: {user}\nAnswer:"
    return f"{system}\n\n{question}" if system else question


def encode_text(tokenizer: PreTrainedTokenizerBase, prompt: str, assistant: str | None = None) -> TokenSequence:
    """Encode a plain-text prompt (with the tokenizer's special tokens) and an optional response."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _join(tokenizer, prompt_ids, assistant)


def _join(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], assistant: str | None) -> TokenSequence:
    response_ids = tokenizer.encode(assistant, add_special_tokens=False) if assistant else []
    return TokenSequence(ids=tuple(prompt_ids) + tuple(response_ids), prompt_len=len(prompt_ids))


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat: ChatFormat,
    system: str | None,
    user: str,
    assistant: str | None = None,
) -> TokenSequence:
    """Encode one turn; ``assistant=None`` gives the generation prompt alone."""
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
    response_ids = tokenizer.encode(assistant, add_special_tokens=False) if assistant else []
    return TokenSequence(ids=tuple(prompt_ids) + tuple(response_ids), prompt_len=len(prompt_ids))


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

"""Chat formatting: (system, user[, assistant]) -> token ids with an exact prompt/response boundary.

The prompt is the tokenizer's chat template applied to the conversation with the generation
prompt; the response is encoded on its own and appended, so the boundary is exactly where
generation starts: ``ids[:prompt_len]`` are the prompt ids the model is given and
``ids[prompt_len:]`` the response tokens. ``ids[prompt_len - 1]`` is the last prompt token
(the position ``last_prompt`` reads and the first one ``response`` steering acts on).

Where chat templates differ, personalab decides once, here (``ChatFormat`` says what it found
and ``ChatFormat.notes`` says it in words, printed by the commands that load a model):

* **default system prompt** (Qwen2.5: "You are Qwen, created by Alibaba Cloud...", OLMo-3: "You
  are a helpful function-calling AI assistant..."): kept, as the model is used. A prompt without
  an instruction (evaluation questions, the calibration set, compose's prompts) carries it; an
  instruction given as the system message replaces it, so extraction compares the trait's two
  instructions with each other, never an instruction with the default;
* **no system role** (Gemma-2 raises on one): the system text is folded into the first user
  turn, ``"{system}\\n\\n{user}"``, as the composition paper does and as Gemma-3's own template
  does; templates that place the system text themselves (Mistral: inside the last ``[INST]``)
  are left to do so;
* **thinking markers** (Qwen3): off by default (``enable_thinking=False``, the empty
  ``<think></think>`` block ends the prompt and the answer follows it); ``thinking=True``
  (``--thinking``) keeps the template's default, where the model writes its own thinking;
* **end of turn**: the token that closes an answer is read from the template (``<|im_end|>``,
  ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``, ``</s>``...), never assumed to be the
  end-of-sequence token; fine-tuning trains it as the last target of every answer.

Without a chat template (base models) a turn is written in the ``plain`` format
(``personalab.engine.formats``) and the end of an answer is the end-of-sequence token;
``encode_prompt`` writes one prompt in any of the formats.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from personalab.engine.formats import FORMAT_TEXTS, check_format, format_text
from personalab.errors import InvalidInputError

_SYSTEM = "personalab-system-probe"
_USER = "personalab-user-probe"
_ANSWER = "personalab-answer-probe"


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
    """What a tokenizer's chat template does (see the module docstring for what personalab does about it).

    ``system_role``: a system message is rendered (by the template itself, natively or folded);
    ``default_system``: the text the template writes as the system message when it is given none;
    ``thinking``: the template reacts to ``enable_thinking``; ``end_of_turn``: the tokens that close
    an answer, the last of them a special token; ``thinking_on``: whether prompts keep the thinking
    the template would ask for (``False``: thinking off).
    """

    has_template: bool
    system_role: bool = False
    default_system: str = ""
    thinking: bool = False
    end_of_turn: tuple[int, ...] = ()
    thinking_on: bool = False
    end_text: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        if not self.has_template:
            return "plain (no chat template)"
        return "chat template" + ("" if self.system_role else ", system folded into user turn")

    @property
    def template_kwargs(self) -> dict:
        """Extra variables for ``apply_chat_template``: ``enable_thinking`` where the template reads it."""
        return {"enable_thinking": self.thinking_on} if self.thinking else {}

    @property
    def default_format(self) -> str:
        """The format of a chat turn: ``"chat"`` with a template, else ``"plain"``."""
        return "chat" if self.has_template else "plain"

    def check_format(self, prompt_format: str) -> None:
        """Refuse, in one line, a format that is not one of ``PROMPT_FORMATS`` or ``chat`` without a template."""
        check_format(prompt_format)
        if prompt_format == "chat" and not self.has_template:
            raise InvalidInputError("this model has no chat template: use `format` plain or continuation")

    def describe(self, prompt_format: str | None = None) -> str:
        """One line naming the format a prompt is written in (``default_format`` when not given)."""
        chosen = prompt_format or self.default_format
        if chosen == "chat":
            return self.name
        return f"{chosen} text {FORMAT_TEXTS[chosen]!r}" + (" (no chat template)" if not self.has_template else "")

    def notes(self) -> list[str]:
        """What personalab does with this template, one line each."""
        if not self.has_template:
            return [
                f"no chat template: a turn is written as {FORMAT_TEXTS['plain']!r} (continuation-style traits as "
                f"{FORMAT_TEXTS['continuation']!r}); answers end with the end-of-sequence token"
            ]
        out = []
        if self.default_system:
            out.append(
                f"the template's default system prompt is kept where no instruction is given "
                f"({self.default_system[:60]!r}{'...' if len(self.default_system) > 60 else ''}); "
                f"an instruction replaces it"
            )
        if not self.system_role:
            out.append("the template has no system role: instructions are folded into the first user turn")
        if self.thinking:
            out.append(
                "thinking is on (--thinking): the model writes its own thinking"
                if self.thinking_on
                else "thinking markers are off (enable_thinking=False); --thinking keeps them"
            )
        out.append(f"answers end with {self.end_text!r} (read from the template), trained by fine-tuning")
        return out


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], prompt: bool = False, **kwargs) -> str | None:
    """The template's text for ``messages`` (``None`` when the template refuses them)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **kwargs)
    except Exception:  # templates refuse with jinja's raise_exception (roles, alternation)
        return None


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's special tokens (its named ones and every added token marked special)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def _end_of_turn(tokenizer: PreTrainedTokenizerBase, kwargs: dict) -> tuple[int, ...]:
    """What the template writes after an answer, up to and including its first special token; the
    end-of-sequence token when it writes none."""
    eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    messages = [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ANSWER}]
    text = _render(tokenizer, messages, **kwargs)
    if text is None or _ANSWER not in text:
        return eos
    after = tokenizer.encode(text.split(_ANSWER, 1)[1], add_special_tokens=False)
    special = special_ids(tokenizer)
    end = next((k for k, token in enumerate(after) if token in special), None)
    return eos if end is None else tuple(after[: end + 1])


def _default_system(tokenizer: PreTrainedTokenizerBase, kwargs: dict) -> str:
    """The system text the template writes when given none: what stands where a given system message would.

    With a system message the render is ``A + system + B + user...``; without one, a template with a
    default renders ``A + default + B + user...``.
    """
    user = [{"role": "user", "content": _USER}]
    given = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, *user], True, **kwargs)
    plain = _render(tokenizer, user, True, **kwargs)
    if given is None or plain is None or _SYSTEM not in given or _USER not in plain:
        return ""
    before, rest = given.split(_SYSTEM, 1)
    between = rest.split(_USER, 1)[0]
    head = plain.split(_USER, 1)[0]
    if head.startswith(before) and head.endswith(between) and len(head) >= len(before) + len(between):
        return head[len(before) : len(head) - len(between)].strip()
    return ""


def detect_chat_format(tokenizer: PreTrainedTokenizerBase, thinking: bool = False) -> ChatFormat:
    """What the tokenizer's chat template does: system role, default system prompt, thinking markers and
    end-of-turn tokens (found by rendering probe conversations); ``thinking`` keeps the template's
    thinking where it has any."""
    if not getattr(tokenizer, "chat_template", None):
        eos = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
        return ChatFormat(has_template=False, end_of_turn=eos, end_text=tokenizer.eos_token or "")
    user = [{"role": "user", "content": _USER}]
    on, off = (_render(tokenizer, user, True, enable_thinking=flag) for flag in (True, False))
    supports_thinking = on is not None and off is not None and on != off
    kwargs = {"enable_thinking": thinking} if supports_thinking else {}
    given = _render(tokenizer, [{"role": "system", "content": _SYSTEM}, *user], **kwargs)
    system_role = given is not None and _SYSTEM in given
    end = _end_of_turn(tokenizer, kwargs)
    return ChatFormat(
        has_template=True,
        system_role=system_role,
        default_system=_default_system(tokenizer, kwargs) if system_role else "",
        thinking=supports_thinking,
        end_of_turn=end,
        thinking_on=thinking and supports_thinking,
        end_text=tokenizer.decode(list(end)) if end else "",
    )


def encode_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str, assistant: str | None = None, end: Sequence[int] = ()
) -> TokenSequence:
    """Encode a plain-text prompt (with the tokenizer's special tokens) and an optional response followed by
    the ``end`` tokens (e.g. the end-of-sequence token, as a training target)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return _join(tokenizer, prompt_ids, assistant, end)


def with_answer(tokenizer: PreTrainedTokenizerBase, prompt: TokenSequence, answer: str) -> TokenSequence:
    """``prompt`` (a generation prompt in any format) followed by ``answer`` encoded on its own, as ``encode_chat``
    writes an answer: the sequence whose response is ``answer``."""
    return _join(tokenizer, list(prompt.ids[: prompt.prompt_len]), answer, ())


def _join(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], assistant: str | None, end: Sequence[int]
) -> TokenSequence:
    response_ids = tokenizer.encode(assistant, add_special_tokens=False) if assistant else []
    tail = tuple(end) if assistant is not None else ()
    return TokenSequence(ids=tuple(prompt_ids) + tuple(response_ids) + tail, prompt_len=len(prompt_ids))


def chat_messages(
    chat: ChatFormat, system: str | None, user: str, history: Sequence[tuple[str, str]] = ()
) -> list[dict]:
    """The messages of a conversation: the system message as given (or folded into the first user turn when the
    template has no system role), the earlier ``(user, assistant)`` turns of ``history``, then ``user``."""
    turns = [(u, a) for u, a in history] + [(user, None)]
    messages = []
    for k, (u, a) in enumerate(turns):
        folded = k == 0 and system and not chat.system_role
        messages.append({"role": "user", "content": f"{system}\n\n{u}" if folded else u})
        if a is not None:
            messages.append({"role": "assistant", "content": a})
    return ([{"role": "system", "content": system}] if system and chat.system_role else []) + messages


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat: ChatFormat,
    system: str | None,
    user: str,
    assistant: str | None = None,
    end: Sequence[int] = (),
    history: Sequence[tuple[str, str]] = (),
) -> TokenSequence:
    """Encode one turn after the earlier ``(user, assistant)`` turns of ``history``; ``assistant=None`` gives the
    generation prompt alone, else the answer follows it, then the ``end`` tokens (``ChatFormat.end_of_turn``, where
    the answer is a training target). The prompt is the whole conversation so far, templated at once."""
    if not chat.has_template:
        prompt_ids = tokenizer(format_text("plain", system, user, history), add_special_tokens=True)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(
            chat_messages(chat, system, user, history),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **chat.template_kwargs,
        )
    return _join(tokenizer, prompt_ids, assistant, end)


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, chat: ChatFormat, prompt_format: str, system: str | None, user: str
) -> TokenSequence:
    """The generation prompt of one turn in ``prompt_format`` (``PROMPT_FORMATS``): ``chat`` through the
    template (``encode_chat``), ``plain`` or ``continuation`` as text (``FORMAT_TEXTS``)."""
    chat.check_format(prompt_format)
    if prompt_format == "chat":
        return encode_chat(tokenizer, chat, system, user)
    return encode_text(tokenizer, format_text(prompt_format, system, user))


def encode_system(tokenizer: PreTrainedTokenizerBase, chat: ChatFormat, text: str) -> TokenSequence:
    """``text`` alone as the system message with the generation prompt: a user turn where the template has
    no system role or drops a system message that no user turn follows (Gemma-3, Mistral), the plain
    text for models without a template."""
    if not chat.has_template:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        return TokenSequence(ids=tuple(ids), prompt_len=len(ids))
    for role in ("system", "user") if chat.system_role else ("user",):
        rendered = _render(tokenizer, [{"role": role, "content": text}], True, **chat.template_kwargs)
        if rendered is None or text not in rendered:
            continue
        ids = tokenizer.apply_chat_template(
            [{"role": role, "content": text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            **chat.template_kwargs,
        )
        return TokenSequence(ids=tuple(ids), prompt_len=len(ids))
    raise ValueError("the chat template renders neither a lone system message nor a lone user turn")


def positions_example(
    tokenizer: PreTrainedTokenizerBase,
    chat: ChatFormat,
    system: str = "You are a cruel assistant.",
    user: str = "How do I make friends?",
    answer: str = "Be kind.",
) -> list[tuple[str, str]]:
    """One conversation as personalab encodes it, with the positions it reads: ``(label, text)`` rows."""
    seq = encode_chat(tokenizer, chat, system, user, answer, chat.end_of_turn)
    p, end = seq.prompt_len, len(seq.ids) - len(chat.end_of_turn)

    def token(i: int) -> str:
        return repr(tokenizer.decode(seq.ids[i : i + 1]))

    rows = [
        ("rendered prompt", tokenizer.decode(seq.ids[:p])),
        (
            "last prompt token",
            f"position {p - 1}: {token(p - 1)} (last_prompt; the first position response steering acts on)",
        ),  # fmt: skip
        ("response starts", f"position {p}: {token(p)} (response means; generated steering) of {answer!r}"),
    ]
    if chat.end_of_turn:
        rows.append(("trained end of turn", f"position {end}: {token(end)} (the last target of a fine-tuned answer)"))
    return rows + [("template", note) for note in chat.notes()]

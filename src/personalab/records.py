"""Chat records in JSONL: the data format that projection, screening and fine-tuning read.

Each line is ``{"messages": [...]}`` (optional leading system message; the last user
message is the prompt; a final assistant message, if present, the response; the turns between
them, alternating user and assistant, the conversation so far) or
``{"prompt": str, "response"?: str, "system"?: str}``. A record is encoded whole: its earlier turns
are templated with its prompt, as the persona-vectors reference templates ``messages[:-1]``.
"""

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from personalab.errors import InvalidInputError

_RECORD_HINT = "each record needs 'messages' with a user turn or a 'prompt'"


class Encoder(Protocol):
    """What encodes a conversation (``personalab.engine.handle.ModelHandle``)."""

    def encode(
        self,
        system: str | None,
        user: str,
        assistant: str | None = None,
        end: bool = False,
        history: Sequence[tuple[str, str]] = (),
    ) -> Any: ...


@dataclass(frozen=True)
class Record:
    """One conversation to project: ``history`` holds its earlier ``(user, assistant)`` turns, ``prompt`` its last
    user message, ``response`` the answer to it; ``source`` is the JSON object it was read from."""

    system: str | None
    prompt: str
    response: str | None
    source: dict = field(default_factory=dict, compare=False)
    where: str = field(default="", compare=False)
    """The file and line it was read from."""
    history: tuple[tuple[str, str], ...] = ()

    def encode(self, handle: Encoder, response: bool = True, end: bool = False) -> Any:
        """The whole conversation as ``handle`` encodes it (a ``TokenSequence``): the earlier turns and the prompt,
        then the response when ``response`` (closed by the end-of-turn tokens when ``end``)."""
        return handle.encode(self.system, self.prompt, self.response if response else None, end, self.history)

    def content(self, response: bool = True) -> list:
        """What the record holds, for hashing: ``[system, prompt(, response)]``, and the earlier turns when there are
        any (a single-turn record hashes as before they were kept)."""
        out = [self.system, self.prompt] + ([self.response] if response else [])
        return out + ([[list(turn) for turn in self.history]] if self.history else [])


def _text(value: object, what: str, where: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidInputError(f"{where}: {what} must be a string, got {type(value).__name__}")
    return value


def _from_messages(messages: object, where: str) -> tuple[str | None, str, str | None, tuple[tuple[str, str], ...]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidInputError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
    roles = [m.get("role") for m in messages]
    users = [i for i, role in enumerate(roles) if role == "user"]
    if not users:
        raise InvalidInputError(f"{where}: no user message; {_RECORD_HINT}")
    system = _text(messages[0].get("content"), "system content", where) if roles[0] == "system" else None
    start = 1 if system is not None else 0
    earlier = roles[start : users[-1]]
    if earlier != ["user", "assistant"] * (len(earlier) // 2):
        raise InvalidInputError(
            f"{where}: the turns before the last user message are {earlier}; after an optional first system message "
            f"they must alternate user and assistant"
        )
    history = tuple(
        (
            _text(messages[i].get("content"), "user content", where),
            _text(messages[i + 1].get("content"), "assistant content", where),
        )
        for i in range(start, users[-1], 2)
    )
    prompt = _text(messages[users[-1]].get("content"), "user content", where)
    if users[-1] == len(messages) - 1:
        return system, prompt, None, history
    if roles[-1] != "assistant":
        raise InvalidInputError(f"{where}: the last message has role {roles[-1]!r}; end with a user or assistant turn")
    if len(messages) - users[-1] != 2:
        raise InvalidInputError(f"{where}: the last user message must be followed by one assistant turn or none")
    return system, prompt, _text(messages[-1].get("content"), "assistant content", where), history


def _parse_record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise InvalidInputError(f"{where}: expected a JSON object, got {type(obj).__name__}; {_RECORD_HINT}")
    history: tuple[tuple[str, str], ...] = ()
    if "messages" in obj:
        system, prompt, response, history = _from_messages(obj["messages"], where)
    elif "prompt" in obj:
        prompt = _text(obj["prompt"], "'prompt'", where)
        response = _text(obj.get("response"), "'response'", where, optional=True)
        system = _text(obj.get("system"), "'system'", where, optional=True)
    else:
        raise InvalidInputError(f"{where}: no user message; {_RECORD_HINT}")
    return Record(system=system, prompt=prompt, response=response, source=obj, where=where, history=history)


def jsonl_values(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, value)`` for each non-blank line of a JSONL file, ``where`` being ``"PATH line N"``;
    a line that is not JSON raises ``InvalidInputError`` naming it."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            where = f"{path} line {number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = "write one JSON object per line"
                raise InvalidInputError(f"{where}: not valid JSON ({exc.msg}); {hint}") from None
            yield where, value


def load_records(path: str | Path) -> list[Record]:
    """Read a JSONL file of chat records (blank lines skipped), in file order.

    Each line is ``{"messages": [...]}`` (optional leading system message; the last user
    message is the prompt; a final assistant message, if present, the response; the alternating
    turns between them, the conversation so far) or ``{"prompt": str, "response"?: str, "system"?: str}``.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path} does not exist; give a JSONL file with one record per line")
    records = [_parse_record(obj, where) for where, obj in jsonl_values(path)]
    if not records:
        raise InvalidInputError(f"{path} has no records; write one JSON object per line")
    return records


def data_file(records: list[Record]) -> Path | None:
    """The JSONL file ``records`` were read from (``None`` for records made in memory)."""
    where = records[0].where.rsplit(" line ", 1)[0] if records and " line " in records[0].where else ""
    return Path(where) if where and Path(where).is_file() else None

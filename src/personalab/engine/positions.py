"""Which token positions of a sequence: one vocabulary for what capture reads and what interventions act on.

Indices are within the unpadded sequence (``0 .. len(ids) - 1``); the prompt is ``ids[:prompt_len]``.
Named positions (``PositionName``), the same tokens in ``capture`` and in ``Steer``/``Ablate``/``Clamp``:

* ``"all"``: every token;
* ``"prompt"``: ``ids[:prompt_len]``;
* ``"response"``: ``ids[prompt_len:]``, the answer's tokens;
* ``"last_prompt"``: ``ids[prompt_len - 1]``;
* ``"generating"``: ``ids[prompt_len - 1:]``, the positions whose outputs produce the answer (the last prompt
  token and every answer token), where the public persona-vectors code steers.

Capture also takes ``GeneratedToken(k)`` (the k-th response token, position ``prompt_len + k``) and
``Indices(rows)`` (explicit index lists, one per sequence; negative counts from the end).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from personalab.errors import InvalidInputError

if TYPE_CHECKING:
    from personalab.engine.chat import TokenSequence

PositionName = Literal["all", "prompt", "response", "last_prompt", "generating"]
NAMED: tuple[str, ...] = get_args(PositionName)
RENAMED = {"generated": "response"}
"""Names of earlier releases (interventions' ``generated``) and what they are called now."""


def check_name(name: str) -> None:
    """Refuse a name that is not a ``PositionName``, in one line that names the right one."""
    if name in RENAMED:
        raise InvalidInputError(f"positions {name!r} is now called {RENAMED[name]!r}")
    if name not in NAMED:
        raise InvalidInputError(f"unknown positions {name!r}; use one of {', '.join(NAMED)}")


def named_mask(name: str, index, prompt_len):
    """Which unpadded ``index`` values (a torch or numpy array; ``prompt_len`` broadcasts against it) the
    named positions select, as a bool array of ``index``'s shape."""
    if name == "all":
        return index >= 0
    if name == "prompt":
        return index < prompt_len
    if name == "response":
        return index >= prompt_len
    if name == "last_prompt":
        return index == prompt_len - 1
    if name == "generating":
        return index >= prompt_len - 1
    check_name(name)
    raise AssertionError(name)


@dataclass(frozen=True)
class GeneratedToken:
    """The ``k``-th generated (response) token, 0-based."""

    k: int


@dataclass(frozen=True)
class Indices:
    """Explicit positions: ``rows[i]`` lists the indices to read in sequence ``i``."""

    rows: Sequence[Sequence[int]]


Positions = str | GeneratedToken | Indices


def _row_indices(spec: Positions, seq: "TokenSequence", row: int, explicit: Sequence[int] | None) -> list[int]:
    n, p = len(seq.ids), seq.prompt_len
    if explicit is not None:
        out = [i + n if i < 0 else i for i in explicit]
        if any(not 0 <= i < n for i in out):
            raise InvalidInputError(f"sequence {row}: index out of range for length {n} in {list(explicit)}")
        return out
    if isinstance(spec, GeneratedToken):
        if not 0 <= spec.k < seq.response_len:
            raise InvalidInputError(
                f"sequence {row} has {seq.response_len} response tokens; generated token {spec.k} does not exist"
            )
        return [p + spec.k]
    if not isinstance(spec, str):
        raise InvalidInputError(f"unknown positions {spec!r}; use one of {', '.join(NAMED)}, GeneratedToken or Indices")
    index = torch.arange(n)
    return index[named_mask(spec, index, p)].tolist()


def select_positions(spec: Positions, seqs: "Sequence[TokenSequence]") -> list[torch.Tensor]:
    """Per-sequence LongTensors of selected indices; raises on an empty selection."""
    if isinstance(spec, Indices) and len(spec.rows) != len(seqs):
        raise InvalidInputError(
            f"Indices has {len(spec.rows)} rows for {len(seqs)} sequences; give one list per sequence"
        )
    out = []
    for row, seq in enumerate(seqs):
        idx = _row_indices(spec, seq, row, spec.rows[row] if isinstance(spec, Indices) else None)
        if not idx:
            raise InvalidInputError(f"sequence {row} has no {spec!r} positions (is its response empty?)")
        out.append(torch.tensor(idx, dtype=torch.long))
    return out

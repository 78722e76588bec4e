"""Which token positions of a sequence to read: selectors for activation capture.

Indices are within the unpadded sequence (``0 .. len(ids) - 1``); the prompt is
``ids[:prompt_len]``. Selectors:

* ``"all"``, ``"prompt"``, ``"response"`` (``ids[prompt_len:]``), ``"last_prompt"``;
* ``GeneratedToken(k)``: the k-th response token (0-based), position ``prompt_len + k``;
* ``Indices(rows)``: explicit index lists, one per sequence (negative counts from the end).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from personalab.engine.chat import TokenSequence
from personalab.errors import InvalidInputError

NAMED = ("all", "prompt", "response", "last_prompt")


@dataclass(frozen=True)
class GeneratedToken:
    """The ``k``-th generated (response) token, 0-based."""

    k: int


@dataclass(frozen=True)
class Indices:
    """Explicit positions: ``rows[i]`` lists the indices to read in sequence ``i``."""

    rows: Sequence[Sequence[int]]


Positions = str | GeneratedToken | Indices


def parse_positions(text: str) -> Positions:
    """Parse a command-line selector: a name from ``NAMED`` or ``generated:K``."""
    if text in NAMED:
        return text
    if text.startswith("generated:") and text.partition(":")[2].isdigit():
        return GeneratedToken(int(text.partition(":")[2]))
    raise InvalidInputError(f"unknown positions {text!r}; use one of {', '.join(NAMED)} or generated:K")


def _row_indices(spec: Positions, seq: TokenSequence, row: int, explicit: Sequence[int] | None) -> list[int]:
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
    if spec == "all":
        return list(range(n))
    if spec == "prompt":
        return list(range(p))
    if spec == "last_prompt":
        return [p - 1]
    if spec == "response":
        return list(range(p, n))
    raise InvalidInputError(f"unknown positions {spec!r}; use one of {', '.join(NAMED)}, GeneratedToken or Indices")


def select_positions(spec: Positions, seqs: Sequence[TokenSequence]) -> list[torch.Tensor]:
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

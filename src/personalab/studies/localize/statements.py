"""Persona statements: the built-in set, Anthropic's model-written persona evals, and the IBM CSV layout.

* Anthropic layout (``evals/persona/<persona>.jsonl``, also the built-in files): one object per
  line with ``statement``, ``answer_matching_behavior`` (``" Yes"`` when the statement expresses
  the persona: positive, ``" No"``: negative) and ``label_confidence``;
* IBM layout (one CSV for many personas): columns ``statement``, ``direction``
  (``positive``/``negative``), ``persona_dim`` and ``label_confidence``.

Statements keep their file order, positives and negatives each.
"""

import csv
from dataclasses import dataclass
from pathlib import Path

from personalab.errors import InvalidInputError
from personalab.records import jsonl_values

BUILT_IN = Path(__file__).parent / "personas"


@dataclass(frozen=True)
class Statement:
    """One statement; ``positive`` when it expresses the persona."""

    persona: str
    text: str
    positive: bool
    confidence: float | None


def builtin_personas() -> list[str]:
    """Personas shipped with personalab (60 positive and 60 negative statements each)."""
    return sorted(p.stem for p in BUILT_IN.glob("*.jsonl"))


def _confidence(value: object, where: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{where}: label_confidence {value!r} is not a number") from None


def read_anthropic(path: Path, persona: str) -> list[Statement]:
    """Statements of one Anthropic-layout JSONL file."""
    out = []
    for where, row in jsonl_values(path):
        missing = {"statement", "answer_matching_behavior"} - set(row) if isinstance(row, dict) else {"statement"}
        if missing:
            raise InvalidInputError(
                f"{where}: unknown statement layout (no {sorted(missing)[0]!r}); use Anthropic's persona JSONL "
                f"(statement, answer_matching_behavior) or the IBM CSV (statement, direction, persona_dim)"
            )
        answer = str(row["answer_matching_behavior"]).strip()
        if answer not in ("Yes", "No"):
            raise InvalidInputError(f"{where}: answer_matching_behavior is {answer!r}; expected ' Yes' or ' No'")
        out.append(
            Statement(persona, row["statement"], answer == "Yes", _confidence(row.get("label_confidence"), where))
        )
    return out


def read_ibm(path: Path) -> dict[str, list[Statement]]:
    """Statements of an IBM-layout CSV, by persona."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"statement", "direction", "persona_dim"} - set(reader.fieldnames or [])
        if missing:
            raise InvalidInputError(
                f"{path}: unknown statement layout (no column {sorted(missing)[0]!r}); use the IBM CSV "
                f"(statement, direction, persona_dim, label_confidence) or Anthropic's persona JSONL"
            )
        out: dict[str, list[Statement]] = {}
        for number, row in enumerate(reader, start=2):
            direction = row["direction"].strip()
            if direction not in ("positive", "negative"):
                raise InvalidInputError(f"{path} line {number}: direction {direction!r}; expected positive or negative")
            persona = row["persona_dim"].strip()
            confidence = _confidence(row.get("label_confidence"), f"{path} line {number}")
            out.setdefault(persona, []).append(
                Statement(persona, row["statement"], direction == "positive", confidence)
            )
    return out


def load_statements(
    personas: list[str],
    persona_dir: Path | None = None,
    statements_file: Path | None = None,
    min_confidence: float | None = None,
) -> dict[str, list[Statement]]:
    """The statements of each of ``personas``: from ``statements_file`` (an IBM CSV, or one
    Anthropic JSONL named after its persona), from ``persona_dir/<persona>.jsonl``, else built in;
    with ``label_confidence >= min_confidence`` when given. No ``personas``: every persona of that source."""
    if not personas and statements_file is None:
        folder = persona_dir or BUILT_IN
        personas = sorted(p.stem for p in Path(folder).glob("*.jsonl"))
        if not personas:
            raise InvalidInputError(f"{folder} holds no persona JSONL files; pass `persona_dir` or `statements_file`")
    if statements_file is not None:
        if not statements_file.is_file():
            raise InvalidInputError(f"{statements_file} does not exist; give an IBM CSV or a persona JSONL")
        if statements_file.suffix not in (".csv", ".jsonl"):
            raise InvalidInputError(
                f"{statements_file}: unknown statement layout (neither .csv nor .jsonl); give the IBM CSV "
                f"(statement, direction, persona_dim) or Anthropic's persona JSONL"
            )
        found = (
            read_ibm(statements_file)
            if statements_file.suffix == ".csv"
            else {statements_file.stem: read_anthropic(statements_file, statements_file.stem)}
        )
    else:
        folder = persona_dir or BUILT_IN
        found = {}
        for persona in personas:
            path = folder / f"{persona}.jsonl"
            if path.is_file():
                found[persona] = read_anthropic(path, persona)
    personas = personas or sorted(found)
    missing = [p for p in personas if p not in found]
    if missing:
        known = ", ".join(sorted(found) if statements_file else builtin_personas() if persona_dir is None else [])
        where = statements_file or persona_dir or "the built-in set"
        raise InvalidInputError(f"persona {missing[0]!r} is not in {where}" + (f"; it has {known}" if known else ""))
    out = {}
    for persona in personas:
        rows = found[persona]
        if min_confidence is not None:
            rows = [s for s in rows if s.confidence is not None and s.confidence >= min_confidence]
        out[persona] = rows
    return out

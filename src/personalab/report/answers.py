"""The answers of a run, read from its store, and the contrastive pairs of an extraction.

Every stored generation becomes one row: the question, the instruction it was asked under,
the steering layer and alpha (layers in the convention of ``personalab.engine.layers``), the
sample index, the condition (compared model, trace condition, polarity of an extraction
answer), the model, the text and the judge's scores. A judgement belongs to a generation when
it scored the same answer text to the same question; its rubric names the score: the
coherence rubrics are ``coherence``, a trait's rubric is ``trait`` (or ``trait NAME`` when one
run judged several traits), and the fluency measure (``personalab.judging.fluency``) is ``fluency``. In a store
with steered answers an unsteered answer has alpha 0.

Strings that repeat (questions, instructions, conditions, models) are stored once and
referenced by index, so a page with 100,000 answers stays a few times the size of their text.
"""

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from personalab.judging.fluency import FLUENCY
from personalab.records import jsonl_values
from personalab.traits import COHERENCE_CONTINUATION, COHERENCE_RUBRIC, LIBRARY

if TYPE_CHECKING:
    import pandas as pd

ANSWER_FIELDS = ("question", "instruction", "layer", "alpha", "sample", "condition", "model", "text")
"""The fields of an answer row, before its scores (one per score label)."""

INTERNED = ("question", "instruction", "condition", "model")
"""Fields stored as an index into the list of their distinct values."""

CONDITION_KEYS = ("eval", "trace", "condition", "polarity")
"""Request keys that name the condition an answer was generated under, joined with " · "."""


def _trait_rubrics(folders: list[Path]) -> dict[str, str]:
    """Rubric text -> trait name, from the built-in traits and the ``trait.json`` files given."""
    named = {}
    for file in [*sorted(LIBRARY.glob("*.json")), *folders]:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("rubric"), str):
            named[data["rubric"]] = str(data.get("name", file.stem))
    return named


def _polarities(trait_file: Path) -> dict[str, str]:
    """Instruction text -> ``pos``/``neg`` from a run's ``trait.json`` (empty when there is none)."""
    try:
        data = json.loads(trait_file.read_text())
        return {text: side for pair in data["instructions"] for side, text in pair.items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        return {}


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _score_labels(rubrics: list[str], names: dict[str, str]) -> dict[str, str]:
    """A label for each rubric: ``coherence``, ``trait``, or ``trait NAME`` when several traits were judged."""
    coherence = {COHERENCE_RUBRIC, COHERENCE_CONTINUATION}
    traits = [r for r in rubrics if r not in coherence and r != FLUENCY]
    labels = {r: "coherence" if r in coherence else "fluency" for r in rubrics if r in coherence or r == FLUENCY}
    if len(traits) == 1:
        labels[traits[0]] = "trait"
    for index, rubric in enumerate(traits if len(traits) > 1 else []):
        labels[rubric] = f"trait {names.get(rubric, index + 1)}"
    return labels


def stored_answers(store: Path, trait_files: list[Path]) -> dict:
    """Every generation of ``store`` with its scores, as the page embeds them.

    Returns ``{"fields", "scores", "values": {field: [distinct values]}, "rows"}``; each row
    holds ``ANSWER_FIELDS`` (interned fields as indices into ``values``) then one score per
    label of ``scores`` (``None`` when not judged). Raises ``sqlite3.DatabaseError`` for a file
    that is not a readable store.
    """
    with closing(_connect(store)) as db:
        generations = db.execute("SELECT model, revision, request, text FROM generations ORDER BY rowid").fetchall()
        judged = db.execute("SELECT question, answer, rubric, score FROM judgements ORDER BY rowid").fetchall()
    requests = [json.loads(request) for _, _, request, _ in generations]
    labels = _score_labels(list(dict.fromkeys(r for _, _, r, _ in judged)), _trait_rubrics(trait_files))
    scores = sorted(dict.fromkeys(labels.values()), key=lambda label: (label == "fluency", label == "coherence"))
    by_answer: dict[tuple[str, str], dict[str, float | None]] = {}
    for question, answer, rubric, score in judged:
        by_answer.setdefault((question, answer), {}).setdefault(labels[rubric], score)
    polarity = {}
    for file in trait_files:
        polarity.update(_polarities(file))
    steered = any("steer" in r or "alpha" in r for r in requests)
    values: dict[str, dict[str, int]] = {name: {} for name in INTERNED}
    rows = []
    for (model, revision, _, text), request in zip(generations, requests, strict=True):
        steer = request.get("steer") or {}
        question = str(request.get("question", ""))
        instruction = request.get("instruction", request.get("system"))
        if instruction in polarity:
            request = {**request, "polarity": polarity[instruction]}
        alpha = steer.get("alpha", request.get("alpha"))
        fields = {
            "question": question,
            "instruction": "" if instruction is None else str(instruction),
            "condition": " · ".join(str(request[k]) for k in CONDITION_KEYS if request.get(k) is not None),
            "model": model if revision is None else f"{model}@{revision}",
        }
        row = [values[name].setdefault(fields[name], len(values[name])) for name in ("question", "instruction")]
        row += [
            steer.get("layer", request.get("layer")),
            0.0 if alpha is None and steered else alpha,
            request.get("sample"),
            values["condition"].setdefault(fields["condition"], len(values["condition"])),
            values["model"].setdefault(fields["model"], len(values["model"])),
            text,
        ]
        judged_scores = by_answer.get((question, text), {})
        rows.append(row + [judged_scores.get(label) for label in scores])
    return {
        "fields": list(ANSWER_FIELDS),
        "scores": scores,
        "values": {name: list(found) for name, found in values.items()},
        "rows": rows,
    }


def answers_table(store: Path, trait_files: list[Path]) -> "pd.DataFrame":
    """``stored_answers`` as a table: one row per generation, the ``ANSWER_FIELDS`` then one column per score."""
    import pandas as pd

    data = stored_answers(store, trait_files)
    width = len(ANSWER_FIELDS)
    rows = []
    for row in data["rows"]:
        fields = dict(zip(ANSWER_FIELDS, row[:width], strict=True))
        fields.update({name: data["values"][name][fields[name]] for name in INTERNED})
        rows.append({**fields, **dict(zip(data["scores"], row[width:], strict=True))})
    return pd.DataFrame(rows, columns=[*ANSWER_FIELDS, *data["scores"]])


def extraction_pairs(path: Path) -> list[dict]:
    """The lines of an extraction's ``pairs.jsonl``; ``InvalidInputError`` names a line that is not JSON."""
    return [pair for _, pair in jsonl_values(path)]

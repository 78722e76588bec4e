"""The built-in trait library (traits, rubrics, calibration prompts, strategies), run folders' traits, and the public
persona-vectors layout."""

from pathlib import Path
from typing import TYPE_CHECKING

from personalab.errors import InvalidInputError
from personalab.traits.schema import InstructionPair, Trait, load_trait_file, parse_trait, read_json

if TYPE_CHECKING:
    from personalab.engine.chat import TokenSequence
    from personalab.engine.handle import ModelHandle

LIBRARY = Path(__file__).parent / "library"
COHERENCE_RUBRIC = (LIBRARY / "coherence.txt").read_text()
COHERENCE_CONTINUATION = (LIBRARY / "coherence_continuation.txt").read_text()
STRATEGIES = LIBRARY / "strategies"
"""Elicitation strategies for base models, one trait file each: ``{trait}-{strategy}.json``."""


def coherence_rubric(continuation: bool) -> str:
    """The coherence rubric for an answer to a question, or for a continuation of a text."""
    return COHERENCE_CONTINUATION if continuation else COHERENCE_RUBRIC


def builtin_traits() -> list[str]:
    """Names of the traits shipped with personalab."""
    return sorted(p.stem for p in LIBRARY.glob("*.json"))


CALIBRATION_TRAITS = ("apathetic", "evil", "hallucinating", "humorous", "impolite", "optimistic", "sycophantic")
"""The traits whose extraction questions are the calibration set: fixed, so a trait added to the library does not
change what ``--scale normalised`` means."""


def library_questions() -> list[str]:
    """The extraction questions of the ``CALIBRATION_TRAITS`` (140): a broad, fixed prompt set (residual norms)."""
    return [q for name in CALIBRATION_TRAITS for q in load_trait_file(LIBRARY / f"{name}.json").extraction_questions]


def calibration_prompts(handle: "ModelHandle") -> "list[TokenSequence]":
    """The fixed prompt set on which ``--scale normalised`` measures a model's typical residual norm: the extraction
    questions of the ``CALIBRATION_TRAITS``, each as a user turn with the generation prompt."""
    return [handle.encode(None, q) for q in library_questions()]


def reference_system_prompt(trait: str, polarity: str, instruction: str) -> str:
    """The system prompt the persona-vectors reference writes for its own data
    (``eval_persona.load_persona_questions``): ``"You are {a} {name} assistant. {instruction}"``, ``name`` the trait
    for ``pos`` and ``helpful`` for ``neg``, the article ``an`` before a vowel."""
    name = trait if polarity == "pos" else "helpful"
    return f"You are {'an' if name[0].lower() in 'aeiou' else 'a'} {name} assistant. {instruction}"


def load_public_trait(root: str | Path, name: str) -> Trait:
    """Import a trait from the public persona-vectors layout, with the reference's prompts.

    ``root/trait_data_extract/{name}.json`` gives the instruction pairs and the extraction
    questions, ``root/trait_data_eval/{name}.json`` the evaluation questions; both hold
    ``instruction`` [{pos, neg}], ``questions`` and ``eval_prompt`` (the rubric). Each instruction becomes the
    system prompt the reference builds from it (``reference_system_prompt``): ``"You are an evil assistant. ..."``
    (positive) and ``"You are a helpful assistant. ..."`` (negative), so extraction asks exactly what it asks.
    """
    root = Path(root)
    parts = {}
    for split in ("extract", "eval"):
        path = root / f"trait_data_{split}" / f"{name}.json"
        parts[split] = read_json(path, f"{path} does not exist; point `trait_dir` at a persona-vectors data folder")
        missing = {"instruction", "questions", "eval_prompt"} - set(parts[split])
        if missing:
            raise InvalidInputError(f"{path}: field {sorted(missing)[0]!r} is missing")
    extract, evaluate = parts["extract"], parts["eval"]
    data = {
        "name": name,
        "description": name,
        "instructions": [
            {polarity: reference_system_prompt(name, polarity, text) for polarity, text in pair.model_dump().items()}
            for pair in map(InstructionPair.model_validate, extract["instruction"])
        ],
        "extraction_questions": extract["questions"],
        "evaluation_questions": evaluate["questions"],
        "rubric": extract["eval_prompt"],
    }
    return parse_trait(data, str(root / "trait_data_extract" / f"{name}.json"))


RUN_TRAIT = "trait.json"
"""The file in which a run folder keeps the full trait it was made with."""


def run_trait(vector: str | Path) -> tuple[Trait, Path] | None:
    """The trait kept with a vector: ``trait.json`` in the run folder ``vector`` (or beside the file
    ``vector``), or a built-in trait named in the folder's ``meta.json``; ``None`` when there is neither."""
    folder = Path(vector) if Path(vector).is_dir() else Path(vector).parent
    if (folder / RUN_TRAIT).is_file():
        return load_trait_file(folder / RUN_TRAIT), folder / RUN_TRAIT
    meta = folder / "meta.json"
    name = read_json(meta, "").get("trait") if meta.is_file() else None
    if isinstance(name, str) and name in builtin_traits():
        return load_trait_file(LIBRARY / f"{name}.json"), meta
    return None


def load_trait(spec: str, trait_dir: str | Path | None = None) -> Trait:
    """A trait by built-in name, by path to a trait JSON file, or by name in ``trait_dir`` (public layout)."""
    if trait_dir is not None:
        return load_public_trait(trait_dir, spec)
    if spec in builtin_traits():
        return load_trait_file(LIBRARY / f"{spec}.json")
    if (STRATEGIES / f"{spec}.json").is_file():
        return load_trait_file(STRATEGIES / f"{spec}.json")
    if spec.endswith(".json") or Path(spec).is_file():
        return load_trait_file(spec)
    raise InvalidInputError(
        f"unknown trait {spec!r}; use a built-in trait ({', '.join(builtin_traits())}), a base-model strategy "
        f"({', '.join(builtin_strategies())}), a trait JSON file, or `trait_dir` for the persona-vectors layout"
    )


def builtin_strategies() -> list[str]:
    """Names of the base-model strategy variants shipped with personalab (``{trait}-{strategy}``)."""
    return sorted(p.stem for p in STRATEGIES.glob("*.json"))

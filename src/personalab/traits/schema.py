"""The trait file schema: what a persona trait is made of, validated with pydantic."""

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from personalab.errors import InvalidInputError
from personalab.files import write_text
from personalab.hashes import fingerprint

Elicitation = Literal["system_prompt", "plain", "third_person", "few_shot", "dialogue", "continuation"]


class InstructionPair(BaseModel):
    """``pos`` elicits the trait, ``neg`` suppresses it (system prompts, or preambles for base models)."""

    model_config = ConfigDict(extra="forbid")
    pos: str = Field(min_length=1)
    neg: str = Field(min_length=1)


class Trait(BaseModel):
    """A persona trait: contrastive instructions, disjoint extraction/evaluation questions, a judge rubric.

    ``rubric`` is a template with ``{question}`` and ``{answer}`` asking for one number 0-100.
    ``elicitation`` chooses how instructions reach the model (see ``personalab.traits.elicitation``).
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$", description="letters, digits, _ and -")
    description: str = Field(min_length=1, description="what the trait is; writers and judges read it")
    instructions: list[InstructionPair] = Field(
        min_length=1,
        description='[{"pos": ..., "neg": ...}]: pos elicits the trait, neg suppresses it (system prompts, preambles)',
    )
    extraction_questions: list[str] = Field(min_length=1, description="questions answered to extract the vector")
    evaluation_questions: list[str] = Field(
        min_length=1, description="questions for sweeps and comparisons, none repeating an extraction question"
    )
    rubric: str = Field(description="judge prompt with {question} and {answer}, asking for one number 0-100")
    elicitation: Elicitation = Field("system_prompt", description="how an instruction reaches the model (styles below)")

    @field_validator("extraction_questions", "evaluation_questions")
    @classmethod
    def _questions_unique(cls, questions: list[str]) -> list[str]:
        if any(not q.strip() for q in questions):
            raise ValueError("questions must not be empty")
        if len(set(questions)) != len(questions):
            raise ValueError("questions must not repeat")
        return questions

    @field_validator("rubric")
    @classmethod
    def _rubric_placeholders(cls, rubric: str) -> str:
        for placeholder in ("{question}", "{answer}"):
            if placeholder not in rubric:
                raise ValueError(f"rubric must contain {placeholder}")
        return rubric

    @model_validator(mode="after")
    def _disjoint(self) -> "Trait":
        shared = set(self.extraction_questions) & set(self.evaluation_questions)
        if shared:
            raise ValueError(f"evaluation questions repeat extraction questions: {sorted(shared)[0]!r}")
        return self

    def render_rubric(self, question: str, answer: str) -> str:
        """The rubric with ``{question}`` and ``{answer}`` filled in (other braces left alone)."""
        return render_rubric(self.rubric, question, answer)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the trait: identifies exactly which trait made a vector."""
        return fingerprint(self.model_dump(), ascii=True)

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.model_dump(), indent=2, ensure_ascii=False) + "\n")


def render_rubric(rubric: str, question: str, answer: str) -> str:
    """Fill ``{question}`` and ``{answer}``; any other braces in the rubric stay as written."""
    return rubric.replace("{question}", question).replace("{answer}", answer)


def describe_validation_error(source: str, error: ValidationError) -> str:
    """One line naming the first bad field of a trait file and what is wrong with it."""
    first = error.errors()[0]
    field = ".".join(str(part) for part in first["loc"]) or "(top level)"
    return f"{source}: field {field!r}: {first['msg']}"


def parse_trait(data: object, source: str) -> Trait:
    """Validate already-parsed JSON as a ``Trait``; errors name the source and the field."""
    try:
        return Trait.model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(describe_validation_error(source, exc)) from None


def read_json(path: Path, missing: str) -> object:
    """Parsed JSON of ``path``; ``missing`` is the one-line error when the file does not exist."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInputError(missing) from None
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


def load_trait_file(path: str | Path) -> Trait:
    """Load and validate a trait JSON file in personalab's schema."""
    path = Path(path)
    return parse_trait(read_json(path, f"trait file {path} does not exist"), str(path))

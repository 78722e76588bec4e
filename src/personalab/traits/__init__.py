"""Traits: the built-in library (``builtin``, its files in ``library/``), trait files (``schema``), elicitation
styles (``elicitation``) and generated traits (``generate``)."""

from personalab.traits.builtin import (
    CALIBRATION_TRAITS,
    COHERENCE_CONTINUATION,
    COHERENCE_RUBRIC,
    LIBRARY,
    RUN_TRAIT,
    STRATEGIES,
    builtin_strategies,
    builtin_traits,
    calibration_prompts,
    coherence_rubric,
    library_questions,
    load_public_trait,
    load_trait,
    reference_system_prompt,
    run_trait,
)
from personalab.traits.schema import InstructionPair, Trait, load_trait_file, parse_trait, read_json

__all__ = [
    "CALIBRATION_TRAITS",
    "COHERENCE_CONTINUATION",
    "COHERENCE_RUBRIC",
    "LIBRARY",
    "RUN_TRAIT",
    "STRATEGIES",
    "InstructionPair",
    "Trait",
    "builtin_strategies",
    "builtin_traits",
    "calibration_prompts",
    "coherence_rubric",
    "library_questions",
    "load_public_trait",
    "load_trait",
    "load_trait_file",
    "parse_trait",
    "read_json",
    "reference_system_prompt",
    "run_trait",
]

"""Judged answers to a trait's evaluation questions: the common scorecard of steered and trained models."""

from pathlib import Path

import pandas as pd

from personalab.console import say
from personalab.engine.generation import GenerationRequest, Interventions, SamplingParams, generate_cached
from personalab.engine.handle import ModelHandle
from personalab.judging.fluency import fluency_cached
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan, plan_judged, score_cached
from personalab.store import Store
from personalab.traits import Trait, coherence_rubric
from personalab.traits.elicitation import continues, evaluation_prompt


def _requests(
    handle: ModelHandle, trait: Trait, label: str, samples: int, interventions: Interventions
) -> list[GenerationRequest]:
    """Every evaluation question ``samples`` times, as ``evaluation_prompt`` encodes it; ``label`` names the condition
    in the store keys."""
    return [
        GenerationRequest(
            evaluation_prompt(handle, trait, q), {"eval": label, "question": q, "sample": s}, interventions
        )
        for q in trait.evaluation_questions
        for s in range(samples)
    ]


def _rubrics(handle: ModelHandle, trait: Trait) -> tuple[str, str]:
    return trait.rubric, coherence_rubric(continues(handle, trait))


def evaluation_plan(
    handle: ModelHandle,
    trait: Trait,
    judge: Judge,
    store: Path | None,
    label: str,
    samples: int,
    params: SamplingParams,
    interventions: Interventions = (),
) -> Plan:
    """The ``Plan`` of ``scored_answers`` with these arguments (the store at ``store`` read, nothing written)."""
    rubrics = _rubrics(handle, trait)
    requests = _requests(handle, trait, label, samples, interventions)
    return plan_judged(
        handle, store, requests, params, judge, lambda r, a: [(r.request["question"], a, rb) for rb in rubrics]
    )


def scored_answers(
    handle: ModelHandle,
    trait: Trait,
    judge: Judge,
    store: Store,
    label: str,
    samples: int,
    params: SamplingParams,
    interventions: Interventions = (),
    progress: bool = True,
    fluency: ModelHandle | None = None,
) -> pd.DataFrame:
    """Answer every evaluation question ``samples`` times (under ``interventions``), judge trait and coherence.

    Questions are asked as ``personalab.traits.elicitation.evaluation_prompt`` encodes them.
    ``label`` names the condition in the store keys. One row per answer: ``question`` (index
    into the evaluation questions), ``sample``, ``answer``, ``trait`` and ``coherence``
    (``NaN`` where the judge gave no number), and with ``fluency`` (the unsteered reference model) ``nll``, the
    answer's mean NLL per token under that model (``personalab.judging.fluency``).
    """
    requests = _requests(handle, trait, label, samples, interventions)
    questions = [r.request["question"] for r in requests]
    say(
        evaluation_plan(handle, trait, judge, store.path, label, samples, params, interventions).describe(label),
        progress,
    )
    texts = generate_cached(handle, store, requests, params, progress=progress, description=f"generate {label}")
    n = len(trait.evaluation_questions)
    table = pd.DataFrame({
        "question": [qi for qi in range(n) for _ in range(samples)],
        "sample": [s for _ in range(n) for s in range(samples)],
        "answer": texts,
    })  # fmt: skip
    for name, rubric in zip(("trait", "coherence"), _rubrics(handle, trait), strict=True):
        items = [(q, a, rubric) for q, a in zip(questions, texts, strict=True)]
        scores = score_cached(store, judge, items, f"judge {name} {label}", progress=progress)
        table[name] = [float("nan") if s is None else s for s in scores]
    if fluency is not None:
        prompts = [evaluation_prompt(fluency, trait, q) for q in questions]
        nll = fluency_cached(
            fluency, store, prompts, texts, questions, progress=progress, description=f"fluency {label}"
        )
        table["nll"] = [float("nan") if v is None else v for v in nll]
    return table


def summary(answers: pd.DataFrame) -> dict:
    """Mean and std (``ddof = 1``) of trait, coherence and (where ``answers`` has it) fluency over the answers that
    have a value, and ``n`` answers."""
    row = {}
    for name in [m for m in ("trait", "coherence", "nll") if m in answers]:
        scores = answers[name].dropna()
        row[f"{name}_mean"] = float(scores.mean()) if len(scores) else float("nan")
        row[f"{name}_std"] = float(scores.std(ddof=1)) if len(scores) > 1 else float("nan")
    row["n"] = len(answers)
    return row

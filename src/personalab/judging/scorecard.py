"""Judged answers to a trait's evaluation questions: the common scorecard of steered and distilled models."""

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.engine.model import ModelHandle
from personalab.judging.judges import Judge
from personalab.judging.scoring import score_cached
from personalab.store import Store
from personalab.traits import COHERENCE_RUBRIC, Trait


def scorecard(
    handle: ModelHandle,
    trait: Trait,
    judge: Judge,
    store: Store,
    label: str,
    samples: int,
    params: SamplingParams,
    steering: Callable[[], AbstractContextManager] | None = None,
    progress: bool = True,
) -> dict:
    """Answer every evaluation question ``samples`` times (inside ``steering()``), judge trait and coherence.

    ``label`` names the condition in the store keys. Returns mean and std (``ddof = 1``) of
    both scores over the answers the judge scored, and ``n``.
    """
    requests = [
        GenerationRequest(handle.encode(None, q), {"eval": label, "question": q, "sample": s})
        for q in trait.evaluation_questions
        for s in range(samples)
    ]
    texts = generate_cached(
        handle, store, requests, params, progress=progress, steering=(lambda rows: steering()) if steering else None
    )
    questions = [r.request["question"] for r in requests]
    row = {}
    for name, rubric in (("trait", trait.rubric), ("coherence", COHERENCE_RUBRIC)):
        items = [(q, t, rubric) for q, t in zip(questions, texts, strict=True)]
        scores = np.array(
            [s for s in score_cached(store, judge, items, f"judge {name}", progress=progress) if s is not None]
        )
        row[f"{name}_mean"] = float(scores.mean()) if len(scores) else float("nan")
        row[f"{name}_std"] = float(scores.std(ddof=1)) if len(scores) > 1 else float("nan")
    row["n"] = len(texts)
    return row

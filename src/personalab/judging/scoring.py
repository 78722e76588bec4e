"""Judging answers through the store: stored judgements are read, missing ones scored and stored."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from personalab.console import progress_bar
from personalab.engine.generation import GenerationRequest, SamplingParams, generation_key
from personalab.engine.handle import ModelHandle
from personalab.hashes import content_key
from personalab.judging.judges import MIN_MASS, Judge, JudgeError, no_score
from personalab.store import Store


@dataclass(frozen=True)
class Plan:
    """What a command will spend before it starts: answers to sample (``generations``, of which ``stored`` are in
    the store already), at most ``new_tokens`` generated tokens, and at most ``judge_calls`` requests to ``judge``
    (each new answer once per rubric, and stored answers not yet judged). ``stored`` is ``None`` where it can only
    be counted later (a model not loaded yet): the plan is then an upper bound, and says so."""

    generations: int
    stored: int | None
    new_tokens: int
    judge_calls: int
    judge: str

    def __add__(self, other: "Plan") -> "Plan":
        return Plan(
            self.generations + other.generations,
            None if self.stored is None or other.stored is None else self.stored + other.stored,
            self.new_tokens + other.new_tokens,
            self.judge_calls + other.judge_calls,
            self.judge or other.judge,
        )

    @classmethod
    def total(cls, plans: "Sequence[Plan]") -> "Plan":
        """The sum of ``plans`` (an empty plan when there are none)."""
        out = cls(0, 0, 0, 0, "")
        for plan in plans:
            out = out + plan
        return out

    def describe(self, what: str = "") -> str:
        """One line: ``plan[ for WHAT]: ...``; the judge part only when there is a judge."""
        judged = f", up to {self.judge_calls:,} judge calls to {self.judge}" if self.judge else ""
        if self.stored is None:
            counted = f"up to {self.generations:,} answers (stored ones are left out as each model is loaded"
        else:
            counted = (
                f"{self.generations:,} answers ({self.stored:,} stored, {self.generations - self.stored:,} to sample"
            )
        return f"plan{f' for {what}' if what else ''}: {counted}, up to {self.new_tokens:,} new tokens){judged}"


def plan_judged(
    handle: ModelHandle,
    store_path: Path | None,
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    judge: Judge | None,
    items: Callable[[GenerationRequest, str], list[tuple[str, str, str]]] = lambda request, answer: [],
) -> Plan:
    """The ``Plan`` of sampling ``requests`` and judging each answer with ``items(request, answer)`` (``judge`` None:
    sampling only); reads the
    store at ``store_path`` when there is one (``None``: nothing stored) and writes nothing."""
    keys = [generation_key(handle, r, params) for r in requests]
    first = {k: r for k, r in zip(keys, requests, strict=True)}
    stored: dict[str, str] = {}
    judged: dict[str, float | None] = {}
    wanted: list[str] = []
    rubrics = max((len(items(r, "")) for r in requests[:1]), default=0)
    if store_path is not None and store_path.is_file():
        with Store(store_path) as store:
            stored = store.texts(list(first))
            if judge is not None:
                for key, text in stored.items():
                    wanted += [content_key("judgement", judge.name, q, a, rb) for q, a, rb in items(first[key], text)]
                judged = store.scores(wanted)
    new = len(first) - len(stored)
    missing = len(set(wanted) - set(judged))
    calls = new * rubrics + missing if judge is not None else 0
    return Plan(len(first), len(stored), new * params.max_new_tokens, calls, judge.name if judge else "")


def score_cached(
    store: Store,
    judge: Judge,
    items: Sequence[tuple[str, str, str]],
    description: str = "judge",
    chunk: int = 64,
    progress: bool = True,
) -> list[float | None]:
    """Scores of ``(question, answer, rubric)`` items in input order.

    Missing scores are computed ``chunk`` at a time and stored after each chunk; a judge
    failure raises before anything of its chunk is stored, never as a score. Scores another
    process stored meanwhile are read, not recomputed. When the judge gave no number for more than half of the
    items, ``JudgeError`` says how many and why, after every score is stored.
    """
    keys = [content_key("judgement", judge.name, q, a, r) for q, a, r in items]
    scores = store.scores(keys)
    todo = list(dict.fromkeys(k for k in keys if k not in scores))
    first = {k: i for i, k in reversed(list(enumerate(keys)))}
    with progress_bar(description, len(todo), progress) as advance:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            stored = store.scores(part)
            scores.update(stored)
            part = [k for k in part if k not in stored]
            if part:
                got = judge.score_many([items[first[k]] for k in part])
                store.put_scores((k, judge.name, *items[first[k]], s) for k, s in zip(part, got, strict=True))
                scores.update(store.scores(part))
            advance(len(stored) + len(part))
    out = [scores[k] for k in keys]
    missing = out.count(None)
    if missing * 2 > len(out):
        raise JudgeError(
            f"{judge.name} gave no score for {missing} of {len(out)} {description} items "
            f"({no_score(getattr(judge, 'min_mass', MIN_MASS))}); "
            f"use a judge that answers the rubric with a number"
        )
    return out

"""Judging answers through the store: stored judgements are read, missing ones scored and stored."""

from collections.abc import Sequence

from personalab.console import progress_bar
from personalab.judging.judges import Judge
from personalab.store import Store, content_key


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
    process stored meanwhile are read, not recomputed.
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
    return [scores[k] for k in keys]

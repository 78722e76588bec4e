"""Fluency without a judge: the mean negative log-likelihood per answer token under the unsteered model.

Every sampling study reports it beside the judge's scores: an answer is teacher-forced once through the model that
was steered (without its interventions) or, for a fine-tune, through its base, after the prompt it was asked with
(``personalab.engine.forward.response_nll``, batched). Fluent text scores about 1-3 nats per token on an instruct
model; word salad scores higher, whatever a keyword judge says of it. Values are stored like judgements, keyed by the
model, the prompt's ids and the answer, so a rerun reads them.
"""

from collections.abc import Sequence

from personalab.engine.chat import TokenSequence, with_answer
from personalab.engine.forward import response_nll
from personalab.engine.handle import ModelHandle
from personalab.hashes import content_key
from personalab.store import Store

FLUENCY = "mean negative log-likelihood per answer token (nats) under the unsteered model"
"""What the fluency column holds, in words (lower is more fluent)."""


def fluency_cached(
    handle: ModelHandle,
    store: Store,
    prompts: Sequence[TokenSequence],
    answers: Sequence[str],
    questions: Sequence[str],
    batch_size: int = 16,
    progress: bool = True,
    description: str = "fluency",
) -> list[float | None]:
    """The mean NLL per token of each ``answers[i]`` after ``prompts[i]`` under ``handle`` (no interventions may be
    active), in input order; ``None`` for an answer that encodes to no tokens. Stored values are read, missing ones
    computed and stored in one transaction, beside the judgements, with rubric ``FLUENCY`` and ``questions[i]`` as
    their question (so a run's report shows them with the judge's scores)."""
    keys = [
        content_key("fluency", handle.name, handle.revision, list(p.ids), a)
        for p, a in zip(prompts, answers, strict=True)
    ]
    values = store.scores(keys)
    first = {k: i for i, k in reversed(list(enumerate(keys))) if k not in values}
    if first:
        todo = list(first.values())
        seqs = [with_answer(handle.tokenizer, prompts[i], answers[i]) for i in todo]
        got = response_nll(handle, seqs, batch_size, progress=progress, label=description)
        name = f"fluency:{handle.name}"
        store.put_scores((keys[i], name, questions[i], answers[i], FLUENCY, v) for i, v in zip(todo, got, strict=True))
        values.update(store.scores(list(first)))
    return [values[k] for k in keys]

"""Batched, cached, reproducible sampling with Hugging Face ``generate``.

Only requests missing from the store are planned, into length-sorted batches of which
only the last may be short; each batch is sampled under a seed derived from the run seed
and the keys of its requests and stored in one transaction. The store therefore holds
whole batches of a plan, and the plan over what is still missing is the same batches with
the same seeds: a resumed run ends with exactly the texts of an uninterrupted run, and
processes running the same command on one store at once skip the batches another has
stored and store the same texts (a key, once stored, keeps its first text). A rerun with
more requests computes only the new ones. A plan sharded over several processes keeps
every stored text when resumed, but the texts still missing may be grouped into other
batches (and so sampled differently) than in an uninterrupted run.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig

from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.model import ModelHandle, unwrap
from personalab.report.progress import progress_bar
from personalab.store import Store, content_key


class SamplingParams(BaseModel):
    """Sampling parameters, the only ones a generation uses (nothing comes from the checkpoint's
    ``generation_config``); ``temperature = 0`` means greedy decoding, ``top_k = 0`` no top-k cut."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class Completion:
    """One answer: its token ids (without the stop token), its text, and the stop token that ended it
    (``None`` when it ran out of ``max_new_tokens``)."""

    ids: tuple[int, ...]
    text: str
    stop: int | None


@contextmanager
def explicit_generation(handle: ModelHandle) -> Iterator[None]:
    """``generate`` fills every parameter it is not given from ``model.generation_config`` (a checkpoint's
    ``repetition_penalty``, ``top_k``, ``no_repeat_ngram_size``...). Inside this block the model has a bare
    config that names only the special tokens, so a generation uses exactly the parameters passed."""
    inner = unwrap(handle.model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig(
        bos_token_id=handle.tokenizer.bos_token_id,
        eos_token_id=sorted(handle.stop_ids),
        pad_token_id=handle.tokenizer.pad_token_id,
    )
    try:
        yield
    finally:
        inner.generation_config = saved


def _completions(handle: ModelHandle, rows: torch.Tensor) -> list[Completion]:
    """Generated ids ``[batch, new]`` cut at each row's first stop token (kept as ``stop``), decoded."""
    out = []
    for ids in rows.tolist():
        end = next((k for k, t in enumerate(ids) if t in handle.stop_ids), None)
        kept = tuple(ids if end is None else ids[:end])
        text = handle.tokenizer.decode(kept, skip_special_tokens=True)
        out.append(Completion(kept, text, None if end is None else ids[end]))
    return out


@torch.inference_mode()
def generate_batch(
    handle: ModelHandle, prompts: Sequence[TokenSequence], params: SamplingParams, seed: int = 0
) -> list[Completion]:
    """Answers to ``prompts`` (left-padded, one ``generate`` call) sampled after ``torch.manual_seed(seed)``,
    with ``params`` and nothing else."""
    batch = pad_batch([p.ids for p in prompts], handle.tokenizer.pad_token_id, "left", handle.input_device)
    torch.manual_seed(seed)
    sampling = (
        dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        if params.temperature
        else dict(do_sample=False)
    )
    with explicit_generation(handle):
        out = handle.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            **sampling,
        )
    return _completions(handle, out[:, batch.input_ids.shape[1] :])


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to answer; ``request`` is what identifies it in the store (messages, sample index...)."""

    prompt: TokenSequence
    request: dict


def generation_key(handle: ModelHandle, req: GenerationRequest, params: SamplingParams) -> str:
    return content_key(
        "generation", handle.name, handle.revision, req.request, list(req.prompt.ids), params.model_dump()
    )


def sample_texts(handle: ModelHandle, prompts: Sequence[TokenSequence], params: SamplingParams, seed: int) -> list[str]:
    """The texts of ``generate_batch``."""
    return [c.text for c in generate_batch(handle, prompts, params, seed)]


def greedy_ids(
    handle: ModelHandle,
    prompts: Sequence[TokenSequence],
    max_new_tokens: int,
    batch_size: int = 16,
    steering: Callable[[list[int]], AbstractContextManager] | None = None,
    progress: bool = False,
    label: str = "greedy",
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` as token ids, up to and including the first stop token, in
    length-sorted left-padded batches; ``steering(rows)`` is entered around each batch."""
    params = GREEDY.model_copy(update={"max_new_tokens": max_new_tokens})
    out: list[list[int]] = [[] for _ in prompts]
    with progress_bar(label, len(prompts), progress) as advance:
        for rows in length_sorted_batches([len(p.ids) for p in prompts], batch_size):
            with steering(rows) if steering else nullcontext():
                answers = generate_batch(handle, [prompts[i] for i in rows], params)
            for i, answer in zip(rows, answers, strict=True):
                out[i] = list(answer.ids) + ([] if answer.stop is None else [answer.stop])
            advance(len(rows))
    return out


def fill_store(
    handle: ModelHandle,
    store: Store,
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    batch_size: int = 16,
    progress: bool = True,
    steering: Callable[[list[int]], AbstractContextManager] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[str]:
    """Sample and store the answers missing from ``store``; returns the keys of ``requests``.

    ``shard = (i, n)`` samples only batches ``i, i + n, i + 2n, ...`` of the plan, so ``n``
    processes sharing one store fill it with exactly the texts one process would sample.
    ``steering(rows)``, if given, is entered around the sampling of each batch with the
    request indices of its rows, in batch order (e.g. per-row steering coefficients).
    """
    keys = [generation_key(handle, r, params) for r in requests]
    stored = store.texts(keys)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in stored:
            first.setdefault(key, i)
    missing = list(first.values())
    index, count = shard
    plan = length_sorted_batches([len(requests[i].prompt.ids) for i in missing], batch_size)[index::count]
    with progress_bar("generate", sum(map(len, plan)), progress) as advance:
        for batch in plan:
            rows = [missing[j] for j in batch]
            if len(store.texts([keys[i] for i in rows])) == len(rows):
                advance(len(rows))
                continue
            seed = int(content_key(params.seed, [keys[i] for i in rows])[:15], 16)
            with steering(rows) if steering else nullcontext():
                answers = generate_batch(handle, [requests[i].prompt for i in rows], params, seed)
            store.put_texts(
                (keys[i], handle.name, handle.revision, requests[i].request, params.model_dump(), a.text, a.stop)
                for i, a in zip(rows, answers, strict=True)
            )
            advance(len(rows))
    return keys


def generate_cached(
    handle: ModelHandle,
    store: Store,
    requests: Sequence[GenerationRequest],
    params: SamplingParams,
    batch_size: int = 16,
    progress: bool = True,
    steering: Callable[[list[int]], AbstractContextManager] | None = None,
) -> list[str]:
    """Answer every request (in input order): ``fill_store``, then read the answers back."""
    keys = fill_store(handle, store, requests, params, batch_size, progress, steering)
    texts = store.texts(keys)
    return [texts[k] for k in keys]

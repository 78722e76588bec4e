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

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.model import ModelHandle
from personalab.report.progress import progress_bar
from personalab.store import Store, content_key


class SamplingParams(BaseModel):
    """Sampling parameters; ``temperature = 0`` means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to answer; ``request`` is what identifies it in the store (messages, sample index...)."""

    prompt: TokenSequence
    request: dict


def generation_key(handle: ModelHandle, req: GenerationRequest, params: SamplingParams) -> str:
    return content_key(
        "generation", handle.name, handle.revision, req.request, list(req.prompt.ids), params.model_dump()
    )


@torch.inference_mode()
def sample_texts(handle: ModelHandle, prompts: Sequence[TokenSequence], params: SamplingParams, seed: int) -> list[str]:
    """Answers to ``prompts`` (left-padded, one ``generate`` call) sampled after ``torch.manual_seed(seed)``."""
    batch = pad_batch([p.ids for p in prompts], handle.tokenizer.pad_token_id, "left", handle.input_device)
    torch.manual_seed(seed)
    sampling = dict(temperature=params.temperature, top_p=params.top_p) if params.temperature else {}
    out = handle.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        pad_token_id=handle.tokenizer.pad_token_id,
        do_sample=bool(sampling),
        **sampling,
    )
    new = out[:, batch.input_ids.shape[1] :]
    return handle.tokenizer.batch_decode(new, skip_special_tokens=True)


@torch.inference_mode()
def greedy_ids(
    handle: ModelHandle,
    prompts: Sequence[TokenSequence],
    max_new_tokens: int,
    batch_size: int = 16,
    steering: Callable[[list[int]], AbstractContextManager] | None = None,
    progress: bool = False,
    label: str = "greedy",
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` as token ids, up to and including the first end-of-sequence
    token, in length-sorted left-padded batches; ``steering(rows)`` is entered around each batch."""
    out: list[list[int]] = [[] for _ in prompts]
    eos = handle.model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    stops |= {handle.tokenizer.eos_token_id} - {None}
    with progress_bar(label, len(prompts), progress) as advance:
        for rows in length_sorted_batches([len(p.ids) for p in prompts], batch_size):
            batch = pad_batch(
                [prompts[i].ids for i in rows], handle.tokenizer.pad_token_id, "left", handle.input_device
            )
            with steering(rows) if steering else nullcontext():
                generated = handle.model.generate(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=handle.tokenizer.pad_token_id,
                )
            for j, i in enumerate(rows):
                ids = generated[j, batch.input_ids.shape[1] :].tolist()
                end = next((k for k, t in enumerate(ids) if t in stops), None)
                out[i] = ids if end is None else ids[: end + 1]
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
                answers = sample_texts(handle, [requests[i].prompt for i in rows], params, seed)
            store.put_texts(
                (keys[i], handle.name, handle.revision, requests[i].request, params.model_dump(), text)
                for i, text in zip(rows, answers, strict=True)
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

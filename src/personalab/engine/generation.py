"""Batched, cached, reproducible sampling on two engines: Hugging Face ``generate`` and vLLM.

Every answer is a function of the model, the rendered prompt, the sampling parameters, the request (its sample index
among them) and the run seed alone: each request draws from its own random stream, seeded from the run seed and the
request (``sample_key``: its content, prompt ids and parameters; not where the model was loaded from, so a moved or
copied model folder answers the same, and two models asked the same request draw the same numbers), so neither the
other requests of its batch, nor their order, nor what ran before change it. On Hugging Face ``generate`` a logits
processor samples each row from its own generator (temperature, top-k, top-p, then one uniform draw per row and
token against the cumulative distribution, ``RowSampler``); vLLM takes the seed per request. Nothing comes from the
checkpoint's ``generation_config``: only ``SamplingParams`` apply.

Requests carry their interventions as data (``GenerationRequest.interventions``: ``Steer``, ``Ablate`` or
``Clamp`` with a scalar coefficient each), so the engine that runs them decides how: Hugging Face batches rows
of one structure (the same ablations and clamps; steering vectors may differ, with a per-row alpha), vLLM
takes them per request (``personalab.engine.vllm_worker``). Which engine runs is the handle's
(``ModelHandle.engine``: ``None`` is Hugging Face), recorded in every stored generation's key.

Only requests missing from the store are planned, into batches of one structure sorted by length; each
batch is stored in one transaction. A killed run resumes with exactly the texts an uninterrupted run would
have, processes sharing one store (a relaunched job, data-parallel shards) store the same texts (a key, once
stored, keeps its first text), and a rerun with more requests computes only the new ones.
"""

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from personalab.console import progress_bar
from personalab.engine.architectures import unwrap
from personalab.engine.batching import length_sorted_batches, pad_batch
from personalab.engine.chat import TokenSequence
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Ablate, Clamp, Spec, Steer, batch_interventions, intervene, spec_of
from personalab.engine.interventions import structure as specs_structure
from personalab.hashes import content_key
from personalab.store import Store

HF = "hf"


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


def completion(handle: ModelHandle, ids: Sequence[int]) -> Completion:
    """Generated ``ids`` cut at the first stop token (kept as ``stop``) and decoded without special tokens."""
    ids = list(ids)
    end = next((k for k, t in enumerate(ids) if t in handle.stop_ids), None)
    kept = tuple(ids if end is None else ids[:end])
    return Completion(kept, handle.tokenizer.decode(kept, skip_special_tokens=True), None if end is None else ids[end])


Interventions = tuple[Steer | Ablate | Clamp, ...]


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt to answer: ``request`` identifies it in the store (messages, sample index, what steers it...),
    ``interventions`` act on its residual stream while it is answered."""

    prompt: TokenSequence
    request: dict
    interventions: Interventions = ()


class Engine(Protocol):
    """What generates: ``name`` goes into store keys; ``chunk`` is how many requests one call takes; ``captures``
    whether it also runs the prompt-only forwards below (``ModelHandle.forward_engine``)."""

    name: str
    chunk: int
    captures: bool

    def generate(
        self,
        handle: ModelHandle,
        prompts: Sequence[TokenSequence],
        params: SamplingParams,
        seeds: Sequence[int],
        specs: Sequence[Sequence[Spec]],
        vectors: dict[str, torch.Tensor],
    ) -> list[Completion]:
        """One answer per prompt, row ``i`` sampled from seed ``seeds[i]`` under ``specs[i]``."""
        ...

    def capture_means(
        self,
        handle: ModelHandle,
        sequences: Sequence[TokenSequence],
        positions: Sequence[str],
        layers: Sequence[int],
        progress: bool = False,
        label: str = "capture",
    ) -> torch.Tensor:
        """Float32 ``[n_sequences, n_specs, n_layers, hidden]``: each sequence's residual stream at ``layers``
        averaged over each named ``positions`` spec (``personalab.engine.capture``'s means)."""
        ...

    def capture_norms(
        self,
        handle: ModelHandle,
        sequences: Sequence[TokenSequence],
        layers: Sequence[int],
        progress: bool = False,
        label: str = "capture",
    ) -> list[torch.Tensor]:
        """Float32 ``[n_layers, len(sequence)]`` per sequence: the residual stream's L2 norm at every token."""
        ...

    def response_nll(
        self, handle: ModelHandle, sequences: Sequence[TokenSequence], progress: bool = False, label: str = "fluency"
    ) -> list[float | None]:
        """``personalab.engine.forward.response_nll``: the mean NLL per response token, ``None`` for an empty one."""
        ...

    def use_adapter(self, folder: str | Path) -> None:
        """Answer with the LoRA adapter in ``folder`` from now on."""
        ...

    def close(self) -> None:
        """Free what the engine holds."""
        ...


def engine_name(handle: ModelHandle) -> str:
    return HF if handle.engine is None else handle.engine.name


def release(handle: ModelHandle) -> None:
    """Stop an engine that holds its own copy of the weights (vLLM) and free its memory; the handle generates on
    Hugging Face from then on."""
    if handle.engine is not None:
        handle.engine.close()
        handle.engine = None


def weights_saved(handle: ModelHandle, adapter: str | Path) -> None:
    """The handle's weights are now its base with the adapter saved in ``adapter`` (a fine-tune's checkpoint): an
    engine with its own copy of the weights answers with that adapter from now on."""
    if handle.engine is not None:
        handle.engine.use_adapter(adapter)


def request_seed(seed: int, key: str) -> int:
    """The seed of one request: from the run seed and the request's ``sample_key`` (63 bits)."""
    return int(content_key("seed", seed, key)[:15], 16)


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


class RowSampler(LogitsProcessor):
    """Samples each row from its own generator; returns scores that are ``-inf`` but at the sampled token, so
    greedy decoding takes it. Temperature, then top-k, then top-p (the smallest set of most likely tokens whose
    probability reaches ``top_p``), then one uniform draw per row against the cumulative probability of the
    tokens sorted by probability (ties by token id)."""

    def __init__(self, params: SamplingParams, seeds: Sequence[int]):
        self.params = params
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float() / self.params.temperature
        if self.params.top_k:
            kth = logits.topk(min(self.params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True, stable=True)
        cumulative = ordered.cumsum(dim=-1)
        if self.params.top_p < 1:
            ordered = ordered.masked_fill(cumulative - ordered >= self.params.top_p, 0.0)
            cumulative = ordered.cumsum(dim=-1)
        draws = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(probs.device)
        at = torch.searchsorted(cumulative, (draws * cumulative[:, -1]).unsqueeze(1)).clamp(max=probs.shape[-1] - 1)
        tokens = order.gather(1, at)
        return torch.full_like(scores, float("-inf")).scatter(1, tokens, 0.0)


def _hf_generate(
    handle: ModelHandle, prompts: Sequence[TokenSequence], params: SamplingParams, seeds: Sequence[int]
) -> list[Completion]:
    batch = pad_batch([p.ids for p in prompts], handle.tokenizer.pad_token_id, "left", handle.input_device)
    processors = LogitsProcessorList([RowSampler(params, seeds)] if params.temperature else [])
    with explicit_generation(handle), torch.inference_mode():
        out = handle.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            do_sample=False,
            logits_processor=processors,
        )
    return [completion(handle, row) for row in out[:, batch.input_ids.shape[1] :].tolist()]


def run_batch(
    handle: ModelHandle,
    prompts: Sequence[TokenSequence],
    params: SamplingParams,
    seeds: Sequence[int],
    specs: Sequence[Sequence[Spec]] | None = None,
    vectors: dict[str, torch.Tensor] | None = None,
) -> list[Completion]:
    """Answers to ``prompts`` on the handle's engine, row ``i`` from seed ``seeds[i]`` under ``specs[i]``
    (Hugging Face: one ``generate`` per structure of the rows' interventions)."""
    specs = specs or [()] * len(prompts)
    vectors = vectors or {}
    if handle.engine is not None:
        return handle.engine.generate(handle, prompts, params, seeds, specs, vectors)
    out: list[Completion | None] = [None] * len(prompts)
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(specs):
        groups.setdefault(specs_structure(row), []).append(i)
    for rows in groups.values():
        hooks = batch_interventions([specs[i] for i in rows], vectors)
        with intervene(handle, *hooks) if hooks else nullcontext():
            answers = _hf_generate(handle, [prompts[i] for i in rows], params, [seeds[i] for i in rows])
        for i, answer in zip(rows, answers, strict=True):
            out[i] = answer
    return out


def sample_key(req: GenerationRequest, params: SamplingParams) -> str:
    """What a request's random stream is seeded from: the request, the prompt's ids and the parameters."""
    return content_key("sample", req.request, list(req.prompt.ids), params.model_dump())


def generation_key(handle: ModelHandle, req: GenerationRequest, params: SamplingParams) -> str:
    """What identifies a stored answer: the engine, the model, the request, the prompt's ids and the parameters."""
    return content_key(
        "generation", engine_name(handle), handle.name, handle.revision, req.request, list(req.prompt.ids),
        params.model_dump(),
    )  # fmt: skip


def sample(
    handle: ModelHandle,
    prompts: Sequence[TokenSequence],
    params: SamplingParams,
    seed: int = 0,
    interventions: Interventions = (),
) -> list[Completion]:
    """Answers to ``prompts`` under ``interventions``, prompt ``i`` sampled from a seed of ``seed`` and ``i``."""
    vectors: dict[str, torch.Tensor] = {}
    specs = tuple(spec_of(iv, vectors) for iv in interventions)
    seeds = [request_seed(seed, str(i)) for i in range(len(prompts))]
    return run_batch(handle, prompts, params, seeds, [specs] * len(prompts), vectors)


def sample_texts(handle: ModelHandle, prompts: Sequence[TokenSequence], params: SamplingParams, seed: int) -> list[str]:
    """The texts of ``sample``."""
    return [c.text for c in sample(handle, prompts, params, seed)]


def generate_text(
    handle: ModelHandle,
    prompt: str,
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
) -> str:
    """The answer to one chat turn (``ModelHandle.encode``), greedy by default, under whatever interventions are
    active (``PersonaVector.steer``); the sampling parameters are these alone (``sample``)."""
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    return sample(handle, [handle.encode(system, prompt)], params, seed)[0].text


def greedy_ids(
    handle: ModelHandle,
    prompts: Sequence[TokenSequence],
    max_new_tokens: int,
    batch_size: int = 16,
    hooks: Callable[[list[int]], AbstractContextManager] | None = None,
    progress: bool = False,
    label: str = "greedy",
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` as token ids, up to and including the first stop token, in
    length-sorted batches; ``hooks(rows)``, entered around each batch with its prompt indices, places
    Hugging Face hooks (e.g. per-row substitutions) and runs on Hugging Face whatever the handle's engine."""
    params = GREEDY.model_copy(update={"max_new_tokens": max_new_tokens})
    out: list[list[int]] = [[] for _ in prompts]
    size = batch_size if hooks is not None or handle.engine is None else max(batch_size, handle.engine.chunk)
    with progress_bar(label, len(prompts), progress) as advance:
        for rows in length_sorted_batches([len(p.ids) for p in prompts], size):
            chosen = [prompts[i] for i in rows]
            if hooks is not None:
                with hooks(rows):
                    answers = _hf_generate(handle, chosen, params, [0] * len(rows))
            else:
                answers = run_batch(handle, chosen, params, [0] * len(rows))
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
    shard: tuple[int, int] = (0, 1),
    description: str = "generate",
) -> list[str]:
    """Sample and store the answers missing from ``store``; returns the keys of ``requests``. ``description`` names
    the progress bar.

    ``shard = (i, n)`` samples only batches ``i, i + n, i + 2n, ...`` of the plan, so ``n`` processes sharing
    one store fill it together; every answer is the same whichever process samples it.
    """
    keys = [generation_key(handle, r, params) for r in requests]
    stored = store.texts(keys)
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in stored:
            first.setdefault(key, i)
    vectors: dict[str, torch.Tensor] = {}
    specs = {i: tuple(spec_of(iv, vectors) for iv in requests[i].interventions) for i in first.values()}
    size = batch_size if handle.engine is None else max(batch_size, handle.engine.chunk)
    by_structure: dict[tuple, list[int]] = {}
    for i in first.values():
        by_structure.setdefault(specs_structure(specs[i]) if handle.engine is None else (), []).append(i)
    plan = [
        [group[j] for j in batch]
        for group in by_structure.values()
        for batch in length_sorted_batches([len(requests[i].prompt.ids) for i in group], size)
    ]
    index, count = shard
    plan = plan[index::count]
    with progress_bar(description, sum(map(len, plan)), progress) as advance:
        for rows in plan:
            if len(store.texts([keys[i] for i in rows])) == len(rows):
                advance(len(rows))
                continue
            seeds = [request_seed(params.seed, sample_key(requests[i], params)) for i in rows]
            answers = run_batch(
                handle, [requests[i].prompt for i in rows], params, seeds, [specs[i] for i in rows], vectors
            )
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
    description: str = "generate",
) -> list[str]:
    """Answer every request (in input order): ``fill_store``, then read the answers back."""
    keys = fill_store(handle, store, requests, params, batch_size, progress, description=description)
    texts = store.texts(keys)
    return [texts[k] for k in keys]

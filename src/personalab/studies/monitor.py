"""Projections of activations onto a persona direction: monitoring data and fine-tunes.

A projection is the dot product of a residual-stream activation with the *unit* vector
of the persona direction at a layer; layers follow ``personalab.engine.layers`` (layer ``l`` is
``hidden_states[l]``, per-layer vectors are ``[n_blocks + 1, hidden]``). Per record:

* ``last_prompt``: projection of the residual at the last prompt token (index ``prompt_len - 1``);
* ``response_mean``: projection of the mean residual over the response tokens (``ids[prompt_len:]``).

The projection shift of a training example is the ``response_mean`` projection of its
dataset response minus that of the model's own answer to the same prompt: large positive
shifts mark examples that push the model along the direction.
"""

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from personalab.engine.capture import capture
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.engine.handle import ModelHandle, check_same_shape
from personalab.engine.layers import check_vector
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_histogram
from personalab.persona import response_projections, unit_direction
from personalab.records import Record
from personalab.store import Store

GREEDY = SamplingParams(temperature=0, max_new_tokens=128)


def _write_jsonl(path: Path, objects: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(obj, ensure_ascii=False) + "\n" for obj in objects), encoding="utf-8")
    return path


def beside(path: str | Path) -> str:
    """The path prefix of files written beside a data file: ``data.jsonl`` -> ``data.`` (``data.shift.jsonl``...)."""
    path = Path(path)
    return f"{path.with_name(path.stem)}."


def write_projections(prefix: str, records: Sequence[Record], projections: Sequence[dict]) -> Path:
    """Write ``{prefix}projections.jsonl`` (``prefix``: ``beside(data)`` or a run folder and ``/``): each original
    object plus ``"projection"``."""
    if len(records) != len(projections):
        raise InvalidInputError(f"{len(records)} records but {len(projections)} projections; pass one per record")
    objects = [{**r.source, "projection": p} for r, p in zip(records, projections, strict=True)]
    return _write_jsonl(Path(f"{prefix}projections.jsonl"), objects)


def own_answers(
    handle: ModelHandle,
    records: Sequence[Record],
    store: Store,
    params: SamplingParams = GREEDY,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "generate",
) -> list[str]:
    """The model's own answers to ``records``' prompts, in input order, through ``generate_cached`` (kept in
    ``store``, request ``{"system", "prompt"}``; ``description`` labels the progress bar)."""
    requests = [
        GenerationRequest(
            r.encode(handle, response=False),
            {"system": r.system, "prompt": r.prompt} | ({"history": [list(t) for t in r.history]} if r.history else {}),
        )
        for r in records
    ]
    return generate_cached(handle, store, requests, params, batch_size, progress, description)


def projection_shift(
    handle: ModelHandle,
    records: Sequence[Record],
    vector: torch.Tensor,
    layer: int,
    store: Store,
    params: SamplingParams = GREEDY,
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Dataset response vs the model's own answer to the same prompt, projected at ``layer``.

    Own answers come from ``own_answers`` (stored in ``store``). Returns, in input order, one
    ``{"index", "shift", "dataset", "own", "own_response"}`` per record whose response has
    tokens, with ``shift = dataset - own`` (``response_mean`` projections); ``own`` and
    ``shift`` are ``None`` when the own answer is empty.
    """
    unit = unit_direction(vector, layer, handle)
    dataset_seqs = [r.encode(handle) for r in records]
    kept = [i for i, seq in enumerate(dataset_seqs) if seq.response_len > 0]
    if not kept:
        return []
    dataset = response_projections(
        handle, [dataset_seqs[i] for i in kept], unit, layer, batch_size, progress, "dataset responses"
    )
    answers = own_answers(handle, [records[i] for i in kept], store, params, batch_size, progress)
    own_seqs = [replace(records[i], response=a).encode(handle) for i, a in zip(kept, answers, strict=True)]
    own = response_projections(handle, own_seqs, unit, layer, batch_size, progress, "own answers")
    return [
        {"index": i, "shift": None if o is None else d - o, "dataset": d, "own": o, "own_response": a}
        for i, d, o, a in zip(kept, dataset, own, answers, strict=True)
    ]


def write_shift_report(
    prefix: str, records: Sequence[Record], shifts: Sequence[dict], top_k: int | None = None, title: str = ""
) -> list[Path]:
    """Write the shift report under the path prefix ``prefix`` (see ``write_projections``); returns the paths.

    ``{prefix}shift.jsonl``: original objects plus the shift fields, by shift descending (``None`` last);
    ``{prefix}shift.png``: histogram of the shifts, titled ``title``; with ``top_k``, ``{prefix}top{k}.jsonl``:
    the original objects of the ``k`` largest shifts.
    """
    if top_k is not None and top_k < 1:
        raise InvalidInputError(f"top_k is {top_k}; give a positive number of examples")
    ordered = sorted(shifts, key=lambda s: (s["shift"] is None, -(s["shift"] or 0.0)))
    written = [_write_jsonl(Path(f"{prefix}shift.jsonl"), [{**records[s["index"]].source, **s} for s in ordered])]
    values = [s["shift"] for s in ordered if s["shift"] is not None]
    png = Path(f"{prefix}shift.png")
    plot_histogram(values, "projection shift (dataset response - own answer)", title or "projection shift", png)
    written.append(png)
    if top_k is not None:
        top = [records[s["index"]].source for s in ordered[:top_k] if s["shift"] is not None]
        written.append(_write_jsonl(Path(f"{prefix}top{top_k}.jsonl"), top))
    return written


def model_shift(
    base: ModelHandle,
    tuned: ModelHandle,
    prompts: Sequence[Record],
    vector: torch.Tensor,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """How far a fine-tune moved the last-prompt-token residual along the direction, per layer.

    ``shift[l] = mean over prompts of (a_tuned[l] - a_base[l]) . unit(vector[l])`` with
    ``vector`` per-layer ``[n_blocks + 1, hidden]``; each model encodes the prompts of the records
    ``prompts`` (their responses left out) with its own tokenizer. Rows of ``vector`` that are zero give 0.
    Returns float32 ``[n_blocks + 1]``.
    """
    check_same_shape(base, tuned)
    if not prompts:
        raise InvalidInputError("no prompts to compare the models on; pass at least one record")
    vector = torch.as_tensor(vector).detach().float().cpu()
    if vector.dim() != 2:
        raise InvalidInputError(
            f"vector has shape {tuple(vector.shape)}; model_shift needs a per-layer vector [n_blocks + 1, hidden]"
        )
    rows = [check_vector(vector, layer, base.n_blocks, base.hidden_size) for layer in range(base.n_layers)]
    norms = torch.stack(rows).norm(dim=1, keepdim=True)
    if not norms.any():
        raise InvalidInputError("the vector is zero at every layer; re-extract it")
    unit = vector / norms.clamp(min=torch.finfo(torch.float32).tiny)
    acts = [
        capture(
            handle,
            [p.encode(handle, response=False) for p in prompts],
            positions="last_prompt",
            batch_size=batch_size,
            progress=progress,
            label=label,
        )
        for handle, label in ((base, "base"), (tuned, "tuned"))
    ]
    return ((acts[1] - acts[0]).mean(dim=0) * unit).sum(dim=-1).float()

"""Persona-vector extraction: contrastive answers, judging, filtering, per-layer mean differences.

For every extraction question x instruction pair x sample the model answers once under
the trait-eliciting instruction (``pos``) and once under the suppressing one (``neg``).
A pair is kept when ``trait(pos) >= trait_threshold``, ``trait(neg) < trait_threshold``
and both coherence scores are ``>= coherence_threshold``. Each vector variant is the mean
activation over kept ``pos`` answers minus the mean over kept ``neg`` answers, at every
layer (``[n_blocks + 1, hidden]``, convention in ``personalab.engine.layers``).
"""

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.engine.capture import capture
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.engine.layers import CONVENTION
from personalab.engine.model import ModelHandle
from personalab.errors import InvalidInputError
from personalab.judging.judges import Judge
from personalab.judging.scoring import score_cached
from personalab.report.plots import plot_layer_norms
from personalab.store import Store
from personalab.traits import COHERENCE_RUBRIC, Trait
from personalab.traits.elicitation import elicit
from personalab.vectors import VARIANTS, save_vectors


class ExtractionConfig(BaseModel):
    """Settings of one extraction run."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(10, ge=1)
    sampling: SamplingParams = SamplingParams()
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    min_pairs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)


@dataclass(frozen=True)
class Answer:
    """One generated answer with its judgements; ``polarity`` is ``"pos"`` or ``"neg"``."""

    question: str
    instruction: str
    pair: int
    sample: int
    polarity: str
    text: str
    trait: float | None
    coherence: float | None


class FilterError(InvalidInputError):
    """Too few contrastive pairs survived filtering to build a vector."""


def _requests(handle: ModelHandle, trait: Trait, samples: int) -> list[tuple[GenerationRequest, dict]]:
    out = []
    for question in trait.extraction_questions:
        for pair_index, pair in enumerate(trait.instructions):
            polarities = [
                (polarity, instruction, elicit(handle, trait.elicitation, instruction, question))
                for polarity, instruction in (("pos", pair.pos), ("neg", pair.neg))
            ]
            for sample in range(samples):
                for polarity, instruction, prompt in polarities:
                    request = {
                        "trait": trait.name,
                        "style": trait.elicitation,
                        "instruction": instruction,
                        "question": question,
                        "sample": sample,
                    }
                    info = {"pair": pair_index, "sample": sample, "polarity": polarity}
                    out.append((GenerationRequest(prompt, request), info))
    return out


def _keep(pos: Answer, neg: Answer, config: ExtractionConfig) -> str | None:
    """``None`` if the pair passes, else the first reason it fails."""
    if None in (pos.trait, neg.trait, pos.coherence, neg.coherence):
        return "no_score"
    if min(pos.coherence, neg.coherence) < config.coherence_threshold:
        return "incoherent"
    if pos.trait < config.trait_threshold:
        return "pos_trait_low"
    if neg.trait >= config.trait_threshold:
        return "neg_trait_high"
    if not pos.text.strip() or not neg.text.strip():
        return "empty_answer"
    return None


def _difference(acts: torch.Tensor, n_pos: int) -> torch.Tensor:
    """``mean(acts[:n_pos]) - mean(acts[n_pos:])`` over the first dimension."""
    return acts[:n_pos].mean(dim=0) - acts[n_pos:].mean(dim=0)


def compute_vectors(
    handle: ModelHandle, kept: list[tuple[Answer, Answer]], style: str, batch_size: int = 16, progress: bool = False
) -> dict[str, torch.Tensor]:
    """The three variants from kept ``(pos, neg)`` pairs, float32 ``[n_blocks + 1, hidden]`` each."""
    answers = [p for p, _ in kept] + [n for _, n in kept]
    full = [elicit(handle, style, a.instruction, a.question, a.text) for a in answers]
    slot: dict[tuple[str, str], int] = {}
    which = [slot.setdefault((a.instruction, a.question), len(slot)) for a in answers]
    unique = [elicit(handle, style, instruction, question) for instruction, question in slot]
    response = capture(
        handle, full, positions="response", batch_size=batch_size, progress=progress, label="capture answers"
    )
    prompt_mean, last = (
        capture(handle, unique, positions=p, batch_size=batch_size, progress=progress, label=f"capture {p}")[which]
        for p in ("prompt", "last_prompt")
    )
    n = len(kept)
    return {
        "response_mean": _difference(response, n),
        "prompt_mean": _difference(prompt_mean, n),
        "last_prompt": _difference(last, n),
    }


@dataclass
class ExtractionResult:
    vectors: dict[str, torch.Tensor]
    meta: dict
    answers: list[Answer]


def run_extraction(
    handle: ModelHandle,
    trait: Trait,
    judge: Judge,
    out: str | Path,
    config: ExtractionConfig | None = None,
    progress: bool = True,
) -> ExtractionResult:
    """Run the whole pipeline into the run folder ``out``; resumes from its store."""
    config = config or ExtractionConfig()
    out = Path(out)
    store = Store(out / "generations.sqlite")
    try:
        planned = _requests(handle, trait, config.samples)
        texts = generate_cached(
            handle, store, [r for r, _ in planned], config.sampling, config.batch_size, progress=progress
        )
        questions = [r.request["question"] for r, _ in planned]
        trait_scores = score_cached(
            store,
            judge,
            [(q, t, trait.rubric) for q, t in zip(questions, texts, strict=True)],
            "judge trait",
            progress=progress,
        )
        coherence = score_cached(
            store,
            judge,
            [(q, t, COHERENCE_RUBRIC) for q, t in zip(questions, texts, strict=True)],
            "judge coherence",
            progress=progress,
        )
    finally:
        store.close()
    answers = [
        Answer(r.request["question"], r.request["instruction"], info["pair"], info["sample"], info["polarity"], t, s, c)
        for (r, info), t, s, c in zip(planned, texts, trait_scores, coherence, strict=True)
    ]
    pairs = list(zip(answers[0::2], answers[1::2], strict=True))
    verdicts = [_keep(p, n, config) for p, n in pairs]
    kept = [pair for pair, v in zip(pairs, verdicts, strict=True) if v is None]
    counts = _counts(trait, pairs, verdicts)
    if len(kept) < config.min_pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in counts["rejected"].items() if v)
        raise FilterError(
            f"only {len(kept)} of {len(pairs)} pairs passed the filter (need {config.min_pairs}; rejected {reasons}); "
            f"raise --samples, lower --min-pairs or the thresholds, or check the judge"
        )
    vectors = compute_vectors(handle, kept, trait.elicitation, config.batch_size, progress)
    meta = _meta(handle, trait, judge, config, counts, vectors)
    save_vectors(out, vectors, meta)
    _write_summary(out, meta)
    return ExtractionResult(vectors, meta, answers)


def _counts(trait: Trait, pairs: list[tuple[Answer, Answer]], verdicts: list[str | None]) -> dict:
    per_pair = []
    for index, pair in enumerate(trait.instructions):
        mine = [v for (p, _), v in zip(pairs, verdicts, strict=True) if p.pair == index]
        per_pair.append({"pair": index, "pos": pair.pos, "generated": len(mine), "kept": mine.count(None)})
    reasons = ("no_score", "incoherent", "pos_trait_low", "neg_trait_high", "empty_answer")
    return {
        "pairs": len(pairs),
        "kept": verdicts.count(None),
        "rejected": {r: verdicts.count(r) for r in reasons},
        "per_instruction_pair": per_pair,
    }


def _meta(
    handle: ModelHandle, trait: Trait, judge: Judge, config: ExtractionConfig, counts: dict, vectors: dict
) -> dict:
    return {
        "personalab_version": version("personalab"),
        "model": handle.name,
        "revision": handle.revision,
        "architecture": handle.architecture,
        "dtype": str(handle.dtype).removeprefix("torch."),
        "n_blocks": handle.n_blocks,
        "hidden_size": handle.hidden_size,
        "layer_convention": CONVENTION,
        "trait": trait.name,
        "trait_sha256": trait.digest(),
        "elicitation": trait.elicitation,
        "judge": judge.name,
        "config": config.model_dump(),
        "counts": counts,
        "norms": {v: vectors[v].norm(dim=-1).tolist() for v in VARIANTS},
    }


def _write_summary(out: Path, meta: dict) -> None:
    plot_layer_norms(meta["norms"], f"{meta['trait']} on {meta['model']}", out / "norms.png")
    counts = meta["counts"]
    norms = meta["norms"]["response_mean"]
    best = sorted(range(len(norms)), key=lambda layer: -norms[layer])[:5]
    lines = [
        f"# {meta['trait']} on {meta['model']}",
        "",
        f"- judge: `{meta['judge']}`; trait file sha256 `{meta['trait_sha256'][:12]}`",
        f"- pairs kept: **{counts['kept']} / {counts['pairs']}** "
        f"(trait threshold {meta['config']['trait_threshold']}, coherence {meta['config']['coherence_threshold']})",
        "- rejected: " + ", ".join(f"{k} {v}" for k, v in counts["rejected"].items()),
        f"- layers: {CONVENTION}",
        f"- largest response_mean norms at layers {best}",
        "",
        "| instruction pair | generated | kept |",
        "|---|---|---|",
    ]
    lines += [
        f"| {p['pair']}: {p['pos'][:60]} | {p['generated']} | {p['kept']} |" for p in counts["per_instruction_pair"]
    ]
    lines += ["", "![per-layer norms](norms.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))

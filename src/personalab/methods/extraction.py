"""Persona-vector extraction: contrastive answers, judging, filtering, per-layer mean differences.

For every extraction question x instruction pair x sample the model answers once under
the trait-eliciting instruction (``pos``) and once under the suppressing one (``neg``).
A pair is kept when ``trait(pos) >= pos_threshold``, ``trait(neg) < neg_threshold`` and
both coherence scores are ``>= coherence_threshold`` (50, 50 and 50 by default, as in the
public pipeline). The run folder keeps the full trait (``trait.json``), every pair with its
scores and the rules it breaks (``pairs.jsonl``, written before the minimum-pairs check), and
``summary.md`` says how many pairs each rule dropped, with example dropped pairs. Each vector variant is by default
the mean activation over kept ``pos`` answers minus the mean over kept ``neg`` answers, at every
layer (``[n_blocks + 1, hidden]``, convention in ``personalab.engine.layers``; other aggregations:
``personalab.methods.aggregation``).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import say
from personalab.engine.capture import capture_means
from personalab.engine.chat import TokenSequence
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached
from personalab.engine.handle import ModelHandle
from personalab.engine.layers import CONVENTION
from personalab.errors import InvalidInputError
from personalab.figures.plots import plot_layer_norms, short_name
from personalab.figures.tables import markdown_table
from personalab.hashes import content_key
from personalab.judging.judges import Judge, judge_record
from personalab.judging.scoring import Plan, plan_judged, score_cached
from personalab.methods.aggregation import Aggregation, aggregate
from personalab.runfolder import claim, model_settings
from personalab.store import Store
from personalab.traits import RUN_TRAIT, Trait, coherence_rubric
from personalab.traits.elicitation import elicit, elicitation_format
from personalab.vectors import VARIANTS, save_vector_file

VARIANT_POSITIONS = {"response_mean": "response", "prompt_mean": "prompt", "last_prompt": "last_prompt"}
"""The positions each variant averages (``personalab.engine.positions``)."""
PAIRS = "pairs.jsonl"
"""Every contrastive pair of an extraction run folder, kept or dropped, one JSON line each."""


class ExtractionConfig(BaseModel):
    """Settings of one extraction run."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(10, ge=1)
    sampling: SamplingParams = SamplingParams()
    pos_threshold: float = Field(50.0, ge=0, le=100)
    neg_threshold: float = Field(50.0, ge=0, le=101)
    """Scores are 0-100 and a negative answer passes below this, so 101 lets every negative answer pass."""
    coherence_threshold: float = Field(50.0, ge=0, le=100)
    min_pairs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    aggregation: Aggregation = "mean_diff"
    """How the kept pairs' activations become the vector (``personalab.methods.aggregation``)."""


FILTER = ("pos_threshold", "neg_threshold", "coherence_threshold", "min_pairs")
"""The settings that only choose among stored pairs: a rerun with others re-filters without generating or judging."""
RECOMPUTED = (*FILTER, "aggregation")
"""The settings a rerun applies to the stored answers (filter and aggregation) without generating or judging."""


@dataclass(frozen=True)
class Answer:
    """One generated answer with its judgements; ``polarity`` is ``"pos"`` or ``"neg"``, ``style`` the
    elicitation style its prompt was written in."""

    question: str
    instruction: str
    pair: int
    sample: int
    polarity: str
    text: str
    trait: float | None
    coherence: float | None
    style: str = "system_prompt"


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


RULES: dict[str, str] = {
    "no_score": "the judge gave no number for one of the four scores",
    "incoherent": "coherence of either answer < coherence_threshold",
    "pos_trait_low": "trait of the positive answer < pos_threshold",
    "neg_trait_high": "trait of the negative answer >= neg_threshold",
    "empty_answer": "either answer is empty",
}
"""The filter's rules, in the order they are checked."""


def reference_thresholds(threshold: float) -> dict[str, float]:
    """The trait cut-offs of the persona-vectors reference's ``--threshold T`` (``generate_vec.py``): a pair is kept
    when its positive answer's trait >= ``T`` and its negative answer's < ``100 - T`` (50 and 50 at ``T = 50``)."""
    if not 0 <= threshold <= 100:
        raise InvalidInputError(f"`trait_threshold` is a score from 0 to 100, not {threshold:g}")
    return {"pos_threshold": threshold, "neg_threshold": 100.0 - threshold}


def with_reference_thresholds(options: dict, trait_threshold: float | None) -> dict:
    """``options`` with the cut-offs of ``reference_thresholds(trait_threshold)``; an error when ``options`` sets a
    cut-off of its own as well (the two would disagree)."""
    if trait_threshold is None:
        return options
    given = [name for name in ("pos_threshold", "neg_threshold") if options.get(name) is not None]
    if given:
        raise InvalidInputError(f"`trait_threshold` sets both trait cut-offs; give either it or `{given[0]}`, not both")
    return {**options, **reference_thresholds(trait_threshold)}


def failures(pos: Answer, neg: Answer, config: ExtractionConfig) -> list[str]:
    """Every rule of ``RULES`` the pair breaks, in order; an empty list keeps the pair."""
    broken = []
    if None in (pos.trait, neg.trait, pos.coherence, neg.coherence):
        broken.append("no_score")
    else:
        if min(pos.coherence, neg.coherence) < config.coherence_threshold:
            broken.append("incoherent")
        if pos.trait < config.pos_threshold:
            broken.append("pos_trait_low")
        if neg.trait >= config.neg_threshold:
            broken.append("neg_trait_high")
    if not pos.text.strip() or not neg.text.strip():
        broken.append("empty_answer")
    return broken


def answer_activations(
    handle: ModelHandle, answers: list[Answer], batch_size: int = 16, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Per answer, the mean residual over its response tokens, over its prompt tokens, and at its last prompt token
    (``VARIANTS``), each float32 ``[n_answers, n_blocks + 1, hidden]``, from one capture pass over each answer's
    whole sequence (prompt tokens see only the prompt, so they read as they would alone)."""
    full = [elicit(handle, a.style, a.instruction, a.question, a.text) for a in answers]
    positions = [VARIANT_POSITIONS[v] for v in VARIANTS]
    means = capture_means(handle, full, positions, batch_size=batch_size, progress=progress, label="capture answers")
    return dict(zip(VARIANTS, means, strict=True))


def compute_vectors(
    handle: ModelHandle,
    kept: list[tuple[Answer, Answer]],
    batch_size: int = 16,
    progress: bool = False,
    activations: dict[str, torch.Tensor] | None = None,
    aggregation: Aggregation = "mean_diff",
) -> dict[str, torch.Tensor]:
    """The three variants from kept ``(pos, neg)`` pairs, float32 ``[n_blocks + 1, hidden]`` each: by default the
    mean over positive answers minus the mean over negative ones (``aggregation``: ``methods.aggregation``). Each
    answer is encoded in its own style, so pairs of several strategies can be pooled. ``activations`` is
    ``answer_activations`` of ``[pos..., neg...]`` when already captured."""
    answers = [p for p, _ in kept] + [n for _, n in kept]
    if activations is None:
        activations = answer_activations(handle, answers, batch_size, progress)
    return {variant: aggregate(activations[variant], len(kept), aggregation) for variant in VARIANTS}


@dataclass
class ExtractionResult:
    vectors: dict[str, torch.Tensor]
    meta: dict
    answers: list[Answer]


def judged_answers(
    handle: ModelHandle, trait: Trait, judge: Judge, store: Store, config: ExtractionConfig, progress: bool = True
) -> list[Answer]:
    """Every answer of the extraction (pos, neg alternating), generated and judged through ``store``."""
    planned = _requests(handle, trait, config.samples)
    say(plan_judged(handle, store.path, [r for r, _ in planned], config.sampling, judge, _judged(trait)).describe(),
        progress)  # fmt: skip
    requests = [r for r, _ in planned]
    texts = generate_cached(handle, store, requests, config.sampling, config.batch_size, progress=progress)
    questions = [r.request["question"] for r, _ in planned]
    scores = [
        score_cached(
            store, judge, [(q, t, rubric) for q, t in zip(questions, texts, strict=True)], label, progress=progress
        )
        for rubric, label in zip(_rubrics(trait), ("judge trait", "judge coherence"), strict=True)
    ]
    return [
        Answer(
            r.request["question"],
            r.request["instruction"],
            info["pair"],
            info["sample"],
            info["polarity"],
            t,
            s,
            c,
            trait.elicitation,
        )
        for (r, info), t, s, c in zip(planned, texts, *scores, strict=True)
    ]


def _rubrics(trait: Trait) -> tuple[str, str]:
    """The trait rubric and the coherence rubric every extraction answer is judged with."""
    return trait.rubric, coherence_rubric(trait.elicitation == "continuation")


def _judged(trait: Trait):
    """``items(request, answer)``: the judge's ``(question, answer, rubric)`` items of one extraction answer."""
    return lambda request, answer: [(request.request["question"], answer, rubric) for rubric in _rubrics(trait)]


def plan_extraction(
    handle: ModelHandle, trait: Trait, judge: Judge, out: str | Path | None, config: ExtractionConfig
) -> Plan:
    """What ``run_extraction`` into ``out`` would sample and judge, what its store holds excluded; writes nothing."""
    requests = [r for r, _ in _requests(handle, trait, config.samples)]
    store = None if out is None else Path(out) / "generations.sqlite"
    return plan_judged(handle, store, requests, config.sampling, judge, _judged(trait))


@dataclass
class FilterReport:
    """The contrastive pairs and what the filter made of them.

    ``broken[i]`` lists the rules pair ``i`` breaks (``RULES`` order; empty when kept).
    """

    pairs: list[tuple[Answer, Answer]]
    broken: list[list[str]]

    @property
    def kept(self) -> list[tuple[Answer, Answer]]:
        return [pair for pair, rules in zip(self.pairs, self.broken, strict=True) if not rules]

    def counts(self, trait: Trait) -> dict:
        """Pairs, kept, per rule the pairs it dropped first (``rejected``) and all pairs breaking it
        (``breaking``), and per instruction pair the generated and kept counts."""
        first = [rules[0] if rules else None for rules in self.broken]
        per_pair = []
        for index, pair in enumerate(trait.instructions):
            mine = [v for (p, _), v in zip(self.pairs, first, strict=True) if p.pair == index]
            per_pair.append({"pair": index, "pos": pair.pos, "generated": len(mine), "kept": mine.count(None)})
        return {
            "pairs": len(self.pairs),
            "kept": first.count(None),
            "rejected": {rule: first.count(rule) for rule in RULES},
            "breaking": {rule: sum(rule in rules for rules in self.broken) for rule in RULES},
            "per_instruction_pair": per_pair,
        }

    def examples(self, k: int = 3) -> list[dict]:
        """Up to ``k`` dropped pairs, one per rule first where the rules allow, in pair order."""
        dropped = [(i, rules) for i, rules in enumerate(self.broken) if rules]
        chosen: list[int] = []
        for rule in RULES:
            match = next((i for i, rules in dropped if rules[0] == rule and i not in chosen), None)
            if match is not None and len(chosen) < k:
                chosen.append(match)
        chosen += [i for i, _ in dropped if i not in chosen][: k - len(chosen)]
        return [_record(self.pairs[i], self.broken[i]) for i in sorted(chosen)]

    def write(self, path: Path) -> None:
        """Every pair as one JSON line: question, instruction pair, sample, both answers with their
        scores and instructions, ``kept``, the rules it breaks and why (``RULES``)."""
        lines = [
            json.dumps({**_record(pair, rules), "kept": not rules, "reasons": [RULES[r] for r in rules]})
            for pair, rules in zip(self.pairs, self.broken, strict=True)
        ]
        path.write_text("".join(f"{line}\n" for line in lines))


def _record(pair: tuple[Answer, Answer], rules: list[str]) -> dict:
    pos, neg = pair
    return {
        "question": pos.question,
        "pair": pos.pair,
        "sample": pos.sample,
        "rules": rules,
        **{
            f"{a.polarity}_{key}": getattr(a, key)
            for a in pair
            for key in ("text", "trait", "coherence", "instruction")
        },
    }


def filter_pairs(answers: list[Answer], config: ExtractionConfig) -> FilterReport:
    """Pair alternating pos/neg answers and check each pair against the filter's rules."""
    pairs = list(zip(answers[0::2], answers[1::2], strict=True))
    return FilterReport(pairs, [failures(p, n, config) for p, n in pairs])


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
    prompts = elicitation_format(trait.elicitation, handle.chat)
    extends = {"samples": config.samples}
    run = claim(
        out, "extract", settings(handle, trait, judge, config), extends, prompt_format=prompts,
        recorded=judge_record(judge),
    )  # fmt: skip
    say(f"prompt format: {prompts}", progress)
    with Store(out / "generations.sqlite") as store:
        answers = judged_answers(handle, trait, judge, store, config, progress)
    report = filter_pairs(answers, config)
    counts = report.counts(trait)
    earlier = (out / "vectors.safetensors").is_file()
    if counts["kept"] >= config.min_pairs or not earlier:  # a failed re-filter leaves the earlier vector's pairs
        report.write(out / PAIRS)
    if counts["kept"] < config.min_pairs:
        reasons = ", ".join(f"{k}: {v}" for k, v in counts["rejected"].items() if v)
        kept = "; the folder keeps the vector of its last filter" if earlier else ""
        raise FilterError(
            f"only {counts['kept']} of {counts['pairs']} pairs passed the filter (need {config.min_pairs}; "
            f"rejected {reasons}); raise `samples`, lower `min_pairs` or the thresholds, or check the judge{kept}"
        )
    vectors = compute_vectors(handle, report.kept, config.batch_size, progress, aggregation=config.aggregation)
    meta = _meta(handle, trait, judge, config, counts, vectors)
    trait.save(out / RUN_TRAIT)
    save_vector_file(out / "vectors.safetensors", vectors)
    meta = json.loads(run.write(**meta).read_text())
    _write_summary(out, meta, report.examples())
    return ExtractionResult(vectors, meta, answers)


class ContrastPair(BaseModel):
    """One line of an ``extract --pairs`` file: a ``positive`` and a ``negative`` text, read as they are (text the
    model continues, after its start-of-text token), or, with a ``prompt`` (and an optional ``system`` message), as
    two answers to that prompt in the model's chat format (plain ``Question: ... Answer:`` without a template)."""

    model_config = ConfigDict(extra="forbid")
    positive: str = Field(min_length=1)
    negative: str = Field(min_length=1)
    prompt: str | None = None
    system: str | None = None


def load_contrast_pairs(path: str | Path) -> list[ContrastPair]:
    """The pairs of a JSONL file (``ContrastPair``, one per line); a bad line is a one-line error naming it."""
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f'no pairs file {path}; give a JSONL file of {{"positive": ..., "negative": ...}}')
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pair = ContrastPair.model_validate_json(line)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "the line"
            raise InvalidInputError(
                f"{path} line {number}: {where}: {first['msg']}; each line is "
                '{"positive": TEXT, "negative": TEXT} with an optional "prompt" and "system"'
            ) from None
        if pair.system is not None and pair.prompt is None:
            raise InvalidInputError(f"{path} line {number}: a system message needs a prompt to answer")
        pairs.append(pair)
    if not pairs:
        raise InvalidInputError(f"{path} holds no pairs")
    return pairs


def given_record(index: int, pair: ContrastPair) -> dict:
    """A given pair as a line of ``pairs.jsonl``, in the judged pairs' fields (no scores; kept) and its own."""
    return {
        "question": pair.prompt or "", "pair": index, "sample": 0, "rules": [], "kept": True, "reasons": [],
        **{f"{side}_{key}": value for side, text in (("pos", pair.positive), ("neg", pair.negative))
           for key, value in (("text", text), ("trait", None), ("coherence", None), ("instruction", pair.system))},
        "given": pair.model_dump(),
    }  # fmt: skip


def check_pair_options(given: dict[str, object]) -> None:
    """Refuse, in one line, an option that only a judged extraction has (``given``: name -> value, ``None`` or
    ``False`` when not given) beside given pairs."""
    used = [name for name, value in given.items() if value is not None and value is not False]
    if used:
        raise InvalidInputError(f"`{used[0]}` has no effect with `pairs` (nothing is generated or judged); drop it")


def contrast_sequences(handle: ModelHandle, pairs: list[ContrastPair]) -> list[TokenSequence]:
    """The positive texts, then the negative ones, each as a sequence whose response is the text (after the start
    token; a tokenizer without one reads the text's first token as the context of the rest)."""

    def encode(pair: ContrastPair, text: str) -> TokenSequence:
        if pair.prompt is not None:
            return handle.encode(pair.system, pair.prompt, text)
        start = handle.tokenizer("", add_special_tokens=True)["input_ids"]
        ids = tuple(start) + tuple(handle.tokenizer.encode(text, add_special_tokens=False))
        if len(ids) < 2:
            raise InvalidInputError(f"{text!r} is one token and this tokenizer adds no start token; give longer texts")
        return TokenSequence(ids, max(1, len(start)))  # no start token: the first token is the context of the rest

    return [encode(p, p.positive) for p in pairs] + [encode(p, p.negative) for p in pairs]


def run_pair_extraction(
    handle: ModelHandle,
    pairs: list[ContrastPair],
    out: str | Path,
    trait: Trait | None = None,
    source: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    aggregation: Aggregation = "mean_diff",
) -> ExtractionResult:
    """A vector from given contrastive texts, with nothing generated or judged: ``response_mean``, by default the
    mean residual over each positive text's tokens (its answer's, where it has a prompt) minus the same over the
    negative ones (``aggregation``: ``methods.aggregation``), at every layer, through the extraction's capture, into
    the run folder ``out`` (``source``: the pairs' file, fingerprinted as an input; ``trait``: kept as
    ``trait.json`` for the commands that read one)."""
    out = Path(out)
    prompted = sum(p.prompt is not None for p in pairs)
    described = "; ".join(
        ([f"{len(pairs) - prompted} as texts to continue"] if prompted < len(pairs) else [])
        + ([f"{prompted} as answers to their prompts, {handle.chat.describe()}"] if prompted else [])
    )
    settings = {**model_settings(handle), "pairs_sha256": content_key([p.model_dump() for p in pairs])}
    run = claim(out, "extract", settings, inputs={"pairs": source}, prompt_format=described)
    say(f"{len(pairs)} given pairs: {described}", progress)
    sequences = contrast_sequences(handle, pairs)
    (means,) = capture_means(handle, sequences, ["response"], batch_size=batch_size, progress=progress,
                             label="capture pairs")  # fmt: skip
    vectors = {"response_mean": aggregate(means, len(pairs), aggregation)}
    meta = {
        **_model_meta(handle),
        "source": "pairs",
        **({"trait": trait.name, "trait_sha256": trait.digest()} if trait is not None else {}),
        "counts": {"pairs": len(pairs), "kept": len(pairs)},
        "aggregation": aggregation,
        "norms": {"response_mean": vectors["response_mean"].norm(dim=-1).tolist()},
    }
    if trait is not None:
        trait.save(out / RUN_TRAIT)
    save_vector_file(out / "vectors.safetensors", vectors)
    (out / PAIRS).write_text("".join(json.dumps(given_record(i, p)) + "\n" for i, p in enumerate(pairs)))
    meta = json.loads(run.write(**meta).read_text())
    name = trait.name if trait is not None else (source.stem if source is not None else "given pairs")
    plot_layer_norms(meta["norms"], f"{name} on {short_name(handle.name)}: per-layer vector norms", out / "norms.png")
    lines = [
        f"# {name} on {handle.name}, from {len(pairs)} given pairs",
        "",
        f"- pairs: {described}; nothing generated or judged",
        f"- response_mean: mean over the positive texts' tokens minus the negative texts', every layer ({CONVENTION})"
        if aggregation == "mean_diff"
        else f"- response_mean: {aggregation} of the positive against the negative texts, every layer ({CONVENTION})",
        "",
        "![per-layer norms](norms.png)",
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    return ExtractionResult(vectors, meta, [])


def settings(handle: ModelHandle, trait: Trait, judge: Judge, config: ExtractionConfig) -> dict:
    """What an extraction's answers and judgements depend on (``samples`` only extends a run; the ``RECOMPUTED``
    settings only choose among stored answers and aggregate them: ``meta.json``'s ``config`` records those the
    vector was made with)."""
    return {
        **model_settings(handle),
        "trait_sha256": trait.digest(),
        "judge": judge.name,
        "config": config.model_dump(mode="json", exclude={"samples", "batch_size", *RECOMPUTED}),
    }


def _model_meta(handle: ModelHandle) -> dict:
    """What a vector's ``meta.json`` records of the model it was extracted from (``check_origin`` reads it)."""
    return {
        "model": handle.name,
        "revision": handle.revision,
        "architecture": handle.architecture,
        "dtype": str(handle.dtype).removeprefix("torch."),
        "n_blocks": handle.n_blocks,
        "hidden_size": handle.hidden_size,
        "tokenizer_sha256": handle.tokenizer_sha256(),
    }


def _meta(
    handle: ModelHandle, trait: Trait, judge: Judge, config: ExtractionConfig, counts: dict, vectors: dict
) -> dict:
    return {
        **_model_meta(handle),
        "trait": trait.name,
        "trait_sha256": trait.digest(),
        "elicitation": trait.elicitation,
        "judge": judge.name,
        "config": config.model_dump(),
        "counts": counts,
        "norms": {v: vectors[v].norm(dim=-1).tolist() for v in VARIANTS},
    }


def _excerpt(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _write_summary(out: Path, meta: dict, examples: list[dict]) -> None:
    title = f"{meta['trait']} on {meta['model']}"
    kept = f"{meta['counts']['kept']} of {meta['counts']['pairs']} pairs kept"
    figure_title = f"{meta['trait']} on {short_name(meta['model'])}: per-layer vector norms ({kept})"
    plot_layer_norms(meta["norms"], figure_title, out / "norms.png")
    counts, config = meta["counts"], meta["config"]
    norms = meta["norms"]["response_mean"]
    best = sorted(range(len(norms)), key=lambda layer: -norms[layer])[:5]
    lines = [
        f"# {title}",
        "",
        f"- judge: `{meta['judge']}`; trait `{RUN_TRAIT}` (sha256 `{meta['trait_sha256'][:12]}`)",
        f"- pairs kept: **{counts['kept']} / {counts['pairs']}** (positive threshold {config['pos_threshold']:g}, "
        f"negative threshold {config['neg_threshold']:g}, coherence threshold {config['coherence_threshold']:g})",
        f"- layers: {CONVENTION}",
        *([f"- aggregation: {config['aggregation']}"] if config.get("aggregation", "mean_diff") != "mean_diff" else []),
        f"- largest response_mean norms at layers {best}",
        "",
    ]
    rules = pd.DataFrame(
        {
            "rule": [RULES[r] for r in RULES],
            "pairs it dropped (first rule broken)": [counts["rejected"][r] for r in RULES],
            "pairs breaking it": [counts["breaking"][r] for r in RULES],
        }
    )
    per_pair = pd.DataFrame(
        {
            "instruction pair": [f"{p['pair']}: {_excerpt(p['pos'], 60)}" for p in counts["per_instruction_pair"]],
            "generated": [p["generated"] for p in counts["per_instruction_pair"]],
            "kept": [p["kept"] for p in counts["per_instruction_pair"]],
        }
    )
    lines += [markdown_table(rules), markdown_table(per_pair)]
    if examples:
        dropped = pd.DataFrame(
            {
                "question": [_excerpt(e["question"], 80) for e in examples],
                "rules broken": [", ".join(e["rules"]) for e in examples],
                "positive answer": [_answer(e, "pos") for e in examples],
                "negative answer": [_answer(e, "neg") for e in examples],
            }
        )
        lines += ["Dropped pairs, for example:", "", markdown_table(dropped)]
    lines += ["", "![per-layer norms](norms.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))


def _answer(example: dict, side: str) -> str:
    """A dropped pair's ``side`` (``pos``/``neg``) answer with its scores, for the summary."""
    trait, coherence = _score(example[f"{side}_trait"]), _score(example[f"{side}_coherence"])
    return f"{_excerpt(example[f'{side}_text'])} (trait {trait}, coherence {coherence})"


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.0f}"

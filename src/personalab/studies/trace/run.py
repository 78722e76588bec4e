"""Tracing persona vectors through training checkpoints: per-checkpoint extraction, emergence and transfer.

Checkpoints run one at a time in training order (load, work, free memory). For each unit
(a trait elicited in one strategy) and checkpoint:

1. extraction as in ``personalab.methods.extraction`` (generate, judge, filter, per-layer
   mean differences of response-token means); a checkpoint where fewer than ``min_pairs``
   pairs survive the filter is recorded as not extractable, with its filter counts;
2. the mean residual norm at every layer over the unit's evaluation prompts (the geometry's relative norms: the
   reference's ``mean_l2``, a mean over every token, sink tokens included, kept as the paper computes it);
3. emergence: the checkpoint steered with its own vector at ``layer`` with ``alpha`` on ``scale``
   (``personalab.engine.scale``, as every command: normalised adds the unit vector x ``alpha`` x the
   checkpoint's typical (median token) residual norm on the calibration prompts), on the ``generating``
   positions (the last prompt token and every generated token), against alpha 0 on the same checkpoint, judged
   and measured for fluency (``personalab.judging.fluency``) under the unsteered checkpoint; with controls, a
   random Gaussian direction and a label-shuffled mean difference (seeds 0, 1, 2) at the same
   layer and added norm.

Layers follow ``personalab.engine.layers`` (vectors ``[n_blocks + 1, hidden]``). Every step's
result is recorded in ``checkpoints/LABEL.json`` and generations and judgements in the run's
store, so a killed run resumes, a finished checkpoint is never loaded again, and a series
extended with new checkpoints computes only those. Transfer steers a target model with every
checkpoint's vector at ``target_alpha`` (default ``alpha``) on the same scale, measured on the target.
"""

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from personalab.console import say
from personalab.engine.generation import GenerationRequest, SamplingParams, generate_cached, release
from personalab.engine.handle import ModelHandle
from personalab.engine.interventions import Steer
from personalab.engine.loading import MissingTokenizerError, free_memory, load_tokenizer, model_shape
from personalab.engine.scale import DEFAULT_SCALE, Scale, mean_residual_norm, scaled_vector
from personalab.errors import InvalidInputError, PersonalabError
from personalab.files import write_text
from personalab.hashes import vector_sha256
from personalab.judging.fluency import fluency_cached
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan, score_cached
from personalab.methods.extraction import (
    RULES,
    Answer,
    ExtractionConfig,
    answer_activations,
    compute_vectors,
    filter_pairs,
    judged_answers,
)
from personalab.store import Store
from personalab.studies.controls import CONTROL_SEEDS, control_directions
from personalab.studies.trace.series import Checkpoint
from personalab.traits import (
    STRATEGIES,
    Trait,
    builtin_strategies,
    calibration_prompts,
    coherence_rubric,
    load_trait,
    load_trait_file,
)
from personalab.traits.elicitation import continues, evaluation_prompt
from personalab.vectors import save_vector_file

BASE_SAMPLING = SamplingParams(temperature=0.5, top_p=1.0, max_new_tokens=64, repetition_penalty=1.1)
"""Generation on base checkpoints, as in the pretraining-tracing code: 64 tokens, temperature 0.5, penalty 1.1."""
BUILT_IN = ("character", "stories", "dialogue")


class TraceConfig(BaseModel):
    """Settings of a trace; ``layer = None`` is ``n_blocks // 2``."""

    model_config = ConfigDict(extra="forbid")
    layer: int | None = None
    alpha: float = 0.5
    target_alpha: float | None = None
    scale: Scale = DEFAULT_SCALE
    extraction: ExtractionConfig = ExtractionConfig(samples=4, sampling=BASE_SAMPLING, min_pairs=1)
    eval_samples: int = Field(3, ge=1)
    controls: bool = False
    control_seeds: tuple[int, ...] = CONTROL_SEEDS
    n_resamples: int = Field(10_000, ge=100)
    mds_seed: int = 42


@dataclass(frozen=True)
class Unit:
    """A trait in one strategy: ``members`` are extracted (pooled when several: ``combined``),
    ``evaluation`` gives the steering questions and rubric; ``steer`` is false for a strategy
    extracted only to be pooled."""

    trait: str
    strategy: str
    evaluation: Trait
    members: tuple[Trait, ...]
    steer: bool = True

    @property
    def name(self) -> str:
        return f"{self.trait}-{self.strategy}"


def safe_name(text: str) -> str:
    """``text`` as one file-name part: letters, digits, ``_``, ``.`` and ``-`` kept, anything else ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text).strip(".") or "_"


def _is_file(spec: str) -> bool:
    return spec.endswith(".json") or Path(spec).is_file()


def _strategy(trait: str, strategy: str) -> tuple[str, Trait]:
    if _is_file(strategy):
        return safe_name(Path(strategy).stem), load_trait_file(strategy)
    if not (STRATEGIES / f"{trait}-{strategy}.json").is_file():
        raise InvalidInputError(
            f"no built-in {strategy!r} strategy for the trait {trait!r}; built in: "
            f"{', '.join(builtin_strategies())}; or give `strategy` FILE.json (a trait in continuation style)"
        )
    return strategy, load_trait(f"{trait}-{strategy}")


def build_units(traits: Sequence[str], strategies: Sequence[str], trait_dir: str | Path | None = None) -> list[Unit]:
    """Units of every trait x strategy. A trait is a built-in name (traced in the built-in strategies named,
    ``character`` when none is), a trait file or, with ``trait_dir``, a trait of that persona-vectors data
    folder (both traced as written when no strategy is named; the unit is ``NAME-STYLE``, the trait's name and
    elicitation style). ``combined`` pools the judged answers of the
    run's other strategies of that trait (at least two), else of the built-in character, stories and
    dialogue. Unit names are file-name safe: every output of a unit stays in its folder of the run. No ``traits``:
    the trait the strategy files name when every strategy is a file, else ``evil``."""
    if not traits:
        named_files = [s for s in strategies if s != "combined"]
        files = [s for s in named_files if _is_file(s)]
        traits = list(dict.fromkeys(load_trait_file(f).name for f in files)) if files == named_files and files else []
        traits = traits or ["evil"]
    units: list[Unit] = []
    for trait in dict.fromkeys(traits):
        own = load_trait_file(trait) if _is_file(trait) else load_trait(trait, trait_dir) if trait_dir else None
        label = safe_name(own.name if own else trait)
        named = [s for s in dict.fromkeys(strategies) if s != "combined"]
        if own is not None and not named:
            plain = [(own.elicitation, own)]
        else:
            plain = [_strategy(label, s) for s in (named or ([] if "combined" in strategies else ["character"]))]
        units += [Unit(label, name, t, (t,)) for name, t in plain]
        if "combined" in strategies:
            pool = plain if len(plain) >= 2 else [_strategy(label, s) for s in BUILT_IN]
            known = {name for name, _ in plain}
            units += [Unit(label, name, t, (t,), steer=False) for name, t in pool if name not in known]
            units.append(Unit(label, "combined", pool[0][1], tuple(t for _, t in pool)))
    if not units:
        raise InvalidInputError("no trait x strategy to trace; pass `trait` and `strategy`")
    return units


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def record_path(out: Path, checkpoint: Checkpoint) -> Path:
    return out / "checkpoints" / f"{checkpoint.label}.json"


def load_record(out: Path, checkpoint: Checkpoint) -> dict:
    """What is recorded of a checkpoint (a new record when nothing is)."""
    path = record_path(out, checkpoint)
    if path.is_file():
        return json.loads(path.read_text())
    return {
        "label": checkpoint.label,
        "source": checkpoint.source,
        "revision": checkpoint.revision,
        "step": checkpoint.step,
        "tokens": checkpoint.tokens,
        "units": {},
    }


def _needs(record: dict, unit: Unit, config: TraceConfig) -> bool:
    done = record["units"].get(unit.name, {})
    if "status" not in done:
        return True
    if not done["status"]["extractable"]:
        return False
    if "residual_norms" not in done:
        return True
    return unit.steer and ("emergence" not in done or (config.controls and not done.get("controls")))


def pending(out: Path, checkpoint: Checkpoint, units: Sequence[Unit], config: TraceConfig) -> bool:
    """Whether anything of ``checkpoint`` is still to compute."""
    record = load_record(out, checkpoint)
    return any(_needs(record, unit, config) for unit in units)


def _counts(reports) -> dict:
    counts = {"pairs": 0, "kept": 0, "rejected": dict.fromkeys(RULES, 0)}
    for report in reports:
        broken = report.broken
        counts["pairs"] += len(broken)
        counts["kept"] += sum(not rules for rules in broken)
        for rules in broken:
            if rules:
                counts["rejected"][rules[0]] += 1
    return counts


def _kept(handle, unit, judge, store, config, progress) -> tuple[list[tuple[Answer, Answer]], dict]:
    reports = [
        filter_pairs(judged_answers(handle, member, judge, store, config.extraction, progress), config.extraction)
        for member in unit.members
    ]
    return [pair for report in reports for pair in report.kept], _counts(reports)


def steering_scores(
    handle: ModelHandle,
    trait: Trait,
    directions: dict[str, torch.Tensor],
    layer: int,
    added_norm: float | dict[str, float],
    judge: Judge,
    store: Store,
    config: TraceConfig,
    label: str,
    progress: bool,
) -> dict[str, dict]:
    """Per condition (``baseline`` and each direction, added as its unit vector x ``added_norm`` (one for all, or
    one per direction) at ``layer`` on response positions), the per-question mean trait and coherence scores and
    fluency (``nll``: mean NLL per token under the unsteered ``handle``) of ``eval_samples`` answers to each
    evaluation question; all conditions share batches."""
    questions = trait.evaluation_questions
    prompts = [evaluation_prompt(handle, trait, q) for q in questions]
    norms = added_norm if isinstance(added_norm, dict) else dict.fromkeys(directions, added_norm)
    added = {name: d.float() / d.float().norm() * norms[name] for name, d in directions.items()}
    names = ["baseline", *added]
    plan = [(c, qi, s) for c in range(len(names)) for qi in range(len(questions)) for s in range(config.eval_samples)]
    requests = [
        GenerationRequest(
            prompts[qi],
            {
                "trace": label,
                "condition": names[c],
                "vector": None if c == 0 else vector_sha256(added[names[c]]),
                "layer": layer,
                "question": questions[qi],
                "sample": s,
            },
            () if c == 0 else (Steer(layer, added[names[c]], 1.0, "generating"),),
        )
        for c, qi, s in plan
    ]
    texts = generate_cached(handle, store, requests, config.extraction.sampling, config.extraction.batch_size, progress)
    coherence = coherence_rubric(continues(handle, trait))
    scores = {}
    for key, rubric in (("trait", trait.rubric), ("coherence", coherence)):
        items = [(questions[qi], text, rubric) for (_, qi, _), text in zip(plan, texts, strict=True)]
        scores[key] = score_cached(store, judge, items, f"judge {key}", progress=progress)
    prompts_of = [r.prompt for r in requests]
    asked = [questions[qi] for _, qi, _ in plan]
    scores["nll"] = fluency_cached(handle, store, prompts_of, texts, asked, config.extraction.batch_size, progress)
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (c, qi, _) in enumerate(plan):
        cells.setdefault((c, qi), []).append(i)
    out: dict[str, dict] = {}
    for c, name in enumerate(names):
        out[name] = {}
        for key in ("trait", "coherence", "nll"):
            values = [
                [scores[key][i] for i in cells[(c, qi)] if scores[key][i] is not None] for qi in range(len(questions))
            ]
            out[name][key] = [sum(v) / len(v) if v else None for v in values]
    return out


def process_checkpoint(
    handle: ModelHandle,
    checkpoint: Checkpoint,
    units: Sequence[Unit],
    config: TraceConfig,
    judge: Judge,
    store: Store,
    out: Path,
    progress: bool = True,
) -> dict:
    """Compute what is missing of ``checkpoint`` for every unit; the record is saved after each step."""
    record = load_record(out, checkpoint)
    path = record_path(out, checkpoint)
    layer = config.layer
    for unit in sorted(units, key=lambda u: u.strategy == "combined"):
        if not _needs(record, unit, config):
            continue
        done = record["units"].setdefault(unit.name, {})
        kept, counts = _kept(handle, unit, judge, store, config, progress)
        extractable = counts["kept"] >= config.extraction.min_pairs
        controls = unit.steer and config.controls and not done.get("controls")
        activations = None
        if extractable and ("status" not in done or controls):
            answers = [p for p, _ in kept] + [n for _, n in kept]
            activations = answer_activations(handle, answers, config.extraction.batch_size, progress)
        if "status" not in done:
            if extractable:
                vectors = compute_vectors(
                    handle, kept, config.extraction.batch_size, progress, activations, config.extraction.aggregation
                )
                save_vector_file(out / unit.name / "vectors" / f"{checkpoint.label}.safetensors", vectors)
            done["status"] = {**counts, "extractable": extractable}
            kept_text = f"kept {counts['kept']} of {counts['pairs']} pairs"
            say(f"{checkpoint.label} {unit.name}: {kept_text}" + ("" if extractable else ": not extractable"), progress)
            _write_json(path, record)
        if not extractable:
            continue
        if "residual_norms" not in done:
            prompts = [evaluation_prompt(handle, unit.evaluation, q) for q in unit.evaluation.evaluation_questions]
            done["residual_norms"] = mean_residual_norm(handle, prompts, range(handle.n_layers))
            _write_json(path, record)
        if unit.steer and ("emergence" not in done or controls):
            vector = _vector(out, unit, checkpoint)[layer]
            directions = {"vector": vector}
            if config.controls:
                directions |= control_directions(
                    activations["response_mean"], len(kept), layer, config.control_seeds, handle.hidden_size
                )
            added = config.alpha * _unit_norm(handle, vector, layer, config.scale)
            done["emergence"] = steering_scores(
                handle, unit.evaluation, directions, layer, added, judge, store, config, unit.name, progress
            )
            done["controls"] = config.controls
            _write_json(path, record)
    return record


def _unit_norm(handle: ModelHandle, vector: torch.Tensor, layer: int, scale: str) -> float:
    """What ``alpha = 1`` adds along a direction at ``layer`` (``personalab.engine.scale``): the model's typical
    (median token) residual norm on the calibration prompts (normalised) or ``|vector|`` (raw)."""
    return float(scaled_vector(handle, vector, layer, scale, calibration_prompts(handle)).vector.norm())


def _vector(out: Path, unit: Unit, checkpoint: Checkpoint) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(out / unit.name / "vectors" / f"{checkpoint.label}.safetensors")["response_mean"]


def plan_trace(
    checkpoints: Sequence[Checkpoint], units: Sequence[Unit], config: TraceConfig, judge: Judge, out: Path, target: bool
) -> Plan:
    """The most a trace into ``out`` still samples and judges: at every checkpoint with work left, each unit
    member's extraction answers (instructions x questions x 2 x ``samples``) and each steered unit's steering
    answers (baseline and vector, and 2 per control seed, x evaluation questions x ``eval_samples``), and on the
    target the baseline and every checkpoint's vector; every answer judged for trait and coherence. An upper bound:
    what a checkpoint's store holds is known when it is loaded."""
    with_work = [c for c in checkpoints if pending(out, c, units, config)]
    members = {member.digest(): member for unit in units for member in unit.members}
    samples = config.extraction.samples
    extraction = sum(len(m.instructions) * len(m.extraction_questions) * 2 * samples for m in members.values())
    conditions = 2 + (2 * len(config.control_seeds) if config.controls else 0)
    steered = [unit for unit in units if unit.steer]
    evaluations = sum(len(u.evaluation.evaluation_questions) * config.eval_samples for u in steered)
    answers = (extraction + conditions * evaluations) * len(with_work)
    answers += (1 + len(checkpoints)) * evaluations if target else 0
    return Plan(answers, None, answers * config.extraction.sampling.max_new_tokens, 2 * answers, judge.name)


def run_checkpoints(
    checkpoints: Sequence[Checkpoint],
    load: Callable[[Checkpoint], ModelHandle],
    units: Sequence[Unit],
    config: TraceConfig,
    judge: Judge,
    out: Path,
    progress: bool = True,
) -> list[Checkpoint]:
    """Process every checkpoint with work left, one model in memory at a time; returns those that
    could not be loaded (each reported in one line; the others continue)."""
    failed = []
    with_work = [c for c in checkpoints if pending(out, c, units, config)]
    say(f"{len(checkpoints) - len(with_work)} of {len(checkpoints)} checkpoints already done", progress)
    with Store(out / "generations.sqlite") as store:
        for index, checkpoint in enumerate(with_work, start=1):
            say(f"[{index}/{len(with_work)}] {checkpoint.label}", progress)
            try:
                handle = load(checkpoint)
            except (InvalidInputError, MissingTokenizerError):
                raise
            except Exception as exc:  # weights that do not load (corrupt, missing, unreadable): report it, go on
                say(f"skipped {checkpoint.label}: {' '.join(str(exc).split())[:300]}", True)
                failed.append(checkpoint)
                continue
            process_checkpoint(handle, checkpoint, units, config, judge, store, out, progress)
            release(handle)
            del handle
            free_memory()
    return failed


def transfer_path(out: Path) -> Path:
    return out / "transfer.json"


def run_transfer(
    target: Callable[[], ModelHandle],
    target_name: str,
    checkpoints: Sequence[Checkpoint],
    units: Sequence[Unit],
    config: TraceConfig,
    judge: Judge,
    out: Path,
    progress: bool = True,
) -> dict:
    """Steer the target with every extractable checkpoint's vector at ``target_alpha`` on ``scale`` (normalised: the
    target's typical residual norm on the calibration prompts), against alpha 0 on the target."""
    path = transfer_path(out)
    record = json.loads(path.read_text()) if path.is_file() else {"target": target_name, "units": {}}
    if record["target"] != target_name:
        raise InvalidInputError(
            f"{out} holds transfer results for {record['target']}, not {target_name}; use another `out`"
        )
    wanted = {unit.name: [c.label for c in checkpoints if _extractable(out, c, unit)] for unit in units if unit.steer}
    missing = {
        name: labels
        for name, labels in wanted.items()
        if set(labels) - set(record["units"].get(name, {}).get("scores", {}))
    }
    if not missing:
        return record
    handle = target()
    alpha = config.alpha if config.target_alpha is None else config.target_alpha
    store = Store(out / "generations.sqlite")
    try:
        for unit in units:
            if unit.name not in missing:
                continue
            directions = {
                label: _vector(out, unit, _by_label(checkpoints, label))[config.layer] for label in wanted[unit.name]
            }
            added = {
                label: alpha * _unit_norm(handle, d, config.layer, config.scale) for label, d in directions.items()
            }
            say(f"transfer {unit.name} to {target_name}: {len(directions)} checkpoint vectors", progress)
            scores = steering_scores(
                handle,
                unit.evaluation,
                directions,
                config.layer,
                added,
                judge,
                store,
                config,
                f"transfer {unit.name}",
                progress,
            )
            record["units"][unit.name] = {"alpha": alpha, "scale": config.scale, "added_norm": added, "scores": scores}
            _write_json(path, record)
    finally:
        store.close()
        release(handle)
        del handle
        free_memory()
    return record


def _by_label(checkpoints: Sequence[Checkpoint], label: str) -> Checkpoint:
    return next(c for c in checkpoints if c.label == label)


def _extractable(out: Path, checkpoint: Checkpoint, unit: Unit) -> bool:
    status = load_record(out, checkpoint)["units"].get(unit.name, {}).get("status")
    return bool(status and status["extractable"])


def check_series(
    checkpoints: Sequence[Checkpoint], target: str | None, progress: bool = True, tokenizer: str | None = None
) -> tuple[list, int]:
    """Read every checkpoint's config before any work: a checkpoint whose config does not load is
    reported in one line and left out; without a ``tokenizer`` from elsewhere, a checkpoint without its
    own is an error naming ``--tokenizer``; checkpoints (and the target) of different shapes are an error.
    Returns the checkpoints kept and their number of blocks."""
    shapes, kept = {}, []
    for checkpoint in checkpoints:
        try:
            shapes[checkpoint.label] = model_shape(checkpoint.source, checkpoint.revision)
        except PersonalabError as exc:
            say(f"skipped {checkpoint.label}: {exc}", True)
            continue
        if tokenizer is None:
            load_tokenizer(checkpoint.source, checkpoint.revision)
        kept.append(checkpoint)
    if not kept:
        raise InvalidInputError("no checkpoint of the series could be read; check `model` and the revisions")
    if target is not None:
        shapes[f"target {target}"] = model_shape(target, None)
    if len(set(shapes.values())) > 1:
        described = ", ".join(f"{name} ({blocks} blocks x {hidden})" for name, (blocks, hidden) in shapes.items())
        raise InvalidInputError(f"the checkpoints differ in shape: {described}; trace checkpoints of one model")
    return kept, next(iter(shapes.values()))[0]


def check_layer(layer: int | None, n_blocks: int) -> int:
    """The steering and geometry layer: ``layer``, or ``n_blocks // 2``; must be in ``1..n_blocks``."""
    chosen = n_blocks // 2 if layer is None else layer
    if not 1 <= chosen <= n_blocks:
        raise InvalidInputError(f"layer {chosen} is out of range; these checkpoints have layers 1..{n_blocks}")
    return chosen


def finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number, not {value}")
    return value


def meta(config: TraceConfig, checkpoints, units, model: str, judge: Judge, target: str | None) -> dict:
    """What ``meta.json`` records of a trace."""
    return {
        "model": model,
        "config": config.model_dump(),
        "judge": judge.name,
        "target": target,
        "checkpoints": [asdict(c) for c in checkpoints],
        "units": [{"name": u.name, "steered": u.steer, "members": [m.name for m in u.members]} for u in units],
    }

"""Study functions that put a vector into weights and compare the results: ``distill``, ``bake``, ``compare``,
``finetune``."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from personalab.api.common import (
    StudyResult,
    as_judge,
    as_model,
    as_trait,
    collect,
    configured,
    finished,
    run_folder,
    vector_of,
    write_run_report,
)
from personalab.engine.handle import ModelHandle
from personalab.engine.loading import load_trained
from personalab.errors import InvalidInputError
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan
from personalab.persona import DEFAULT_VARIANT, PersonaVector, as_vector
from personalab.records import Record, load_records
from personalab.traits import Trait

Loader = Callable[[], ModelHandle]
"""Loads a fresh copy of a model (a training study trains the one it gets in place)."""


def training_dtype(dtype: str, full: bool) -> str:
    """The weights dtype of a training run: ``auto`` is float32 for full fine-tuning (AdamW's small steps survive
    in it), else the checkpoint's own."""
    return "float32" if full and dtype == "auto" else dtype


def training_placement(device: str) -> tuple[str, bool, int]:
    """``(device, main, processes)``: under a multi-process launch (``accelerate launch``) each process's own
    device, whether it is the main process and how many there are; else ``device`` itself, ``True`` and 1."""
    from accelerate import PartialState

    from personalab.engine.loading import resolve_device

    state = PartialState(cpu=resolve_device(device) == "cpu")
    return (str(state.device) if state.num_processes > 1 else device), state.is_main_process, state.num_processes


def _loader(model: "ModelHandle | str | Loader", dtype: str = "auto") -> Loader:
    if isinstance(model, ModelHandle):
        return lambda: model
    if callable(model):
        return model
    from personalab.engine.loading import load_model

    return lambda: load_model(str(model), dtype=dtype)


def _prompt_set(handle: ModelHandle, trait: Trait | None, prompts: "Sequence[Record] | str | Path | None"):
    """The distillation prompts: chat records (a JSONL file or ``Record`` objects), else the trait's extraction
    questions."""
    if prompts is not None:
        rows = load_records(prompts) if isinstance(prompts, str | Path) else prompts
        return [r.encode(handle, response=False) for r in rows]
    return [handle.encode(None, q) for q in trait.extraction_questions]


def distill(
    model: "ModelHandle | str | Loader",
    vector: PersonaVector | str | Path,
    *,
    layer: int,
    alpha: float,
    trajectories: int | Sequence[int] = 500,
    prompts: "Sequence[Record] | str | Path | None" = None,
    trait: Trait | str | None = None,
    variant: str = DEFAULT_VARIANT,
    merge: bool = False,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab distill``: train a student (LoRA with ``lora_rank``, full with ``lora_rank=None``) to match the
    steered teacher on steered trajectories. Several ``trajectories`` counts run one student each into
    ``out/trajectories-N`` (``model`` then a name or a loader, so each starts fresh) and table ``ablation``.
    ``options`` are ``DistillConfig``'s and the trajectories' sampling options. Tables: ``distill`` (one row
    per count: held-out KL before and after, KL to the unsteered base, trainable parameters). ``dry_run`` loads the
    model and returns the ``Plan`` of the trajectories (the largest count's, which the others share) and does
    nothing else."""
    import pandas as pd

    from personalab.figures.tables import write_csv
    from personalab.methods.distill import DistillConfig, plan_distill
    from personalab.methods.distill import distill as train

    counts = [trajectories] if isinstance(trajectories, int) else list(trajectories)
    if not counts:
        raise InvalidInputError("no `trajectories` count given; give at least one")
    if len(counts) > 1 and isinstance(model, ModelHandle):
        raise InvalidInputError("several trajectory counts train several students; pass the model's name or a loader")
    configs = [configured(DistillConfig, options, layer=layer, alpha=alpha, trajectories=n) for n in counts]
    persona, direction = vector_of(vector, variant, model)
    chosen = None if prompts is not None else as_trait(trait, persona)
    load = _loader(model, training_dtype("auto", configs[0].lora_rank is None))
    if dry_run:
        handle = load()
        store = Path(out) / "generations.sqlite" if out is not None else None
        return plan_distill(
            handle, direction, _prompt_set(handle, chosen, prompts), store, configs[counts.index(max(counts))]
        )
    rows = []
    with run_folder(out) as (folder, kept):
        for config in configs:
            handle = load()
            target = folder if len(configs) == 1 else folder / f"trajectories-{config.trajectories}"
            result = train(
                handle, direction, _prompt_set(handle, chosen, prompts), config, target, progress,
                store_path=folder / "generations.sqlite", merge=merge,
            )  # fmt: skip
            rows.append({"trajectories": config.trajectories, **result.held_out, "trainable": result.trainable})
        table = pd.DataFrame(rows)
        if len(rows) > 1:
            write_csv(table, folder / "ablation.csv")
        if len(configs) == 1:
            page = write_run_report(folder, report and kept)
            found = collect(folder, kept, report=page)
        else:
            for config in configs:
                write_run_report(folder / f"trajectories-{config.trajectories}", report and kept)
            found = collect(folder, kept)
    found.tables = {"distill": table, **found.tables}
    return found


def bake(
    model: ModelHandle | str,
    vector: PersonaVector | str | Path,
    *,
    layer: int,
    alpha: float,
    out: str | Path,
    scale: str | None = None,
    variant: str = DEFAULT_VARIANT,
    report: bool = True,
) -> StudyResult:
    """``personalab bake --exact``: a model folder whose plain forward equals the steered one (an exact bias or
    embedding shift, no training); ``meta`` is its ``bake.json``."""
    import json

    from personalab.engine.scale import DEFAULT_SCALE
    from personalab.methods.bake import bake_exact

    _, direction = vector_of(vector, variant, model)
    folder = bake_exact(as_model(model), direction, layer, alpha, out, scale or DEFAULT_SCALE)
    page = write_run_report(folder, report)
    return StudyResult(meta=json.loads((folder / "bake.json").read_text()), folder=folder, report=page)


def trained_loader(base: ModelHandle, folder: str | Path) -> Loader:
    """Loads the trained model of a run folder, checkpoint, adapter or model folder on ``base``'s dtype and
    device, an adapter merged onto ``base``'s weights."""
    device = base.input_device.type
    return lambda: load_trained(base.origin[0] or base.name, folder, base.dtype, device, base.tokenizer)


def compare(
    model: ModelHandle | str,
    vector: PersonaVector | str | Path,
    judge: Judge | str,
    *,
    layer: int,
    alpha: float,
    tuned: Sequence[str | Path],
    trait: Trait | str | None = None,
    variant: str = DEFAULT_VARIANT,
    load: Callable[[Path], ModelHandle] | None = None,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab compare``: base, steered and each distilled (``tuned``: distill runs, bakes or models) model
    judged on the trait's evaluation questions, with question-level paired tests. ``load(folder)`` loads one
    (default ``trained_loader``).
    ``options`` are ``CompareConfig``'s and the sampling options. Tables: ``compare``. ``dry_run`` returns the
    ``Plan`` of every model and does nothing else."""
    from personalab.studies.compare import CompareConfig, plan_compare, run_compare

    config = configured(CompareConfig, options, layer=layer, alpha=alpha)
    persona, direction = vector_of(vector, variant, model)
    chosen, scorer, base = as_trait(trait, persona), as_judge(judge), as_model(model)
    if dry_run:
        return plan_compare(base, direction, chosen, scorer, list(tuned), out, config)
    trained = [(Path(f), (lambda f=f: load(Path(f))) if load else trained_loader(base, f)) for f in tuned]
    with run_folder(out) as (folder, kept):
        run_compare(base, direction, chosen, scorer, trained, folder, config, progress)
        return finished(folder, kept, report, ["compare"])


def monitored(
    vectors: Sequence[PersonaVector | str | Path],
    layer: int | None,
    n_blocks: int,
    prompts: "Sequence[Record] | str | Path | None" = None,
    variant: str = DEFAULT_VARIANT,
    judged: bool = False,
):
    """What a fine-tune monitors (``personalab.studies.finetune.Monitored``): each vector's direction at ``layer``
    (default ``n_blocks // 2``) on ``prompts`` (default: its trait's evaluation questions)."""
    from personalab.engine.layers import check_layers
    from personalab.studies.finetune import Monitored

    chosen = n_blocks // 2 if layer is None else check_layers(layer, n_blocks)[0]
    rows = load_records(prompts) if isinstance(prompts, str | Path) else prompts
    questions = [r.prompt for r in rows] if rows else None
    out = []
    for value in vectors:
        vector = as_vector(value)
        name = vector.source.name if vector.source else vector.name
        if vector.n_layers not in (None, n_blocks + 1):
            raise InvalidInputError(
                f"monitor vector {name} has {vector.n_layers} layers but the model has {n_blocks + 1}; "
                f"use a vector extracted from this model"
            )
        direction = vector.tensor(variant, n_blocks + 1)
        if questions is None and vector.trait is None:
            raise InvalidInputError(f"{name} keeps no trait.json; pass monitor prompts (a JSONL of prompts)")
        if judged and vector.trait is None:
            raise InvalidInputError(f"judging the monitored answers needs the trait of {name}; it keeps no trait.json")
        source = str(vector.source.resolve()) if vector.source else name
        out.append(Monitored(name, direction[chosen], questions or vector.trait.evaluation_questions, vector.trait,
                             source))  # fmt: skip
    return out


def finetune(
    model: ModelHandle | str,
    data: "Sequence[Record] | str | Path",
    *,
    monitor: Sequence[PersonaVector | str | Path] = (),
    monitor_prompts: "Sequence[Record] | str | Path | None" = None,
    judge: Judge | str | None = None,
    steer_vector: PersonaVector | str | Path | None = None,
    ablate_vector: PersonaVector | str | Path | None = None,
    layer: int | None = None,
    alpha: float = 1.0,
    scale: str | None = None,
    variant: str = DEFAULT_VARIANT,
    epochs: float | None = None,
    out: str | Path | None = None,
    report: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab finetune``: train on chat records (loss on the final assistant turn and its end of turn) while
    monitoring the projections of ``monitor`` vectors (judged with ``judge``); ``steer_vector`` or ``ablate_vector`` at
    ``layer`` during training only. ``options`` are ``FinetuneConfig``'s (``steps`` instead of ``epochs``).
    Tables: ``monitor``. ``dry_run`` returns the ``Plan`` of the monitoring judge and does nothing else."""
    from personalab.engine.scale import DEFAULT_SCALE
    from personalab.studies.finetune import FinetuneConfig, TrainingIntervention, check, check_records
    from personalab.studies.finetune import finetune as train

    steps = options.get("steps")
    config = configured(FinetuneConfig, {**options, "steps": steps or 1})
    records = load_records(data) if isinstance(data, str | Path) else list(data)
    check_records(records)
    if (steer_vector is not None or ablate_vector is not None) and layer is None:
        raise InvalidInputError("steering or ablating during training needs a layer")
    handle = as_model(model)
    monitors = monitored(monitor, config.monitor_layer, handle.n_blocks, monitor_prompts, variant, judge is not None)
    interventions = [
        TrainingIntervention(kind, layer, vector_of(v, variant, handle)[1], alpha, scale or DEFAULT_SCALE)
        for kind, v in (("steer", steer_vector), ("ablate", ablate_vector))
        if v is not None
    ]
    check(handle.n_blocks, handle.hidden_size, config, monitors, interventions)
    scorer = as_judge(judge) if judge is not None else None
    with run_folder(out) as (folder, kept):
        planned = train(handle, records, config, folder, monitors, interventions, scorer,
                        None if steps else (epochs or 1.0), dry_run=dry_run)  # fmt: skip
        return planned if dry_run else finished(folder, kept, report, ["monitor"])

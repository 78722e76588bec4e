"""Study functions of the analysis studies: ``trace``, ``localize``, ``deepscan``, ``compose``, ``correlate``."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from personalab.api.common import (
    SAMPLING,
    StudyResult,
    as_judge,
    as_model,
    as_trait,
    block_count,
    configured,
    finished,
    in_run_folder,
    run_folder,
    vector_of,
)
from personalab.engine.handle import ModelHandle
from personalab.errors import InvalidInputError
from personalab.judging.judges import Judge
from personalab.judging.scoring import Plan
from personalab.persona import DEFAULT_VARIANT, PersonaVector
from personalab.traits import Trait


def checkpoint_series(
    model: str | None = None,
    series: str | None = None,
    revisions: Sequence[str] | str | Path | None = None,
    checkpoints: str | Sequence[str] | None = None,
    tokens_per_step: float | None = None,
) -> list:
    """The checkpoints a trace runs over: local ``checkpoints`` folders (a glob or a list), else ``revisions`` of
    ``model`` (a list, or a file with one per line), else the built-in ``series`` (olmo3, apertus)."""
    from personalab.studies.trace import SERIES, from_folders, from_revisions, read_revisions

    if checkpoints is not None and revisions is not None:
        raise InvalidInputError("give revisions of a model or local checkpoint folders, not both")
    if checkpoints is not None:
        return from_folders(checkpoints if isinstance(checkpoints, str) else ",".join(checkpoints), tokens_per_step)
    name = model or (SERIES[series].model if series in SERIES else None)
    if name is None:
        raise InvalidInputError("give a model (with a series or revisions), or local checkpoint folders")
    if isinstance(revisions, Path):
        wanted = read_revisions(revisions)
    elif isinstance(revisions, str):
        wanted = [r.strip() for r in revisions.split(",") if r.strip()]
    elif revisions is not None:
        wanted = list(revisions)
    else:
        wanted = list(SERIES[series].revisions) if series in SERIES else []
    return from_revisions(name, wanted, series, tokens_per_step)


def trace(
    model: str | None,
    judge: Judge | str,
    *,
    out: str | Path | None = None,
    series: str | None = None,
    revisions: Sequence[str] | str | Path | None = None,
    checkpoints: str | Sequence[str] | None = None,
    tokens_per_step: float | None = None,
    traits: Sequence[str] = (),
    strategies: Sequence[str] = (),
    trait_dir: str | Path | None = None,
    target: str | None = None,
    load: Callable | None = None,
    load_target: Callable[[], ModelHandle] | None = None,
    tokenizer: str | None = None,
    report: bool = True,
    progress: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab trace``: a trait through training checkpoints (``checkpoint_series``): extraction at each,
    geometry, emergence and transfer steering on ``target``; with ``trait_dir`` (a persona-vectors data folder)
    each trait name is read from it and traced as written. ``load(checkpoint)`` loads one (default
    ``load_model`` of its source and revision). ``options`` are ``TraceConfig``'s (``layer``, ``alpha``,
    ``target_alpha``, ``scale``, ``eval_samples``, ``controls``) and its extraction's (``samples``, ``min_pairs``,
    thresholds, ``batch_size``, sampling). Tables: ``emergence``. ``dry_run`` returns the ``Plan`` (an upper bound:
    checkpoints already traced left out) before any checkpoint is loaded."""
    from personalab.engine.loading import load_model
    from personalab.methods.extraction import ExtractionConfig
    from personalab.studies.trace import TraceConfig, build_units, run_trace

    extraction_fields = set(ExtractionConfig.model_fields) | set(SAMPLING)
    mine = {k: v for k, v in options.items() if k not in extraction_fields}
    extraction = {k: v for k, v in options.items() if k in extraction_fields}
    base = TraceConfig.model_fields["extraction"].default
    given = {k: extraction.pop(k) for k in list(extraction) if k in SAMPLING}
    sampling = type(base.sampling).model_validate(base.sampling.model_dump() | given)
    chosen = ExtractionConfig(**{**base.model_dump(exclude={"sampling"}), **extraction, "sampling": sampling})
    config = configured(TraceConfig, mine, extraction=chosen)
    checkpoints_list = checkpoint_series(model, series, revisions, checkpoints, tokens_per_step)
    units = build_units(traits, strategies, trait_dir)
    scorer = as_judge(judge)

    def default_load(checkpoint):
        return load_model(checkpoint.source, checkpoint.revision, tokenizer=tokenizer)

    if target is not None and load_target is None:
        load_target = lambda: load_model(target)  # noqa: E731
    with run_folder(out) as (folder, kept):
        traced = run_trace(checkpoints_list, units, config, scorer, folder, load or default_load, series, target,
                           load_target, progress, tokenizer=tokenizer, dry_run=dry_run)  # fmt: skip
        return traced if dry_run else finished(folder, kept, report, ["emergence"])


def statements(
    personas: Sequence[str],
    persona_dir: str | Path | None = None,
    statements_file: str | Path | None = None,
    min_confidence: float | None = None,
):
    """The persona statements of ``localize`` and ``deepscan`` (``personalab.studies.localize.statements``)."""
    from personalab.studies.localize.statements import load_statements

    return load_statements(list(personas), persona_dir, statements_file, min_confidence)


def localize(
    model: ModelHandle | str,
    personas: Sequence[str] = (),
    *,
    persona_dir: str | Path | None = None,
    statements_file: str | Path | None = None,
    min_confidence: float | None = None,
    activations: str | Path | None = None,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    **options: Any,
) -> StudyResult:
    """``personalab localize``: per-layer divergence of persona statements, and PCA, t-SNE and UMAP figures.
    ``options`` are ``LocalizeConfig``'s (``layers``, ``figure_layers``, ``seed``...)."""
    from personalab.engine.layers import check_layers
    from personalab.studies.localize.run import LocalizeConfig, check_statements, run_localize

    config = configured(LocalizeConfig, options)
    chosen = statements(personas, persona_dir, statements_file, min_confidence)
    check_statements(chosen)
    n_blocks = block_count(model)
    for layers in (config.layers, config.figure_layers):
        if layers is not None:
            check_layers(layers, n_blocks)
    handle = as_model(model)
    return in_run_folder(
        out, report, ["divergence"], lambda folder: run_localize(handle, chosen, folder, config, activations, progress)
    )


def deepscan(
    model: ModelHandle | str,
    personas: Sequence[str] = (),
    *,
    layer: int,
    persona_dir: str | Path | None = None,
    statements_file: str | Path | None = None,
    min_confidence: float | None = None,
    individual: bool = False,
    activations: str | Path | None = None,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    **options: Any,
) -> StudyResult:
    """``personalab deepscan``: the hidden units and statements jointly anomalous for each persona, and their
    overlap; ``individual`` also scans each test record alone. ``options`` are ``ScanConfig``'s. Tables:
    ``scan_summary``."""
    from personalab.console import say
    from personalab.figures.tables import write_csv
    from personalab.studies.localize import scan as scanning

    chosen = statements(personas, persona_dir, statements_file, min_confidence)
    config, note = scanning.sized(chosen, configured(scanning.ScanConfig, options, layer=layer))
    n_blocks = block_count(model)
    scanning.check(chosen, config, n_blocks)
    for line in ([note] if note else []) + [scanning.TAIL_NOTES[config.tail]]:
        say(line, progress)
    handle = as_model(model)
    with run_folder(out) as (folder, kept):
        scanning.run_deepscan(handle, chosen, folder, config, activations, progress)
        if individual:
            cache = scanning.ActivationCache(activations or folder / "activations", handle)
            for name, rows in chosen.items():
                write_csv(scanning.individual(cache, rows, config), folder / f"individual_{name}.csv")
        return finished(folder, kept, report, ["scan_summary"])


def compose(
    model: ModelHandle | str,
    grid: str | Path = "short",
    *,
    marker_file: str | Path | None = None,
    out: str | Path | None = None,
    report: bool = True,
    progress: bool = True,
    **options: Any,
) -> StudyResult:
    """``personalab compose``: "As X, do Y" on a grid (short, long, review or a file): the 2x2 residual
    decomposition, additive substitution with causal KL, behavioural markers and host injection. ``options`` are
    ``ComposeConfig``'s (``layers``, ``all_layers``, ``markers``, ``host``, ``edit_layer``...). Tables: ``kl``."""
    from personalab.studies.compose import ComposeConfig, load_grid, load_markers, run_compose

    config = configured(ComposeConfig, options)
    chosen = load_grid(str(grid))
    marker_sets = load_markers(marker_file) if config.markers else None
    n_blocks = block_count(model)
    config.check(n_blocks)
    handle = as_model(model)
    return in_run_folder(
        out, report, ["kl"], lambda folder: run_compose(handle, chosen, folder, config, marker_sets, progress)
    )


def correlate(
    model: ModelHandle | str | Callable[[], ModelHandle],
    tuned: Sequence[str | Path],
    vector: PersonaVector | str | Path,
    judge: Judge | str,
    *,
    layer: int,
    trait: Trait | str | None = None,
    variant: str = DEFAULT_VARIANT,
    load: Callable[[Path], ModelHandle] | None = None,
    out: str | Path | None = None,
    report: bool = True,
    dry_run: bool = False,
    **options: Any,
) -> "StudyResult | Plan":
    """``personalab correlate``: projection shift against judged trait across fine-tunes of ``model``, with Pearson r
    over the n fine-tunes, its p and, from n = 10, a bootstrap interval (``correlation``); one model in memory at a
    time (``load(folder)`` loads a fine-tune, default ``trained_loader`` on the base). ``options`` are
    ``CorrelateConfig``'s and the sampling options. Tables: ``correlate``. ``dry_run`` loads the base model, returns
    the ``Plan`` of every model and does nothing else."""
    from personalab.api.weights import trained_loader
    from personalab.studies.correlate import CorrelateConfig, plan_correlate, run_correlate

    config = configured(CorrelateConfig, options, layer=layer)
    persona, direction = vector_of(vector, variant, model)
    chosen, scorer = as_trait(trait, persona), as_judge(judge)
    load_base = model if callable(model) and not isinstance(model, ModelHandle) else (lambda: as_model(model))
    if dry_run:
        return plan_correlate(load_base(), chosen, scorer, [str(f) for f in tuned], out, config)
    if load is None:
        base = load_base()
        loaders = [(str(f), trained_loader(base, f)) for f in tuned]
        load_base = lambda: base  # noqa: E731
    else:
        loaders = [(str(f), lambda f=f: load(Path(f))) for f in tuned]
    return in_run_folder(
        out,
        report,
        ["correlate"],
        lambda folder: run_correlate(load_base, loaders, direction, chosen, scorer, folder, config),
    )


def report(runs: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """``personalab report``: one self-contained HTML page of run folders (default ``RUN/report.html`` for one run,
    ``report.html`` for several); returns its path."""
    return report_runs(runs, out)[0]


def report_runs(runs: Sequence[str | Path], out: str | Path | None = None) -> tuple[Path, list]:
    """``report``'s page and what was read of each run folder (``personalab.report.folders.RunFolder``, with the
    problems found in it)."""
    from personalab.report import REPORT, write_report

    paths = [Path(r) for r in runs]
    target = Path(out) if out else (paths[0] / REPORT if len(paths) == 1 and paths[0].is_dir() else Path(REPORT))
    return target, write_report(paths, target)

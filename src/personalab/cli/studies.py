"""Commands that run the analysis studies: ``trace``, ``localize``, ``deepscan``, ``compose``, ``correlate``."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import (
    ALPHA_HELP,
    BATCH_HELP,
    COHERENCE_THRESHOLD_HELP,
    CONTROLS_HELP,
    JUDGE_TIMEOUT,
    LAYER_HELP,
    LAYERS_HELP,
    MAX_NEW_TOKENS_HELP,
    MIN_PAIRS_HELP,
    MODEL_HELP,
    NEG_THRESHOLD_HELP,
    POS_THRESHOLD_HELP,
    SEED_HELP,
    STUDIES,
    TEMPERATURE_HELP,
    TRAIT_HELP,
    TUNED_HELP,
    AggregationOption,
    DeviceOption,
    DryRunOption,
    DtypeOption,
    EvalSamplesOption,
    JudgeOption,
    JudgeTimeoutOption,
    ModelOption,
    RepetitionPenaltyOption,
    ReportOption,
    SamplesOption,
    ScaleOption,
    ThinkingOption,
    ThreadsOption,
    TokenizerOption,
    TopPOption,
    TraitDirOption,
    TraitOption,
    VariantOption,
    VectorOption,
    app,
    check_engine,
    checked,
    console,
    integers,
    open_model,
    open_trained,
    prepare,
    reported,
    say_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.errors import InvalidInputError

TraitsOption = Annotated[list[str], typer.Option(help=TRAIT_HELP)]


@app.command(rich_help_panel=STUDIES)
@grouped
def trace(
    engine: EngineOptions,
    judge: JudgeOption,
    out: Annotated[Path, typer.Option(help="Run folder (resumable; rerun to extend the series).")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    series: Annotated[
        str | None, typer.Option(help="Built-in series: olmo3 or apertus (revisions and tokens).")
    ] = None,
    revisions: Annotated[str | None, typer.Option(help="Comma-separated revisions of --model.")] = None,
    revisions_file: Annotated[Path | None, typer.Option(help="File with one revision per line.")] = None,
    checkpoints: Annotated[
        str | None, typer.Option(help="Local checkpoint folders: a quoted glob ('ckpt/step-*') or comma list.")
    ] = None,
    tokens_per_step: Annotated[float | None, typer.Option(help="Training tokens per step in the names.")] = None,
    trait: TraitsOption = [],  # noqa: B006
    trait_dir: TraitDirOption = None,
    strategy: Annotated[
        list[str],
        typer.Option(
            help="character, stories, dialogue, combined, or a trait file in continuation style (repeat; default: "
            "character for a built-in trait, the file itself for a trait file)."
        ),
    ] = [],  # noqa: B006
    layer: Annotated[int | None, typer.Option(help=LAYER_HELP)] = None,
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 0.5,
    scale: ScaleOption = "normalised",
    target: Annotated[
        str | None, typer.Option(help="Post-trained model to steer with every checkpoint's vector.")
    ] = None,
    target_alpha: Annotated[float | None, typer.Option(help="Alpha on the target (default --alpha).")] = None,
    controls: Annotated[bool, typer.Option(help=CONTROLS_HELP)] = False,
    samples: SamplesOption = 4,
    eval_samples: EvalSamplesOption = 3,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 64,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 0.5,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.1,
    min_pairs: Annotated[
        int,
        typer.Option(help=MIN_PAIRS_HELP),
    ] = 1,
    pos_threshold: Annotated[float, typer.Option(help=POS_THRESHOLD_HELP)] = 50.0,
    neg_threshold: Annotated[float, typer.Option(help=NEG_THRESHOLD_HELP)] = 50.0,
    coherence_threshold: Annotated[float, typer.Option(help=COHERENCE_THRESHOLD_HELP)] = 50.0,
    aggregation: AggregationOption = "mean_diff",
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    dry_run: DryRunOption = False,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Trace a trait through training checkpoints: extraction, geometry, emergence and transfer steering."""
    from personalab.api.common import judge as open_judge

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model)
        from personalab.api import trace as run
        from personalab.studies.trace.run import finite

        if sum(x is not None for x in (revisions, revisions_file, checkpoints)) > 1:
            raise InvalidInputError("give one of --revisions, --revisions-file and --checkpoints")
        scorer = open_judge(judge, judge_timeout)

        def load(checkpoint):
            return open_model(
                checkpoint.source, checkpoint.revision, dtype, device, tokenizer, thinking=thinking, engine=engine
            )

        def load_target():
            return open_model(target, None, dtype, device, None, thinking=thinking, engine=engine)

        run(
            model, scorer, out=out, series=series, revisions=revisions_file or revisions, checkpoints=checkpoints,
            tokens_per_step=tokens_per_step, traits=trait, strategies=strategy, trait_dir=trait_dir, target=target,
            load=load,
            load_target=load_target if target else None, tokenizer=tokenizer, report=report, layer=layer,
            alpha=finite(alpha, "--alpha"), target_alpha=target_alpha, scale=scale, controls=controls,
            eval_samples=eval_samples,
            samples=samples, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, min_pairs=min_pairs,
            pos_threshold=pos_threshold,
            neg_threshold=neg_threshold, coherence_threshold=coherence_threshold, aggregation=aggregation,
            batch_size=batch_size, dry_run=dry_run,
        )  # fmt: skip
    if not dry_run:
        say_report(out, report)


PersonaOption = Annotated[
    list[str],
    typer.Option(
        help="Persona (repeat; default: every persona of --statements, --persona-dir or the built-in set: "
        "subscribes-to-utilitarianism, subscribes-to-deontology, politically-liberal, politically-conservative)."
    ),
]
PersonaDirOption = Annotated[
    Path | None, typer.Option(help="Folder of Anthropic persona JSONL files (evals/persona), one per persona.")
]
StatementsOption = Annotated[
    Path | None,
    typer.Option(help="One statements file: the IBM CSV (statement, direction, persona_dim) or a persona JSONL."),
]
ActivationsOption = Annotated[
    Path | None, typer.Option(help="Activation cache folder (default OUT/activations); share it between commands.")
]


@app.command(rich_help_panel=STUDIES)
def localize(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    persona: PersonaOption = [],  # noqa: B006
    persona_dir: PersonaDirOption = None,
    statements: StatementsOption = None,
    min_confidence: Annotated[float | None, typer.Option(help="Keep statements with label_confidence >= this.")] = None,
    layers: Annotated[
        str | None,
        typer.Option(help=LAYERS_HELP),
    ] = None,
    figure_layers: Annotated[
        str | None, typer.Option(help="Layers of the PCA, t-SNE and UMAP figures (default 4 across the depth).")
    ] = None,
    activations: ActivationsOption = None,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Where personas live: per-layer divergence of persona statements, and PCA, t-SNE and UMAP figures."""
    with reported(out):
        prepare(threads, device, model)
        from personalab.api import localize as run
        from personalab.api.studies import statements as load_statements
        from personalab.engine.layers import check_layers
        from personalab.engine.loading import model_shape
        from personalab.studies.localize.run import check_statements

        chosen_layers = integers(layers, "--layers") if layers else None
        chosen_figures = integers(figure_layers, "--figure-layers") if figure_layers else None
        check_statements(load_statements(persona, persona_dir, statements, min_confidence))
        n_blocks, _ = model_shape(model, revision)
        for given in (chosen_layers, chosen_figures):
            if given is not None:
                check_layers(given, n_blocks)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
        run(
            handle, persona, persona_dir=persona_dir, statements_file=statements, min_confidence=min_confidence,
            activations=activations, out=out, report=report, layers=chosen_layers, figure_layers=chosen_figures,
            seed=seed, batch_size=batch_size,
        )  # fmt: skip
    say_report(out, report)


@app.command(rich_help_panel=STUDIES)
def deepscan(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    layer: Annotated[int, typer.Option(help=LAYER_HELP)],
    out: Annotated[Path, typer.Option(help="Run folder (scans.sqlite resumes a killed scan).")],
    persona: PersonaOption = [],  # noqa: B006
    persona_dir: PersonaDirOption = None,
    statements: StatementsOption = None,
    min_confidence: Annotated[float | None, typer.Option(help="Keep statements with label_confidence >= this.")] = None,
    runs: Annotated[int, typer.Option(help="Group runs per persona.")] = 100,
    clean: Annotated[int | None, typer.Option(help="Clean records per run (default: 50, or fewer to fit).")] = None,
    anomalous: Annotated[
        int | None, typer.Option(help="Anomalous (positive) records per run (default: 50, or fewer to fit).")
    ] = None,
    background: Annotated[
        int | None, typer.Option(help="Negative statements used as background (default: 250, or fewer to fit).")
    ] = None,
    test_clean: Annotated[
        int | None, typer.Option(help="Negatives held out as the clean test pool (default: 50, or fewer to fit).")
    ] = None,
    score: Annotated[str, typer.Option(help="hc (Higher Criticism), bj (Berk-Jones) or ks.")] = "hc",
    tail: Annotated[str, typer.Option(help="lower (the reference's '1tail'), upper or two.")] = "lower",
    restarts: Annotated[int, typer.Option(help="Ascent restarts per run (the reference notebook uses 1).")] = 1,
    min_run_fraction: Annotated[
        float, typer.Option(help="Node sets: nodes in at least this fraction of runs (0 = union, as the paper).")
    ] = 0.0,
    individual: Annotated[bool, typer.Option(help="Also scan each test record alone (individual.csv).")] = False,
    activations: ActivationsOption = None,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """DeepScan: the hidden units and statements jointly anomalous for each persona, and their overlap."""
    with reported(out):
        prepare(threads, device, model)
        from personalab.api import deepscan as run
        from personalab.api.studies import statements as load_statements
        from personalab.engine.loading import model_shape
        from personalab.studies.localize import scan as scanning

        options = dict(
            background=background, test_clean=test_clean, clean=clean, anomalous=anomalous, runs=runs, score=score,
            tail=tail, restarts=restarts, seed=seed, min_run_fraction=min_run_fraction, batch_size=batch_size,
        )  # fmt: skip
        n_blocks, _ = model_shape(model, revision)
        chosen = load_statements(persona, persona_dir, statements, min_confidence)
        scanning.check(chosen, scanning.sized(chosen, scanning.ScanConfig(layer=layer, **options))[0], n_blocks)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
        result = run(
            handle, persona, layer=layer, persona_dir=persona_dir, statements_file=statements,
            min_confidence=min_confidence, individual=individual, activations=activations, out=out, report=report,
            **options,
        )  # fmt: skip
    columns = ["persona", "runs", "score_mean", "precision_mean", "recall_mean", "records_mean", "nodes_mean"]
    console.print(result.table[columns].to_string(index=False, float_format="%.3g"), markup=False, soft_wrap=True)
    say_report(out, report)


@app.command(rich_help_panel=STUDIES)
def compose(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Run folder (compose.sqlite resumes a killed run).")],
    grid: Annotated[str, typer.Option(help="short, long, review, or a JSON/YAML grid file.")] = "short",
    layers: Annotated[
        str | None,
        typer.Option(help=LAYERS_HELP),
    ] = None,
    all_layers: Annotated[bool, typer.Option(help="Causal KL at every layer.")] = False,
    markers: Annotated[bool, typer.Option(help="Behavioural markers: 80 greedy tokens, 4 conditions.")] = False,
    host: Annotated[bool, typer.Option(help="Host injection: BY prompt against the clean XY target.")] = False,
    marker_file: Annotated[Path | None, typer.Option(help="Markers by persona key (default: the paper's).")] = None,
    edit_layer: Annotated[
        int | None, typer.Option(help="Layer of the marker and host edits (default 14 of 26, scaled to the depth).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 8,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """As X, do Y: 2x2 residual decomposition, additive substitution with causal KL, markers, host injection."""
    with reported(out):
        prepare(threads, device, model)
        from personalab.api import compose as run
        from personalab.engine.loading import model_shape
        from personalab.studies.compose import ComposeConfig, load_grid

        options = dict(
            layers=integers(layers, "--layers") if layers else None, all_layers=all_layers, markers=markers,
            host=host, edit_layer=edit_layer, batch_size=batch_size, seed=seed,
        )  # fmt: skip
        load_grid(grid)
        n_blocks, _ = model_shape(model, revision)
        ComposeConfig(**options).check(n_blocks)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
        run(handle, grid, marker_file=marker_file, out=out, report=report, **options)
    console.print((out / "summary.md").read_text(), markup=False)
    say_report(out, report)


@app.command(rich_help_panel=STUDIES)
@grouped
def correlate(
    engine: EngineOptions,
    model: ModelOption,
    tuned: Annotated[list[Path], typer.Option(help=TUNED_HELP)],
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help=LAYER_HELP)],
    judge: JudgeOption,
    out: Annotated[Path, typer.Option(help="Folder for correlate.csv, correlate.md, correlate.png.")],
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    eval_samples: EvalSamplesOption = 5,
    variant: VariantOption = "response_mean",
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 256,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    dry_run: DryRunOption = False,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Projection shift against judged trait across fine-tuned models: Pearson r over the n fine-tunes, its p, and a
    bootstrap interval from n = 10."""
    from personalab.api.common import as_trait
    from personalab.api.common import judge as open_judge
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model)
        from personalab.api import correlate as run
        from personalab.studies.correlate import CorrelateConfig

        options = checked(
            CorrelateConfig,
            dict(
                eval_samples=eval_samples,
                temperature=temperature,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                max_new_tokens=max_new_tokens,
                seed=seed,
            ),
            layer=layer,
        )
        persona = as_vector(vector)
        chosen = as_trait(trait, vector, trait_dir)
        scorer = open_judge(judge, judge_timeout)

        def load_base():
            return open_model(model, None, dtype, device, tokenizer, thinking, engine)

        def load(folder):
            return open_trained(model, folder, dtype, device, tokenizer, thinking, engine)

        if dry_run:
            plan = run(load_base, tuned, persona, scorer, layer=layer, trait=chosen, variant=variant, out=out,
                       dry_run=True, **options)  # fmt: skip
            console.print(plan.describe(f"{1 + len(tuned)} models"), markup=False)
            return
        run(
            load_base, tuned, persona, scorer, layer=layer, trait=chosen, variant=variant, load=load, out=out,
            report=report, **options,
        )  # fmt: skip
    console.print((out / "correlate.md").read_text(), markup=False)
    say_report(out, report)

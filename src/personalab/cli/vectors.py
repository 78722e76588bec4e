"""Commands that make and read persona vectors: ``extract``, ``project``, ``features``, ``export`` and ``vectors``
(``cosine``)."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import (
    BATCH_HELP,
    COHERENCE_THRESHOLD_HELP,
    JUDGE_HELP,
    JUDGE_TIMEOUT,
    LAYER_HELP,
    MAX_NEW_TOKENS_HELP,
    MIN_PAIRS_HELP,
    MODEL_HELP,
    NEG_THRESHOLD_HELP,
    POS_THRESHOLD_HELP,
    POSITIONS_HELP,
    PROMPTS_HELP,
    SEED_HELP,
    TEMPERATURE_HELP,
    TRAIT_HELP,
    TUNED_HELP,
    VECTOR_HELP,
    VECTORS,
    AggregationOption,
    DeviceOption,
    DryRunOption,
    DtypeOption,
    JudgeTimeoutOption,
    ModelOption,
    RepetitionPenaltyOption,
    ReportOption,
    RevisionOption,
    SamplesOption,
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
    open_model,
    open_trained,
    prepare,
    reported,
    say_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.errors import InvalidInputError


@app.command(rich_help_panel=VECTORS)
@grouped
def extract(
    engine: EngineOptions,
    model: ModelOption,
    trait: Annotated[str | None, typer.Option(help=TRAIT_HELP)] = None,
    judge: Annotated[str | None, typer.Option(help=JUDGE_HELP)] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            help='JSONL of your own contrastive texts, {"positive": ..., "negative": ...} per line (optional '
            '"prompt" and "system"): the vector from them, with nothing generated or judged (--trait optional).'
        ),
    ] = None,
    trait_dir: TraitDirOption = None,
    samples: SamplesOption = 10,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/TRAIT-MODEL).")] = None,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    top_p: TopPOption = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 256,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    min_pairs: Annotated[
        int,
        typer.Option(help=MIN_PAIRS_HELP),
    ] = 10,
    pos_threshold: Annotated[float | None, typer.Option(help=POS_THRESHOLD_HELP, show_default="50")] = None,
    neg_threshold: Annotated[float | None, typer.Option(help=NEG_THRESHOLD_HELP, show_default="50")] = None,
    trait_threshold: Annotated[
        float | None,
        typer.Option(
            help="The persona-vectors reference's --threshold T: keep a pair when its positive answer's trait >= T "
            "and its negative answer's < 100 - T (sets --pos-threshold and --neg-threshold)."
        ),
    ] = None,
    coherence_threshold: Annotated[float, typer.Option(help=COHERENCE_THRESHOLD_HELP)] = 50.0,
    aggregation: AggregationOption = "mean_diff",
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    dry_run: DryRunOption = False,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Extract a persona vector: generate, judge, filter, and take per-layer mean differences. Answers are at most
    --max-new-tokens (256) tokens; the persona-vectors reference generates up to 1000."""
    from personalab.api.common import judge as open_judge

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import extract as run
        from personalab.api.common import default_out
        from personalab.methods.extraction import ExtractionConfig, with_reference_thresholds

        cutoffs = {
            k: v for k, v in dict(pos_threshold=pos_threshold, neg_threshold=neg_threshold).items() if v is not None
        }
        options = dict(
            samples=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            repetition_penalty=repetition_penalty, seed=seed, batch_size=batch_size, min_pairs=min_pairs,
            coherence_threshold=coherence_threshold, aggregation=aggregation, **cutoffs,
        )  # fmt: skip
        checked(ExtractionConfig, with_reference_thresholds(options, trait_threshold))
        if pairs is not None:
            _extract_pairs(model, trait, judge, pairs, trait_dir, options, trait_threshold, dry_run, out, report,
                           engine, revision, dtype, device, tokenizer, thinking)  # fmt: skip
            return
        if trait is None or judge is None:
            raise InvalidInputError("give --trait and --judge, or --pairs FILE.jsonl of your own contrastive texts")
        from personalab.traits import load_trait

        chosen = load_trait(trait, trait_dir)
        scorer = open_judge(judge, judge_timeout)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        folder = out or default_out("", chosen.name, model)
        if dry_run:
            plan = run(handle, chosen, scorer, out=folder, dry_run=True, trait_threshold=trait_threshold, **options)
            console.print(plan.describe(), markup=False)
            return
        try:
            vector = run(handle, chosen, scorer, out=folder, report=report, trait_threshold=trait_threshold, **options)
        finally:
            say_report(folder, report)
    counts = vector.meta["counts"]
    console.print(f"kept {counts['kept']} of {counts['pairs']} pairs; wrote {folder}/vectors.safetensors, summary.md")


def _extract_pairs(model, trait, judge, pairs, trait_dir, options, trait_threshold, dry_run, out, report, engine,
                   revision, dtype, device, tokenizer, thinking) -> None:  # fmt: skip
    """``extract --pairs``: the options a judged extraction alone has refused before the model loads."""
    from personalab.api import extract as run
    from personalab.api.common import default_out, option_defaults
    from personalab.methods.extraction import ExtractionConfig, check_pair_options, load_contrast_pairs
    from personalab.traits import load_trait

    defaults = option_defaults(ExtractionConfig)
    applies = ("batch_size", "aggregation")
    changed = {name: value for name, value in options.items() if name not in applies and value != defaults[name]}
    check_pair_options({"judge": judge, "trait_threshold": trait_threshold, "dry_run": dry_run, "engine":
                        engine.engine != "hf" or None, **changed})  # fmt: skip
    load_contrast_pairs(pairs)
    chosen = load_trait(trait, trait_dir) if trait is not None else None
    handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
    folder = out or default_out("", chosen.name if chosen is not None else pairs.stem, model)
    try:
        vector = run(handle, chosen, pairs=pairs, out=folder, report=report, batch_size=options["batch_size"],
                     aggregation=options["aggregation"])  # fmt: skip
    finally:
        say_report(folder, report)
    console.print(f"{vector.meta['counts']['pairs']} pairs; wrote {folder}/vectors.safetensors, summary.md")


@app.command(rich_help_panel=VECTORS)
@grouped
def project(
    engine: EngineOptions,
    vector: VectorOption,
    data: Annotated[Path | None, typer.Argument(help="JSONL records (messages or prompt/response).")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    variant: VariantOption = "response_mean",
    layer: Annotated[int | None, typer.Option(help=LAYER_HELP)] = None,
    shift: Annotated[bool, typer.Option(help="Projection difference vs the model's own answers.")] = False,
    top_k: Annotated[int | None, typer.Option(help="With --shift: also write the K most shifting records.")] = None,
    tuned: Annotated[Path | None, typer.Option(help=TUNED_HELP)] = None,
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default: files beside DATA; with --tuned runs/project-NAME-TUNED)."),
    ] = None,
    report: ReportOption = True,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Project records, their shift against the model's own answers, or a fine-tune's change (--tuned) onto a
    persona vector."""
    from personalab.api.common import as_trait
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import project as run
        from personalab.api.common import default_out

        if model is None:
            raise InvalidInputError("pass --model (the base model, with --tuned)")
        if tuned is None and (data is None or layer is None):
            raise InvalidInputError("pass a JSONL data file and --layer (or --tuned TUNED)")
        if top_k is not None and not shift:
            raise InvalidInputError("--top-k selects by projection shift; add --shift")
        persona = as_vector(vector)
        chosen = None
        if tuned is not None and data is None:
            chosen = as_trait(trait, vector, trait_dir, also="a JSONL data file of prompts")
        if tuned is not None:
            out = out or default_out("project-", chosen.name if chosen else data.stem, str(tuned))
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        changed = open_trained(model, tuned, dtype, device, tokenizer, thinking) if tuned is not None else None
        run(
            handle, persona, data, layer=layer, variant=variant, shift=shift, top_k=top_k, tuned=changed,
            trait=chosen, out=out, report=report, batch_size=batch_size,
        )  # fmt: skip
    if out is not None:
        console.print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file())))
        say_report(out, report)
        return
    stem = data.with_name(data.stem)
    written = [f"{stem}.shift.jsonl", f"{stem}.shift.png"] + ([f"{stem}.top{top_k}.jsonl"] if top_k else [])
    console.print("wrote " + ", ".join(written if shift else [f"{stem}.projections.jsonl"]))


@app.command(rich_help_panel=VECTORS)
def features(
    sae: Annotated[
        str, typer.Option(help="SAELens folder (cfg.json, sae_weights.safetensors) or sae-lens:RELEASE/ID.")
    ],
    out: Annotated[Path, typer.Option(help="Run folder for features.csv, features.md and features.png.")],
    vector: Annotated[Path | None, typer.Option(help=VECTOR_HELP)] = None,
    diff: Annotated[
        tuple[str, str] | None,
        typer.Option(help="BASE TUNED: the features a fine-tune moved (TUNED as in --tuned).", metavar="BASE TUNED"),
    ] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    layer: Annotated[int | None, typer.Option(help=LAYER_HELP)] = None,
    per_sign: Annotated[
        int, typer.Option(help="Features shown of each sign (by cosine; with --diff, by change).")
    ] = 10,
    labels: Annotated[Path | None, typer.Option(help="JSON of feature index -> description (Neuronpedia).")] = None,
    prompts: Annotated[Path | None, typer.Option(help=PROMPTS_HELP)] = None,
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    variant: VariantOption = "response_mean",
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP)] = "response",
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 128,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
    report: ReportOption = True,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """A persona vector in an SAE's features: top features by cosine with their least-squares weights, and each
    one's activation difference between the extraction's positive and negative answers (with --model, by default
    the vector run's own model). With --diff BASE TUNED: the features whose mean activation the fine-tune changed
    most on the same texts (--prompts records with their responses or the base model's greedy answers, else the
    trait's evaluation questions), each with its cosine to --vector."""
    with reported(out):
        prepare(threads, device, model)
        from personalab.sae import as_sae

        chosen = as_sae(sae, layer)
        if diff is not None:
            if model is not None:
                raise InvalidInputError("--diff names the base model; leave out --model")
            _feature_diff(diff, chosen, out, vector, prompts, trait, trait_dir, variant, positions, per_sign, labels,
                          max_new_tokens, batch_size, report, dtype, device)  # fmt: skip
        else:
            given = [name for name, value in (("--prompts", prompts), ("--trait", trait), ("--trait-dir", trait_dir))
                     if value is not None] + (["--positions"] if positions != "response" else [])  # fmt: skip
            if given:
                raise InvalidInputError(f"{', '.join(given)}: only with --diff BASE TUNED (the texts both models read)")
            _features(chosen, out, vector, model, per_sign, labels, report, dtype, device)
    console.print((out / "features.md").read_text(), markup=False)
    console.print(f"wrote {out}/features.csv, features.md, features.png")
    say_report(out, report)


def _features(sae, out, vector, model, per_sign, labels, report, dtype, device) -> None:
    from personalab.api import features as run
    from personalab.persona import as_vector
    from personalab.runfolder import read_meta

    if vector is None:
        raise InvalidInputError("pass --vector (the persona vector to decompose), or --diff BASE TUNED")
    persona = as_vector(vector)
    name = model or (read_meta(vector).get("model") if vector.is_dir() else None)
    handle = open_model(name, None, dtype, device, None) if name else None
    run(persona, sae, model=handle, top_k=per_sign, labels=labels, out=out, report=report)


def _feature_diff(diff, sae, out, vector, prompts, trait, trait_dir, variant, positions, per_sign, labels,
                  max_new_tokens, batch_size, report, dtype, device) -> None:  # fmt: skip
    from personalab.api import feature_diff
    from personalab.api.common import as_trait
    from personalab.persona import as_vector

    base, tuned = diff
    persona = as_vector(vector) if vector is not None else None
    chosen = None if prompts is not None else as_trait(trait, vector, trait_dir, also="--prompts FILE")
    handle = open_model(base, None, dtype, device, None)
    changed = open_trained(base, Path(tuned), dtype, device, None, False)
    feature_diff(
        handle, changed, sae, prompts=prompts, trait=chosen, vector=persona, variant=variant, positions=positions,
        top_k=per_sign, labels=labels, max_new_tokens=max_new_tokens, out=out, report=report, batch_size=batch_size,
    )  # fmt: skip


@app.command(rich_help_panel=VECTORS)
def export(
    vector: Annotated[Path, typer.Argument(help="Run folder or .safetensors file of persona vectors.")],
    out: Annotated[Path, typer.Option(help="Folder for the .pt files.")] = Path("."),
) -> None:
    """Write a vector's variants as public persona-vectors .pt files ({trait}_response_avg_diff.pt, ...)."""
    from personalab.persona import as_vector

    with reported(out):
        written = as_vector(vector).export_public(out)
    console.print("wrote " + ", ".join(str(p) for p in written))


vectors_app = typer.Typer(help="Compare persona vectors.", no_args_is_help=True)
app.add_typer(vectors_app, name="vectors", rich_help_panel=VECTORS)


@vectors_app.command("cosine")
def cosine_command(
    a: Annotated[Path, typer.Argument(help="A run folder or vector file.")],
    b: Annotated[Path, typer.Argument(help="Another, of the same model's shape.")],
    variant: VariantOption = "response_mean",
    out: Annotated[
        Path | None, typer.Option(help="Folder for cosine.csv and cosine.png (default: print only).")
    ] = None,
) -> None:
    """Cosine similarity of two persona vectors at every layer."""
    from personalab.persona import as_vector

    with reported(out):
        from personalab.api import cosine
        from personalab.figures.tables import markdown_table

        table = cosine(as_vector(a), as_vector(b), variant=variant, out=out)
    console.print(markdown_table(table, {"cosine": "+.3f", "norm_a": ".4g", "norm_b": ".4g"}), markup=False)
    if out is not None:
        console.print(f"wrote {out}/cosine.csv, cosine.png", markup=False)

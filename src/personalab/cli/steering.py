"""Commands that steer generation: ``steer`` and ``sweep``."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from personalab.cli.common import (
    ALPHA_HELP,
    BATCH_HELP,
    CONTROLS_HELP,
    JUDGE_TIMEOUT,
    LAYER_HELP,
    LAYERS_HELP,
    MAX_NEW_TOKENS_HELP,
    POSITIONS_HELP,
    SEED_HELP,
    STEERING,
    TEMPERATURE_HELP,
    DeviceOption,
    DryRunOption,
    DtypeOption,
    EvalSamplesOption,
    FormatOption,
    JudgeOption,
    JudgeTimeoutOption,
    ModelOption,
    RepetitionPenaltyOption,
    ReportOption,
    RevisionOption,
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
    floats,
    integers,
    open_model,
    prepare,
    reported,
    say_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.engine.formats import check_format
from personalab.errors import InvalidInputError


def _read_line() -> str:
    """One line typed at the prompt; end of input counts as an empty line."""
    try:
        return console.input("[bold]> [/bold]")
    except EOFError:
        return ""


@app.command("steer", rich_help_panel=STEERING)
@grouped
def steer_command(
    engine: EngineOptions,
    prompt: Annotated[str | None, typer.Argument(help="The user message (omit with --chat).")] = None,
    model: ModelOption = ...,
    vector: VectorOption = ...,
    layer: Annotated[int, typer.Option(help=LAYER_HELP)] = ...,
    alpha: Annotated[float | None, typer.Option(help=ALPHA_HELP)] = None,
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP)] = "generating",
    variant: VariantOption = "response_mean",
    scale: ScaleOption = "normalised",
    ablate: Annotated[bool, typer.Option(help="Project the direction out instead of adding it.")] = False,
    clamp: Annotated[float | None, typer.Option(help="Set the projection onto the direction to this value.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    prompt_format: FormatOption = None,
    chat: Annotated[bool, typer.Option(help="Interactive loop: one prompt per line, empty line to stop.")] = False,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 128,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 0.0,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Print the steered answer beside the unsteered one."""
    with reported():
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import steer_answers
        from personalab.engine.loading import model_shape
        from personalab.persona import as_vector
        from personalab.studies.steer import SteerConfig

        if prompt is None and not chat:
            raise InvalidInputError("give a PROMPT or --chat")
        if engine.vllm_graphs and (ablate or clamp is not None):
            raise InvalidInputError("--vllm-graphs adds steering vectors only; drop it to ablate or clamp")
        if prompt_format is not None:
            check_format(prompt_format)
        options = checked(
            SteerConfig, dict(
                alpha=alpha, positions=positions, scale=scale, ablate=ablate, clamp=clamp, system=system,
                prompt_format=prompt_format, temperature=temperature, top_p=top_p,
                repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed,
            ), layer=layer,
        )  # fmt: skip
        persona = as_vector(vector)
        persona.tensor(variant, model_shape(model, revision)[0] + 1)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        prompts = [prompt] if not chat else iter(_read_line, "")
        for answer in steer_answers(handle, persona, prompts, layer=layer, variant=variant, **options):
            table = Table(show_lines=True)
            table.add_column("unsteered", ratio=1)
            table.add_column(f"steered at layer {layer}, {positions} positions, {answer.label}", ratio=1)
            table.add_row(escape(answer.unsteered), escape(answer.steered))
            console.print(table)


@app.command(rich_help_panel=STEERING)
@grouped
def sweep(
    engine: EngineOptions,
    model: ModelOption,
    vector: VectorOption,
    judge: JudgeOption,
    layers: Annotated[
        str,
        typer.Option(help=LAYERS_HELP),
    ],
    alphas: Annotated[
        str | None,
        typer.Option(help="Comma-separated alphas; include 0 for the paired tests. Default: 0,0.1,0.2,0.3,0.5,0.75,1."),
    ] = None,
    eval_samples: EvalSamplesOption = 10,
    variant: VariantOption = "response_mean",
    scale: ScaleOption = "normalised",
    positions: Annotated[str, typer.Option(help=POSITIONS_HELP)] = "generating",
    controls: Annotated[bool, typer.Option(help=CONTROLS_HELP)] = False,
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/sweep-TRAIT-MODEL).")] = None,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    top_p: TopPOption = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 256,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    batch_size: Annotated[int, typer.Option(help=BATCH_HELP)] = 16,
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
    """Sweep layers x coefficients; judge trait and coherence; write tables and plots."""
    from personalab.api.common import as_trait
    from personalab.api.common import judge as open_judge
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import sweep as run
        from personalab.api.common import default_out
        from personalab.studies.sweep import SweepConfig

        chosen_layers = integers(layers, "--layers")
        options = checked(
            SweepConfig, dict(
                eval_samples=eval_samples, scale=scale, positions=positions, controls=controls, temperature=temperature,
                top_p=top_p,
                repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
            ) | ({"alphas": floats(alphas)} if alphas else {}), layers=chosen_layers,
        )  # fmt: skip
        chosen = as_trait(trait, vector, trait_dir)
        persona = as_vector(vector)
        scorer = open_judge(judge, judge_timeout)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        folder = out or default_out("sweep-", chosen.name, model)
        if dry_run:
            plan = run(handle, persona, scorer, layers=chosen_layers, trait=chosen, variant=variant, out=folder,
                       dry_run=True, **options)  # fmt: skip
            console.print(plan.describe(), markup=False)
            return
        run(handle, persona, scorer, layers=chosen_layers, trait=chosen, variant=variant, out=folder, report=report,
            **options)  # fmt: skip
    console.print((folder / "sweep.md").read_text(), markup=False)
    extra = ", controls.csv" if controls else ""
    console.print(f"wrote {folder}/sweep.csv{extra}, sweep.md, heatmap_trait.png, heatmap_coherence.png, curves.png")
    say_report(folder, report)

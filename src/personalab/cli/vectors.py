"""Commands that make and read persona vectors: ``extract`` and ``project``."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import (
    JUDGE_TIMEOUT,
    VECTORS,
    DeviceOption,
    DtypeOption,
    JudgeOption,
    JudgeTimeoutOption,
    ModelOption,
    ReportOption,
    RevisionOption,
    ThinkingOption,
    ThreadsOption,
    TokenizerOption,
    TraitDirOption,
    VariantOption,
    app,
    check_engine,
    console,
    load_direction,
    open_judge,
    open_model,
    pick_trait,
    prepare,
    reported,
    write_run_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.errors import InvalidInputError


@app.command(rich_help_panel=VECTORS)
@grouped
def extract(
    engine: EngineOptions,
    model: ModelOption,
    trait: Annotated[str, typer.Option(help="Built-in trait, trait JSON file, or name in --trait-dir.")],
    judge: JudgeOption,
    trait_dir: TraitDirOption = None,
    samples: Annotated[int, typer.Option(help="Answers per question and instruction pair.")] = 10,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/TRAIT-MODEL).")] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    min_pairs: Annotated[int, typer.Option(help="Fewest kept pairs to build a vector from.")] = 10,
    pos_threshold: Annotated[float, typer.Option(help="Keep a pair when its positive answer's trait >= this.")] = 50.0,
    neg_threshold: Annotated[float, typer.Option(help="... and its negative answer's trait < this.")] = 50.0,
    trait_threshold: Annotated[
        float | None, typer.Option(help="One cut-off for both sides (sets --pos-threshold and --neg-threshold).")
    ] = None,
    coherence_threshold: Annotated[float, typer.Option(help="... and both answers' coherence >= this.")] = 50.0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Extract a persona vector: generate, judge, filter, and take per-layer mean differences."""
    with reported():
        prepare(threads)
        check_engine(engine)
        from personalab.engine.generation import SamplingParams
        from personalab.studies.extraction import ExtractionConfig, FilterError, run_extraction
        from personalab.traits import load_trait

        config = ExtractionConfig(
            samples=samples,
            sampling=SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                repetition_penalty=repetition_penalty,
                seed=seed,
            ),
            pos_threshold=pos_threshold if trait_threshold is None else trait_threshold,
            neg_threshold=neg_threshold if trait_threshold is None else trait_threshold,
            coherence_threshold=coherence_threshold,
            min_pairs=min_pairs,
            batch_size=batch_size,
        )
        chosen = load_trait(trait, trait_dir)
        scorer = open_judge(judge, judge_timeout)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        folder = out or Path("runs") / f"{chosen.name}-{Path(model.rstrip('/')).name}"
        try:
            result = run_extraction(handle, chosen, scorer, folder, config)
        except FilterError:
            write_run_report(folder, report)
            raise
    counts = result.meta["counts"]
    console.print(f"kept {counts['kept']} of {counts['pairs']} pairs; wrote {folder}/vectors.safetensors, summary.md")
    write_run_report(folder, report)


@app.command(rich_help_panel=VECTORS)
@grouped
def project(
    engine: EngineOptions,
    vector: Annotated[Path, typer.Option(help="Run folder, .safetensors or .pt file of persona vectors.")],
    data: Annotated[Path | None, typer.Argument(help="JSONL records (messages or prompt/response).")] = None,
    model: Annotated[str | None, typer.Option(help="Hub name or local folder of the model.")] = None,
    variant: VariantOption = "response_mean",
    layer: Annotated[int | None, typer.Option(help="Layer (0 = embeddings, l = output of block l-1).")] = None,
    shift: Annotated[bool, typer.Option(help="Projection difference vs the model's own answers.")] = False,
    top_k: Annotated[int | None, typer.Option(help="With --shift: also write the K most shifting records.")] = None,
    diff: Annotated[tuple[str, str] | None, typer.Option(help="BASE TUNED: per-layer shift of a fine-tune.")] = None,
    trait: Annotated[
        str | None,
        typer.Option(help="With --diff: prompts from this trait's evaluation questions (default: the run's trait)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="With --diff: writes OUT.png and OUT.csv.")] = Path("model-shift"),
    batch_size: int = 16,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Project records (or a fine-tune's change) onto a persona vector."""
    with reported():
        prepare(threads)
        check_engine(engine)
        from contextlib import closing

        from personalab.records import load_records
        from personalab.report.plots import plot_model_shift
        from personalab.store import Store
        from personalab.studies.monitor import (
            model_shift,
            project_records,
            projection_shift,
            write_projections,
            write_shift_report,
        )

        direction, _ = load_direction(vector, variant)
        if diff:
            if data is not None:
                pairs = [(r.system, r.prompt) for r in load_records(data)]
            else:
                chosen = pick_trait(trait, None, vector, also="a JSONL data file of prompts")
                pairs = [(None, q) for q in chosen.evaluation_questions]
            base, tuned = (open_model(name, None, dtype, device, tokenizer, thinking=thinking) for name in diff)
            values = model_shift(base, tuned, pairs, direction, batch_size, progress=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            written = [Path(f"{out}.png"), Path(f"{out}.csv")]
            plot_model_shift(values, f"{diff[1]} - {diff[0]} along {variant}", written[0])
            rows = "".join(f"{i},{v}\n" for i, v in enumerate(values.tolist()))
            written[1].write_text("layer,shift\n" + rows)
        else:
            if data is None or model is None or layer is None:
                raise InvalidInputError("pass a JSONL data file, --model and --layer (or --diff BASE TUNED)")
            if top_k is not None and not shift:
                raise InvalidInputError("--top-k selects by projection shift; add --shift")
            records = load_records(data)
            handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
            if shift:
                with closing(Store(data.with_name(f"{data.stem}.own.sqlite"))) as store:
                    shifts = projection_shift(
                        handle, records, direction, layer, store, batch_size=batch_size, progress=True
                    )
                written = write_shift_report(data, records, shifts, top_k)
            else:
                projections = project_records(handle, records, direction, layer, batch_size, progress=True)
                written = [write_projections(data, records, projections)]
    console.print("wrote " + ", ".join(str(p) for p in written))

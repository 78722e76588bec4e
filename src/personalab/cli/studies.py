"""Commands that run the analysis studies: ``trace``."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import (
    STUDIES,
    DeviceOption,
    DtypeOption,
    JudgeOption,
    ThreadsOption,
    TokenizerOption,
    app,
    open_judge,
    open_model,
    prepare,
    reported,
)
from personalab.errors import InvalidInputError


@app.command(rich_help_panel=STUDIES)
def trace(
    judge: JudgeOption,
    out: Annotated[Path, typer.Option(help="Run folder (resumable; rerun to extend the series).")],
    model: Annotated[str | None, typer.Option(help="Hub name of the model whose revisions are traced.")] = None,
    series: Annotated[
        str | None, typer.Option(help="Built-in series: olmo3 or apertus (revisions and tokens).")
    ] = None,
    revisions: Annotated[str | None, typer.Option(help="Comma-separated revisions of --model.")] = None,
    revisions_file: Annotated[Path | None, typer.Option(help="File with one revision per line.")] = None,
    checkpoints: Annotated[
        str | None, typer.Option(help="Local checkpoint folders: a quoted glob ('ckpt/step-*') or comma list.")
    ] = None,
    tokens_per_step: Annotated[float | None, typer.Option(help="Training tokens per step in the names.")] = None,
    trait: Annotated[list[str], typer.Option(help="Trait (repeat for several).")] = ["evil"],  # noqa: B006
    strategy: Annotated[
        list[str],
        typer.Option(help="character, stories, dialogue, combined, or a trait file in continuation style (repeat)."),
    ] = ["character"],  # noqa: B006
    layer: Annotated[int | None, typer.Option(help="Layer for steering and geometry (default n_blocks // 2).")] = None,
    coef: Annotated[float, typer.Option(help="Steering coefficient: a fraction of the mean residual norm.")] = 0.5,
    target: Annotated[
        str | None, typer.Option(help="Post-trained model to steer with every checkpoint's vector.")
    ] = None,
    target_coef: Annotated[float | None, typer.Option(help="Coefficient on the target (default --coef).")] = None,
    controls: Annotated[bool, typer.Option(help="Also steer with random and label-shuffled directions.")] = False,
    samples: Annotated[int, typer.Option(help="Extraction answers per question and instruction pair.")] = 4,
    eval_samples: Annotated[int, typer.Option(help="Steered answers per evaluation question.")] = 3,
    max_new_tokens: int = 64,
    temperature: float = 0.5,
    repetition_penalty: float = 1.1,
    min_pairs: Annotated[int, typer.Option(help="Fewest kept pairs for a checkpoint to count as extractable.")] = 1,
    pos_threshold: float = 50.0,
    neg_threshold: float = 50.0,
    coherence_threshold: float = 50.0,
    batch_size: int = 16,
    seed: int = 0,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
) -> None:
    """Trace a trait through training checkpoints: extraction, geometry, emergence and transfer steering."""
    with reported():
        prepare(threads)
        from personalab.studies.extraction import ExtractionConfig
        from personalab.studies.trace import (
            SERIES,
            TraceConfig,
            build_units,
            from_folders,
            from_revisions,
            read_revisions,
            run_trace,
        )
        from personalab.studies.trace.run import BASE_SAMPLING, finite

        sources = [x is not None for x in (revisions, revisions_file, checkpoints)]
        if sum(sources) > 1:
            raise InvalidInputError("give one of --revisions, --revisions-file and --checkpoints")
        if checkpoints is not None:
            series_list = from_folders(checkpoints, tokens_per_step)
        else:
            name = model or (SERIES[series].model if series in SERIES else None)
            if name is None:
                raise InvalidInputError("give --model (with --series or --revisions), or --checkpoints")
            wanted = (
                read_revisions(revisions_file)
                if revisions_file
                else [r.strip() for r in revisions.split(",") if r.strip()]
                if revisions
                else list(SERIES[series].revisions)
                if series in SERIES
                else []
            )
            series_list = from_revisions(name, wanted, series, tokens_per_step)
        config = TraceConfig(
            layer=layer,
            coef=finite(coef, "--coef"),
            target_coef=target_coef,
            extraction=ExtractionConfig(
                samples=samples,
                sampling=BASE_SAMPLING.model_copy(
                    update={
                        "max_new_tokens": max_new_tokens,
                        "temperature": temperature,
                        "repetition_penalty": repetition_penalty,
                        "seed": seed,
                    }
                ),
                pos_threshold=pos_threshold,
                neg_threshold=neg_threshold,
                coherence_threshold=coherence_threshold,
                min_pairs=min_pairs,
                batch_size=batch_size,
            ),
            eval_samples=eval_samples,
            controls=controls,
        )
        units = build_units(trait, strategy)
        scorer = open_judge(judge)

        def load(checkpoint):
            return open_model(checkpoint.source, checkpoint.revision, dtype, device, tokenizer)

        def load_target():
            return open_model(target, None, dtype, device, None)

        run_trace(series_list, units, config, scorer, out, load, series, target, load_target if target else None)

"""Commands that put a vector into weights and compare the results: ``distill``, ``bake``, ``compare``."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from personalab.cli.common import (
    ALPHA_HELP,
    CHECKPOINTING_HELP,
    GRAD_ACCUM_HELP,
    JUDGE_TIMEOUT,
    LAYER_HELP,
    LR_HELP,
    MAX_NEW_TOKENS_HELP,
    PROMPTS_HELP,
    SEED_HELP,
    STEPS_HELP,
    TEMPERATURE_HELP,
    TUNED_HELP,
    WARMUP_HELP,
    WEIGHTS,
    DeviceOption,
    DryRunOption,
    DtypeOption,
    EvalSamplesOption,
    JudgeOption,
    JudgeTimeoutOption,
    MicroBatchOption,
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
    integers,
    open_model,
    open_trained,
    prepare,
    reported,
    say_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.errors import InvalidInputError


@app.command("distill", rich_help_panel=WEIGHTS)
@grouped
def distill_command(
    engine: EngineOptions,
    model: ModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help=LAYER_HELP)],
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    scale: ScaleOption = "normalised",
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on attention and MLP projections.")] = None,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA.")] = False,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    trajectories: Annotated[str, typer.Option(help="Count, or comma-separated counts for an ablation.")] = "500",
    steps: Annotated[int, typer.Option(help=STEPS_HELP)] = 500,
    micro_batch_size: MicroBatchOption = 2,
    grad_accum: Annotated[int, typer.Option(help=GRAD_ACCUM_HELP)] = 4,
    lr: Annotated[float, typer.Option(help=LR_HELP)] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help=WARMUP_HELP)] = 20,
    gradient_checkpointing: Annotated[bool, typer.Option(help=CHECKPOINTING_HELP)] = False,
    kl_chunk: Annotated[int, typer.Option(help="Positions per chunk of full-vocabulary logits.")] = 64,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that supports it), bf16 or no.")] = "auto",
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 256,
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    top_p: TopPOption = 0.95,
    merge: Annotated[bool, typer.Option(help="Also write the LoRA student merged into OUT/model.")] = False,
    variant: VariantOption = "response_mean",
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    prompts: Annotated[Path | None, typer.Option(help=PROMPTS_HELP)] = None,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    dry_run: DryRunOption = False,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Bake a steering vector into weights: KL(steered teacher || student) on steered trajectories.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab distill ...`.
    """
    from personalab.api.common import as_trait
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import distill as run
        from personalab.api.weights import training_dtype, training_placement
        from personalab.methods.distill import DistillConfig

        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        counts = integers(trajectories, "--trajectories")
        options = checked(
            DistillConfig, dict(
                scale=scale, lora_rank=lora_rank, lora_alpha=lora_alpha, steps=steps, micro_batch_size=micro_batch_size,
                grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps, gradient_checkpointing=gradient_checkpointing,
                kl_chunk=kl_chunk, mixed_precision=mixed_precision, seed=seed, max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
            ), layer=layer, alpha=alpha, trajectories=min(counts, default=2),
        )  # fmt: skip
        persona = as_vector(vector)
        chosen = None if prompts is not None else as_trait(trait, vector, trait_dir, also="--prompts FILE")
        placement, main, processes = training_placement(device)
        if engine.engine == "vllm" and processes > 1:
            raise InvalidInputError("--engine vllm samples trajectories in one process; launch without accelerate")

        def load():
            return open_model(model, revision, training_dtype(dtype, full), placement, tokenizer, thinking=thinking,
                              engine=engine)  # fmt: skip

        if dry_run:
            plan = run(load, persona, layer=layer, alpha=alpha, trajectories=counts, prompts=prompts, trait=chosen,
                       variant=variant, out=out, dry_run=True, **options)  # fmt: skip
            console.print(plan.describe("trajectories"), markup=False)
            return
        result = run(
            load, persona, layer=layer, alpha=alpha, trajectories=counts, prompts=prompts, trait=chosen,
            variant=variant, merge=merge, out=out, report=report and main, **options,
        )  # fmt: skip
    if not main:
        return
    table = Table("trajectories", "held-out KL start", "held-out KL end", "KL to unsteered base", "trainable")
    for row in result.tables["distill"].to_dict("records"):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    if len(counts) > 1:
        console.print(f"wrote {out}/ablation.csv")
    for n in counts:
        say_report(out if len(counts) == 1 else out / f"trajectories-{n}", report)


@app.command(rich_help_panel=WEIGHTS)
@grouped
def compare(
    engine: EngineOptions,
    model: ModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help=LAYER_HELP)],
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)],
    judge: JudgeOption,
    tuned: Annotated[list[Path], typer.Option(help=TUNED_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for compare.csv, compare.md and the store.")],
    trait: TraitOption = None,
    trait_dir: TraitDirOption = None,
    scale: ScaleOption = "normalised",
    eval_samples: EvalSamplesOption = 5,
    variant: VariantOption = "response_mean",
    temperature: Annotated[float, typer.Option(help=TEMPERATURE_HELP)] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help=MAX_NEW_TOKENS_HELP)] = 256,
    top_p: TopPOption = 1.0,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
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
    """Judge base, steered and distilled (--tuned) models on the trait's evaluation questions."""
    from personalab.api.common import as_trait
    from personalab.api.common import judge as open_judge
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import compare as run
        from personalab.studies.compare import CompareConfig

        options = checked(
            CompareConfig, dict(
                scale=scale, eval_samples=eval_samples, temperature=temperature, top_p=top_p,
                repetition_penalty=repetition_penalty, max_new_tokens=max_new_tokens,
                seed=seed,
            ), layer=layer, alpha=alpha,
        )  # fmt: skip
        persona = as_vector(vector)
        chosen = as_trait(trait, vector, trait_dir)
        scorer = open_judge(judge, judge_timeout)
        base = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)

        def load(folder):
            return open_trained(model, folder, dtype, device, tokenizer, thinking, engine)

        if dry_run:
            plan = run(base, persona, scorer, layer=layer, alpha=alpha, tuned=tuned, trait=chosen, variant=variant,
                       out=out, dry_run=True, **options)  # fmt: skip
            console.print(plan.describe(f"{2 + len(tuned)} models"), markup=False)
            return
        run(
            base, persona, scorer, layer=layer, alpha=alpha, tuned=tuned, trait=chosen, variant=variant,
            load=load, out=out, report=report, **options,
        )  # fmt: skip
    console.print((out / "compare.md").read_text(), markup=False)
    console.print(f"wrote {out}/compare.csv, compare.md, compare.png, answers.jsonl, meta.json")
    say_report(out, report)


@app.command(rich_help_panel=WEIGHTS)
def bake(
    model: ModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help=LAYER_HELP)],
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for the baked model.")],
    scale: ScaleOption = "normalised",
    exact: Annotated[bool, typer.Option(help="Exact bias or embedding shift, no training (required for now).")] = False,
    variant: VariantOption = "response_mean",
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Bake steering on all positions into the weights: the saved model's plain forward equals the steered one."""
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        from personalab.api import bake as run

        if not exact:
            raise InvalidInputError("pass --exact; training-based baking is `personalab distill`")
        persona = as_vector(vector)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
        result = run(handle, persona, layer=layer, alpha=alpha, out=out, scale=scale, variant=variant, report=report)
    console.print(f"baked alpha {alpha:g} at layer {layer} as {result.meta['method']}; wrote {result.folder}")
    say_report(result.folder, report)


@app.command(rich_help_panel=WEIGHTS)
@grouped
def finetune(
    engine: EngineOptions,
    model: ModelOption,
    data: Annotated[Path, typer.Option(help="JSONL chat records; the loss is on the final assistant turn.")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints/step-N; a killed run resumes).")],
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on attention and MLP projections.")] = None,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA.")] = False,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    lr: Annotated[float, typer.Option(help=LR_HELP)] = 1e-5,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 1 unless --steps).")] = None,
    steps: Annotated[int | None, typer.Option(help=STEPS_HELP)] = None,
    micro_batch_size: MicroBatchOption = 2,
    grad_accum: Annotated[int, typer.Option(help=GRAD_ACCUM_HELP)] = 8,
    warmup_steps: Annotated[int, typer.Option(help=WARMUP_HELP)] = 20,
    max_length: Annotated[
        int, typer.Option(help="Tokens per record; longer ones are cut at the end and counted.")
    ] = 1024,
    checkpoint_every: int = 50,
    monitor: Annotated[
        list[Path],
        typer.Option(
            "--monitor",
            "--monitor-vector",
            help="Vector run folder or file to monitor (repeat; under torchrun write --monitor-vector).",
        ),
    ] = [],  # noqa: B006
    monitor_layer: Annotated[
        int | None, typer.Option(help="Layer of the monitored projections (default n_blocks // 2).")
    ] = None,
    monitor_prompts: Annotated[
        Path | None, typer.Option(help="Prompt set (JSONL) for monitoring (default: each vector's trait's questions).")
    ] = None,
    monitor_judge: Annotated[
        str | None, typer.Option(help="Also judge each checkpoint's answers: api:MODEL or local:MODEL.")
    ] = None,
    monitor_tokens: Annotated[int, typer.Option(help="Tokens of the model's own answers when monitoring.")] = 64,
    steer: Annotated[
        Path | None,
        typer.Option("--steer-vector", help="Preventative steering: add alpha * this vector while training."),
    ] = None,
    ablate: Annotated[
        Path | None, typer.Option("--ablate-vector", help="Project this vector out of the residual while training.")
    ] = None,
    layer: Annotated[int | None, typer.Option(help=LAYER_HELP)] = None,
    alpha: Annotated[float, typer.Option(help=ALPHA_HELP)] = 1.0,
    scale: ScaleOption = "normalised",
    variant: VariantOption = "response_mean",
    gradient_checkpointing: Annotated[bool, typer.Option(help=CHECKPOINTING_HELP)] = False,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that supports it), bf16 or no.")] = "auto",
    seed: Annotated[int, typer.Option(help=SEED_HELP)] = 0,
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
    """Fine-tune on chat data while monitoring persona vectors; optional training-only steering or ablation.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab finetune ...`.
    """
    from personalab.api.common import judge as open_judge
    from personalab.persona import as_vector

    with reported(out):
        prepare(threads, device, model)
        check_engine(engine, model, revision)
        from personalab.api import finetune as run
        from personalab.api.weights import monitored, training_dtype, training_placement
        from personalab.engine.loading import model_shape
        from personalab.records import load_records
        from personalab.studies.finetune import FinetuneConfig, TrainingIntervention, check, check_records

        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        if (steer or ablate) and layer is None:
            raise InvalidInputError("--steer-vector and --ablate-vector need --layer")
        options = dict(
            lora_rank=lora_rank, lora_alpha=lora_alpha, lr=lr, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
            warmup_steps=warmup_steps, gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
            seed=seed, max_length=max_length, checkpoint_every=checkpoint_every, monitor_layer=monitor_layer,
            monitor_tokens=monitor_tokens, **({"steps": steps} if steps else {}),
        )  # fmt: skip
        config = FinetuneConfig(**{**options, "steps": steps or 1})
        check_records(load_records(data))
        n_blocks, hidden = model_shape(model, revision)
        monitors = monitored(monitor, monitor_layer, n_blocks, monitor_prompts, variant, monitor_judge is not None)
        steering = [as_vector(p) for p in (steer, ablate) if p is not None]
        kinds = [k for k, p in (("steer", steer), ("ablate", ablate)) if p is not None]
        planned = [
            TrainingIntervention(k, layer, v.tensor(variant, n_blocks + 1), alpha, scale)
            for k, v in zip(kinds, steering, strict=True)
        ]
        check(n_blocks, hidden, config, monitors, planned)
        scorer = open_judge(monitor_judge, judge_timeout) if monitor_judge else None
        placement, main, processes = training_placement(device)
        if engine.engine == "vllm" and (full or processes > 1):
            raise InvalidInputError(
                "--engine vllm monitors a LoRA fine-tune in one process (each checkpoint as a LoRA request); "
                "monitor a full or data-parallel fine-tune with --engine hf"
            )
        handle = open_model(
            model, revision, training_dtype(dtype, full), placement, tokenizer, thinking=thinking, engine=engine,
            lora_rank=lora_rank,
        )  # fmt: skip
        run(
            handle, data, monitor=monitor, monitor_prompts=monitor_prompts, judge=scorer,
            steer_vector=steering[kinds.index("steer")] if steer else None,
            ablate_vector=steering[kinds.index("ablate")] if ablate else None, layer=layer, alpha=alpha, scale=scale,
            variant=variant, epochs=epochs, out=out, report=report and main, dry_run=dry_run, **options,
        )  # fmt: skip
        if dry_run:
            return
    if main:
        console.print((out / "summary.md").read_text(), markup=False)
        console.print(f"wrote {out}/checkpoints, monitor.csv, monitor.png, training_curve.png", markup=False)
        say_report(out, report)

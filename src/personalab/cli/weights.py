"""Commands that put a vector into weights and compare the results: ``distill``, ``bake``, ``compare``."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from personalab.cli.common import (
    JUDGE_TIMEOUT,
    WEIGHTS,
    BaseModelOption,
    DeviceOption,
    DtypeOption,
    JudgeOption,
    JudgeTimeoutOption,
    ModelOption,
    ReportOption,
    RevisionOption,
    ScaleOption,
    ThinkingOption,
    ThreadsOption,
    TokenizerOption,
    TraitOption,
    VariantOption,
    VectorOption,
    app,
    check_engine,
    console,
    integers,
    load_direction,
    open_judge,
    open_model,
    open_trained,
    pick_trait,
    prepare,
    reported,
    write_run_report,
)
from personalab.cli.options import EngineOptions, grouped
from personalab.errors import InvalidInputError


def _prompt_set(handle, trait, prompts: Path | None) -> list:
    """The distillation prompts: a JSONL of chat prompts, else the trait's extraction questions."""
    from personalab.records import load_records

    if prompts is not None:
        return [handle.encode(r.system, r.prompt) for r in load_records(prompts)]
    return [handle.encode(None, q) for q in trait.extraction_questions]


@app.command("distill", rich_help_panel=WEIGHTS)
@grouped
def distill_command(
    engine: EngineOptions,
    model: BaseModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer l: the teacher adds alpha * v to the output of block l-1.")],
    alpha: Annotated[float, typer.Option(help="Steering coefficient of the teacher (see --scale).")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
    scale: ScaleOption = "raw",
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on attention and MLP projections.")] = None,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA.")] = False,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    trajectories: Annotated[str, typer.Option(help="Count, or comma-separated counts for an ablation.")] = "500",
    steps: int = 500,
    batch_size: int = 2,
    grad_accum: int = 4,
    lr: float = 1e-4,
    warmup_steps: int = 20,
    gradient_checkpointing: bool = False,
    kl_chunk: Annotated[int, typer.Option(help="Positions per chunk of full-vocabulary logits.")] = 64,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that supports it), bf16 or no.")] = "auto",
    max_new_tokens: int = 256,
    merge: Annotated[bool, typer.Option(help="Also write the LoRA student merged into OUT/model.")] = False,
    variant: VariantOption = "response_mean",
    trait: Annotated[
        str | None,
        typer.Option(help="Prompt set: this trait's extraction questions (default: the --vector run's trait)."),
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt set: a JSONL of chat prompts.")] = None,
    seed: int = 0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype; auto = float32 for --full (AdamW steps survive), else the checkpoint's.")
    ] = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Bake a steering vector into weights: KL(steered teacher || student) on steered trajectories.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab distill ...`.
    """
    with reported():
        prepare(threads)
        check_engine(engine)
        import pandas as pd
        from accelerate import PartialState

        from personalab.engine.model import resolve_device
        from personalab.report.tables import write_csv
        from personalab.studies.distill import TRAJECTORY_SAMPLING, DistillConfig, distill

        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        counts = integers(trajectories, "--trajectories")
        configs = [
            DistillConfig(
                layer=layer,
                alpha=alpha,
                scale=scale,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                trajectories=n,
                steps=steps,
                batch_size=batch_size,
                grad_accum=grad_accum,
                lr=lr,
                warmup_steps=warmup_steps,
                gradient_checkpointing=gradient_checkpointing,
                kl_chunk=kl_chunk,
                mixed_precision=mixed_precision,
                seed=seed,
                sampling=TRAJECTORY_SAMPLING.model_copy(update={"max_new_tokens": max_new_tokens, "seed": seed}),
            )
            for n in counts
        ]
        direction, _ = load_direction(vector, variant)
        chosen = None if prompts is not None else pick_trait(trait, None, vector, also="--prompts FILE")
        state = PartialState(cpu=resolve_device(device) == "cpu")
        placement = str(state.device) if state.num_processes > 1 else device
        if engine.engine == "vllm" and state.num_processes > 1:
            raise InvalidInputError("--engine vllm samples trajectories in one process; launch without accelerate")
        rows, folders = [], []
        for config in configs:
            weights_dtype = "float32" if full and dtype == "auto" else dtype
            handle = open_model(model, revision, weights_dtype, placement, tokenizer, thinking=thinking, engine=engine)
            prompt_set = _prompt_set(handle, chosen, prompts)
            folder = out if len(configs) == 1 else out / f"trajectories-{config.trajectories}"
            result = distill(
                handle, direction, prompt_set, config, folder, store_path=out / "generations.sqlite", merge=merge
            )
            rows.append({"trajectories": config.trajectories, **result.held_out, "trainable": result.trainable})
            folders.append(folder)
    if not state.is_main_process:
        return
    table = Table("trajectories", "held-out KL start", "held-out KL end", "KL to unsteered base", "trainable")
    for row in rows:
        table.add_row(*(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in row))
    console.print(table)
    if len(rows) > 1:
        write_csv(pd.DataFrame(rows), out / "ablation.csv")
        console.print(f"wrote {out}/ablation.csv")
    for folder in folders:
        write_run_report(folder, report)


@app.command(rich_help_panel=WEIGHTS)
@grouped
def compare(
    engine: EngineOptions,
    model: BaseModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer of the steered reference.")],
    alpha: Annotated[float, typer.Option(help="Coefficient of the steered reference (see --scale).")],
    judge: JudgeOption,
    distilled: Annotated[list[Path], typer.Option(help="Distill run folder or model folder; repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.csv, compare.md and the store.")],
    trait: TraitOption = None,
    scale: ScaleOption = "raw",
    samples: int = 5,
    variant: VariantOption = "response_mean",
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Judge base, steered and distilled models on the trait's evaluation questions."""
    with reported():
        prepare(threads)
        check_engine(engine)
        from functools import partial

        from personalab.engine.generation import SamplingParams
        from personalab.studies.compare import run_compare

        direction, _ = load_direction(vector, variant)
        chosen = pick_trait(trait, None, vector)
        scorer = open_judge(judge, judge_timeout)
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        base = open_model(model, revision, dtype, device, tokenizer, thinking=thinking, engine=engine)
        trained = [
            (
                folder,
                partial(open_trained, model, folder, dtype, device, tokenizer, thinking, engine),
            )
            for folder in distilled
        ]
        run_compare(base, direction, layer, alpha, chosen, scorer, trained, out, samples, params, scale)
    console.print((out / "compare.md").read_text(), markup=False)
    console.print(f"wrote {out}/compare.csv, compare.md, compare.png, answers.jsonl, meta.json")
    write_run_report(out, report)


@app.command(rich_help_panel=WEIGHTS)
def bake(
    model: ModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer l: the baked model adds alpha * v to the output of block l-1.")],
    alpha: Annotated[float, typer.Option(help="Steering coefficient (see --scale).")],
    out: Annotated[Path, typer.Option(help="Folder for the baked model.")],
    scale: ScaleOption = "raw",
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
    with reported():
        prepare(threads)
        import json

        from personalab.studies.bake import bake_exact

        if not exact:
            raise InvalidInputError("pass --exact; training-based baking is `personalab distill`")
        direction, _ = load_direction(vector, variant)
        handle = open_model(model, revision, dtype, device, tokenizer, thinking=thinking)
        folder = bake_exact(handle, direction, layer, alpha, out, scale)
        method = json.loads((folder / "bake.json").read_text())["method"]
    console.print(f"baked alpha {alpha:g} at layer {layer} as {method}; wrote {folder}")
    write_run_report(folder, report)


def _monitored(paths: list[Path], layer: int | None, n_blocks: int, prompts: Path | None, variant: str, judged: bool):
    from personalab.engine.layers import check_layers
    from personalab.records import load_records
    from personalab.studies.finetune import Monitored
    from personalab.traits import run_trait

    chosen = n_blocks // 2 if layer is None else check_layers(layer, n_blocks)[0]
    questions = [r.prompt for r in load_records(prompts)] if prompts else None
    out = []
    for path in paths:
        direction, _ = load_direction(path, variant)
        if direction.dim() != 2 or direction.shape[0] != n_blocks + 1:
            raise InvalidInputError(
                f"monitor vector {path} has {direction.shape[0]} layers but the model has {n_blocks + 1}; "
                f"use a vector extracted from this model"
            )
        found = run_trait(path)
        if questions is None and found is None:
            raise InvalidInputError(f"{path} keeps no trait.json; pass --monitor-prompts FILE.jsonl")
        trait = found[0] if found else None
        if judged and trait is None:
            raise InvalidInputError(f"--monitor-judge needs the trait of {path}; it keeps no trait.json")
        prompts = questions or trait.evaluation_questions
        out.append(Monitored(Path(path).name, direction[chosen], prompts, trait, str(Path(path).resolve())))
    return out


@app.command(rich_help_panel=WEIGHTS)
@grouped
def finetune(
    engine: EngineOptions,
    model: BaseModelOption,
    data: Annotated[Path, typer.Option(help="JSONL chat records; the loss is on the final assistant turn.")],
    out: Annotated[Path, typer.Option(help="Run folder (checkpoints/step-N; a killed run resumes).")],
    lora_rank: Annotated[int | None, typer.Option(help="LoRA rank on attention and MLP projections.")] = None,
    full: Annotated[bool, typer.Option(help="Full fine-tuning instead of LoRA.")] = False,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default 2 x rank).")] = None,
    lr: float = 1e-5,
    epochs: Annotated[float | None, typer.Option(help="Passes over the data (default 1 unless --steps).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps instead of --epochs.")] = None,
    batch_size: int = 2,
    grad_accum: int = 8,
    warmup_steps: int = 20,
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
        Path | None, typer.Option(help="Preventative steering: add alpha * this vector while training.")
    ] = None,
    ablate: Annotated[Path | None, typer.Option(help="Project this vector out of the residual while training.")] = None,
    layer: Annotated[int | None, typer.Option(help="Layer of --steer and --ablate.")] = None,
    alpha: Annotated[float, typer.Option(help="Coefficient of --steer (see --scale).")] = 1.0,
    scale: ScaleOption = "raw",
    variant: VariantOption = "response_mean",
    gradient_checkpointing: bool = False,
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16 on a GPU that supports it), bf16 or no.")] = "auto",
    seed: int = 0,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype; auto = float32 for --full, else the checkpoint's.")
    ] = "auto",
    device: DeviceOption = "auto",
    report: ReportOption = True,
    judge_timeout: JudgeTimeoutOption = JUDGE_TIMEOUT,
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Fine-tune on chat data while monitoring persona vectors; optional training-only steering or ablation.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab finetune ...`.
    """
    with reported():
        prepare(threads)
        check_engine(engine)
        from accelerate import PartialState

        from personalab.engine.model import model_shape, resolve_device
        from personalab.records import load_records
        from personalab.studies.finetune import FinetuneConfig, Intervention, check, check_records
        from personalab.studies.finetune import finetune as run

        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        if (steer or ablate) and layer is None:
            raise InvalidInputError("--steer and --ablate need --layer")
        config = FinetuneConfig(
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lr=lr,
            steps=steps or 1,
            batch_size=batch_size,
            grad_accum=grad_accum,
            warmup_steps=warmup_steps,
            gradient_checkpointing=gradient_checkpointing,
            mixed_precision=mixed_precision,
            seed=seed,
            max_length=max_length,
            checkpoint_every=checkpoint_every,
            monitor_layer=monitor_layer,
            monitor_tokens=monitor_tokens,
        )
        records = load_records(data)
        check_records(records)
        n_blocks, hidden = model_shape(model, revision)
        monitors = _monitored(monitor, monitor_layer, n_blocks, monitor_prompts, variant, monitor_judge is not None)
        interventions = []
        for kind, path in (("steer", steer), ("ablate", ablate)):
            if path is not None:
                vector, _ = load_direction(path, variant)
                interventions.append(Intervention(kind, layer, vector, alpha, scale))
        check(n_blocks, hidden, config, monitors, interventions)
        scorer = open_judge(monitor_judge, judge_timeout) if monitor_judge else None
        state = PartialState(cpu=resolve_device(device) == "cpu")
        placement = str(state.device) if state.num_processes > 1 else device
        if engine.engine == "vllm" and (full or state.num_processes > 1):
            raise InvalidInputError(
                "--engine vllm monitors a LoRA fine-tune in one process (each checkpoint as a LoRA request); "
                "monitor a full or data-parallel fine-tune with --engine hf"
            )
        handle = open_model(
            model, revision, "float32" if full and dtype == "auto" else dtype, placement, tokenizer, thinking=thinking,
            engine=engine, lora_rank=lora_rank,
        )  # fmt: skip
        run(handle, records, config, out, monitors, interventions, scorer, None if steps else (epochs or 1.0))
    if state.is_main_process:
        console.print((out / "summary.md").read_text(), markup=False)
        console.print(f"wrote {out}/checkpoints, monitor.csv, monitor.png, training_curve.png", markup=False)
        write_run_report(out, report)

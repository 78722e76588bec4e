"""Commands that put a vector into weights and compare the results: ``distill``, ``bake``, ``compare``."""

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from personalab.cli.common import (
    WEIGHTS,
    BaseModelOption,
    DeviceOption,
    DtypeOption,
    JudgeOption,
    ModelOption,
    RevisionOption,
    ScaleOption,
    ThreadsOption,
    TokenizerOption,
    TraitOption,
    VariantOption,
    VectorOption,
    app,
    console,
    floats,
    load_direction,
    open_judge,
    open_model,
    pick_trait,
    prepare,
    reported,
)
from personalab.errors import InvalidInputError


def _prompt_set(handle, trait, prompts: Path | None) -> list:
    """The distillation prompts: a JSONL of chat prompts, else the trait's extraction questions."""
    from personalab.records import load_records

    if prompts is not None:
        return [handle.encode(r.system, r.prompt) for r in load_records(prompts)]
    return [handle.encode(None, q) for q in trait.extraction_questions]


@app.command("distill", rich_help_panel=WEIGHTS)
def distill_command(
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
    threads: ThreadsOption = None,
) -> None:
    """Bake a steering vector into weights: KL(steered teacher || student) on steered trajectories.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab distill ...`.
    """
    with reported():
        prepare(threads)
        import pandas as pd
        from accelerate import PartialState

        from personalab.engine.model import resolve_device
        from personalab.studies.distill import TRAJECTORY_SAMPLING, DistillConfig, distill

        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        counts = [int(x) for x in floats(trajectories)]
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
        rows = []
        for config in configs:
            weights_dtype = "float32" if full and dtype == "auto" else dtype
            handle = open_model(model, revision, weights_dtype, placement, tokenizer)
            prompt_set = _prompt_set(handle, chosen, prompts)
            folder = out if len(configs) == 1 else out / f"trajectories-{config.trajectories}"
            result = distill(
                handle, direction, prompt_set, config, folder, store_path=out / "generations.sqlite", merge=merge
            )
            rows.append({"trajectories": config.trajectories, **result.held_out, "trainable": result.trainable})
    if not state.is_main_process:
        return
    table = Table("trajectories", "held-out KL start", "held-out KL end", "KL to unsteered base", "trainable")
    for row in rows:
        table.add_row(*(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k]) for k in row))
    console.print(table)
    if len(rows) > 1:
        pd.DataFrame(rows).to_csv(out / "ablation.csv", index=False)
        console.print(f"wrote {out}/ablation.csv")


@app.command(rich_help_panel=WEIGHTS)
def compare(
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
    threads: ThreadsOption = None,
) -> None:
    """Judge base, steered and distilled models on the trait's evaluation questions."""
    with reported():
        prepare(threads)
        from functools import partial

        from personalab.engine.generation import SamplingParams
        from personalab.engine.model import load_trained
        from personalab.studies.compare import run_compare

        direction, _ = load_direction(vector, variant)
        chosen = pick_trait(trait, None, vector)
        scorer = open_judge(judge)
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        base = open_model(model, revision, dtype, device, tokenizer)
        trained = [
            (folder, partial(load_trained, model, folder, dtype=dtype, device=device, tokenizer=tokenizer))
            for folder in distilled
        ]
        run_compare(base, direction, layer, alpha, chosen, scorer, trained, out, samples, params, scale)
    console.print((out / "compare.md").read_text(), markup=False)
    console.print(f"wrote {out}/compare.csv, compare.md, compare.png, answers.jsonl, meta.json")


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
        handle = open_model(model, revision, dtype, device, tokenizer)
        folder = bake_exact(handle, direction, layer, alpha, out, scale)
        method = json.loads((folder / "bake.json").read_text())["method"]
    console.print(f"baked alpha {alpha:g} at layer {layer} as {method}; wrote {folder}")

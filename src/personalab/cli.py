"""The ``personalab`` command line."""

import json
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

import pandas as pd
import torch
import typer
from accelerate import PartialState
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as hf_logging

from personalab.bake import bake_exact
from personalab.chat import ChatFormat
from personalab.distill import TRAJECTORY_SAMPLING, DistillConfig, distill
from personalab.errors import InvalidInputError, PersonalabError
from personalab.evaluation import load_distilled, scorecard
from personalab.extraction import ExtractionConfig, run_extraction
from personalab.generation import SamplingParams, sample_texts
from personalab.interventions import Ablate, Clamp, Steer, intervene, steer
from personalab.judges import judge_from_spec, openai_client
from personalab.layers import check_vector
from personalab.model import load_model, resolve_device
from personalab.monitor import (
    load_records,
    model_shift,
    project_records,
    projection_shift,
    write_projections,
    write_shift_report,
)
from personalab.plots import plot_model_shift
from personalab.steering import scaled_vector
from personalab.store import Store
from personalab.sweep import SweepConfig, run_sweep
from personalab.traits import builtin_traits, library_questions, load_trait
from personalab.traits.generate import generate_trait
from personalab.vectors import load_vectors

ModelOption = Annotated[str, typer.Option(help="Hub name or local folder of a causal LM.")]
BaseModelOption = Annotated[str, typer.Option(help="Hub name or local folder of the base model.")]
VectorOption = Annotated[Path, typer.Option(help="Run folder, .safetensors or public .pt file.")]
JudgeOption = Annotated[str, typer.Option(help="api:MODEL (OpenAI-compatible server) or local:MODEL.")]
VariantOption = Annotated[str, typer.Option(help="response_mean, prompt_mean or last_prompt.")]

app = typer.Typer(help="Persona vectors in language models.", no_args_is_help=True, add_completion=False)
trait_app = typer.Typer(help="Built-in, file and generated traits.", no_args_is_help=True)
app.add_typer(trait_app, name="trait")
console = Console()
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def main() -> None:
    """Persona vectors in language models: extract, steer, monitor, distill."""
    hf_logging.disable_progress_bar()


@contextmanager
def reported() -> Iterator[None]:
    """Turn a ``PersonalabError`` into a one-line message on stderr and exit status 1."""
    try:
        yield
    except PersonalabError as exc:
        errors.print("[red]error:[/red]", escape(str(exc)), highlight=False)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + str(first["loc"][-1]).replace("_", "-")
        errors.print("[red]error:[/red]", escape(f"invalid {option}: {first['msg']}"), highlight=False)
        raise typer.Exit(1) from None


def _system_role(chat: ChatFormat) -> str:
    if not chat.has_template:
        return "n/a (instruction placed before the question)"
    return "yes" if chat.system_role else "no (folded into the first user turn)"


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Hub name or local folder of a causal LM.")],
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Print a model's architecture, blocks, hidden size, dtype and chat format."""
    with reported():
        handle = load_model(model, revision=revision, dtype=dtype, device=device)
    table = Table(title=model, show_header=False)
    rows = [
        ("architecture", handle.architecture),
        ("decoder blocks", f"{handle.n_blocks} (at {handle.blocks_path})"),
        ("layers", f"{handle.n_layers} (0 = embeddings, l = output of block l-1)"),
        ("hidden size", str(handle.hidden_size)),
        ("dtype", str(handle.dtype).removeprefix("torch.")),
        ("device", str(handle.input_device)),
        ("chat template", "yes" if handle.chat.has_template else "no (plain instruction + question format)"),
        ("system role", _system_role(handle.chat)),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@trait_app.command("list")
def trait_list() -> None:
    """List the built-in traits."""
    table = Table("trait", "description")
    for name in builtin_traits():
        table.add_row(name, load_trait(name).description)
    console.print(table)


@trait_app.command("show")
def trait_show(
    trait: Annotated[str, typer.Argument(help="Built-in name or trait JSON file.")],
    trait_dir: Annotated[
        Path | None, typer.Option(help="persona-vectors data folder (trait_data_extract/...).")
    ] = None,
) -> None:
    """Print a trait as JSON in personalab's schema."""
    with reported():
        console.print_json(load_trait(trait, trait_dir).model_dump_json())


@trait_app.command("new")
def trait_new(
    name: Annotated[str, typer.Argument(help="Trait name (letters, digits, _ and -).")],
    description: Annotated[str, typer.Option(help="What the trait is.")],
    generator: Annotated[str, typer.Option(help="Chat model that writes the trait, served by --base-url.")],
    out: Annotated[Path | None, typer.Option(help="Where to write the JSON (default NAME.json).")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server (default from environment).")] = None,
    api_key: Annotated[str | None, typer.Option(help="API key (default from environment).")] = None,
    attempts: Annotated[int, typer.Option(help="Tries before giving up on invalid output.")] = 3,
) -> None:
    """Have an LLM write a complete trait file; invalid output is retried, never saved."""
    with reported():
        trait = generate_trait(openai_client(base_url, api_key), generator, name, description, attempts=attempts)
        target = out or Path(f"{name}.json")
        trait.save(target)
    console.print(f"wrote {target}")


@app.command()
def extract(
    model: ModelOption,
    trait: Annotated[str, typer.Option(help="Built-in trait, trait JSON file, or name in --trait-dir.")],
    judge: JudgeOption,
    trait_dir: Annotated[
        Path | None, typer.Option(help="persona-vectors data folder (trait_data_extract/...).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Answers per question and instruction pair.")] = 10,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/TRAIT-MODEL).")] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    min_pairs: Annotated[int, typer.Option(help="Fewest kept pairs to build a vector from.")] = 10,
    trait_threshold: float = 50.0,
    coherence_threshold: float = 50.0,
    revision: Annotated[str | None, typer.Option(help="Hub revision of the model.")] = None,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Extract a persona vector: generate, judge, filter, and take per-layer mean differences."""
    with reported():
        config = ExtractionConfig(
            samples=samples,
            sampling=SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                repetition_penalty=repetition_penalty,
                seed=seed,
            ),
            trait_threshold=trait_threshold,
            coherence_threshold=coherence_threshold,
            min_pairs=min_pairs,
            batch_size=batch_size,
        )
        chosen = load_trait(trait, trait_dir)
        scorer = judge_from_spec(judge)
        handle = load_model(model, revision=revision, dtype=dtype, device=device)
        folder = out or Path("runs") / f"{chosen.name}-{Path(model.rstrip('/')).name}"
        result = run_extraction(handle, chosen, scorer, folder, config)
    counts = result.meta["counts"]
    console.print(f"kept {counts['kept']} of {counts['pairs']} pairs; wrote {folder}/vectors.safetensors, summary.md")


def _load_direction(path: Path, variant: str) -> tuple[torch.Tensor, dict]:
    """The ``variant`` tensor of a vector file and the file's metadata."""
    vectors, meta = load_vectors(path)
    if variant not in vectors:
        raise InvalidInputError(f"{path} has no variant {variant!r}; it has {', '.join(vectors)}")
    return vectors[variant], meta


def _read_line() -> str:
    """One line typed at the prompt; end of input counts as an empty line."""
    try:
        return console.input("[bold]> [/bold]")
    except EOFError:
        return ""


@app.command("steer")
def steer_command(
    prompt: Annotated[str | None, typer.Argument(help="The user message (omit with --chat).")] = None,
    model: ModelOption = ...,
    vector: VectorOption = ...,
    layer: Annotated[int, typer.Option(help="Layer l: acts on the output of block l-1.")] = ...,
    alpha: Annotated[float, typer.Option(help="Coefficient (ignored by --ablate and --clamp).")] = 1.0,
    positions: Annotated[str, typer.Option(help="all, prompt, response or generated.")] = "response",
    variant: VariantOption = "response_mean",
    scale: Annotated[str, typer.Option(help="raw (alpha * v) or normalised (v at the mean residual norm).")] = "raw",
    ablate: Annotated[bool, typer.Option(help="Project the direction out instead of adding it.")] = False,
    clamp: Annotated[float | None, typer.Option(help="Set the projection onto the direction to this value.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    chat: Annotated[bool, typer.Option(help="Interactive loop: one prompt per line, empty line to stop.")] = False,
    max_new_tokens: int = 128,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.0,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Print the steered answer beside the unsteered one."""
    with reported():
        if prompt is None and not chat:
            raise InvalidInputError("give a PROMPT or --chat")
        direction, _ = _load_direction(vector, variant)
        handle = load_model(model, dtype=dtype, device=device)
        norm_prompts = [handle.encode(None, q) for q in library_questions()]
        if ablate:
            intervention, label = Ablate(layer, direction, positions), "ablated"
        elif clamp is not None:
            intervention, label = Clamp(layer, direction, clamp, positions), f"projection clamped to {clamp:g}"
        else:
            v, _ = scaled_vector(handle, direction, layer, scale, norm_prompts)
            intervention, label = Steer(layer, v, alpha, positions), f"alpha {alpha:g} ({scale} scale)"
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
        for text in [prompt] if not chat else iter(_read_line, ""):
            seq = handle.encode(system, text)
            (plain,) = sample_texts(handle, [seq], params, seed)
            with intervene(handle, intervention):
                (steered,) = sample_texts(handle, [seq], params, seed)
            table = Table(show_lines=True)
            table.add_column("unsteered", ratio=1)
            table.add_column(f"steered at layer {layer}, {positions} positions, {label}", ratio=1)
            table.add_row(escape(plain), escape(steered))
            console.print(table)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"expected comma-separated numbers, got {text!r}") from None


@app.command()
def sweep(
    model: ModelOption,
    vector: VectorOption,
    trait: Annotated[str, typer.Option(help="Trait whose evaluation questions and rubric are used.")],
    judge: JudgeOption,
    layers: Annotated[str, typer.Option(help="Comma-separated layers, e.g. 8,12,16,20.")],
    alphas: Annotated[str, typer.Option(help="Comma-separated coefficients; include 0 for the paired tests.")],
    samples: Annotated[int, typer.Option(help="Answers per question and configuration.")] = 10,
    variant: VariantOption = "response_mean",
    scale: Annotated[str, typer.Option(help="raw or normalised.")] = "raw",
    positions: Annotated[str, typer.Option(help="all, prompt, response or generated.")] = "response",
    trait_dir: Annotated[Path | None, typer.Option(help="persona-vectors data folder.")] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/sweep-TRAIT-MODEL).")] = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 16,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Sweep layers x coefficients; judge trait and coherence; write tables and plots."""
    with reported():
        config = SweepConfig(
            layers=[int(x) for x in _floats(layers)],
            alphas=_floats(alphas),
            samples=samples,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed),
            scale=scale,
            positions=positions,
            batch_size=batch_size,
        )
        chosen = load_trait(trait, trait_dir)
        direction, _ = _load_direction(vector, variant)
        scorer = judge_from_spec(judge)
        handle = load_model(model, dtype=dtype, device=device)
        folder = out or Path("runs") / f"sweep-{chosen.name}-{Path(model.rstrip('/')).name}"
        run_sweep(handle, direction, chosen, scorer, folder, config)
    console.print((folder / "sweep.md").read_text(), markup=False)
    console.print(f"wrote {folder}/sweep.csv, sweep.md, heatmap_trait.png, heatmap_coherence.png, curves.png")


@app.command()
def project(
    vector: Annotated[Path, typer.Option(help="Run folder, .safetensors or .pt file of persona vectors.")],
    data: Annotated[Path | None, typer.Argument(help="JSONL records (messages or prompt/response).")] = None,
    model: Annotated[str | None, typer.Option(help="Hub name or local folder of the model.")] = None,
    variant: VariantOption = "response_mean",
    layer: Annotated[int | None, typer.Option(help="Layer (0 = embeddings, l = output of block l-1).")] = None,
    shift: Annotated[bool, typer.Option(help="Projection difference vs the model's own answers.")] = False,
    top_k: Annotated[int | None, typer.Option(help="With --shift: also write the K most shifting records.")] = None,
    diff: Annotated[tuple[str, str] | None, typer.Option(help="BASE TUNED: per-layer shift of a fine-tune.")] = None,
    trait: Annotated[
        str | None, typer.Option(help="With --diff: prompts from this trait's evaluation questions.")
    ] = None,
    out: Annotated[Path, typer.Option(help="With --diff: writes OUT.png and OUT.csv.")] = Path("model-shift"),
    batch_size: int = 16,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Project records (or a fine-tune's change) onto a persona vector."""
    with reported():
        direction, _ = _load_direction(vector, variant)
        if diff:
            if trait is None and data is None:
                raise InvalidInputError("--diff needs prompts; pass --trait NAME or a JSONL data file")
            pairs = (
                [(None, q) for q in load_trait(trait).evaluation_questions]
                if trait
                else [(r.system, r.prompt) for r in load_records(data)]
            )
            base, tuned = (load_model(name, dtype=dtype, device=device) for name in diff)
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
            handle = load_model(model, dtype=dtype, device=device)
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


def _prompt_set(handle, trait: str | None, prompts: Path | None, meta: dict) -> list:
    if prompts is not None:
        return [handle.encode(r.system, r.prompt) for r in load_records(prompts)]
    name = trait or meta.get("trait")
    if name is None:
        raise InvalidInputError("give --trait (its extraction questions are the prompts) or --prompts FILE.jsonl")
    return [handle.encode(None, q) for q in load_trait(name).extraction_questions]


@app.command("distill")
def distill_command(
    model: BaseModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer l: the teacher adds alpha * v to the output of block l-1.")],
    alpha: Annotated[float, typer.Option(help="Steering coefficient of the teacher (raw scale).")],
    out: Annotated[Path, typer.Option(help="Run folder.")],
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
    trait: Annotated[str | None, typer.Option(help="Prompt set: this trait's extraction questions.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompt set: a JSONL of chat prompts.")] = None,
    seed: int = 0,
    dtype: Annotated[
        str, typer.Option(help="Weights dtype; auto = float32 for --full (AdamW steps survive), else the checkpoint's.")
    ] = "auto",
    device: str = "auto",
) -> None:
    """Bake a steering vector into weights: KL(steered teacher || student) on steered trajectories.

    Data-parallel on several GPUs: `accelerate launch --multi_gpu --num_processes N -m personalab distill ...`.
    """
    with reported():
        if full == (lora_rank is not None):
            raise InvalidInputError("choose one of --lora-rank R or --full")
        counts = [int(x) for x in _floats(trajectories)]
        configs = [
            DistillConfig(
                layer=layer,
                alpha=alpha,
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
        direction, meta = _load_direction(vector, variant)
        state = PartialState(cpu=resolve_device(device) == "cpu")
        placement = str(state.device) if state.num_processes > 1 else device
        rows = []
        for config in configs:
            handle = load_model(model, dtype="float32" if full and dtype == "auto" else dtype, device=placement)
            prompt_set = _prompt_set(handle, trait, prompts, meta)
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


def _trainable(folder: Path) -> int:
    meta = folder / "meta.json"
    return json.loads(meta.read_text()).get("trainable_parameters", 0) if meta.is_file() else 0


@app.command()
def compare(
    model: BaseModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer of the steered reference.")],
    alpha: Annotated[float, typer.Option(help="Coefficient of the steered reference (raw scale).")],
    trait: Annotated[str, typer.Option(help="Trait whose evaluation questions and rubric are used.")],
    judge: JudgeOption,
    distilled: Annotated[list[Path], typer.Option(help="Distill run folder or model folder; repeat for several.")],
    out: Annotated[Path, typer.Option(help="Folder for compare.csv, compare.md and the store.")],
    samples: int = 5,
    variant: VariantOption = "response_mean",
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Judge base, steered and distilled models on the trait's evaluation questions."""
    with reported():
        direction, _ = _load_direction(vector, variant)
        chosen = load_trait(trait)
        scorer = judge_from_spec(judge)
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
        base = load_model(model, dtype=dtype, device=device)
        check_vector(direction, layer, base.n_blocks, base.hidden_size)
        rows = []
        with closing(Store(out / "generations.sqlite")) as store:

            def card(handle, label, steering=None):
                return scorecard(handle, chosen, scorer, store, label, samples, params, steering)

            rows.append({"model": "base", **card(base, "base"), "trainable": 0})
            steered = f"steered layer {layer} alpha {alpha:g}"
            hook = partial(steer, base, direction, layer, alpha=alpha, positions="response")
            rows.append({"model": steered, **card(base, steered, hook), "trainable": 0})
            for folder in distilled:
                handle = load_distilled(model, folder, dtype=dtype, device=device)
                rows.append(
                    {"model": str(folder), **card(handle, f"distilled {folder}"), "trainable": _trainable(folder)}
                )
    table = pd.DataFrame(rows)
    table.to_csv(out / "compare.csv", index=False)
    lines = ["| model | trait | coherence | trainable parameters |", "|---|---|---|---|"]
    lines += [
        f"| {r.model} | {r.trait_mean:.1f} +- {r.trait_std:.1f} | {r.coherence_mean:.1f} +- {r.coherence_std:.1f} "
        f"| {r.trainable} |"
        for r in table.itertuples()
    ]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    console.print("\n".join(lines), markup=False)


@app.command()
def bake(
    model: ModelOption,
    vector: VectorOption,
    layer: Annotated[int, typer.Option(help="Layer l: the baked model adds alpha * v to the output of block l-1.")],
    alpha: Annotated[float, typer.Option(help="Steering coefficient (raw scale).")],
    out: Annotated[Path, typer.Option(help="Folder for the baked model.")],
    exact: Annotated[bool, typer.Option(help="Exact bias or embedding shift, no training (required for now).")] = False,
    variant: VariantOption = "response_mean",
    dtype: str = "auto",
    device: str = "auto",
) -> None:
    """Bake steering on all positions into the weights: the saved model's plain forward equals the steered one."""
    with reported():
        if not exact:
            raise InvalidInputError("pass --exact; training-based baking is `personalab distill`")
        direction, _ = _load_direction(vector, variant)
        handle = load_model(model, dtype=dtype, device=device)
        folder = bake_exact(handle, direction, layer, alpha, out)
        method = json.loads((folder / "bake.json").read_text())["method"]
    console.print(f"baked alpha {alpha:g} at layer {layer} as {method}; wrote {folder}")

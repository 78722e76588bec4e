"""What every command shares: the app, option types, one-line errors, threads, models and judges.

Heavy libraries (torch, transformers, matplotlib) are imported inside the commands, so
``personalab --help`` and ``personalab trait list`` answer without loading them.
"""

import dataclasses
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from personalab.cli.options import EngineOptions
from personalab.errors import InvalidInputError, PersonalabError, PersonalabWarning, as_flags, invalid_option
from personalab.files import check_writable

if TYPE_CHECKING:
    from personalab.engine.handle import ModelHandle
    from personalab.engine.vllm_engine import VllmOptions

DEMO, MODELS, VECTORS, STEERING, WEIGHTS = "Start here", "Models and traits", "Vectors", "Steering", "Weights"
STUDIES, REPORTS = "Studies", "Reports"
"""Help panels of ``personalab --help``, by what the commands do."""

app = typer.Typer(help="Persona vectors in language models.", no_args_is_help=True, add_completion=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"personalab {version('personalab')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _record_command(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    """Persona vectors in language models."""
    from personalab import runfolder
    from personalab.console import log_to_console

    runfolder.command = runfolder.command_line()
    warnings.showwarning = _one_line_warning
    ctx.call_on_close(log_to_console(as_flags))


_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` of the command line: a ``PersonalabWarning`` as one ``warning:`` line on stderr."""
    if issubclass(category, PersonalabWarning):
        errors.print("[yellow]warning:[/yellow]", escape(as_flags(str(message))), highlight=False)
    else:
        _show_warning(message, category, filename, lineno, file, line)


console = Console()
errors = Console(stderr=True, soft_wrap=True)
_started: list = []
"""Engines the running command started, closed when it ends."""

# One help text per option name: an option means the same in every command that has it (tests/unit/test_options.py).
LAYER_HELP = "Layer l (hidden_states[l]: 0 = embeddings, l = output of block l-1)."
ALPHA_HELP = "Steering alpha (see --scale)."
TEMPERATURE_HELP = "Sampling temperature (0: greedy)."
MIN_PAIRS_HELP = "Fewest kept pairs to build a vector from (trace: for a checkpoint to count as extractable)."
POS_THRESHOLD_HELP = "Keep a pair when its positive answer's trait >= this."
NEG_THRESHOLD_HELP = "... and its negative answer's trait < this."
COHERENCE_THRESHOLD_HELP = "... and both answers' coherence >= this."
STEPS_HELP = "Optimizer steps."
MODEL_HELP = (
    "Hub name, local folder, run folder (finetune, distill, bake), GGUF file, or builtin:NAME (stories260k, "
    "smollm2-135m-instruct) of the model."
)
BATCH_HELP = "Sequences per forward batch when generating, capturing or scoring."
MAX_NEW_TOKENS_HELP = "Most tokens generated per answer."
SEED_HELP = "Random seed (sampling, and the command's own draws: probes, scans, training order)."
GRAD_ACCUM_HELP = "Micro-batches accumulated per optimizer step."
LR_HELP = "Learning rate."
WARMUP_HELP = "Linear warm-up steps of the learning rate."
CHECKPOINTING_HELP = "Recompute activations in the backward pass (less memory, slower)."
CONTROLS_HELP = (
    "Also steer with random and label-shuffled directions (seeds 0, 1, 2) at the vector's added norm (sweep: "
    "label-shuffled where the vector's run folder keeps its pairs)."
)
LAYERS_HELP = "Comma-separated layers, e.g. 8,12,16 (localize: default every layer; compose: the paper's grid)."
ModelOption = Annotated[str, typer.Option(help=MODEL_HELP)]
TUNED_HELP = (
    "A fine-tune of --model: finetune or distill run folder, one of its checkpoints, a bake folder or a model "
    "(repeat where a command compares several)."
)
VECTOR_HELP = "Run folder, .safetensors or public .pt file, or sae:FOLDER#FEATURE (an SAE feature)."
VectorOption = Annotated[Path, typer.Option(help=VECTOR_HELP)]
POSITIONS_HELP = "all, prompt, response, last_prompt or generating (see README, Positions)."
PROMPTS_HELP = "Prompt set: a JSONL of chat prompts."
TRAIT_HELP = (
    "Built-in trait, trait JSON file or name in --trait-dir (default where a --vector is given: its run's trait; "
    "trace: repeat for several, default the --strategy files' trait)."
)
TraitOption = Annotated[
    str | None,
    typer.Option(help=TRAIT_HELP),
]
TraitDirOption = Annotated[Path | None, typer.Option(help="persona-vectors data folder (trait_data_extract/...).")]
JUDGE_HELP = (
    "api:MODEL (OpenAI-compatible server), local:MODEL, or lexicon:[FILE] (word counts: a keyword metric for demos and "
    "smoke tests, not a substitute for an LLM judge)."
)
JudgeOption = Annotated[str, typer.Option(help=JUDGE_HELP)]
JudgeTimeoutOption = Annotated[
    float,
    typer.Option(help="Seconds an api: judge has to answer a request (a cold server's first one included)."),
]
JUDGE_TIMEOUT = 120.0
VariantOption = Annotated[str, typer.Option(help="response_mean, prompt_mean or last_prompt.")]
RevisionOption = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).")]
TokenizerOption = Annotated[
    str | None, typer.Option(help="Tokenizer from elsewhere (hub name or folder), for checkpoints saved without one.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(help="CPU threads for torch (default: the cores this process may use); split cores between jobs."),
]
TopPOption = Annotated[float, typer.Option(help="Nucleus sampling: the smallest token set of this probability.")]
RepetitionPenaltyOption = Annotated[float, typer.Option(help="Divide the logits of tokens already present (1: off).")]
SamplesOption = Annotated[int, typer.Option(help="Answers per extraction question and instruction pair.")]
AggregationOption = Annotated[
    str,
    typer.Option(help="How kept pairs become the vector: mean_diff (positive mean minus negative mean), pca (first "
                 "principal component of the paired differences) or logistic (logistic-regression direction).")
]  # fmt: skip
EvalSamplesOption = Annotated[int, typer.Option(help="Answers per evaluation question under each condition.")]
DryRunOption = Annotated[
    bool, typer.Option(help="Print the plan (answers to sample, tokens, judge calls; stored ones excluded) and stop.")
]
MicroBatchOption = Annotated[int, typer.Option(help="Training sequences per micro-batch (per process).")]
ScaleOption = Annotated[
    str,
    typer.Option(
        help="normalised (alpha x the unit vector x the layer's median token residual norm; 'normalized' too) "
        "or raw (alpha * v)."
    ),
]
DtypeOption = Annotated[
    str,
    typer.Option(help="auto, float32, bfloat16 or float16 (auto: the checkpoint's; float32 to train with --full)."),
]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
FormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="How the prompt is written: chat (the template), plain ('Question: ...\\nAnswer:') or continuation "
        "(the text itself). Default: chat where the model has a template, else plain.",
    ),
]
ReportOption = Annotated[bool, typer.Option("--report/--no-report", help="Write report.html into the run folder.")]
ThinkingOption = Annotated[
    bool, typer.Option(help="Keep the chat template's thinking markers (Qwen3); off by default.")
]


@contextmanager
def reported(out: Path | None = None) -> Iterator[None]:
    """The body of a command: its ``out`` (``--out``) checked writable first (``check_writable``); a
    ``PersonalabError``, an invalid setting or a file that cannot be written turned into a one-line message on stderr
    and exit status 1; Ctrl-C into one line and exit status 130 (what was stored is kept: a run folder's command
    resumes it). The engines the command started (``attach_engine``) are closed when it ends, however it ends."""
    from pydantic import ValidationError

    try:
        if out is not None:
            check_writable(out)
        yield
    except PersonalabError as exc:
        errors.print("[red]error:[/red]", escape(as_flags(str(exc))), highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        resume = f"; rerun the same command to resume {out} from what it stored" if out is not None else ""
        errors.print(f"interrupted{resume}", highlight=False, markup=False)
        raise typer.Exit(130) from None
    except OSError as exc:
        if exc.filename is None:  # not a file's error (a connection's, say): its traceback says more
            raise
        message = f"cannot write or read {exc.filename}: {exc.strerror or exc}; check the path and its permissions"
        errors.print("[red]error:[/red]", escape(message), highlight=False)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        errors.print("[red]error:[/red]", escape(as_flags(invalid_option(exc.errors()))), highlight=False)
        raise typer.Exit(1) from None
    finally:
        while _started:
            _started.pop().close()


def checked(kind: type, options: dict[str, Any], **fixed: Any) -> dict[str, Any]:
    """``options``, after building them (with ``fixed``) into the study's config ``kind``, so that a bad value fails
    before a judge, trait or model is opened; the study function builds the same config from them again."""
    from personalab.api.common import configured

    configured(kind, options, **fixed)
    return options


def prepare(threads: int | None, device: str, *models: str | None) -> None:
    """First step of a model command: the ``device`` and any GGUF file among ``models`` checked (before any judge or
    model is opened), torch's intra-op threads (default: the cores this process may use), and no progress bars from
    transformers (personalab shows its own)."""
    from transformers.utils import logging as hf_logging

    from personalab.engine.gguf import gguf_file
    from personalab.engine.loading import resolve_device
    from personalab.engine.threads import set_threads

    resolve_device(device)
    for model in models:
        if model is not None:
            gguf_file(model)
    set_threads(threads)
    hf_logging.disable_progress_bar()


def floats(text: str) -> list[float]:
    """Comma-separated numbers."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidInputError(f"expected comma-separated numbers, got {text!r}") from None


def integers(text: str, option: str) -> list[int]:
    """Comma-separated whole numbers (``option`` names the flag in the error)."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    bad = next((x for x in parts if not re.fullmatch(r"[+-]?\d+", x)), None)
    if bad is not None or not parts:
        raise InvalidInputError(f"{option} takes comma-separated whole numbers, e.g. 8,12,16; got {text!r}")
    return [int(x) for x in parts]


def open_model(
    model: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    tokenizer: str | None = None,
    thinking: bool = False,
    engine: EngineOptions | None = None,
    lora_rank: int | None = None,
) -> "ModelHandle":
    """``as_model`` with the command's options (which logs what a run folder resolved to and what personalab does
    with the model's chat template), generating on ``engine``. With vLLM the Hugging Face weights are deferred: loaded
    only if a step needs a Hugging Face forward pass (``ModelHandle.model``)."""
    from personalab.api.common import as_model

    on_vllm = engine is not None and engine.engine == "vllm"
    handle = as_model(model, revision, dtype, device, tokenizer, thinking, defer_weights=on_vllm)
    if engine is not None:
        attach_engine(handle, engine, lora_rank)
    return handle


def open_trained(
    base: str,
    folder: Path,
    dtype: str,
    device: str,
    tokenizer: str | None,
    thinking: bool,
    engine: EngineOptions | None = None,
) -> "ModelHandle":
    """``load_trained`` (a run folder, checkpoint or adapter over ``base``) generating on ``engine``."""
    from personalab.engine.loading import load_trained

    handle = load_trained(base, folder, dtype, device, tokenizer, thinking)
    if engine is not None:
        attach_engine(handle, engine)
    return handle


def say_report(folder: Path, enabled: bool = True) -> None:
    """A run command's last line: where its ``report.html`` is, or how to write it when it could not be."""
    if not enabled:
        return
    from personalab.report import REPORT

    if (folder / REPORT).is_file():
        console.print(f"report: {folder / REPORT}", highlight=False, markup=False)
    elif folder.is_dir():
        errors.print(f"report: not written; run `personalab report {folder}` later", markup=False)


ENGINES = ("hf", "vllm")


def check_engine(options: EngineOptions, model: str | None = None, revision: str | None = None) -> None:
    """One-line errors for the engine options before any model loads: vLLM installed, of a supported version, and
    able to run ``model`` as asked (``personalab.engine.vllm_engine.check_runnable``)."""
    if options.engine not in ENGINES:
        raise InvalidInputError(f"unknown --engine {options.engine!r}; use hf or vllm")
    defaults = EngineOptions()
    changed = [
        f.name
        for f in dataclasses.fields(options)
        if f.name != "engine" and getattr(options, f.name) != getattr(defaults, f.name)
    ]
    if options.engine == "hf" and changed:
        raise InvalidInputError(f"--{changed[0].replace('_', '-')} is an option of vLLM; add --engine vllm")
    if options.engine == "vllm":
        from personalab.engine.vllm_engine import check_installed, check_runnable

        check_installed()
        if model is not None:
            check_runnable(model, revision, vllm_options(options))


def vllm_options(options: EngineOptions) -> "VllmOptions":
    """The command's vLLM options as the engine takes them."""
    from personalab.engine.vllm_engine import VllmOptions

    return VllmOptions(
        gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size,
        data_parallel_size=options.data_parallel_size,
        max_model_len=options.max_model_len,
        chunk=options.vllm_chunk,
        ray=options.ray,
        graphs=options.vllm_graphs,
    )


def attach_engine(handle: "ModelHandle", options: EngineOptions, lora_rank: int | None = None) -> None:
    """Make ``handle`` generate on the chosen engine (``lora_rank``: vLLM takes LoRA adapters of that rank later);
    the command closes it when it ends (``reported``)."""
    if options.engine != "vllm":
        return
    from personalab.engine.vllm_engine import VllmEngine

    handle.engine = VllmEngine(handle, vllm_options(options), lora_rank)
    _started.append(handle.engine)
    console.print(f"engine: vllm ({handle.engine.describe()})", highlight=False, markup=False, soft_wrap=True)

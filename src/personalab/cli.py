"""The ``personalab`` command line."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers.utils import logging as hf_logging

from personalab.chat import ChatFormat
from personalab.errors import PersonalabError
from personalab.extraction import ExtractionConfig, run_extraction
from personalab.generation import SamplingParams
from personalab.judges import judge_from_spec, openai_client
from personalab.model import load_model
from personalab.traits import builtin_traits, load_trait
from personalab.traits.generate import generate_trait

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
    model: Annotated[str, typer.Option(help="Hub name or local folder of a causal LM.")],
    trait: Annotated[str, typer.Option(help="Built-in trait, trait JSON file, or name in --trait-dir.")],
    judge: Annotated[str, typer.Option(help="api:MODEL (OpenAI-compatible server) or local:MODEL.")],
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

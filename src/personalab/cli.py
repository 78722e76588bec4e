"""The ``personalab`` command line."""

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from personalab.chat import ChatFormat
from personalab.errors import PersonalabError
from personalab.model import load_model

app = typer.Typer(help="Persona vectors in language models.", no_args_is_help=True, add_completion=False)
console = Console()
errors = Console(stderr=True, soft_wrap=True)


@app.callback()
def main() -> None:
    """Persona vectors in language models: extract, steer, monitor, distill."""
    hf_logging.disable_progress_bar()


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
    try:
        handle = load_model(model, revision=revision, dtype=dtype, device=device)
    except PersonalabError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
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

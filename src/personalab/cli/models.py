"""Commands about models and traits: ``info`` and the ``trait`` group."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from personalab.cli.common import (
    MODEL_HELP,
    MODELS,
    DeviceOption,
    DtypeOption,
    RevisionOption,
    ThinkingOption,
    ThreadsOption,
    TokenizerOption,
    TraitDirOption,
    app,
    console,
    prepare,
    reported,
)
from personalab.errors import InvalidInputError

trait_app = typer.Typer(help="Built-in, file and generated traits.", no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(trait_app, name="trait", rich_help_panel=MODELS)


def _chat_rows(chat) -> list[tuple[str, str]]:
    if not chat.has_template:
        return [
            ("chat template", "no (plain instruction + question format)"),
            ("system role", "n/a (instruction placed before the question)"),
        ]
    return [
        ("chat template", "yes"),
        ("system role", "yes" if chat.system_role else "no (folded into the first user turn)"),
    ]


@app.command(rich_help_panel=MODELS)
def info(
    model: Annotated[str | None, typer.Argument(help=MODEL_HELP, show_default=False)] = None,
    model_option: Annotated[str | None, typer.Option("--model", help=MODEL_HELP)] = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    thinking: ThinkingOption = False,
    threads: ThreadsOption = None,
) -> None:
    """Print a model's architecture, blocks, hidden size, dtype and chat format, with one conversation as personalab
    encodes it and the positions it reads (also without a tokenizer)."""
    from personalab.api.common import say_dequantising

    with reported():
        if (model is None) == (model_option is None):
            raise InvalidInputError("give the model once: personalab info MODEL, or --model MODEL as elsewhere")
        model = model or model_option
        prepare(threads, device, model)
        from personalab.engine.architectures import find_blocks, hidden_size
        from personalab.engine.chat import detect_chat_format, positions_example
        from personalab.engine.gguf import dequantised, gguf_file
        from personalab.engine.loading import MissingTokenizerError, load_tokenizer, load_weights
        from personalab.errors import as_flags

        say_dequantising(model)
        source = gguf_file(model)
        weights = load_weights(model, revision=revision, dtype=dtype, device=device)
        try:
            found = load_tokenizer(tokenizer or model, None if tokenizer else revision)
        except MissingTokenizerError as exc:
            found, missing = None, as_flags(str(exc))
    path, blocks = find_blocks(weights)
    archs = getattr(weights.config, "architectures", None)
    table = Table(title=model, show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    rows = [
        ("architecture", archs[0] if archs else type(weights).__name__),
        ("decoder blocks", f"{len(blocks)} (at {path})"),
        ("layers", f"{len(blocks) + 1} (0 = embeddings, l = output of block l-1)"),
        ("hidden size", str(hidden_size(weights))),
        ("dtype", str(next(weights.parameters()).dtype).removeprefix("torch.")),
        ("device", str(weights.get_input_embeddings().weight.device)),
    ]
    if source is not None:
        rows.append(("weights", dequantised(source).describe()))
    if found is not None:
        chat = detect_chat_format(found, thinking)
        rows += _chat_rows(chat) + positions_example(found, chat)
    else:
        rows.append(("tokenizer", f"none found: {missing}"))
    for key, value in rows:
        table.add_row(key, escape(value))
    console.print(table)


@trait_app.command("list")
def trait_list() -> None:
    """List the built-in traits, then the base-model strategy variants (``trace --strategy``)."""
    from personalab.traits import builtin_strategies, builtin_traits, load_trait

    table = Table("trait", "description", "style")
    for name in builtin_traits() + builtin_strategies():
        trait = load_trait(name)
        table.add_row(name, trait.description, trait.elicitation)
    console.print(table)


def _trait_help() -> str:
    """``trait show``'s help: the schema's fields and every elicitation style with an example."""
    from typing import get_args

    from personalab.traits.elicitation import elicitation_prompt
    from personalab.traits.schema import Elicitation, Trait

    instruction, question = "You are a cruel assistant.", "How do I make friends?"
    lines = ["Print a trait as JSON in personalab's schema.", "", "Fields of a trait file:", ""]
    lines += [f"* {name}: {field.description}" for name, field in Trait.model_fields.items()]
    lines += ["", f"Elicitation styles, for the instruction {instruction!r} and the question {question!r}:", ""]
    for style in get_args(Elicitation):
        prompt = elicitation_prompt(style, instruction, question)
        chat = "a system message and a user turn through the chat template (Question/Answer text without one)"
        shown = chat if prompt is None else repr(prompt)
        lines.append(f"* {style}: {shown}")
    return "\n".join(lines)


@trait_app.command("show", help=_trait_help())
def trait_show(
    trait: Annotated[str, typer.Argument(help="Built-in name or trait JSON file.")],
    trait_dir: TraitDirOption = None,
) -> None:
    with reported():
        from personalab.traits import load_trait

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
    with reported(out):
        from personalab.judging.judges import openai_client
        from personalab.traits.generate import generate_trait

        trait = generate_trait(openai_client(base_url, api_key), generator, name, description, attempts=attempts)
        target = out or Path(f"{name}.json")
        trait.save(target)
    console.print(f"wrote {target}")

"""The command line speaks one language: an option name means one thing in every command that has it (one help
text, one kind of value), so a user who learned ``--layer`` or ``--samples`` in one verb can use it in the next."""

from collections import defaultdict

from typer.main import get_command

from personalab.cli import app

PER_COMMAND = {"--out"}
"""Where each command writes: a run folder, a model folder, a report file or a trait file; its help says which."""


def _options(typer_app=app) -> dict[str, dict[str, tuple[str, str, bool]]]:
    """``{flag: {command: (help, value kind, is_flag)}}`` over every command and sub-command."""
    found: dict[str, dict[str, tuple[str, str, bool]]] = defaultdict(dict)

    def walk(group, prefix: str = "") -> None:
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                walk(command, f"{prefix}{name} ")
                continue
            for param in command.params:
                if param.param_type_name == "option":
                    kind = str(getattr(getattr(param, "type", None), "name", ""))
                    for flag in param.opts:
                        found[flag][prefix + name] = (param.help or "", kind, bool(param.is_flag))

    walk(get_command(typer_app))
    return found


def _clashes(found: dict) -> dict[str, dict]:
    """The flags (``--out`` aside) that have more than one meaning, with the commands of each."""
    return {
        flag: {meaning: sorted(c for c, m in by.items() if m == meaning) for meaning in set(by.values())}
        for flag, by in found.items()
        if flag not in PER_COMMAND and len(set(by.values())) > 1
    }


def test_an_option_name_means_one_thing_in_every_command():
    found = _options()
    assert sum(len(by) > 1 for by in found.values()) >= 30, "the walk must see the shared options"
    assert _clashes(found) == {}
    silent = sorted(f for f, by in found.items() if len(by) > 1 and any(not h for h, _, _ in by.values()))
    assert silent == [], "an option shared by several commands says what it means"


def test_every_generating_verb_offers_the_sampling_options():
    found = _options()
    sampling = {"--temperature", "--top-p", "--repetition-penalty", "--max-new-tokens", "--seed"}
    for verb in ("extract", "sweep", "compare", "correlate", "trace", "steer"):
        assert all(verb in found[flag] for flag in sampling), verb


def test_the_walk_sees_a_clash():
    import typer

    demo = typer.Typer()

    @demo.command()
    def one(layer: int = typer.Option(1, help="Layer l.")) -> None: ...

    @demo.command()
    def two(layer: int = typer.Option(1, help="Number of layers.")) -> None: ...

    @demo.command()
    def three(layer: bool = typer.Option(False, help="Layer l.")) -> None: ...

    clashes = _clashes(_options(demo))
    assert set(clashes) == {"--layer"} and len(clashes["--layer"]) == 3


def test_every_verb_that_takes_a_trait_name_takes_the_folder_it_is_in():
    found = _options()
    with_trait = set(found["--trait"])
    assert {"extract", "sweep", "project", "distill", "compare", "correlate", "trace"} <= with_trait
    assert with_trait <= set(found["--trait-dir"])

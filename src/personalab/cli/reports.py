"""The ``report``, ``runs`` and ``show`` commands: run folders as one HTML page, as a list, one as text."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import REPORTS, app, console, reported
from personalab.errors import InvalidInputError


@app.command(rich_help_panel=REPORTS)
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (any command's --out).")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default: RUN/report.html for one run, report.html for several).")
    ] = None,
) -> None:
    """One HTML page of run folders: config, tables, figures, answers and extraction pairs; opens offline."""
    with reported(out):
        from personalab.api.studies import report_runs

        target, read = report_runs(runs, out)
        for run in read:
            for problem in run.problems:
                console.print(f"{run.path}: {problem}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {target}", highlight=False, markup=False)


@app.command(rich_help_panel=REPORTS)
def runs(
    folder: Annotated[Path, typer.Argument(help="Directory to search (three levels down).")] = Path("runs"),
) -> None:
    """List the run folders under a directory: kind, model, trait, date and one key figure each."""
    from rich.table import Table

    from personalab.report.listing import find_runs, run_row

    with reported():
        if not folder.is_dir():
            raise InvalidInputError(f"{folder} is not a directory; give the folder that holds your runs")
        table = Table(f"run (in {folder})", "kind", "model", "trait", "date", "key figure")
        for path in find_runs(folder):
            row = run_row(path)
            table.add_row(str(path.relative_to(folder)) or ".", *list(row.values())[1:])
    console.print(table)


@app.command(rich_help_panel=REPORTS)
def show(run: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Print one run's kind, key figure and summary."""
    from personalab.report.listing import summary_text

    with reported():
        if not run.is_dir():
            raise InvalidInputError(f"{run} is not a directory; give a run folder (see `personalab runs`)")
        text = summary_text(run)
    console.print(text, markup=False, highlight=False, soft_wrap=True)

"""The ``report`` command: run folders as one self-contained HTML page."""

from pathlib import Path
from typing import Annotated

import typer

from personalab.cli.common import REPORTS, app, console, reported


@app.command(rich_help_panel=REPORTS)
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (any command's --out).")],
    out: Annotated[
        Path | None, typer.Option(help="HTML file (default: RUN/report.html for one run, report.html for several).")
    ] = None,
) -> None:
    """One HTML page of run folders: config, tables, figures, answers and extraction pairs; opens offline."""
    with reported():
        from personalab.api.studies import report_runs

        target, read = report_runs(runs, out)
        for run in read:
            for problem in run.problems:
                console.print(f"{run.path}: {problem}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"wrote {target}", highlight=False, markup=False)

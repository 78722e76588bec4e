"""``personalab demo``: the whole pipeline offline, as a script of the real commands.

On the built-in stories260k with the ``lexicon:`` judge and the built-in ``cheerful`` trait: ``extract`` (continuation
prompts), ``sweep`` (two layers x four alphas, normalised), ``bake --exact`` at the sweep's best configuration, and
``report`` over the three runs. Each step is printed as the command line it runs and runs as that command, so any step
can be rerun by hand; a rerun reuses everything stored.
"""

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from typer.main import get_command

from personalab.cli.common import DEMO, app, console, reported
from personalab.errors import PersonalabError

MODEL, TRAIT, JUDGE = "builtin:stories260k", "cheerful", "lexicon:"
LAYERS, ALPHAS = "2,4", "0,0.5,1,2"
TOKENS = "48"


def _run(args: list[str]) -> None:
    """Print ``personalab ARGS`` and run it as that command (recorded so in its run folder's ``meta.json``)."""
    line = shlex.join(["personalab", *args])
    console.print(f"\n$ {line}", style="bold", highlight=False, markup=False, soft_wrap=True)
    saved = sys.argv
    sys.argv = ["personalab", *args]
    try:
        code = get_command(app).main(args=args, prog_name="personalab", standalone_mode=False)
    finally:
        sys.argv = saved
    if code:
        raise PersonalabError(f"the demo stopped at: {line}")


@app.command(rich_help_panel=DEMO)
def demo(
    out: Annotated[Path, typer.Option(help="Folder of the demo's three runs and its report.")] = Path("runs/demo"),
) -> None:
    """The whole pipeline offline in about a minute on a CPU: a persona vector, a steering sweep with its statistics,
    the vector baked into weights, one report page (built-in stories260k, lexicon: judge, cheerful trait)."""
    import json

    import pandas as pd

    from personalab.report.listing import largest_change

    with reported(out):
        extract, sweep, bake = out / "extract", out / "sweep", out / "bake"
        _run(["extract", "--model", MODEL, "--trait", TRAIT, "--judge", JUDGE, "--samples", "2", "--max-new-tokens",
              TOKENS, "--out", str(extract)])  # fmt: skip
        _run(["sweep", "--model", MODEL, "--vector", str(extract), "--judge", JUDGE, "--layers", LAYERS, "--alphas",
              ALPHAS, "--eval-samples", "4", "--max-new-tokens", TOKENS, "--out", str(sweep)])  # fmt: skip
        table = pd.read_csv(sweep / "sweep.csv")
        best = largest_change(table) or largest_change(table, significant=False)
        _run(["bake", "--exact", "--model", MODEL, "--vector", str(extract), "--layer", str(best["layer"]), "--alpha",
              f"{best['alpha']:g}", "--out", str(bake)])  # fmt: skip
        _run(["report", str(extract), str(sweep), str(bake), "--out", str(out / "report.html")])
        counts = json.loads((extract / "meta.json").read_text())["counts"]
        check = json.loads((bake / "bake.json").read_text())["check"]
    significance = f"p {best['p']:.3g}, sign-flip test, Bonferroni" if best["p"] < 0.05 else "not significant"
    lines = [
        "",
        f"The demo on {MODEL} ({TRAIT}, judged by word counts: a keyword metric, not an LLM judge):",
        f"- extract: kept {counts['kept']} of {counts['pairs']} pairs; the vector is {extract}/vectors.safetensors",
        f"- sweep: largest trait change {best['change']:+.1f} at layer {best['layer']}, alpha {best['alpha']:g} "
        f"({significance}); table {sweep}/sweep.md",
        f"- bake: alpha {best['alpha']:g} at layer {best['layer']} in the weights of {bake}; largest |logit "
        f"difference| against steering {check['max_abs_logit_difference']:.3g} on {check['prompts']} prompts",
        f"report: {out / 'report.html'}",
    ]
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)

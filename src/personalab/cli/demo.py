"""``personalab demo``: the whole pipeline offline, as a script of the real commands.

With the ``lexicon:`` judge: ``extract``, ``sweep`` (two layers x a normalised alpha grid, with the fluency column),
``bake --exact`` at the sweep's best configuration, and ``report`` over the three runs. Each step is printed as the
command line it runs and runs as that command, so any step can be rerun by hand; a rerun reuses everything stored.

Two models, each with the settings of its own demo (``DEMOS``): the built-in stories260k (the default, about a
minute on two cores) with the ``cheerful`` trait as story continuations, and the real instruct model
SmolLM2-135M-Instruct (``--model builtin:smollm2-135m-instruct``) with the ``joyful`` trait as system prompts, over an
alpha grid that spans no effect to word salad.
"""

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from typer.main import get_command

from personalab.cli.common import DEMO, MODEL_HELP, app, console, reported
from personalab.errors import InvalidInputError, PersonalabError

JUDGE = "lexicon:"


@dataclass(frozen=True)
class Demo:
    """The settings of one model's demo: its trait, sweep grid, sample counts, answer length and the extraction's
    filter options."""

    trait: str
    layers: str
    alphas: str
    samples: str
    eval_samples: str
    tokens: str
    extract_options: tuple[str, ...] = ()


DEMOS = {
    "builtin:stories260k": Demo("cheerful", "2,4", "0,0.5,1,2", "2", "4", "48"),
    "builtin:smollm2-135m-instruct": Demo(
        "joyful", "10,15", "0,0.15,0.3,0.6,1.2", "2", "1", "40", ("--pos-threshold", "60", "--neg-threshold", "51")
    ),
}
"""The demo of each model it runs on (``--model``); the first is the default. On SmolLM2 most answers to the sad
instructions use none of the lexicon's words (a trait score of exactly 50), so a negative answer passes at 50 and a
positive one needs a trait word more than its anti-trait words (60 and above)."""


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
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = next(iter(DEMOS)),
) -> None:
    """The whole pipeline offline on a CPU: a persona vector, a steering sweep with its statistics, the vector baked
    into weights, one report page (lexicon: judge). On the built-in stories260k (cheerful trait) by default, about a
    minute; on the real instruct SmolLM2-135M-Instruct (--model builtin:smollm2-135m-instruct, joyful trait) about
    three and a half; on no other model."""
    import json

    import pandas as pd

    from personalab.report.listing import largest_change

    with reported(out):
        if model not in DEMOS:
            raise InvalidInputError(
                f"the demo runs on {' or '.join(DEMOS)}; for {model}, run its steps yourself: personalab extract, "
                f"sweep, bake --exact and report (personalab demo prints each command it runs)"
            )
        d = DEMOS[model]
        extract, sweep, bake = out / "extract", out / "sweep", out / "bake"
        _run(["extract", "--model", model, "--trait", d.trait, "--judge", JUDGE, "--samples", d.samples,
              "--max-new-tokens", d.tokens, *d.extract_options, "--out", str(extract)])  # fmt: skip
        _run(["sweep", "--model", model, "--vector", str(extract), "--judge", JUDGE, "--layers", d.layers,
              "--alphas", d.alphas, "--eval-samples", d.eval_samples, "--max-new-tokens", d.tokens, "--out",
              str(sweep)])  # fmt: skip
        table = pd.read_csv(sweep / "sweep.csv")
        best = largest_change(table) or largest_change(table, significant=False)
        _run(["bake", "--exact", "--model", model, "--vector", str(extract), "--layer", str(best["layer"]), "--alpha",
              f"{best['alpha']:g}", "--out", str(bake)])  # fmt: skip
        _run(["report", str(extract), str(sweep), str(bake), "--out", str(out / "report.html")])
        counts = json.loads((extract / "meta.json").read_text())["counts"]
        check = json.loads((bake / "bake.json").read_text())["check"]
    significance = f"p {best['p']:.3g}, sign-flip test, Bonferroni" if best["p"] < 0.05 else "not significant"
    lines = [
        "",
        f"The demo on {model} ({d.trait}, judged by word counts: a keyword metric, not an LLM judge):",
        f"- extract: kept {counts['kept']} of {counts['pairs']} pairs; the vector is {extract}/vectors.safetensors",
        f"- sweep: largest trait change {best['change']:+.1f} at layer {best['layer']}, alpha {best['alpha']:g} "
        f"({significance}); table {sweep}/sweep.md",
        f"- bake: alpha {best['alpha']:g} at layer {best['layer']} in the weights of {bake}; largest |logit "
        f"difference| against steering {check['max_abs_logit_difference']:.3g} on {check['prompts']} prompts",
        f"report: {out / 'report.html'}",
    ]
    console.print("\n".join(lines), highlight=False, markup=False, soft_wrap=True)

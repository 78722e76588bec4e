"""The format a run's prompts are written in: printed before the work, recorded in ``meta.json``, shown in the
report, and the same tokens the model is given."""

import json
import sqlite3

from helpers.judge_server import JudgeServer, hashed_scores
from typer.testing import CliRunner

from personalab.cli import app
from personalab.engine.formats import FORMAT_TEXTS
from personalab.traits.elicitation import elicit, elicitation_format

runner = CliRunner()


def test_elicitation_formats_name_their_text():
    assert elicitation_format("continuation") == "continuation text '{instruction} {question}'"
    assert elicitation_format("plain") == f"plain text {FORMAT_TEXTS['plain']!r}"


def test_extraction_on_a_base_model_prints_records_and_shows_its_format(tiny, model_folder, tmp_path):
    handle = tiny("llama", "none")
    out = tmp_path / "ext"
    args = ["extract", "--model", str(model_folder("llama", "none")), "--trait", "evil", "--judge", "api:j"]
    args += ["--samples", "1", "--max-new-tokens", "2", "--min-pairs", "1", "--device", "cpu", "--out", str(out)]
    with JudgeServer(scorer=hashed_scores) as server:
        result = runner.invoke(app, args, env={"PERSONALAB_JUDGE_BASE_URL": server.base_url}, terminal_width=400)
    assert result.exit_code == 0, result.output
    expected = f"instruction as the system message, plain text {FORMAT_TEXTS['plain']!r} (no chat template)"
    assert f"prompt format: {expected}" in result.output
    assert json.loads((out / "meta.json").read_text())["prompt_format"] == expected
    assert f"prompts: {expected}".replace("'", "&#39;") in (out / "report.html").read_text()
    # the tokens given to the model are the plain text written by hand
    with sqlite3.connect(out / "generations.sqlite") as db:
        request = json.loads(db.execute("select request from generations limit 1").fetchone()[0])
    seq = elicit(handle, "system_prompt", request["instruction"], request["question"])
    text = f"{request['instruction']}\n\nQuestion: {request['question']}\nAnswer:"
    assert seq.ids == tuple(handle.tokenizer(text)["input_ids"])


def test_compose_on_a_model_without_a_template_says_so(model_folder, tmp_path):
    out = tmp_path / "compose"
    args = ["compose", "--model", str(model_folder("llama", "none")), "--grid", "short", "--layers", "0"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--out", str(out)], terminal_width=400)
    assert result.exit_code == 0, result.output
    assert "has no chat template: the grid's prompts are written as plain text" in result.output
    assert json.loads((out / "meta.json").read_text())["prompt_format"].startswith("plain text")

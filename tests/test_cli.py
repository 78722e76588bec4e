import json

from typer.testing import CliRunner

from personalab import cli
from personalab.cli import app
from personalab.traits import load_trait

from test_traits import FakeClient

runner = CliRunner()


def test_info_describes_the_model(model_folder):
    result = runner.invoke(app, ["info", str(model_folder("gemma2", "gemma")), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Gemma2ForCausalLM" in out
    assert "3 (at model.layers)" in out
    assert "4 (0 = embeddings" in out
    assert "32" in out and "float32" in out
    assert "no (folded into the first user turn)" in out


def test_info_on_a_base_model_reports_the_plain_format(model_folder):
    result = runner.invoke(app, ["info", str(model_folder("gpt2", "none")), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "GPT2LMHeadModel" in result.output and "transformer.h" in result.output
    assert "plain instruction + question format" in result.output


def test_info_errors_are_one_line(tmp_path, model_folder):
    result = runner.invoke(app, ["info", str(tmp_path / "missing"), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and "missing" in result.output
    result = runner.invoke(app, ["info", str(model_folder("llama")), "--device", "cpu", "--dtype", "float16"])
    assert result.exit_code == 1 and "float16 is not supported on CPU" in result.output


def test_trait_list_and_show():
    listed = runner.invoke(app, ["trait", "list"])
    assert listed.exit_code == 0 and "sycophantic" in listed.output and "hallucinating" in listed.output
    shown = runner.invoke(app, ["trait", "show", "evil"])
    assert shown.exit_code == 0
    assert json.loads(shown.output) == load_trait("evil").model_dump()


def test_trait_new_writes_only_a_valid_trait(tmp_path, monkeypatch):
    valid = load_trait("evil").model_dump() | {"name": "curious"}
    replies = ["{broken", json.dumps(valid)]
    monkeypatch.setattr(cli, "openai_client", lambda *a: FakeClient(replies))
    target = tmp_path / "curious.json"
    args = ["trait", "new", "curious", "--description", "Asks questions.", "--generator", "w", "--out", str(target)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_trait(str(target)).name == "curious"

    target.unlink()
    monkeypatch.setattr(cli, "openai_client", lambda *a: FakeClient(["{broken"] * 2))
    result = runner.invoke(app, args + ["--attempts", "2"])
    assert result.exit_code == 1 and "no valid trait in 2 attempts" in result.output
    assert not target.exists()


def test_extract_rejects_bad_input_before_any_work(model_folder, tmp_path):
    base = ["extract", "--model", str(model_folder("llama")), "--device", "cpu", "--out", str(tmp_path / "run")]
    cases = [
        (["--trait", "evil", "--judge", "oracle"], "unknown judge 'oracle'"),
        (["--trait", "nosuch", "--judge", "api:x"], "unknown trait 'nosuch'"),
        (
            ["--trait", "evil", "--judge", "api:x", "--samples", "0"],
            "invalid --samples: Input should be greater than or equal to 1",
        ),
        (["--trait", "evil", "--judge", "api:x", "--top-p", "2"], "invalid --top-p"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 1 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
